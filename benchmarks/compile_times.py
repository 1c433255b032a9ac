"""Compile time of the drivers on the SD 1.5 architecture (random weights, 16x16 latents,
DDIM-50, classifier-free guidance): the sequential sampler against FasterDiffusion encoder
propagation with the paper's key steps, batched groups and ``decode_chunk=1``.

Compile time = first call (trace + compile + run) minus the median of warm calls. Encoder
propagation traces the encoder once and the decoder once per distinct decoder batch (the
paper's DDIM-50 key steps give groups of 1, 2, 5, 10 and 15 steps: five decoders with
whole groups batched, two with decode_chunk=5 (calls of 5 steps and single steps), one with
decode_chunk=1); before, every one of the nine groups was unrolled (139 s against
~12 s for the sequential sampler, RESULTS.md of 2026-11-30).

    python benchmarks/compile_times.py [--repeats 2] [--size 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_sd15_unet_folder, write_section  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args(argv)

    import jax.numpy as jnp

    import conversion
    from jaxdiff import solvers
    from jaxdiff.guidance import classifier_free
    from jaxdiff.sampling import EncoderPropagation, Sequential, run

    unet = conversion.load_unet(make_sd15_unet_folder())
    rng = np.random.default_rng(0)
    cond, uncond = (jnp.asarray(rng.standard_normal((1, 77, 768), dtype=np.float32))
                    for _ in range(2))
    x_T = jnp.asarray(rng.standard_normal((1, a.size, a.size, 4), dtype=np.float32))
    model_fn = classifier_free(unet, cond, uncond, 7.5)
    solver = solvers.make("ddim", dict(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       clip_sample=False, set_alpha_to_one=False), a.steps)
    samplers = {"sequential": Sequential(),
                "propagation (groups batched)": EncoderPropagation(key_steps="paper"),
                "propagation (decode_chunk=5)": EncoderPropagation(key_steps="paper",
                                                                   decode_chunk=5),
                "propagation (decode_chunk=1)": EncoderPropagation(key_steps="paper",
                                                                   decode_chunk=1)}

    def call(s):
        t0 = time.perf_counter()
        x, _ = run(s, model_fn, solver, x_T)
        x.block_until_ready()
        return time.perf_counter() - t0

    first = {k: call(s) for k, s in samplers.items()}
    warm = {k: [] for k in samplers}
    for _ in range(a.repeats):             # interleaved
        for k, s in samplers.items():
            warm[k].append(call(s))
    rows = []
    seq_compile = first["sequential"] - statistics.median(warm["sequential"])
    for k in samplers:
        med = statistics.median(warm[k])
        comp = first[k] - med
        rows.append((k, first[k], med, comp, comp / seq_compile))
        print(f"{k:32s} first {first[k]:6.1f} s  warm {med:6.1f} s  compile {comp:6.1f} s  "
              f"({comp / seq_compile:.2f}x sequential)", flush=True)
    body = ("SD 1.5 architecture (random weights), "
            f"{a.size}x{a.size} latents, DDIM-{a.steps}, CFG 7.5, batch 1; paper key steps; "
            f"compile = first call - median of {a.repeats} warm calls (interleaved).\n\n"
            "| sampler | first call | warm call | compile | vs sequential |\n|---|---|---|---|---|\n"
            + "\n".join(f"| {k} | {f:.1f} s | {m:.1f} s | {c:.1f} s | {r:.2f}x |"
                        for k, f, m, c, r in rows)
            + "\n\nBefore (every group unrolled, 2026-11-30): 139 s against ~12 s sequential.\n")
    write_section("Driver compile times (SD 1.5 architecture)", body)
    return {k: r for k, *r in rows}


if __name__ == "__main__":
    main(sys.argv[1:])
