"""Learned vs zero-cost time grids on the digits model, measured so that a gain is visible.

For DDIM and DPM-Solver++(2M) at each NFE: every zero-cost grid (jaxdiff.time_grids), GITS
and LD3 (started from the zero-cost grid that is best on the LD3 held-out pairs), all from
the same ``--n-eval`` evaluation x_T (seeds disjoint from the tuning seeds), scored against
the teacher from those x_T (DPM-Solver++(2M), 500 logSNR-uniform steps; its own distance to a
1000-step solve is reported):
  * paired RMSE to the teacher per sample (mean, bootstrap 95% interval), PSNR;
  * the paired difference to the best zero-cost grid of that row (interval; < 0 = better);
  * FD between the samples' and the teacher's classifier features (discretisation error as
    a distribution distance), and FD-digits vs the real held-out digits with its floor.
x0 clipping is off (the digits config's clip_sample=True changes the ODE); the
``--clip`` row repeats the NFE-4 DDIM grids with clipping to show what it does.
Tuning time (teacher pairs included) is measured on this machine.

    python benchmarks/time_grids.py               # the table in RESULTS.md (~40 min on 2 cores)
    python benchmarks/time_grids.py --quick       # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import WORK, write_section  # noqa: E402

PNG = Path(__file__).resolve().parent / "time_grids.png"
ZERO_COST = ("time_uniform", "time_quadratic", "logsnr_uniform", "karras", "kl_optimal",
             "leading", "trailing", "ays_sd15")
NAMES = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++(2M)"}


def _teacher(model_fn_for, ns, x_T, labels, steps, tag):
    from tuning.teacher import solve_batches, teacher_solver

    WORK.mkdir(parents=True, exist_ok=True)
    cache = WORK / f"time_grids_teacher_{tag}_{len(x_T)}_{steps}.npz"
    if cache.exists():
        z = np.load(cache)
        if np.array_equal(z["x_T"], x_T):
            return z["ref"]
    ref = solve_batches(model_fn_for, labels, x_T, teacher_solver(ns, steps), batch=500,
                        progress=f"teacher {tag}")
    np.savez(cache, x_T=x_T, ref=ref)
    return ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    ap.add_argument("--solvers", nargs="+", default=["ddim", "dpmsolver++"])
    ap.add_argument("--teacher-steps", type=int, default=500)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--valid", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lr", type=float, default=0.02, help="LD3 Adam learning rate")
    ap.add_argument("--add", nargs="+", choices=["timetuner", "gits", "ld3"], default=None,
                    help="(re)compute these rows in the last full run's table at --nfe: "
                         "TimeTuner parallel and sequential (100 iterations per ratio, on its "
                         "leading grid); GITS with a free start (tuning.gits.learn's default; the "
                         "main rows start at T as the paper does); LD3 with --epochs "
                         "and --lr (a row of its own)")
    ap.add_argument("--ld3-init", choices=["best", "gits"], default="best",
                    help="--add ld3 starts from the best zero-cost grid (default) or from the "
                         "GITS free-start grid (its tuning time then includes GITS's)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_eval, args.nfe, args.teacher_steps = 200, [4], 200
        args.pairs, args.valid, args.epochs = 40, 20, 5

    import jax.numpy as jnp

    from jaxdiff.time_grids import make_grid
    from jaxdiff.zoo.digits import metrics
    from tuning import gits, ld3, measure
    from tuning.digits import grid_pairs, grid_problem
    from tuning.grid_cli import TRAIN_SEED, VALID_SEED, teacher_pairs
    from tuning.teacher import solve_batches, student_solver, teacher_gap, teacher_solver

    _, ns, model_fn_for = grid_problem(1.0)
    if args.add:
        return _add_rows(args, ns, model_fn_for)
    x_e, lab_e = grid_pairs(args.n_eval, 0)
    t0 = time.perf_counter()
    ref = _teacher(model_fn_for, ns, x_e, lab_e, args.teacher_steps, "eval")
    teacher_seconds = time.perf_counter() - t0
    gap = teacher_gap(model_fn_for, lab_e[:200], x_e[:200], ns, args.teacher_steps,
                      2 * args.teacher_steps, batch=200)
    print(f"teacher {args.teacher_steps} vs {2 * args.teacher_steps} steps on 200 seeds: "
          f"RMSE mean {gap['rmse_mean']:.2e}, max {gap['rmse_max']:.2e}", flush=True)
    to_unit = lambda x: np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
    f_ref = metrics.features(to_unit(ref))
    fd_floor = metrics.fd_floor(args.n_eval) if args.n_eval <= 1437 else metrics.fd_floor(None)
    fd_teacher_real = metrics.fd_digits(to_unit(ref))

    # tuning pairs, shared by every LD3 run (the teacher cost is counted once per run below)
    t0 = time.perf_counter()
    train = teacher_pairs(model_fn_for, ns, args.pairs, TRAIN_SEED, args.teacher_steps)
    valid = teacher_pairs(model_fn_for, ns, args.valid, VALID_SEED, args.teacher_steps)
    pair_seconds = time.perf_counter() - t0

    def evaluate(solver, t, net=None, clip=False):
        sol = student_solver(ns, solver, t, net)
        if clip:
            import dataclasses
            sol = dataclasses.replace(sol, clip_sample=True)
        x = solve_batches(model_fn_for, lab_e, x_e, sol, batch=500)
        err = measure.rmse(x, ref)
        return x, err

    def valid_rmse(solver, t):
        x = solve_batches(model_fn_for, valid[2], valid[0], student_solver(ns, solver, t),
                          batch=len(valid[0]))
        return float(measure.rmse(x, valid[1]).mean())

    rows, curves = [], {}
    gits_cache = {}
    for k in args.nfe:
        for solver in args.solvers:
            grids = {g: (make_grid(g, ns, k), None, 0.0) for g in ZERO_COST}
            if not gits_cache:       # one cost matrix (teacher trajectories) for every K
                t_start = time.perf_counter()
                gits_cache["costs"] = gits.fine_costs(model_fn_for, ns, train[0], train[2],
                                                      fine=100, teacher_steps=args.teacher_steps)
                gits_cache["seconds"] = time.perf_counter() - t_start
            res = gits.grid_from_costs(*gits_cache["costs"][:2], k)   # start at T, as GITS
            grids["GITS"] = (res["t"], None, gits_cache["seconds"])
            # LD3 starts from the zero-cost grid best on its own held-out pairs
            start = min(ZERO_COST, key=lambda g: valid_rmse(solver, grids[g][0]))
            res = ld3.learn(model_fn_for, ns, k, train, valid, config=ld3.LD3Config(
                solver=solver, init=start, epochs=args.epochs, batch=25), progress=True)
            grids[f"LD3 (from {start})"] = (res.t, res.network_t, res.seconds + pair_seconds)
            errs = {}
            for name, (t, net, secs) in grids.items():
                x, err = evaluate(solver, t, net)
                errs[name] = err
                f = metrics.features(to_unit(x))
                rows.append(dict(solver=solver, nfe=k, grid=name, tune_seconds=secs,
                                 rmse=measure.bootstrap_mean(err),
                                 psnr=float(measure.psnr(x, ref).mean()),
                                 fd_teacher=metrics.frechet_distance(f, f_ref),
                                 fd_real=metrics.fd_digits(to_unit(x))))
            best = min(ZERO_COST, key=lambda g: errs[g].mean())
            for r in rows:
                if r["solver"] == solver and r["nfe"] == k:
                    r["best_zero_cost"] = best
                    r["vs_best"] = measure.paired_difference(errs[r["grid"]], errs[best])
                    r["rel_vs_best"] = float(errs[r["grid"]].mean() / errs[best].mean() - 1)
            curves.setdefault(solver, {})
            for name in (best, "GITS", f"LD3 (from {start})"):
                key = "LD3" if name.startswith("LD3") else ("best zero-cost" if name == best
                                                           else name)
                curves[solver].setdefault(key, []).append((k, float(errs[name].mean())))
            print(f"{solver} NFE {k}: best zero-cost {best} {errs[best].mean():.4f}, GITS "
                  f"{errs['GITS'].mean():.4f}, LD3 {errs[f'LD3 (from {start})'].mean():.4f}",
                  flush=True)
    # clipping: what clip_sample=True does to the DDIM NFE-4 grids
    clip_rows = []
    if "ddim" in args.solvers and 4 in args.nfe:
        for name in ("time_uniform", "trailing"):
            _, err = evaluate("ddim", make_grid(name, ns, 4), clip=True)
            clip_rows.append((name, float(err.mean())))

    out = dict(n_eval=args.n_eval, teacher_steps=args.teacher_steps, teacher_gap=gap,
               teacher_seconds=teacher_seconds, fd_floor=fd_floor,
               fd_teacher_real=fd_teacher_real, rows=rows, clip=clip_rows)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "time_grids.json").write_text(json.dumps(out, indent=1, default=float))
    _plot(curves)
    if not args.no_write and not args.quick:
        write_section("Learned time grids (digits)", _table(out))
    print(_table(out))
    return 0


def _add_rows(args, ns, model_fn_for) -> int:
    """TimeTuner / GITS rows for the last full run's table (same evaluation seeds, teacher
    and tuning pairs)."""
    import jax

    from jaxdiff.time_grids import make_grid
    from jaxdiff.zoo.digits import data, metrics
    from tuning import measure
    from tuning.cli import RandomBatches
    from tuning.digits import build_tuner, grid_pairs
    from tuning.teacher import solve_batches, student_solver

    path = WORK / "time_grids.json"
    out = json.loads(path.read_text())
    x_e, lab_e = grid_pairs(out["n_eval"], 0)
    ref = _teacher(model_fn_for, ns, x_e, lab_e, out["teacher_steps"], "eval")
    f_ref = metrics.features(np.clip((ref + 1) / 2, 0, 1))
    from tuning import gits
    from tuning.grid_cli import TRAIN_SEED, VALID_SEED, teacher_pairs

    train = data.load("train")
    tuner = build_tuner()
    ld3_name = f"LD3 {args.epochs} epochs, lr {args.lr:g}"
    if args.ld3_init == "gits":
        ld3_name += ", from GITS free start"
    redo = tuple({"timetuner": "TimeTuner", "gits": "GITS, free start", "ld3": ld3_name}[a]
                 for a in args.add)
    rows = [r for r in out["rows"] if not r["grid"].startswith(redo)]
    if "ld3" in args.add:
        from tuning import ld3
        t0 = time.perf_counter()
        tr = teacher_pairs(model_fn_for, ns, args.pairs, TRAIN_SEED, out["teacher_steps"])
        va = teacher_pairs(model_fn_for, ns, args.valid, VALID_SEED, out["teacher_steps"])
        pair_seconds = time.perf_counter() - t0
    if "gits" in args.add or args.ld3_init == "gits":
        t0 = time.perf_counter()
        pairs = teacher_pairs(model_fn_for, ns, args.pairs, TRAIN_SEED, out["teacher_steps"])
        costs = gits.fine_costs(model_fn_for, ns, pairs[0], pairs[2], fine=100,
                                teacher_steps=out["teacher_steps"])
        gits_seconds = time.perf_counter() - t0
    for k in args.nfe:
        for solver in args.solvers:
            mine = [r for r in rows if r["solver"] == solver and r["nfe"] == k]
            if not mine:
                continue
            best = mine[0]["best_zero_cost"]
            run = lambda t, net: solve_batches(model_fn_for, lab_e, x_e,
                                               student_solver(ns, solver, t, net), batch=500)
            err_best = measure.rmse(run(make_grid(best, ns, k), None), ref)
            runs = []
            if "gits" in args.add:
                runs.append(("GITS, free start", gits.grid_from_costs(costs[0], costs[1], k, costs[2])["t"], None,
                             gits_seconds))
            if "ld3" in args.add:
                if args.ld3_init == "gits":
                    start = tuple(gits.grid_from_costs(costs[0], costs[1], k, costs[2])["t"])
                    name, extra = ld3_name, gits_seconds
                else:
                    start = [r for r in mine if r["grid"].startswith("LD3 (from")][0]["grid"]
                    start = start[len("LD3 (from "):-1]
                    name, extra = f"{ld3_name} (from {start})", 0.0
                res = ld3.learn(model_fn_for, ns, k, tr, va, config=ld3.LD3Config(
                    solver=solver, init=start, epochs=args.epochs, lr=args.lr, batch=25,
                    patience=max(8, args.epochs // 5)))
                runs.append((name, res.t, res.network_t, res.seconds + pair_seconds + extra))
            t = make_grid("leading", ns, k)          # TimeTuner's reference grid
            for tune_type in (("parallel", "sequential") if "timetuner" in args.add else ()):
                batches = RandomBatches(train.images, train.labels, 16, 40, 0)
                t0 = time.perf_counter()
                ratios, _ = tuner.optimize_timesteps(batches, k, tune_type=tune_type,
                                                     lr=2e-3, total_iters=100,
                                                     key=jax.random.key(0), solver=solver)
                runs.append((f"TimeTuner {tune_type} (leading)", t,
                             np.asarray(ratios, np.float64) * t[:-1], time.perf_counter() - t0))
            for name, tt, net, secs in runs:
                x = run(tt, net)
                err = measure.rmse(x, ref)
                f = metrics.features(np.clip((x + 1) / 2, 0, 1))
                rows.append(dict(solver=solver, nfe=k, grid=name,
                                 tune_seconds=secs, rmse=measure.bootstrap_mean(err),
                                 psnr=float(measure.psnr(x, ref).mean()),
                                 fd_teacher=metrics.frechet_distance(f, f_ref),
                                 fd_real=metrics.fd_digits(np.clip((x + 1) / 2, 0, 1)),
                                 best_zero_cost=best,
                                 vs_best=measure.paired_difference(err, err_best),
                                 rel_vs_best=float(err.mean() / err_best.mean() - 1)))
                print(f"{name} {solver} NFE {k}: {err.mean():.4f} "
                      f"(best zero-cost {best} {err_best.mean():.4f}) in {secs:.0f} s", flush=True)
    order = {(r["solver"], r["nfe"]): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: order[(r["solver"], r["nfe"])])
    out["rows"] = rows
    path.write_text(json.dumps(out, indent=1, default=float))
    if not args.no_write:
        write_section("Learned time grids (digits)", _table(out))
    print(_table(out))
    return 0


def _fmt_ci(m):
    return f"{m[0]:.4f} [{m[1]:.4f}, {m[2]:.4f}]"


def _table(out) -> str:
    lines = [
        f"Digits model (guidance 1), {out['n_eval']} evaluation seeds disjoint from the tuning "
        f"seeds; teacher = DPM-Solver++(2M) on {out['teacher_steps']} logSNR-uniform steps from "
        f"the same x_T (its RMSE to a {out['teacher_gap']['check_steps']}-step solve: mean "
        f"{out['teacher_gap']['rmse_mean']:.1e}, max {out['teacher_gap']['rmse_max']:.1e}). "
        f"x0 clipping off. RMSE: per-sample RMSE to the teacher in [-1, 1] units, mean and "
        f"bootstrap 95% interval; 'vs best' = paired mean difference to the best zero-cost "
        f"grid of the same solver and NFE (interval; negative = better). FD-teacher: Frechet "
        f"distance between classifier features of the samples and of the teacher's samples. "
        f"FD-real: FD-digits vs the held-out real digits (teacher {out['fd_teacher_real']:.2f}, "
        f"real-vs-real floor {out['fd_floor']:.2f}). GITS: DDIM step costs between the "
        f"points of a 100-step fine teacher grid on the 100 tuning trajectories, shortest "
        f"K-step path starting at T (as the paper); 'GITS, free start' may start lower, "
        f"priced by |x_T - x_t|. LD3: 100 tuning pairs, 50 held out for early stopping, "
        f"started from the zero-cost grid best on the held-out pairs, 30 epochs at lr 0.02 "
        f"unless the row says otherwise. TimeTuner: 100 iterations per ratio on its leading "
        f"grid (digits training images). Tuning time includes the teacher pairs (LD3) or "
        f"trajectories (GITS).",
        "",
        "| solver | NFE | grid | RMSE to teacher [95% CI] | vs best zero-cost [95% CI] | rel. | "
        "PSNR dB | FD-teacher | FD-real | tuning s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        vs = r["vs_best"]
        lines.append(f"| {NAMES[r['solver']]} | {r['nfe']} | {r['grid']}"
                     f"{' (best zero-cost)' if r['grid'] == r['best_zero_cost'] else ''} | "
                     f"{_fmt_ci(r['rmse'])} | {vs[0]:+.4f} [{vs[1]:+.4f}, {vs[2]:+.4f}] | "
                     f"{100 * r['rel_vs_best']:+.0f}% | {r['psnr']:.1f} | {r['fd_teacher']:.2f} | "
                     f"{r['fd_real']:.2f} | {r['tune_seconds']:.0f} |")
    if out["clip"]:
        lines += ["", "With x0 clipping (the digits config's clip_sample=True), DDIM NFE 4: "
                  + ", ".join(f"{n} RMSE {e:.4f}" for n, e in out["clip"])
                  + " (clipping changes the ODE: the teacher is unclipped)."]
    lines += ["", "![RMSE to the teacher vs NFE](time_grids.png)"]
    return "\n".join(lines)


def _plot(curves) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.4), squeeze=False)
    for ax, (solver, c) in zip(axes[0], curves.items()):
        for name, pts in c.items():
            ks, es = zip(*pts)
            ax.plot(ks, es, "o-", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE to teacher")
        ax.set_title(NAMES[solver], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
