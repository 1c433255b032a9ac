"""scikit-learn's bundled handwritten digits as 16x16 NHWC images in [-1, 1].

The 8x8 originals (values 0..16) are upsampled bilinearly to 16x16: two UNet resolutions
(16 and 8) fit, and training stays fast on a CPU. The held-out split is fixed (stratified,
seeded) so that every quality number in the project is measured on the same images.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class Split(NamedTuple):
    images: np.ndarray   # [N, 16, 16, 1] float32 in [-1, 1]
    labels: np.ndarray   # [N] int32 in 0..9


def upsample(images8: np.ndarray, size: int = SIZE) -> np.ndarray:
    """[N, 8, 8] in 0..16 -> [N, size, size, 1] float32 in [-1, 1] (bilinear, half-pixel centres)."""
    x = np.asarray(images8, np.float64) / 16.0
    n, h, w = x.shape

    def axis_weights(src, dst):
        pos = (np.arange(dst) + 0.5) * src / dst - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        frac = pos - lo
        m = np.zeros((dst, src))
        m[np.arange(dst), lo] += 1 - frac
        m[np.arange(dst), hi] += frac
        return m

    wy, wx = axis_weights(h, size), axis_weights(w, size)
    up = np.einsum("yi,nij,xj->nyx", wy, x, wx)
    return (up * 2.0 - 1.0).astype(np.float32)[..., None]


@functools.lru_cache(maxsize=None)
def _splits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = upsample(d.images)
    labels = d.target.astype(np.int32)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                           stratify=labels, random_state=SPLIT_SEED)
    return (Split(images[idx_train], labels[idx_train]),
            Split(images[idx_test], labels[idx_test]))


def load(split: str = "train") -> Split:
    """``"train"`` (1437 images) or ``"test"`` (360, held out from all training)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    s = _splits()[0 if split == "train" else 1]
    return Split(s.images.copy(), s.labels.copy())


def to_unit(images) -> np.ndarray:
    """[-1, 1] -> [0, 1] (clipped)."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
