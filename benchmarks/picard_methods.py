"""Picard methods side by side on the digits model: ParaDiGMS, ParaSolver initialisation and
ParaTAA (order-k residual + triangular Anderson), same x_T and noise, one run.

Rows: (solver, steps, window, method, tolerance) -> rounds, model evaluations, RMSE to the
sequential digits (pixel scale [0, 1]), wall time of a warm call; a batch-1 DDPM-1000 row
(window 48) against the sequential sampler; a PNG of the largest window error per round.

    python benchmarks/picard_methods.py [--per-class 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402

METHODS = ("paradigms", "parasolver", "taa")
CONFIGS = [("ddim", 50, 16, (0.1, 0.01)), ("dpm++", 50, 16, (0.1, 0.01)),
           ("ddpm", 200, 48, (0.1, 0.01))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff.zoo import digits

    pipe = digits.load()
    labels = [d for d in range(10) for _ in range(a.per_class)]

    def timed(fn):
        fn()                                        # compile
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn()
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        return out, statistics.median(ts)

    def img(x):
        return np.clip((np.asarray(x, np.float32) + 1) / 2, 0, 1)

    rows, curves = [], {}
    for batch_labels, configs in [(labels, CONFIGS), (labels[:1], [("ddpm", 1000, 48, (0.1,))])]:
        fn = pipe.model_fn(batch_labels, 1.0)
        x_T = jax.random.normal(jax.random.key(0), (len(batch_labels), 16, 16, 1))
        key = jax.random.key(1)
        for name, steps, window, tols in configs:
            s = pipe.solver(name, steps)
            ref, t_seq = timed(lambda: jaxdiff.sample(fn, s, x_T, key=key))
            rows.append(dict(n=len(batch_labels), solver=name, steps=steps, window="-",
                             method="sequential", tol="-", rounds=steps, evals=steps,
                             rmse=0.0, seconds=t_seq))
            print(rows[-1], flush=True)
            for tol in tols:
                for m in METHODS:
                    (out, st), t = timed(lambda: jaxdiff.paradigms(
                        fn, s, x_T, parallel=window, tolerance=tol, method=m, key=key))
                    rmse = float(np.sqrt(np.mean((img(out) - img(ref)) ** 2)))
                    rows.append(dict(n=len(batch_labels), solver=name, steps=steps,
                                     window=window, method=m, tol=tol, rounds=st.iterations,
                                     evals=st.model_evaluations, rmse=rmse, seconds=t,
                                     speed=t_seq / t))
                    print(rows[-1], flush=True)
                    if name == "ddim" and tol == 0.01:
                        curves[m] = np.nanmax(st.errors, axis=1)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, c in curves.items():
            ax.semilogy(np.arange(1, len(c) + 1), c, marker="o", ms=3, label=m)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("round")
        ax.set_ylabel("largest window error / tolerance^2")
        ax.set_title("digits DDIM-50, window 16, tolerance 0.01")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(__file__).with_name("picard_methods.png"), dpi=120)
    except ImportError:
        pass

    def fmt(r):
        sp = f"{r['speed']:.2f}x" if "speed" in r else "1.00x"
        return (f"| {r['n']} | {r['solver']}-{r['steps']} | {r['window']} | {r['method']} | "
                f"{r['tol']} | {r['rounds']} | {r['evals']} | {r['rmse']:.4f} | "
                f"{r['seconds']:.2f} s | {sp} |")
    body = ("Digits model, guidance 1, same x_T and noise for every row; RMSE to the "
            f"sequential digits in pixel units; median of {a.repeats} warm calls on this CPU "
            "(2 cores; window positions evaluated one per call, chunk='auto'). "
            "PNG: benchmarks/picard_methods.png.\n\n"
            "| digits | solver | window | method | tolerance | rounds | evaluations | RMSE vs "
            "sequential | time | vs sequential |\n|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(fmt(r) for r in rows) + "\n")
    write_section("Picard methods on the digits model", body)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
