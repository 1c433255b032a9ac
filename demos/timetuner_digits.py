"""TimeTuner on the digits zoo model: few-step DDIM with and without tuned ratios.

    python -m demos.timetuner_digits --steps 5 10 --iters 60 --batch 16

Tunes the ratios of the class-conditional digits UNet on the training split (labels as
the condition) and reports classifier accuracy and FD-digits of ``--per-class`` samples per
digit from the same x_T, plain DDIM vs tuned, on TimeTuner's grid. A demonstration, not a
benchmark: FD on a few hundred samples moves by about as much as tuning does.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from tuning.digits import build_tuner


def main(argv=None):
    from jaxdiff.zoo.digits import data, metrics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10])
    p.add_argument("--tune-types", nargs="+", default=["parallel", "sequential"])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    tuner = build_tuner()
    train = data.load("train")
    rng = np.random.default_rng(a.seed)
    picks = [rng.choice(len(train.labels), a.batch, replace=False) for _ in range(40)]
    batches = [(train.images[i], train.labels[i]) for i in picks]
    labels = np.repeat(np.arange(10), a.per_class)
    x_T = jax.random.normal(jax.random.key(a.seed + 1), (len(labels), 16, 16, 1))

    def quality(k, ratios):
        x = tuner.ddim_sample(x_T, k, t_ratios=ratios, condition=jnp.asarray(labels))
        images = np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
        return {"accuracy": metrics.accuracy(images, labels),
                "fd_digits": metrics.fd_digits(images)}

    rows = []
    for k in a.steps:
        rows.append({"steps": k, "ratios": None, **quality(k, None)})
        print(json.dumps(rows[-1]), flush=True)
        for tune_type in a.tune_types:
            t0 = time.perf_counter()
            ratios, log = tuner.optimize_timesteps(batches, k, tune_type=tune_type, lr=a.lr,
                                                   total_iters=a.iters,
                                                   key=jax.random.key(a.seed))
            rows.append({"steps": k, "tune_type": tune_type,
                         "ratios": np.round(ratios, 4).tolist(),
                         "tune_seconds": round(time.perf_counter() - t0, 1),
                         **quality(k, ratios)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"fd_floor": metrics.fd_floor(len(labels))}))
    return rows


if __name__ == "__main__":
    main()
