"""Discrete noise schedules: betas, alphas_cumprod, timestep spacings, sigmas.

Everything here is host-side numpy, run once when a solver is built. The arithmetic follows
diffusers' PyTorch schedulers operation by operation, in the same precisions (float32 betas
and cumulative products, float64 where diffusers goes through numpy float64), because the
solvers are tested step by step against diffusers at 1e-5 and the integer timesteps a UNet
sees must be identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unsupported {name}={value!r}; jaxdiff implements {list(allowed)}")


def linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)`` bit for bit: a float32 step,
    the first half counted up from ``start`` and the second half down from ``end``, each
    value rounded once (fused multiply-add). ``np.linspace`` differs in the last bit."""
    a, b = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([a], np.float32)
    step = np.float64((b - a) / np.float32(num - 1))
    idx = np.arange(num, dtype=np.float64)
    up = np.float64(a) + step * idx
    down = np.float64(b) - step * (num - 1 - idx)
    return np.where(idx < num // 2, up, down).astype(np.float32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal), discretised as 1 - abar(t2) / abar(t1)."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_train_timesteps
    out = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return np.asarray(out, np.float64).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on float32 CPU tensors accumulates in float64: so do we."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so that the last
    timestep has zero SNR while the first keeps its value."""
    betas = np.asarray(betas, np.float32)
    abar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = abar_sqrt - last
    abar_sqrt = abar_sqrt * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001,
               beta_end: float = 0.02, beta_schedule: str = "linear",
               trained_betas: Optional[Sequence[float]] = None,
               rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """float32 betas [num_train_timesteps] as diffusers' schedulers compute them."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
    else:
        _check("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            betas = linspace_f32(beta_start, beta_end, num_train_timesteps)
        elif beta_schedule == "scaled_linear":
            betas = linspace_f32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
        else:
            betas = betas_for_alpha_bar(num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


rescale_betas_zero_snr = rescale_zero_terminal_snr


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return cumprod_f32(np.float32(1.0) - np.asarray(betas, np.float32))


def sigmas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    """VE sigmas sqrt((1 - abar) / abar), float32, indexed by training timestep."""
    ac = np.asarray(ac, np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The training-time discretisation a model was trained with (diffusers' scheduler
    config fields that define it). ``betas``/``alphas_cumprod`` are float32 numpy."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[tuple] = None
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.trained_betas is None:
            _check("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        elif len(self.trained_betas) != self.num_train_timesteps:
            object.__setattr__(self, "num_train_timesteps", len(self.trained_betas))
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @property
    def betas(self) -> np.ndarray:
        tb = None if self.trained_betas is None else list(self.trained_betas)
        return make_betas(self.num_train_timesteps, self.beta_start, self.beta_end,
                          self.beta_schedule, tb, self.rescale_betas_zero_snr)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(self.betas)


def check_num_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n < 1 or n > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps="
                         f"{num_train_timesteps}], got {n}")
    return n


def discrete_timesteps(num_train_timesteps: int, num_inference_steps: int,
                       spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps of DDPM/DDIM (one per step)."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.int64)
        return ts + steps_offset
    return np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1


def sigma_timesteps(num_train_timesteps: int, num_inference_steps: int,
                    spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """Descending float32 timesteps of the k-diffusion style (Euler, Heun, LMS) schedulers:
    linspace is not rounded, so the UNet sees fractional timesteps."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    return np.arange(T, 0, -T / N).round().astype(np.float32) - np.float32(1)


def multistep_timesteps(num_train_timesteps: int, num_inference_steps: int,
                        spacing: str = "linspace", steps_offset: int = 0,
                        last_timestep: Optional[int] = None) -> np.ndarray:
    """Descending int64 timesteps of the multistep solvers (DPM-Solver, UniPC): N + 1
    points with the final (t = 0 end) one dropped."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, N + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (N + 1)
        ts = (np.arange(0, N + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + steps_offset
    return np.arange(last, 0, -T / N).round().copy().astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, num: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: float64, descending from sigma_max to sigma_min."""
    ramp = np.linspace(0, 1, num)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_sigmas_for(cfg, sigma_min: float, sigma_max: float, num: int,
                      config_bounds: bool) -> np.ndarray:
    """Karras sigmas between the schedule's extremes, or the config's ``sigma_min`` /
    ``sigma_max`` where the scheduler honours them (``config_bounds``) and they are set."""
    lo = cfg.get("sigma_min") if config_bounds else None
    hi = cfg.get("sigma_max") if config_bounds else None
    return karras_sigmas(sigma_min if lo is None else lo, sigma_max if hi is None else hi, num)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma between
    the two neighbouring training sigmas (clipped to the table), as diffusers does, one sigma
    at a time so the float32/float64 promotions are the same as theirs."""
    log_sigmas = np.asarray(log_sigmas)
    out = []
    for sigma in np.asarray(sigmas).reshape(-1):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        out.append(((1 - w) * low_idx + w * high_idx).reshape(()))
    return np.asarray(out)


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Training sigmas linearly interpolated at (possibly fractional) timesteps (float64)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def vp_from_sigma(sigma):
    """VE sigma -> (alpha_t, sigma_t) of the VP process, float64."""
    sigma = np.asarray(sigma, np.float64)
    alpha = 1.0 / np.sqrt(sigma ** 2 + 1.0)
    return alpha, sigma * alpha


__all__ = ["BETA_SCHEDULES", "TIMESTEP_SPACINGS", "Schedule", "alphas_cumprod",
           "betas_for_alpha_bar", "check_num_steps", "cumprod_f32", "discrete_timesteps",
           "interp_sigmas", "karras_sigmas", "linspace_f32", "make_betas",
           "multistep_timesteps", "rescale_betas_zero_snr", "rescale_zero_terminal_snr",
           "sigma_timesteps", "sigma_to_t",
           "sigmas_from_alphas_cumprod", "vp_from_sigma"]
