"""Benchmark worker for the legacy diffusers 0.39.0 Flax UNet (``FlaxUNet2DConditionModel``).

Runs ONLY inside the dedicated venv ``benchmarks/.work/venv039`` (diffusers==0.39.0 with jax/flax,
see ``legacy_flax.py``, which creates that venv and launches this script). Do not import it from
the project venv: diffusers >= 0.40 has no Flax models.

Usage (inside venv039)::

    python legacy_flax_worker.py UNET_FOLDER [--sizes 32 64] [--batch 2] [--repeats 3]
                                 [--out-dir DIR] [--json-out FILE]

UNET_FOLDER is a diffusers-format UNet folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``
(float32, e.g. the SD 1.5 UNet, 3.4 GB).

What it measures
----------------
1. ``convert_s``: wall-clock of ONE call of diffusers 0.39's own PyTorch->Flax converter,
   ``FlaxUNet2DConditionModel.from_pretrained(folder, from_pt=True, dtype=jnp.float32)``, up to the
   converted params being ready (``jax.block_until_ready``). This includes reading the checkpoint
   (torch/safetensors), diffusers' eager random ``init_weights`` of the Flax model (which the
   converter uses as the shape template) and the key renaming / transposes / ``jnp.asarray`` copies.

   Caveat: diffusers 0.39's Flax ``from_pretrained(..., from_pt=True)`` on a local folder only looks
   for ``diffusion_pytorch_model.bin`` (its ``WEIGHTS_NAME``) and raises "no file named
   diffusion_pytorch_model.bin" otherwise. When the folder has no ``.bin`` but has the
   ``.safetensors`` file, this worker sets ``diffusers.models.modeling_flax_utils.WEIGHTS_NAME`` to
   ``diffusion_pytorch_model.safetensors`` before the call. Nothing else changes: diffusers' own
   ``load_state_dict`` then reads the file with ``safetensors.torch.load_file`` (it dispatches on
   the extension) and the conversion code is untouched. The JSON's ``convert_weights_file`` /
   ``convert_patched_weights_name`` fields say which path was taken.

2. ``forward[str(s)]`` for each latent size ``s``: ``f = jax.jit(lambda p, x, t, c:
   model.apply({'params': p}, x, t, c).sample)`` (params passed as an argument, not baked in as
   constants). ``compile_s`` = first call (trace + compile + one run, ``block_until_ready``);
   then ``repeats`` further timed calls: ``times`` (all of them) and ``median_s``.

Inputs (reproducible; the same recipe gives the PyTorch model the same inputs)
------------------------------------------------------------------------------
For EACH size ``s`` separately, a fresh generator::

    rng = np.random.default_rng(1234)
    sample = rng.standard_normal((batch, 4, s, s), np.float32)        # NCHW latents
    ctx    = rng.standard_normal((batch, 77, 768), np.float32)        # encoder_hidden_states
    t      = np.array([999., 500.][:batch], np.float32)               # timesteps, shape [batch]

(in that order: sample first, then ctx; for batch > 2 only, t = np.resize([999., 500.], batch)).
The Flax UNet takes NCHW input and returns NCHW output, like the PyTorch one, so the PyTorch check
is ``UNet2DConditionModel(...)(torch.from_numpy(sample), torch.from_numpy(t),
torch.from_numpy(ctx)).sample``.

Outputs
-------
* ``OUT_DIR/legacy_out_{s}.npy``: the model output for size ``s`` (NCHW float32, shape
  ``[batch, 4, s, s]``), from the first (compile) call. Default OUT_DIR: ``benchmarks/.work``.
* JSON on stdout (last line) and, with ``--json-out``, in that file::

    {"versions": {...}, "convert_s": ..., "convert_weights_file": ..., "peak_rss_gb": ...,
     "forward": {"32": {"compile_s": .., "median_s": .., "times": [..],
                        "output": {"path": .., "shape": .., "dtype": .., "mean": .., "std": ..,
                                   "absmax": ..}}, "64": {...}},
     "inputs": {"recipe": ..., "batch": .., "seed": 1234}}

Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

SEED = 1234
PT_WEIGHTS = "diffusion_pytorch_model.bin"
ST_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / ".work"

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[legacy_flax_worker +{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def make_inputs(size: int, batch: int):
    """The documented input recipe (see module docstring)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    sample = rng.standard_normal((batch, 4, size, size), np.float32)
    ctx = rng.standard_normal((batch, 77, 768), np.float32)
    base = [999.0, 500.0]
    t = np.array(base[:batch] if batch <= 2 else np.resize(base, batch), np.float32)
    return sample, t, ctx


def peak_rss_gb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "diffusers", "transformers", "torch", "numpy",
                 "safetensors", "huggingface_hub"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import jax

    out["jax_backend"] = jax.default_backend()
    out["jax_devices"] = [str(d) for d in jax.devices()]
    return out


def convert(folder: Path):
    """One timed run of diffusers 0.39's PyTorch->Flax conversion. Returns (model, params, info)."""
    import jax
    import jax.numpy as jnp
    import diffusers.models.modeling_flax_utils as mfu
    from diffusers import FlaxUNet2DConditionModel

    info = {"convert_patched_weights_name": None}
    if (folder / PT_WEIGHTS).is_file():
        info["convert_weights_file"] = PT_WEIGHTS
    elif (folder / ST_WEIGHTS).is_file():
        # diffusers 0.39 Flax from_pt only looks for WEIGHTS_NAME (.bin); point it at the
        # safetensors file. Its load_state_dict picks the safetensors reader by extension.
        info["convert_weights_file"] = ST_WEIGHTS
        info["convert_patched_weights_name"] = f"modeling_flax_utils.WEIGHTS_NAME: {mfu.WEIGHTS_NAME!r} -> {ST_WEIGHTS!r}"
        mfu.WEIGHTS_NAME = ST_WEIGHTS
    else:
        raise FileNotFoundError(f"{folder} has neither {PT_WEIGHTS} nor {ST_WEIGHTS}")

    log(f"converting {folder} with FlaxUNet2DConditionModel.from_pretrained(from_pt=True) "
        f"[{info['convert_weights_file']}]")
    t0 = time.perf_counter()
    model, params = FlaxUNet2DConditionModel.from_pretrained(str(folder), from_pt=True, dtype=jnp.float32)
    params = jax.block_until_ready(params)
    info["convert_s"] = time.perf_counter() - t0
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    info["n_params"] = int(n)
    info["param_dtypes"] = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(params)})
    log(f"converted in {info['convert_s']:.1f}s: {n / 1e6:.1f}M params, peak RSS {peak_rss_gb():.1f} GiB")
    return model, params, info


def bench_forward(model, params, sizes, batch: int, repeats: int, out_dir: Path) -> dict:
    import jax
    import numpy as np

    @jax.jit
    def fwd(p, x, t, c):
        return model.apply({"params": p}, x, t, c).sample

    results = {}
    for s in sizes:
        sample, t, ctx = make_inputs(s, batch)
        log(f"size {s}: first call (compile + run), sample {sample.shape}")
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(params, sample, t, ctx))
        compile_s = time.perf_counter() - t0
        log(f"size {s}: first call {compile_s:.1f}s")
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, sample, t, ctx))
            times.append(time.perf_counter() - t0)
            log(f"size {s}: run {i + 1}/{repeats} {times[-1]:.2f}s")
        arr = np.asarray(out, dtype=np.float32)
        path = out_dir / f"legacy_out_{s}.npy"
        np.save(path, arr)
        results[str(s)] = {
            "compile_s": compile_s,
            "median_s": statistics.median(times) if times else None,
            "times": times,
            "output": {
                "path": str(path), "shape": list(arr.shape), "dtype": str(arr.dtype),
                "mean": float(arr.mean()), "std": float(arr.std()),
                "absmax": float(np.abs(arr).max()),
                "finite": bool(np.isfinite(arr).all()),
            },
        }
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("unet_folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    # Quiet diffusers' per-module "Flax classes are deprecated" warnings (one per submodule).
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()

    folder = Path(args.unet_folder).resolve()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    result = {"versions": versions()}
    log(f"versions: {json.dumps(result['versions'])}")
    model, params, info = convert(folder)
    result["convert_s"] = info.pop("convert_s")
    result.update(info)
    result["forward"] = bench_forward(model, params, args.sizes, args.batch, args.repeats, out_dir)
    result["peak_rss_gb"] = peak_rss_gb()
    result["inputs"] = {
        "seed": SEED, "batch": args.batch,
        "recipe": "per size s: rng = np.random.default_rng(1234); "
                  "sample = rng.standard_normal((batch, 4, s, s), np.float32); "
                  "ctx = rng.standard_normal((batch, 77, 768), np.float32); "
                  "t = np.array([999., 500.][:batch], np.float32)",
    }
    result["unet_folder"] = str(folder)
    result["host"] = {"cpu_count": os.cpu_count()}

    text = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text, flush=True)
    log("done")
    return result


if __name__ == "__main__":
    main()
