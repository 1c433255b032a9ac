"""``jaxdiff tune --method ld3 | gits``: learn a whole time grid, write a schedule file.

    jaxdiff tune --method ld3 --solver ddim --steps 4 --out outputs/ld3_ddim4.json
    jaxdiff tune --method gits --solver dpmsolver++ --steps 5 --out outputs/gits5.json

The teacher is jaxdiff's DPM-Solver++(2M) on ``--teacher-steps`` logSNR-uniform steps from
the same x_T (seeds disjoint from the ones ``benchmarks/time_grids.py`` evaluates on).
LD3 trains on ``--pairs`` teacher pairs with ``--valid`` held out for early stopping; GITS
runs its dynamic programme over ``--fine`` teacher points on ``--pairs`` trajectories.
Writes ``--out`` (the schedule file: ``solvers.make(..., schedule=out)``, ``pipe(...,
schedule=out)``) and ``<stem>.png`` (LD3: held-out RMSE per epoch; both: the grid in
logSNR against the starting / uniform grid).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

TRAIN_SEED = 10_000          # tuning seeds; the evaluation uses seeds below this
VALID_SEED = 20_000


def teacher_pairs(model_fn_for, ns, n: int, seed: int, steps: int, progress: bool = True):
    from tuning.digits import grid_pairs
    from tuning.teacher import solve_batches, teacher_solver

    x_T, labels = grid_pairs(n, seed)
    ref = solve_batches(model_fn_for, labels, x_T, teacher_solver(ns, steps), batch=250,
                        progress="teacher" if progress else None)
    return x_T, ref, labels


def best_zero_cost(model_fn_for, ns, solver: str, num_steps: int, pairs) -> str:
    """The zero-cost grid (jaxdiff.time_grids.GRIDS) with the least mean RMSE to the
    teacher on ``pairs`` = (x_T, teacher x_0, cond)."""
    from jaxdiff.time_grids import GRIDS, make_grid
    from tuning.measure import rmse
    from tuning.teacher import solve_batches, student_solver

    x_T, ref, cond = pairs

    def err(name):
        sol = student_solver(ns, solver, make_grid(name, ns, num_steps))
        return float(rmse(solve_batches(model_fn_for, cond, x_T, sol, batch=len(x_T)), ref).mean())
    return min(GRIDS, key=err)


def plot_grid(path, ns, t, start_t, history=None, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import jax.numpy as jnp
    import matplotlib.pyplot as plt

    lam = lambda x: np.asarray(ns.marginal_lambda(jnp.asarray(x, jnp.float32)))
    cols = 2 if history else 1
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(lam(start_t), "o--", label="start / uniform")
    ax.plot(lam(t), "s-", label="learned")
    ax.set_xlabel("grid point")
    ax.set_ylabel("logSNR")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    if history:
        ax = axes[0, 1]
        ax.plot(history["valid"], label="held-out RMSE")
        ax.plot(history["train"], label="train loss")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_main(args) -> int:
    import sys

    from jaxdiff.schedule_files import save_schedule
    from jaxdiff.zoo.digits.model import SCHEDULE, alphas_cumprod
    from tuning import gits, ld3
    from tuning.digits import grid_problem
    from tuning.teacher import check_teacher_steps
    from tuning.tuner import NonFiniteLossError

    def fail(msg, code=2):
        print(f"jaxdiff tune: {msg}", file=sys.stderr)
        return code

    try:
        check_teacher_steps(args.teacher_steps, args.steps)
    except ValueError as e:
        return fail(e)
    out = Path(args.out)
    png = out.with_suffix(".png")
    _, ns, model_fn_for = grid_problem(args.guidance_scale)
    family = args.solver
    progress = not args.no_progress
    t_begin = time.perf_counter()
    train = teacher_pairs(model_fn_for, ns, args.pairs, TRAIN_SEED + args.seed,
                          args.teacher_steps, progress)
    meta = dict(method=args.method, model=args.model, guidance_scale=args.guidance_scale,
                teacher=f"DPM-Solver++(2M), {args.teacher_steps} logSNR-uniform steps",
                pairs=args.pairs, seed=args.seed)
    if args.method == "ld3":
        valid = teacher_pairs(model_fn_for, ns, args.valid, VALID_SEED + args.seed,
                              args.teacher_steps, progress)
        init = args.init
        if init == "auto":
            init = best_zero_cost(model_fn_for, ns, family, args.steps, valid)
            print(f"LD3 starts from {init}, the zero-cost grid best on the held-out pairs")
        elif init == "gits":
            found = gits.learn(model_fn_for, ns, args.steps, train[0], train[2], fine=args.fine,
                               teacher_steps=args.teacher_steps)
            init = tuple(float(v) for v in found["t"])
            meta["gits_t"] = list(init)
            print("LD3 starts from GITS's free-start grid " + " ".join(f"{v:.4f}" for v in init))
        cfg = ld3.LD3Config(solver=family, init=init, lr=args.lr or 0.02,
                            epochs=args.epochs, batch=args.batch, seed=args.seed)
        try:
            res = ld3.learn(model_fn_for, ns, args.steps, train, valid, config=cfg,
                            checkpoint_dir=args.checkpoint_dir, progress=progress)
        except NonFiniteLossError as e:
            return fail(e, code=1)
        except ValueError as e:
            return fail(e)
        t, net, start, history = res.t, res.network_t, res.init_t, res.history
        meta.update(init=args.init if args.init == "gits" else init, valid=args.valid, epochs_run=res.epochs_run,
                    valid_rmse=res.valid_rmse, init_valid_rmse=res.init_valid_rmse)
        print(f"LD3 {family} K={args.steps}: held-out RMSE to the teacher "
              f"{res.init_valid_rmse:.4f} ({meta['init']}) -> {res.valid_rmse:.4f} in "
              f"{res.epochs_run} epochs")
    else:
        x_T, _, labels = train
        try:
            res = gits.learn(model_fn_for, ns, args.steps, x_T, labels, fine=args.fine,
                             teacher_steps=args.teacher_steps)
        except ValueError as e:
            return fail(e)
        from jaxdiff.time_grids import make_grid
        t, net, history = res["t"], None, None
        start = make_grid("time_uniform", ns, args.steps)
        meta.update(fine=args.fine, dp_cost=res["cost"])
        print(f"GITS K={args.steps}: summed DDIM step cost {res['cost']:.4f}")
    seconds = time.perf_counter() - t_begin
    meta["tune_seconds"] = round(seconds, 1)
    options = {"order": 2} if family == "dpmsolver++" else {}
    save_schedule(out, solver=family, t=t, network_t=net, alphas_cumprod=alphas_cumprod(SCHEDULE),
                  options=options, meta=meta)
    plot_grid(png, ns, t, start, history, title=f"{args.method} {family} K={args.steps}")
    print("t         " + " ".join(f"{v:.4f}" for v in t))
    if net is not None:
        print("network_t " + " ".join(f"{v:.4f}" for v in net))
    print(f"tuned in {seconds:.1f} s (teacher included); wrote {out}, {png}")
    solver_name = "ddim" if family == "ddim" else "dpm++"
    print(f"sample with: jaxdiff.solvers.make({solver_name!r}, config, {args.steps}, "
          f"schedule={str(out)!r}) or pipe(..., schedule={str(out)!r})")
    return 0


__all__ = ["best_zero_cost", "grid_main", "plot_grid", "teacher_pairs"]
