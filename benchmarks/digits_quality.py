"""Quality of the sequential solvers on the embedded digits model (issue 4).

For each solver / step count: ``--per-class`` samples of every digit from the same seeds,
classifier accuracy, FD-digits against the 360 held-out real digits, the real-vs-real floor
at the same n, and the sampling time per digit (batched, after compilation; median of
``--repeats`` runs). Every later sampler (ParaDiGMS, TimeTuner, FasterDiffusion) is judged
against this table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, write_section  # noqa: E402

CONFIGS = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("ddim", 10), ("dpm++", 20),
           ("dpm++", 10), ("euler", 20)]
NAMES = {"ddpm": "DDPM", "ddim": "DDIM (eta 0)", "dpm++": "DPM-Solver++ (2M)",
         "euler": "Euler"}


def main(argv=None) -> list[dict]:
    import jax
    import numpy as np

    from jaxdiff.zoo import digits
    from jaxdiff.zoo.digits import metrics

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    pipe = digits.load()
    labels = [d for d in range(10) for _ in range(a.per_class)]
    n = len(labels)
    floor = metrics.fd_floor(n)
    rows = []
    for name, steps in CONFIGS:
        kw = dict(labels=labels, num_inference_steps=steps, solver=name, guidance_scale=1.0)
        t0 = time.perf_counter()
        images = pipe(seed=a.seed, **kw)           # compiles; same output as the timed runs
        t_first = time.perf_counter() - t0
        reps = 1 if steps >= 200 else a.repeats   # DDPM-1000: one timed run
        med, _ = median_time(lambda: pipe(seed=a.seed, **kw), reps, warmup=0)
        row = dict(solver=name, steps=steps, accuracy=metrics.accuracy(images, labels),
                   fd=metrics.fd_digits(images), ms=1e3 * med / n, compile=t_first - med)
        rows.append(row)
        print(f"{NAMES[name]}-{steps}: acc {row['accuracy']:.3f} FD {row['fd']:.1f} "
              f"(floor {floor:.1f}) {row['ms']:.1f} ms/digit", flush=True)
    body = [f"{n} samples ({a.per_class} of each digit, seed {a.seed}), guidance scale 1 "
            "(conditional model only), float32, batch of all samples in one jitted call. "
            f"FD-digits against the 360 held-out real digits; the real-vs-real floor at "
            f"n={n} (training digits vs held-out) is **{floor:.1f}** (all 1437: "
            f"{metrics.fd_floor():.1f}). Classifier test accuracy on real held-out digits: "
            f"{metrics.accuracy(metrics.real_images('test'), metrics.data.load('test').labels):.3f}. "
            f"Time per digit = batched wall time / {n}, median of {a.repeats} runs (DDPM-1000: "
            f"1 run), compilation excluded. Machine: {platform.processor() or 'CPU'}, "
            f"{jax.device_count()} JAX CPU device(s), jax {jax.__version__}.", "",
            "| solver | steps | accuracy | FD-digits | FD / floor | ms per digit | compile s |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        body.append(f"| {NAMES[r['solver']]} | {r['steps']} | {r['accuracy']:.3f} | "
                    f"{r['fd']:.1f} | {r['fd'] / floor:.2f} | {r['ms']:.1f} | "
                    f"{r['compile']:.1f} |")
    body += ["", "Reproduce: `python benchmarks/digits_quality.py` (part of `make bench`)."]
    write_section("Digits model: sequential solver quality (issue 4)", "\n".join(body))
    return rows


if __name__ == "__main__":
    main()
