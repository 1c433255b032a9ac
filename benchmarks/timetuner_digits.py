"""TimeTuner on the embedded digits model (issue 6): few-step samplers before and after tuning.

For each (solver, steps, tune type): tune the ratios on the digits training split (labels as
the condition, TimeTuner's grid), then draw ``--per-class`` samples of every digit from the
same x_T with plain and with tuned ratios and score both (classifier accuracy, FD-digits vs
the held-out digits, and FD minus the real-vs-real floor at the same n). Tuning wall time
is measured on this machine; the loss curves and learned ratios go to
``benchmarks/timetuner_curves.png``.

    python benchmarks/timetuner_digits.py                 # the table in RESULTS.md
    python benchmarks/timetuner_digits.py --quick         # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402

RUNS = [("ddim", 10, "parallel"), ("ddim", 10, "sequential"),
        ("ddim", 5, "parallel"), ("ddim", 5, "sequential"),
        ("ddim", 20, "parallel"), ("ddim", 20, "sequential"),
        ("dpmsolver++", 10, "parallel"), ("dpmsolver++", 10, "sequential")]
NAMES = {"ddim": "DDIM (eta 0)", "dpmsolver++": "DPM-Solver++ (2M)"}
CURVES = Path(__file__).resolve().parent / "timetuner_curves.png"


def _training_batches(batch: int, count: int, seed: int):
    import numpy as np

    from jaxdiff.zoo.digits import data

    train = data.load("train")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(train.labels), batch, replace=False) for _ in range(count)]
    return [(train.images[i], train.labels[i]) for i in picks]


def _plot(curves, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, len(curves), figsize=(3.6 * len(curves), 6.4), squeeze=False)
    for col, (title, log, ratios) in enumerate(curves):
        loss = np.asarray(log["loss"])            # [K-1, iters]
        ax = axes[0, col]
        for i, row in enumerate(loss):
            ax.plot(row, lw=0.8, label=f"step {i}")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        if col == 0:
            ax.set_ylabel("tuning loss")
        ax = axes[1, col]
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.plot(np.arange(len(ratios)), ratios, "o-", ms=3)
        ax.set_xlabel("step index")
        if col == 0:
            ax.set_ylabel("learned ratio r_i")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.zoo.digits import metrics
    from tuning.digits import build_tuner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=100, help="tuning iterations per ratio")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--per-class", type=int, default=50, help="evaluation samples per digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 runs, 5 iterations")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    a = p.parse_args(argv)
    runs = RUNS
    if a.quick:
        runs = [("ddim", 5, "parallel"), ("dpmsolver++", 5, "sequential")]
        a.iters, a.per_class = 5, 5

    tuner = build_tuner()
    batches = _training_batches(a.batch, 40, a.seed)
    labels = np.repeat(np.arange(10), a.per_class)
    n = len(labels)
    x_T = jax.random.normal(jax.random.key(a.seed + 1), (n, 16, 16, 1))
    floor = metrics.fd_floor(n)

    def quality(solver, k, ratios):
        x = tuner.sample(x_T, k, t_ratios=ratios, solver=solver,
                         condition=jnp.asarray(labels))
        images = np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
        fd = metrics.fd_digits(images)
        return {"accuracy": metrics.accuracy(images, labels), "fd": fd, "excess": fd - floor}

    rows, curves, plain = [], [], {}
    for solver, k, tune_type in runs:
        if (solver, k) not in plain:
            plain[(solver, k)] = quality(solver, k, None)
        t0 = time.perf_counter()
        ratios, log = tuner.optimize_timesteps(batches, k, tune_type=tune_type, lr=a.lr,
                                               total_iters=a.iters, solver=solver,
                                               key=jax.random.key(a.seed))
        seconds = time.perf_counter() - t0
        after = quality(solver, k, ratios)
        before = plain[(solver, k)]
        row = {"solver": solver, "steps": k, "tune_type": tune_type, "seconds": seconds,
               "before": before, "after": after, "ratios": [round(float(r), 4) for r in ratios],
               "loss_first": float(np.nanmean(log["loss"][:, :5])),
               "loss_last": float(np.nanmean(log["loss"][:, -5:]))}
        rows.append(row)
        curves.append((f"{NAMES[solver]}-{k}, {tune_type}", log, ratios))
        print(json.dumps(row), flush=True)
    _plot(curves, CURVES)

    body = [f"TimeTuner (tuning/, Xia et al. 2024) on the digits model: ratios tuned on the "
            f"training split ({len(batches)} batches of {a.batch} cycled, labels as the "
            f"condition), Adam lr {a.lr}, **{a.iters} iterations per ratio** ('sequential' "
            f"trains the K-1 ratios one after the other, so it runs (K-1) x {a.iters} "
            f"steps; 'parallel' runs {a.iters} steps that update all ratios at once). "
            f"TimeTuner's grid (DDIM 'leading' spacing, offset 1, ending at t = 1/N), no "
            f"x0 clipping, guidance scale 1. Evaluation: {n} samples ({a.per_class} per "
            f"digit) from the same x_T before and after; FD-digits against the 360 held-out "
            f"digits, whose real-vs-real floor at n={n} is **{floor:.1f}**; *excess* = FD - "
            f"floor. Tuning time: wall clock on this 2-core CPU, compilation included.",
            "",
            "| solver | steps | tune type | tune time | loss first -> last | accuracy before "
            "-> after | FD-digits before -> after | excess FD before -> after | change of "
            "excess |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, f = r["before"], r["after"]
        change = (f["excess"] - b["excess"]) / b["excess"] if b["excess"] > 0 else float("nan")
        body.append(f"| {NAMES[r['solver']]} | {r['steps']} | {r['tune_type']} | "
                    f"{r['seconds']:.0f} s | {r['loss_first']:.4f} -> {r['loss_last']:.4f} | "
                    f"{b['accuracy']:.3f} -> {f['accuracy']:.3f} | {b['fd']:.1f} -> "
                    f"{f['fd']:.1f} | {b['excess']:.1f} -> {f['excess']:.1f} | "
                    f"{100 * change:+.0f}% |")
    body += ["", "Learned ratios (step 0 first; the last is not tuned):", ""]
    body += [f"- {NAMES[r['solver']]}-{r['steps']} {r['tune_type']}: {r['ratios']}"
             for r in rows]
    body += ["", f"Loss curves and ratios: `{CURVES.name}`. Reproduce: "
             f"`python benchmarks/timetuner_digits.py` (part of `make bench`)."]
    text = "\n".join(body)
    print(text)
    if not (a.no_write or a.quick):
        write_section("TimeTuner on the digits model (issue 6)", text)
    return rows


if __name__ == "__main__":
    main()
