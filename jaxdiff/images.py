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


def as_array(images, what: str = "image", channels=None) -> np.ndarray:
    """User images -> float32 [N, H, W, C]: a PIL image or a list of them, or an array
    [H, W, C] / [N, H, W, C] (uint8 0..255, or floats in [0, 1]). ``channels``: the channel
    counts accepted (a mask has 1; a PIL mask is read as grey)."""
    if isinstance(images, Image.Image) or (isinstance(images, (list, tuple)) and images
                                          and isinstance(images[0], Image.Image)):
        pics = [images] if isinstance(images, Image.Image) else list(images)
        mode = "L" if channels == (1,) else "RGB"
        arr = np.stack([np.asarray(p.convert(mode)) for p in pics])
        arr = arr[..., None] if arr.ndim == 3 else arr
    else:
        arr = np.asarray(images)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim == 2 and channels == (1,):
        arr = arr[None, :, :, None]
    if arr.ndim != 4 or (channels is not None and arr.shape[-1] not in channels):
        raise ValueError(f"{what} must be [N, H, W, C] (NHWC) or [H, W, C] with C in "
                         f"{channels}, or PIL images; got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 or float, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} has non-finite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return arr
