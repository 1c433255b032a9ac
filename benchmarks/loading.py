"""Loading a full-size SD 1.5 UNet (float32, 3.4 GB), same random weights, on this machine:
converting the diffusers safetensors folder (``conversion.load_unet``) vs reloading a jaxdiff
checkpoint in each format (``conversion.save_model(..., format=...)`` + ``load_model``).
Runs interleaved, medians; every load ends with the parameters resident
(``block_until_ready``). The files are in the page cache (warm runs), as when a user
reloads a model.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, make_sd15_unet_folder, write_section  # noqa: E402


def _timed(fn) -> float:
    import jax
    from flax import nnx

    t0 = time.perf_counter()
    model = fn()
    jax.block_until_ready(nnx.state(model))
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import conversion

    folder = make_sd15_unet_folder()
    unet = conversion.load_unet(folder)
    ckpts = {}
    for fmt in ("safetensors", "orbax"):
        path = WORK / f"sd15_unet_ckpt_{fmt}"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        conversion.save_model(unet, path, format=fmt)
        ckpts[fmt] = (path, time.perf_counter() - t0)
    del unet
    gc.collect()
    loaders = {"convert diffusers safetensors (load_unet)": lambda: conversion.load_unet(folder),
               "jaxdiff checkpoint, safetensors (default)":
                   lambda: conversion.load_model(ckpts["safetensors"][0]),
               "jaxdiff checkpoint, orbax": lambda: conversion.load_model(ckpts["orbax"][0])}
    times = {k: [] for k in loaders}
    for k, f in loaders.items():      # warm-up: page cache, first-call overheads
        _timed(f)
    for _ in range(args.repeats):
        for k, f in loaders.items():
            times[k].append(_timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["convert diffusers safetensors (load_unet)"]
    rows = ["| load | median s | runs (s) | vs conversion |", "|---|---:|---|---:|"]
    for k, v in times.items():
        rows.append(f"| {k} | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} | "
                    f"{base / med[k]:.2f}x |")
    save = ", ".join(f"{fmt} {t:.1f} s" for fmt, (_, t) in ckpts.items())
    body = ("SD 1.5 UNet, float32, 3.4 GB of parameters, this CPU (2 cores), warm page cache, "
            f"{args.repeats} interleaved runs. Writing the checkpoint took: {save}.\n\n"
            + "\n".join(rows) + "\n\nReproduce: `python benchmarks/loading.py`.")
    print(body)
    write_section("Loading the SD 1.5 UNet (issue 17)", body)
    for path, _ in ckpts.values():
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
