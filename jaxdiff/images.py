"""Images as arrays [N, H, W, C] in [0, 1] -> PIL images and grids (host-side helpers)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_pil(images):
    """[N, H, W, C] floats in [0, 1] -> list of PIL images."""
    arr = np.asarray(np.clip(np.asarray(images, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def image_grid(images, rows: int, cols: int):
    """Tile [N, H, W, C] images (N <= rows * cols) into one PIL image."""
    arr = np.asarray(images, np.float32)
    n, h, w, c = arr.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    grid = np.ones((rows * h, cols * w, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = arr[i]
    return to_pil(grid[None])[0]
