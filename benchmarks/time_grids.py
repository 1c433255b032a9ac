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
            res = gits.grid_from_costs(*gits_cache["costs"], k)
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
        f"real-vs-real floor {out['fd_floor']:.2f}). Tuning time includes the teacher pairs.",
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
