"""The main job: the embedded digits model draws a 10x10 grid (ten of each digit).

Prints what it drew is worth (classifier accuracy, FD-digits against held-out real digits,
and the real-vs-real floor at the same sample count) and how long it took, and writes the
grid as a PNG. ``jaxdiff sample --model digits`` runs the same with options.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def save_grid(images, path, cols: int = 10, scale: int = 4) -> Path:
    """[N, H, W, 1] in [0, 1] -> a PNG grid, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    from jaxdiff.pipeline import image_grid

    images = np.asarray(images, np.float32)
    images = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=0.35)  # cell borders
    rows = -(-len(images) // cols)
    grid = image_grid(np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images,
                      rows, cols)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_digits(out: str | Path = "outputs/digits_grid.png", *, solver: str = "ddim",
               steps: int = 50, guidance_scale: float = 1.0, seed: int = 0,
               labels: Optional[Sequence[int]] = None, per_class: int = 10,
               progress: bool = True, log=print) -> dict:
    """Sample ``labels`` (default: ``per_class`` of each digit) and report quality and time."""
    from jaxdiff.zoo import digits
    from jaxdiff.zoo.digits import metrics

    if labels is None:
        labels = [d for d in range(10) for _ in range(per_class)]
    labels = list(labels)
    t0 = time.perf_counter()
    pipe = digits.load()
    log(f"loaded the digits model in {time.perf_counter() - t0:.1f} s")
    kw = dict(labels=labels, num_inference_steps=steps, solver=solver,
              guidance_scale=guidance_scale)
    t0 = time.perf_counter()
    pipe(seed=seed + 1, progress=progress, **kw)   # compile (and warm up) once
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = pipe(seed=seed, progress=progress, **kw)
    t_sample = time.perf_counter() - t0
    path = save_grid(images, out, cols=10 if len(labels) >= 10 else len(labels))
    res = {"n": len(labels), "solver": solver, "steps": steps,
           "guidance_scale": guidance_scale, "seconds": t_sample,
           "seconds_first_call": t_compile, "png": str(path),
           "accuracy": metrics.accuracy(images, labels)}
    if len(labels) >= 10:
        res["fd_digits"] = metrics.fd_digits(images)
        res["fd_floor"] = metrics.fd_floor(len(labels))
    log(f"{len(labels)} digits, {solver}-{steps}, guidance {guidance_scale}: "
        f"{t_sample:.1f} s ({1e3 * t_sample / len(labels):.0f} ms per digit; first call with "
        f"compilation {t_compile:.1f} s)")
    log(f"classifier accuracy {res['accuracy']:.3f}" + (
        f", FD-digits {res['fd_digits']:.1f} (real-vs-real floor at n={len(labels)}: "
        f"{res['fd_floor']:.1f})" if "fd_digits" in res else ""))
    log(f"grid -> {path}")
    res["images"] = images
    return res


def main(out_dir: str | Path = "outputs") -> int:
    run_digits(Path(out_dir) / "digits_grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
