"""Measurements that can see a better time grid: paired errors to a reference solution.

Few-step samplers from the same x_T differ from the exact ODE solution by their
discretisation error alone, and two samplers run on the same seeds can be compared seed by
seed: the paired difference of their errors has far less spread than either error, so small
gains become visible with a few thousand seeds. ``bootstrap_mean`` gives the 95% interval of
such a mean difference (resampling seeds). Images or latents may be in any range;
``psnr`` takes the data range (2 for [-1, 1]).
"""

from __future__ import annotations

import numpy as np


def rmse(x, ref) -> np.ndarray:
    """Per-sample RMSE [N] between x and ref [N, ...]."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {ref.shape}")
    return np.sqrt(np.mean(np.square(x - ref).reshape(x.shape[0], -1), axis=1))


def psnr(x, ref, data_range: float = 2.0) -> np.ndarray:
    """Per-sample PSNR [N] in dB."""
    e = np.maximum(rmse(x, ref), 1e-12)
    return 20.0 * np.log10(data_range / e)


def bootstrap_mean(values, *, n_boot: int = 4000, seed: int = 0, level: float = 0.95):
    """-> (mean, lo, hi): the mean of ``values`` [N] and its percentile-bootstrap interval."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size < 2 or not np.all(np.isfinite(v)):
        raise ValueError(f"need >= 2 finite values, got {v.size} (finite: "
                         f"{int(np.isfinite(v).sum())})")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(v.mean()), float(lo), float(hi)


def paired_difference(err_a, err_b, **kw):
    """Mean of err_a - err_b over the same seeds with its bootstrap interval: < 0 with hi < 0
    means a is better than b beyond resampling noise."""
    a, b = np.asarray(err_a, np.float64), np.asarray(err_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired errors need the same seeds: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, **kw)


__all__ = ["bootstrap_mean", "paired_difference", "psnr", "rmse"]
