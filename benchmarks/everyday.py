"""What users load every day (issue 17), on this machine, same random weights side by side:

  * int8 vs float32 SD 1.5 UNet forward (jaxdiff.models.quantize, qwix: weight-only and
    dynamic int8 of the Linear and 1x1 conv layers), batch 2, 32x32 latents, and the output
    difference to float32;
  * TAESD (AutoencoderTiny) vs AutoencoderKL decode, full-size SD architectures, jaxdiff and
    diffusers PyTorch, one 32x32 latent (256 px);
  * merging an SD 1.5-sized LoRA (rank 32 on every attention, feed-forward and projection
    layer, a PEFT-format safetensors file) with conversion.merge_lora.
Runs interleaved, medians of ``--repeats``; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, make_sd15_unet_folder, write_section  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=512,
              down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _interleaved(fns: dict, repeats: int) -> dict:
    out = {k: {"times": []} for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        out[k]["result"] = fn()
        out[k]["first"] = time.perf_counter() - t0
        print(f"  {k}: first call {out[k]['first']:.1f} s", flush=True)
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k]["times"].append(time.perf_counter() - t0)
    for v in out.values():
        v["median"] = statistics.median(v["times"])
    return out


def int8_part(repeats: int) -> str:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import conversion
    from jaxdiff.models.quantize import quantize

    unet = conversion.load_unet(make_sd15_unet_folder())
    rng = np.random.default_rng(1234)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 4), dtype=np.float32))
    t = jnp.asarray([999.0, 500.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, 768), dtype=np.float32))
    models, qtime, layers = {"float32": unet}, {}, {}
    for mode in ("weight", "dynamic"):
        t0 = time.perf_counter()
        models[f"int8 {mode}"], paths = quantize(unet, mode)
        qtime[mode], layers[mode] = time.perf_counter() - t0, len(paths)
        print(f"  quantize {mode}: {qtime[mode]:.1f} s, {len(paths)} layers", flush=True)
    fns, size = {}, {}
    for name, m in models.items():
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda st, x, t, c, g=graphdef: nnx.merge(g, st)(x, t, c))
        fns[name] = (lambda f=f, st=state: f(st, x, t, ctx).block_until_ready())
        size[name] = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / 2 ** 30
    r = _interleaved(fns, repeats)
    ref = np.asarray(r["float32"]["result"])
    base = r["float32"]["median"]
    rows = ["| UNet | parameters GiB | first call s | median s | vs float32 | output rel L2 vs "
            "float32 |", "|---|---:|---:|---:|---:|---:|"]
    for name, v in r.items():
        err = 0.0 if name == "float32" else _rel(v["result"], ref)
        rows.append(f"| {name} | {size[name]:.2f} | {v['first']:.1f} | {v['median']:.2f} | "
                    f"{base / v['median']:.2f}x | {err:.2e} |")
    return (f"SD 1.5 UNet (random weights), batch 2, 32x32 latents, float32 activations, "
            f"{repeats} interleaved runs. Quantising took {qtime['weight']:.0f} s (weight-only) "
            f"and {qtime['dynamic']:.0f} s (dynamic) for {layers['dynamic']} layers.\n\n"
            + "\n".join(rows))


def digits_part(repeats: int, per_class: int = 30) -> str:
    """int8 quality on a trained model: the digits UNet, float32 vs int8, same seeds."""
    import dataclasses

    from jaxdiff.models.quantize import quantize
    from jaxdiff.zoo import digits as zoo
    from jaxdiff.zoo.digits import metrics

    pipe = zoo.load()
    labels = [d for d in range(10) for _ in range(per_class)]
    kw = dict(num_inference_steps=50, solver="ddim", seed=0)
    ref = pipe(labels, **kw)
    rows = ["| digits UNet | layers int8 | accuracy | FD-digits | RMS to float32 DDIM-50 "
            "(95% CI) |", "|---|---:|---:|---:|---|"]
    rng = np.random.default_rng(0)

    def rms_ci(a):
        per = np.sqrt(((a - ref) ** 2).reshape(len(a), -1).mean(1))
        boots = [per[rng.integers(0, len(per), len(per))].mean() for _ in range(2000)]
        return f"{per.mean():.4f} ({np.percentile(boots, 2.5):.4f}-{np.percentile(boots, 97.5):.4f})"

    rows.append(f"| float32 DDIM-50 | 0 | {metrics.accuracy(ref, labels):.3f} | "
                f"{metrics.fd_digits(ref):.2f} | 0 |")
    for mode in ("weight", "dynamic"):
        unet, paths = quantize(pipe.unet, mode)
        q = dataclasses.replace(pipe, unet=unet)
        out = q(labels, **kw)
        rows.append(f"| int8 {mode} DDIM-50 | {len(paths)} | {metrics.accuracy(out, labels):.3f} "
                    f"| {metrics.fd_digits(out):.2f} | {rms_ci(out)} |")
    return (f"The embedded digits model (trained), {len(labels)} samples ({per_class} per "
            f"digit), DDIM-50, guidance {zoo.DEFAULT_GUIDANCE_SCALE}, "
            f"the same x_T for every row; pixels in [0, 1]. Real-vs-real FD floor at this "
            f"sample count: {metrics.fd_floor(len(labels)):.2f}.\n\n" + "\n".join(rows))


def vae_part(repeats: int) -> str:
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    import conversion

    torch.manual_seed(0)
    kl, tiny = AutoencoderKL(**SD_VAE).eval(), AutoencoderTiny().eval()
    j_kl, j_tiny = conversion.convert(kl), conversion.convert(tiny)
    z = np.random.default_rng(0).standard_normal((1, 32, 32, 4)).astype(np.float32)
    zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    dec_kl = jax.jit(lambda z: j_kl.decode(z))
    dec_tiny = jax.jit(lambda z: j_tiny.decode(z))
    torch.set_num_threads(2)

    def t_kl():
        with torch.no_grad():
            return kl.decode(zt).sample.numpy()

    def t_tiny():
        with torch.no_grad():
            return tiny.decode(zt).sample.numpy()

    fns = {"jaxdiff AutoencoderKL": lambda: np.asarray(dec_kl(jnp.asarray(z))),
           "jaxdiff AutoencoderTiny": lambda: np.asarray(dec_tiny(jnp.asarray(z))),
           "diffusers AutoencoderKL": t_kl, "diffusers AutoencoderTiny": t_tiny}
    r = _interleaved(fns, repeats)
    err_kl = _rel(r["jaxdiff AutoencoderKL"]["result"].transpose(0, 3, 1, 2),
                  r["diffusers AutoencoderKL"]["result"])
    err_tiny = _rel(r["jaxdiff AutoencoderTiny"]["result"].transpose(0, 3, 1, 2),
                    r["diffusers AutoencoderTiny"]["result"])
    base = r["jaxdiff AutoencoderKL"]["median"]
    rows = ["| decoder | first call s | median s | vs jaxdiff AutoencoderKL |",
            "|---|---:|---:|---:|"]
    for name, v in r.items():
        rows.append(f"| {name} | {v['first']:.2f} | {v['median']:.3f} | "
                    f"{base / v['median']:.1f}x |")
    tiny_vs = r["diffusers AutoencoderTiny"]["median"] / r["jaxdiff AutoencoderTiny"]["median"]
    return (f"One 32x32 latent (256x256 image), float32, {repeats} interleaved runs, random "
            f"weights (SD 1.5 VAE architecture; TAESD's). jaxdiff vs diffusers decode rel L2: "
            f"AutoencoderKL {err_kl:.1e}, AutoencoderTiny {err_tiny:.1e}. jaxdiff TAESD vs "
            f"diffusers TAESD: {tiny_vs:.2f}x.\n\n" + "\n".join(rows))


def lora_part(repeats: int, rank: int = 32) -> str:
    from flax import nnx

    import conversion
    from jaxdiff.lora import _targets

    unet = conversion.load_unet(make_sd15_unet_folder())
    dotted, _, shapes = _targets(unet)
    rng = np.random.default_rng(0)
    state = {}
    for name, path in dotted.items():
        if not any(k in name for k in ("attn1.", "attn2.", "ff.net", "proj_in", "proj_out")):
            continue
        if name != ".".join(str(p) for p in path[:-1]):
            continue                              # one alias per layer
        shape = shapes[path]
        if len(shape) != 2:
            continue
        fan_in, fan_out = shape
        state[f"unet.{name}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(
            np.float32) * 0.01
        state[f"unet.{name}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(
            np.float32) * 0.01
    path = WORK / f"sd15_lora_r{rank}.safetensors"
    conversion.write_safetensors(state, path)
    mib = path.stat().st_size / 2 ** 20
    layers = len(state) // 2
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        merged = conversion.merge_lora(unet, path, scale=0.8)
        import jax
        jax.block_until_ready(nnx.state(merged))
        times.append(time.perf_counter() - t0)
        del merged
    return (f"A rank-{rank} LoRA on {layers} layers of the SD 1.5 UNet ({mib:.0f} MiB PEFT "
            f"safetensors), merged with `conversion.merge_lora(unet, file, scale=0.8)` "
            f"(reading the file included): first {times[0]:.2f} s, then median "
            f"{statistics.median(times[1:]):.2f} s over {repeats} runs "
            f"({', '.join(f'{t:.2f}' for t in times[1:])} s).")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="*", default=["int8", "digits", "vae", "lora"])
    a = ap.parse_args(argv)
    parts = {"int8": ("int8 vs float32 UNet", int8_part),
             "digits": ("int8 quality on the digits model", digits_part),
             "vae": ("TAESD vs AutoencoderKL decode", vae_part),
             "lora": ("LoRA merge", lora_part)}
    for key in a.parts:        # one RESULTS.md section per part: parts can be re-run alone
        title, fn = parts[key]
        print(title, flush=True)
        text = f"{fn(a.repeats)}\n\nReproduce: `python benchmarks/everyday.py --parts {key}`."
        print(text)
        write_section(f"{title} (issue 17)", text)


if __name__ == "__main__":
    main()
