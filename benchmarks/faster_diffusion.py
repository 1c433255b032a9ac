"""FasterDiffusion encoder propagation (Li et al., "Faster Diffusion: Rethinking the Role of
UNet Encoder"): FLOPs, wall clock and quality against full sampling.

Part A, speed: the SD 1.5 UNet architecture with fixed random weights (the folder
benchmarks/sampling.py uses), small latents, batch 1 with classifier-free guidance (UNet
batch 2, random [1, 77, 768] text embeddings). DDIM-50 and DPM-Solver++(2M)-20, full
sampling (``jaxdiff.sample``) vs ``encoder_propagation`` with the paper's key steps and prior
noise injection (0.003 below t=500). UNet GFLOPs come from XLA's cost analysis of one full
UNet call, one encoder call and one decoder call (UNet batch 2), multiplied by the call
counts; the whole jitted propagation program (its groups are unrolled) is analysed as a
cross-check. Wall clock: median of interleaved warm runs (baseline, propagation, baseline,
...); compile time = first call minus the warm median.

Part B, quality: the embedded digits model, full sampling vs propagation with and without
injection from the same x_T: accuracy, FD-digits, PSNR of propagation vs full, time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_sd15_unet_folder, write_section  # noqa: E402

TITLE = "FasterDiffusion encoder propagation (issue 7)"
GUIDANCE = 7.5
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1, "num_train_timesteps": 1000}
SD_SOLVERS = {
    "ddim50": ("DDIM", 50, {"_class_name": "DDIMScheduler", "clip_sample": False,
                            "set_alpha_to_one": False, **SD_SCHEDULE}),
    "dpm20": ("DPM-Solver++(2M)", 20, {"_class_name": "DPMSolverMultistepScheduler",
                                       "algorithm_type": "dpmsolver++", "solver_order": 2,
                                       **SD_SCHEDULE}),
}
DIGITS_SOLVERS = [("ddim", 50, "DDIM"), ("dpm++", 20, "DPM-Solver++(2M)")]
DIGITS_VARIANTS = [("full", None), ("propagation + injection", 0.003),
                   ("propagation, no injection", 0.0)]


def machine() -> str:
    import jax

    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {jax.device_count()} JAX "
            f"{jax.default_backend().upper()} device(s), jax {jax.__version__}")


def _flops(fn, *args) -> float:
    """XLA cost analysis (flops) of ``jax.jit(fn)`` lowered at ``args`` (arrays or
    ShapeDtypeStructs): nothing is compiled or run."""
    import jax

    ca = jax.jit(fn).lower(*args).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def unet_call_flops(unet, size: int, batch: int = 2, context=(77, 768),
                    class_labels: bool = False) -> dict:
    """FLOPs of one full UNet call, one ``encode`` and one ``decode`` at [batch, size, size, C]
    latents with [batch, *context] context (abstract shapes: works at any size cheaply)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(unet)
    st = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    x = jax.ShapeDtypeStruct((batch, size, size, unet.config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((batch, *context), jnp.float32)
    lab = jax.ShapeDtypeStruct((batch,), jnp.int32) if class_labels else None

    def full(s, x, t, c, lab):
        return nnx.merge(graphdef, s)(x, t, c, class_labels=lab)

    def enc(s, x, t, c, lab):
        return nnx.merge(graphdef, s).encode(x, t, c, class_labels=lab)

    def dec(s, e, c):
        return nnx.merge(graphdef, s).decode(e.skips, e.mid, e.emb, c)

    e = jax.eval_shape(enc, st, x, t, ctx, lab)
    return {"full": _flops(full, st, x, t, ctx, lab), "enc": _flops(enc, st, x, t, ctx, lab),
            "dec": _flops(dec, st, e, ctx)}


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    return out, time.perf_counter() - t0


def sd_part(a, log) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import conversion
    import jaxdiff
    from jaxdiff import solvers
    from jaxdiff.guidance import classifier_free
    from jaxdiff.sampling import encoder_propagation, key_step_schedule

    t0 = time.perf_counter()
    folder = make_sd15_unet_folder()
    unet = conversion.load_unet(folder)
    log(f"SD 1.5 UNet (random weights) ready in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(a.seed)
    cond = jnp.asarray(rng.standard_normal((1, 77, 768), dtype=np.float32))
    uncond = jnp.asarray(rng.standard_normal((1, 77, 768), dtype=np.float32))
    x_T = jnp.asarray(rng.standard_normal((1, a.size, a.size, 4), dtype=np.float32))

    calls = unet_call_flops(unet, a.size)
    calls64 = unet_call_flops(unet, 64) if a.size != 64 else calls
    log(f"UNet batch 2 GFLOPs per call at {a.size}x{a.size}: full {calls['full'] / 1e9:.1f}, "
        f"encoder {calls['enc'] / 1e9:.1f}, decoder {calls['dec'] / 1e9:.1f}")
    graphdef, _ = nnx.split(unet)
    rows = []
    for name in a.sd_solvers:
        label, steps, cfg = SD_SOLVERS[name]
        solver = solvers.from_diffusers(cfg, steps)
        keys = key_step_schedule("paper", steps)

        def base():
            return jaxdiff.sample(classifier_free(unet, cond, uncond, GUIDANCE), solver, x_T)

        stats = []

        def prop():
            x0, st = encoder_propagation(unet, solver, x_T, cond=cond, uncond=uncond,
                                         guidance_scale=GUIDANCE, key_steps="paper")
            stats.append(st)
            return x0

        def prop_program(state, x, c, u):  # the whole jitted sampler, for its cost analysis
            return encoder_propagation(nnx.merge(graphdef, state), solver, x, cond=c,
                                       uncond=u, guidance_scale=GUIDANCE,
                                       key_steps="paper")[0]

        whole = _flops(prop_program, nnx.state(unet), x_T, cond, uncond)
        x_base, first_base = _time(base)
        log(f"{label}-{steps}: full sampling first call {first_base:.1f} s")
        x_prop, first_prop = _time(prop)
        log(f"{label}-{steps}: propagation first call {first_prop:.1f} s")
        tb, tp = [], []
        for r in range(a.repeats):  # interleaved
            tb.append(_time(base)[1])
            tp.append(_time(prop)[1])
            log(f"{label}-{steps} run {r + 1}/{a.repeats}: full {tb[-1]:.1f} s, propagation "
                f"{tp[-1]:.1f} s")
        st = stats[-1]
        mb, mp = statistics.median(tb), statistics.median(tp)
        rel = float(jnp.linalg.norm(x_prop - x_base) / jnp.linalg.norm(x_base))
        k = len(keys)
        rows.append(dict(
            name=name, label=label, steps=steps, keys=keys, groups=st.groups,
            encoder_calls=st.encoder_calls, decoder_evals=st.decoder_evaluations,
            base_gflops=steps * calls["full"] / 1e9,
            prop_gflops=(k * calls["enc"] + steps * calls["dec"]) / 1e9,
            prop_whole_gflops=whole / 1e9,
            base_gflops64=steps * calls64["full"] / 1e9,
            prop_gflops64=(k * calls64["enc"] + steps * calls64["dec"]) / 1e9,
            base_s=mb, prop_s=mp, base_times=tb, prop_times=tp, speedup=mb / mp,
            base_compile=first_base - mb, prop_compile=first_prop - mp, rel_l2=rel,
            finite=bool(jnp.all(jnp.isfinite(x_prop)) and jnp.all(jnp.isfinite(x_base)))))
        r = rows[-1]
        log(f"{label}-{steps}: full {mb:.2f} s, propagation {mp:.2f} s -> {r['speedup']:.2f}x; "
            f"GFLOPs {r['base_gflops']:.0f} -> {r['prop_gflops']:.0f} (whole program "
            f"{r['prop_whole_gflops']:.0f}); rel L2 {rel:.3f}")
    return dict(rows=rows, calls=calls, calls64=calls64, size=a.size, repeats=a.repeats,
                jax=jax.__version__)


def digits_part(a, log) -> dict:
    from jaxdiff.zoo import digits
    from jaxdiff.zoo.digits import metrics

    pipe = digits.load()
    labels = [d for d in range(10) for _ in range(a.per_class)]
    n = len(labels)
    floor = metrics.fd_floor(n)
    from jaxdiff.zoo.digits.model import TOKEN_DIM
    calls = unet_call_flops(pipe.unet, 16, batch=1, context=(2, TOKEN_DIM), class_labels=True)
    rows = []
    for solver, steps, label in DIGITS_SOLVERS:
        base = dict(labels=labels, num_inference_steps=steps, solver=solver, seed=a.seed)
        fns = {}
        for vname, alpha in DIGITS_VARIANTS:
            kw = dict(base) if alpha is None else dict(
                base, sampler="faster",
                sampler_options={"key_steps": "paper", "noise_injection": alpha})
            fns[vname] = (lambda kw=kw: pipe.generate(**kw))
        first, images, stats, times = {}, {}, {}, {v: [] for v in fns}
        for vname, fn in fns.items():
            (images[vname], stats[vname]), first[vname] = _time(fn)
        for r in range(a.digits_repeats):  # interleaved
            for vname, fn in fns.items():
                times[vname].append(_time(fn)[1])
        full = images["full"]
        for vname, _ in DIGITS_VARIANTS:
            img, med = images[vname], statistics.median(times[vname])
            mse = np.mean((img - full) ** 2, axis=(1, 2, 3))
            st = stats[vname]
            propagated = hasattr(st, "encoder_calls")
            k = st.encoder_calls if propagated else steps
            row = dict(solver=label, steps=steps, variant=vname, encoder_calls=k,
                       mflops=(steps * calls["full"] if not propagated else
                               k * calls["enc"] + steps * calls["dec"]) / 1e6,
                       accuracy=metrics.accuracy(img, labels), fd=metrics.fd_digits(img),
                       psnr=(float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
                             if vname != "full" else None),
                       ms=1e3 * med / n, speedup=statistics.median(times["full"]) / med,
                       compile=first[vname] - med)
            rows.append(row)
            log(f"digits {label}-{steps} {vname}: acc {row['accuracy']:.3f} FD {row['fd']:.1f} "
                f"(floor {floor:.1f}) PSNR {row['psnr'] or float('nan'):.1f} dB "
                f"{row['ms']:.1f} ms/digit ({row['speedup']:.2f}x)")
    return dict(rows=rows, n=n, floor=floor, per_class=a.per_class, repeats=a.digits_repeats,
                seed=a.seed, calls=calls)


def report(sd, dg, a) -> str:
    out = [f"Machine: {machine()}; float32. Shared 2-core machine: other jobs may have run "
           "at the same time, so absolute times are noisy; baseline and propagation runs are "
           "interleaved so that their ratio is less affected. Reproduce: `python "
           f"benchmarks/faster_diffusion.py{' --quick' if a.quick else ''}`."]
    if sd is not None:
        c, c64, s = sd["calls"], sd["calls64"], sd["size"]
        out += ["", f"### SD 1.5 UNet architecture (random weights), {s}x{s} latents", "",
                f"Batch 1 with classifier-free guidance {GUIDANCE} (UNet batch 2; random "
                "[1, 77, 768] prompt embeddings), same x_T. *full*: `jaxdiff.sample` (one "
                "jitted lax.scan); *propagation*: `encoder_propagation(key_steps=\"paper\")` "
                "with prior noise injection 0.003 below t=500. *GFLOPs/sample*: XLA cost "
                "analysis of one UNet call (batch 2), one encoder call and one decoder call, "
                "times the call counts (full: steps x UNet; propagation: key steps x encoder + "
                "steps x decoder; time embeddings excluded); in brackets, the cost analysis of "
                "the whole jitted propagation program (groups unrolled; XLA counts a lax.scan "
                "body once, so the full sampler's program cannot be checked this way). The "
                f"64x64 column (512 px, the paper's size) is the same count from the cost "
                "analysis at 64x64, not run. Times: per sample, median of "
                f"{sd['repeats']} interleaved warm runs; compile = first call - median.", "",
                f"Per UNet call (batch 2) at {s}x{s}: full {c['full'] / 1e9:.1f} GFLOPs, encoder "
                f"(conv_in, down and mid blocks) {c['enc'] / 1e9:.1f} "
                f"({c['enc'] / c['full']:.0%}), decoder (up blocks, conv_out) "
                f"{c['dec'] / 1e9:.1f}; at 64x64: {c64['full'] / 1e9:.0f} / "
                f"{c64['enc'] / 1e9:.0f} ({c64['enc'] / c64['full']:.0%}) / "
                f"{c64['dec'] / 1e9:.0f}.", "",
                "| solver | sampler | encoder calls | decoder evals | GFLOPs/sample "
                f"{s}x{s} | GFLOPs 64x64 | time | speed-up | compile s | rel. L2 vs full |",
                "|" + "---|" * 10]
        for r in sd["rows"]:
            out.append(f"| {r['label']}-{r['steps']} | full | {r['steps']} | {r['steps']} | "
                       f"{r['base_gflops']:.0f} | {r['base_gflops64']:.0f} | "
                       f"{r['base_s']:.2f} s | 1.00x | {r['base_compile']:.1f} | - |")
            out.append(f"| {r['label']}-{r['steps']} | propagation | {r['encoder_calls']} | "
                       f"{r['decoder_evals']} | {r['prop_gflops']:.0f} "
                       f"({r['prop_whole_gflops']:.0f}) | {r['prop_gflops64']:.0f} "
                       f"({r['base_gflops64'] / r['prop_gflops64']:.2f}x fewer) | "
                       f"{r['prop_s']:.2f} s | **{r['speedup']:.2f}x** | "
                       f"{r['prop_compile']:.1f} | {r['rel_l2']:.2e} |")
        keys = "; ".join(f"{r['label']}-{r['steps']}: key steps {list(r['keys'])}, decoder "
                         f"batches {list(r['groups'])}" for r in sd["rows"])
        runs = "; ".join(f"{r['label']}-{r['steps']} full {[round(t, 2) for t in r['base_times']]}"
                         f", propagation {[round(t, 2) for t in r['prop_times']]}"
                         for r in sd["rows"])
        out += ["", f"{keys}. Individual runs (s): {runs}.", "",
                "Paper (Li et al., SD 1.5, A40 GPU, 512 px): DDIM-50 2.42 -> 1.42 s (1.70x), "
                "37050 -> 27350 GFLOPs (1.35x fewer); DPM-Solver++-20 1.13 -> 0.64 s (1.77x). "
                "Caveats: (1) the paper's wall-clock gain beyond its FLOP ratio comes from "
                "running a group's batched decoder evaluations in parallel on a GPU. On a CPU "
                "a compute-bound call of g decoder evaluations costs about g single ones, so "
                "with large latents the gain approaches the FLOP ratio; with small latents a "
                "batch-2 UNet call is partly bound by streaming the 3.4 GB of weights, and one "
                "batched decoder call reads them once for g steps, a gain that shrinks at "
                f"64x64. (2) At {s}x{s} latents the encoder's share of the UNet FLOPs is "
                f"{c['enc'] / c['full']:.0%} (64x64: {c64['enc'] / c64['full']:.0%}). The "
                "paper's absolute GFLOPs are about half of this table's 64x64 figures (it "
                "presumably counts multiply-adds or one batch-1 call per step); compare the "
                "ratios. (3) Random weights: the relative L2 "
                "between propagation and full latents says nothing about image quality (see "
                "the digits table); it only shows that the approximation is not exact. (4) "
                "Compile time grows with the number of key-step groups (each is unrolled in "
                "the jitted program)."]
    if dg is not None:
        out += ["", f"### Digits model: quality, {dg['n']} samples", "",
                f"{dg['per_class']} per class, seed {dg['seed']}, guidance 1, batch of all "
                "samples in one jitted call, the paper's key steps, same x_T for every "
                "sampler. *PSNR*: propagation vs full sampling, pixels in [0, 1], mean over "
                "digits. FD-digits against the 360 held-out real digits; the real-vs-real "
                f"floor at n={dg['n']} is {dg['floor']:.1f}"
                f"{' (FD with fewer than 50 samples is not meaningful)' if dg['n'] < 50 else ''}"
                f". Time per digit: batched wall time / {dg['n']}, median of {dg['repeats']} "
                "interleaved warm runs. The digits scheduler clips x0 (clip_sample=True) and "
                "uses trailing spacing, so injection acts on the steps with t < 500. "
                "MFLOPs per digit counted as for SD (one UNet call per digit: "
                f"{dg['calls']['full'] / 1e6:.1f} MFLOPs, of which the encoder "
                f"{dg['calls']['enc'] / dg['calls']['full']:.0%}).", "",
                "| solver | sampler | encoder calls | MFLOPs/digit | accuracy | FD-digits | "
                "PSNR vs full | ms per digit | speed-up | compile s |", "|" + "---|" * 10]
        for r in dg["rows"]:
            psnr = "-" if r["psnr"] is None else f"{r['psnr']:.1f} dB"
            out.append(f"| {r['solver']}-{r['steps']} | {r['variant']} | {r['encoder_calls']} | "
                       f"{r['mflops']:.0f} | {r['accuracy']:.3f} | {r['fd']:.1f} | {psnr} | "
                       f"{r['ms']:.1f} | {r['speedup']:.2f}x | {r['compile']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16, help="SD latent size (16 -> 128 px)")
    p.add_argument("--repeats", type=int, default=3, help="timed SD runs per sampler")
    p.add_argument("--sd-solvers", nargs="+", choices=sorted(SD_SOLVERS),
                   default=["ddim50", "dpm20"])
    p.add_argument("--per-class", type=int, default=20, help="digits samples per class")
    p.add_argument("--digits-repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: SD 8x8 latents, DPM-Solver++-20 only, 1 run; 2 digits "
                        "per class, 1 run")
    p.add_argument("--no-write", action="store_true",
                   help="print the report only; do not touch benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.repeats, a.sd_solvers = 8, 1, ["dpm20"]
        a.per_class, a.digits_repeats = 2, 1

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    sd = None if a.skip_sd else sd_part(a, log)
    dg = None if a.skip_digits else digits_part(a, log)
    body = report(sd, dg, a)
    log(f"total {time.perf_counter() - t0:.0f} s")
    if not a.no_write:
        write_section(TITLE, body)
    print(body)
    return {"sd": sd, "digits": dg}


if __name__ == "__main__":
    main()
