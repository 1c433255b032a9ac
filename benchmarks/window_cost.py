"""What a Picard window costs on this CPU: per-position time of one window evaluation vs
window size, as one batched call (chunk=None), in chunks (chunk="auto") and one position per
call (chunk=1), on the digits model (one digit) and the tiny SD UNet (one prompt with
guidance: network batch 2 per position); and the attention kernels behind the difference.

Before this benchmark, the CPU attention used two head-major einsums for short sequences;
with narrow heads (the tiny test models' head dim 8-16) those ran 2-6x slower than XLA's
attention, which made large batched windows ~2x dearer per sample than small calls.

    python benchmarks/window_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, write_section  # noqa: E402

WINDOWS = (1, 4, 16, 48, 100)


def _time(fn, repeats):
    import jax
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import conversion
    from jaxdiff import parallel as par
    from jaxdiff.models import attention as A
    from jaxdiff.sampling import picard
    from jaxdiff.sampling.pytree import combine, partition
    from jaxdiff.zoo import digits

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import write_tiny_pipeline

    folder = WORK / "tiny_sd_window_cost"
    write_tiny_pipeline(folder, seed=0, unet="sd1")
    sd = conversion.load_pipeline(folder)
    emb = sd.encode_prompt(["the cat"])
    neg = sd.encode_prompt([""])
    from jaxdiff.guidance import classifier_free
    models = {
        "digits, 1 digit": (digits.load().model_fn([3], 1.0), (1, 16, 16, 1)),
        "tiny SD, 1 prompt + CFG 7.5": (classifier_free(sd.unet, emb, neg, 7.5),
                                        (1, 16, 16, 4)),
    }
    rows = []
    for name, (fn, shape) in models.items():
        dyn, spec = partition(fn)
        for w in WINDOWS:
            x = jax.random.normal(jax.random.key(0), (w,) + shape)
            t = jnp.full((w, shape[0]), 500.0)
            act = jnp.ones((w,), bool)
            row = dict(model=name, window=w)
            net = shape[0] * (2 if "CFG" in name else 1)       # guidance doubles the batch
            auto = max(1, picard.CPU_SAMPLES_PER_CALL // net)
            for label, chunk in (("batched", None), ("auto", auto), ("one", 1)):
                ev = par.window_evaluator(lambda leaves, x, t: combine(leaves, spec)(x, t),
                                          None, chunk=chunk)
                f = jax.jit(lambda d, x, t, act, ev=ev: ev(d, x, t, act))
                row[label] = 1e3 * _time(lambda: f(dyn, x, t, act), a.repeats) / w
            rows.append(row)
            print(row, flush=True)

    kern = []
    for b, lq, lk, h, d in [(2, 256, 256, 4, 8), (200, 256, 256, 4, 8), (200, 256, 77, 4, 8),
                            (2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80)]:
        ks = jax.random.split(jax.random.key(1), 3)
        q = jax.random.normal(ks[0], (b, lq, h * d))
        k = jax.random.normal(ks[1], (b, lk, h * d))
        v = jax.random.normal(ks[2], (b, lk, h * d))
        row = dict(shape=f"B {b}, {lq}x{lk}, {h} heads x {d}")

        def einsum(q, k, v):
            r = lambda z, L: z.reshape(b, L, h, d)  # noqa: E731
            return A._einsum_attention(r(q, lq), r(k, lk), r(v, lk), d ** -0.5, None, False)
        for label, f in (("einsum", einsum),
                         ("xla", lambda q, k, v: A.dot_product_attention(q, k, v, heads=h,
                                                                         impl="xla")),
                         ("auto", lambda q, k, v: A.dot_product_attention(q, k, v, heads=h))):
            jf = jax.jit(f)
            row[label] = 1e3 * _time(lambda: jf(q, k, v), a.repeats)
        kern.append(row)
        print(row, flush=True)

    body = (f"Per window position, ms (median of {a.repeats}); batched = the whole window "
            "as one model call, auto = chunk=\"auto\" "
            f"({picard.CPU_SAMPLES_PER_CALL} samples per call), one = one position per call.\n\n"
            "| model | window | batched | auto | one position per call |\n|---|---|---|---|---|\n"
            + "\n".join(f"| {r['model']} | {r['window']} | {r['batched']:.2f} | {r['auto']:.2f} "
                        f"| {r['one']:.2f} |" for r in rows)
            + "\n\nAttention kernels on this CPU, ms per call (auto = what the CPU default "
              "now picks):\n\n| shape | head-major einsums | XLA | auto |\n|---|---|---|---|\n"
            + "\n".join(f"| {r['shape']} | {r['einsum']:.1f} | {r['xla']:.1f} | "
                        f"{r['auto']:.1f} |" for r in kern) + "\n")
    write_section("Picard window cost on the CPU", body)
    return rows, kern


if __name__ == "__main__":
    main(sys.argv[1:])
