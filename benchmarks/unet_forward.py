"""Full-size SD 1.5 UNet, same random weights, side by side on this machine:

  * conversion time: diffusers-format safetensors folder -> jaxdiff, vs diffusers 0.39's
    PyTorch->Flax converter (``from_pt=True``);
  * first-call compile time of the jitted jaxdiff forward;
  * forward time, batch 2, latents 32x32 and 64x64, float32: jaxdiff vs diffusers PyTorch
    (runs interleaved, medians) vs diffusers 0.39 FlaxUNet2DConditionModel (own venv);
  * achieved GFLOP/s (XLA cost analysis of the jaxdiff forward) against a measured GEMM ceiling.

Inputs follow the recipe of legacy_flax_worker.py, so all three see identical tensors:
rng = np.random.default_rng(1234); sample = rng.standard_normal((B, 4, s, s), float32);
ctx = rng.standard_normal((B, 77, 768), float32); t = [999, 500].
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, make_sd15_unet_folder, median_time, write_section  # noqa: E402


def inputs(size: int, batch: int = 2):
    rng = np.random.default_rng(1234)
    sample = rng.standard_normal((batch, 4, size, size), dtype=np.float32)
    ctx = rng.standard_normal((batch, 77, 768), dtype=np.float32)
    t = np.resize(np.array([999.0, 500.0], np.float32), batch)
    return sample, t, ctx


def gemm_ceiling(n: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda a: a @ a)
    best, _ = median_time(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / best / 1e9


def time_conversion(folder: Path, repeats: int) -> list[float]:
    import jax
    from flax import nnx

    import conversion

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = conversion.load_unet(folder)
        jax.block_until_ready(nnx.state(m))
        times.append(time.perf_counter() - t0)
        del m
        gc.collect()
    return times


def run(sizes=(32, 64), repeats=5, legacy=True, log=print) -> dict:
    import jax
    import torch
    from flax import nnx

    import conversion

    folder = make_sd15_unet_folder()
    out = {"sizes": list(sizes), "repeats": repeats, "jax": jax.__version__,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads()}

    if legacy:  # first, alone: it peaks at ~11 GB
        from legacy_flax import run_legacy_flax

        log("diffusers 0.39 Flax (own venv) ...")
        out["legacy"] = run_legacy_flax(str(folder), sizes=sizes, batch=2, repeats=3)

    log("conversion ...")
    out["convert_s"] = time_conversion(folder, 3)

    log("GEMM ceiling ...")
    out["gemm_gflops"] = gemm_ceiling()

    import diffusers

    out["diffusers"] = diffusers.__version__
    tm = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    jm = conversion.load_unet(folder)
    graphdef, state = nnx.split(jm)
    fwd = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))

    out["forward"] = {}
    for size in sizes:
        sample, t, ctx = inputs(size)
        x = jax.numpy.asarray(sample.transpose(0, 2, 3, 1))
        t0 = time.perf_counter()
        y = fwd(state, x, t, ctx).block_until_ready()
        compile_s = time.perf_counter() - t0
        flops = fwd.lower(state, x, t, ctx).compile().cost_analysis().get("flops", float("nan"))
        with torch.no_grad():
            ts, tt, tc = (torch.from_numpy(a) for a in (sample, t, ctx))
            ref = tm(ts, tt, tc).sample.numpy()
            jax_times, torch_times = [], []
            for _ in range(repeats):  # interleaved, so drift in machine load hits both
                a = time.perf_counter()
                fwd(state, x, t, ctx).block_until_ready()
                jax_times.append(time.perf_counter() - a)
                a = time.perf_counter()
                tm(ts, tt, tc)
                torch_times.append(time.perf_counter() - a)
        yj = np.asarray(y).transpose(0, 3, 1, 2)
        err = float(np.linalg.norm(yj - ref) / np.linalg.norm(ref))
        row = {"compile_s": compile_s, "jax_times": jax_times, "torch_times": torch_times,
               "jax_median": float(np.median(jax_times)),
               "torch_median": float(np.median(torch_times)),
               "gflop": flops / 1e9, "rel_err_vs_torch": err}
        row["speedup_vs_torch"] = row["torch_median"] / row["jax_median"]
        row["gflops"] = row["gflop"] / row["jax_median"]
        if legacy:
            leg = out["legacy"]["forward"][str(size)]
            row["legacy_median"] = leg["median_s"]
            row["speedup_vs_legacy"] = leg["median_s"] / row["jax_median"]
            legacy_out = np.load(Path(folder).parent / f"legacy_out_{size}.npy")
            row["legacy_rel_err_vs_torch"] = float(np.linalg.norm(legacy_out - ref)
                                                   / np.linalg.norm(ref))
        out["forward"][str(size)] = row
        log(f"{size}x{size}: jaxdiff {row['jax_median']:.2f} s, torch {row['torch_median']:.2f} s"
            f" ({row['speedup_vs_torch']:.2f}x), rel err {err:.1e}")
    return out


def report(r: dict) -> str:
    lines = [
        f"SD 1.5 UNet architecture (859.5M parameters, random weights), float32, batch 2, "
        f"2-core CPU; jax {r['jax']}, torch {r['torch']} ({r['torch_threads']} threads), "
        f"diffusers {r['diffusers']}. Medians of {r['repeats']} interleaved runs "
        "(diffusers 0.39 Flax: 3 runs in its own process).",
        "",
        "| latents | jaxdiff | diffusers PyTorch | diffusers 0.39 Flax | jaxdiff vs PyTorch "
        "| jaxdiff vs 0.39 Flax | jaxdiff compile | GFLOP | jaxdiff GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, row in r["forward"].items():
        leg = row.get("legacy_median")
        vs_leg = f"{row['speedup_vs_legacy']:.2f}x" if leg else "n/a"
        lines.append(
            f"| {size}x{size} | {row['jax_median']:.2f} s | {row['torch_median']:.2f} s | "
            f"{f'{leg:.2f} s' if leg else 'n/a'} | **{row['speedup_vs_torch']:.2f}x** | "
            f"{vs_leg} | "
            f"{row['compile_s']:.1f} s | {row['gflop']:.0f} | {row['gflops']:.0f} |")
    conv = r["convert_s"]
    lines += [
        "",
        f"GEMM ceiling (2048^3 float32 matmul in XLA): {r['gemm_gflops']:.0f} GFLOP/s.",
        "Output agreement with PyTorch (relative L2): "
        + ", ".join(f"{s}x{s}: jaxdiff {row['rel_err_vs_torch']:.1e}"
                    + (f", 0.39 Flax {row['legacy_rel_err_vs_torch']:.1e}"
                       if "legacy_rel_err_vs_torch" in row else "")
                    for s, row in r["forward"].items()) + ".",
        "",
        "| conversion (3.4 GB safetensors folder -> Flax) | time |",
        "|---|---|",
        f"| jaxdiff `conversion.load_unet` (median of {len(conv)}) | "
        f"{float(np.median(conv)):.2f} s |",
    ]
    if "legacy" in r:
        lines.append(f"| diffusers 0.39 `FlaxUNet2DConditionModel.from_pretrained(from_pt=True)` "
                     f"| {r['legacy']['convert_s']:.1f} s |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-legacy", action="store_true")
    args = ap.parse_args(argv)
    r = run(tuple(args.sizes), args.repeats, legacy=not args.no_legacy,
            log=lambda m: print(m, file=sys.stderr, flush=True))
    (Path(__file__).parent / ".work").mkdir(exist_ok=True)
    (Path(__file__).parent / ".work" / "unet_forward.json").write_text(json.dumps(r, indent=1))
    write_section("UNet forward and conversion (issue 2)", report(r))
    print(report(r))


if __name__ == "__main__":
    main()
