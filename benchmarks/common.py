"""Shared benchmark helpers: reference model folders with fixed random weights, timing."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".work"          # large generated artefacts (git-ignored)
RESULTS = ROOT / "RESULTS.md"


def make_sd15_unet_folder(path: Path | None = None, seed: int = 0) -> Path:
    """The SD 1.5 UNet (3.4 GB float32 safetensors) with fixed random weights, built once."""
    from conversion.testing import random_unet_folder

    return random_unet_folder(path or WORK / "sd15_unet", seed=seed)


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_section(title: str, body: str) -> None:
    """Replace (or append) one titled section of benchmarks/RESULTS.md."""
    begin, end = f"<!-- begin: {title} -->", f"<!-- end: {title} -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{begin}\n## {title}\n\n_Measured {stamp} by `make bench`._\n\n{body}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by `make bench` (benchmarks/run_all.py); every table "
        "compares peers in one run on the same machine.\n")
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
