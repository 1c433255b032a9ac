"""Zero-cost time grids: where K solver steps are placed without any tuning.

A grid is K + 1 continuous VP times ``t`` (``jaxdiff.schedules.NoiseScheduleVP``: training
step n of a discrete model sits at t = (n + 1) / N), strictly decreasing from the start
time to the end time; step i moves from t[i] to t[i + 1]. These are the baselines a learned
grid (``jaxdiff tune --method ld3 | gits``) must beat, and its starting points.

    time_uniform     t evenly spaced (DPM-Solver's 'time_uniform')
    time_quadratic   sqrt(t) evenly spaced (DPM-Solver's 'time_quadratic')
    logsnr_uniform   lambda = log(alpha / sigma) evenly spaced (DPM-Solver's 'logSNR')
    karras           sigma^(1/7) evenly spaced, sigma = sigma_t / alpha_t (Karras et al. 2022)
    kl_optimal       arctan(sigma) evenly spaced (the closed-form "KL-optimal" spacing of
                     Align Your Steps, Sabour et al. 2024)
    leading          diffusers' 'leading' steps with steps_offset=1: n_i = (K-1-i) N/K + 1,
                     then t = 1/N (TimeTuner's reference grid)
    trailing         diffusers' 'trailing' steps: n_i = round(N - i N / K) - 1, then t = 1/N
    ays_sd15, ays_sdxl   the published Align Your Steps timesteps for SD 1.5 / SDXL (10
                     steps), log-linearly interpolated for other K as their authors do;
                     meant for SD-schedule models (for other models they are just a grid)

Grids are host-side numpy (float64). ``vp_times`` gives the continuous times of any
decreasing list of training steps.
"""

from __future__ import annotations

import numbers

import numpy as np

from jaxdiff.schedules import NoiseScheduleVP

# Align Your Steps, published 10-step timesteps (Sabour et al. 2024, project page)
AYS_TIMESTEPS = {"ays_sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
                 "ays_sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13)}
KARRAS_RHO = 7.0
GRIDS = ("time_uniform", "time_quadratic", "logsnr_uniform", "karras", "kl_optimal",
         "leading", "trailing") + tuple(AYS_TIMESTEPS)


def _check_k(num_steps) -> int:
    if (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
            or int(num_steps) < 1):
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def _lambda(ns: NoiseScheduleVP, t) -> np.ndarray:
    return np.asarray(ns.marginal_lambda(np.asarray(t, np.float32)), np.float64)


def _from_lambda(ns: NoiseScheduleVP, lam) -> np.ndarray:
    return np.asarray(ns.inverse_lambda(np.asarray(lam, np.float32)), np.float64)


def _pin_ends(t: np.ndarray, t_start: float, t_end: float) -> np.ndarray:
    """Exact ends (inverse_lambda rounds in float32) and a strict decrease check."""
    t = np.asarray(t, np.float64).copy()
    t[0], t[-1] = t_start, t_end
    if np.any(np.diff(t) >= 0):
        raise ValueError(f"the grid is not strictly decreasing (too many steps for this "
                         f"schedule?): {t.tolist()}")
    return t


def vp_times(ns: NoiseScheduleVP, steps) -> np.ndarray:
    """Training steps n (decreasing, network units) -> continuous times (n + 1) / N."""
    n = np.asarray(steps, np.float64)
    if ns.schedule != "discrete":
        return n
    return (n + 1.0) / ns.total_N


def sigma_grid(ns: NoiseScheduleVP, sigmas, t_start: float, t_end: float) -> np.ndarray:
    """VE sigmas (decreasing) -> continuous times via lambda = -log sigma."""
    return _pin_ends(_from_lambda(ns, -np.log(np.asarray(sigmas, np.float64))), t_start, t_end)


def make_grid(name: str, ns: NoiseScheduleVP, num_steps: int, *, t_start=None,
              t_end=None) -> np.ndarray:
    """-> t [K + 1] (float64): the named zero-cost grid of ``num_steps`` steps from
    ``t_start`` (default the schedule's T) to ``t_end`` (default its eps)."""
    k = _check_k(num_steps)
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {list(GRIDS)}")
    t0 = float(ns.T if t_start is None else t_start)
    t1 = float(ns.eps if t_end is None else t_end)
    if not t0 > t1:
        raise ValueError(f"t_start ({t0}) must be above t_end ({t1})")
    n_total = ns.total_N
    u = np.linspace(0.0, 1.0, k + 1)
    if name == "time_uniform":
        return _pin_ends(t0 + u * (t1 - t0), t0, t1)
    if name == "time_quadratic":
        return _pin_ends((np.sqrt(t0) + u * (np.sqrt(t1) - np.sqrt(t0))) ** 2, t0, t1)
    lam0, lam1 = _lambda(ns, [t0, t1])
    if name == "logsnr_uniform":
        return _pin_ends(_from_lambda(ns, lam0 + u * (lam1 - lam0)), t0, t1)
    s0, s1 = np.exp(-lam0), np.exp(-lam1)        # VE sigma at the ends
    if name == "karras":
        r = 1.0 / KARRAS_RHO
        return sigma_grid(ns, (s0 ** r + u * (s1 ** r - s0 ** r)) ** KARRAS_RHO, t0, t1)
    if name == "kl_optimal":
        return sigma_grid(ns, np.tan(np.arctan(s0) + u * (np.arctan(s1) - np.arctan(s0))),
                          t0, t1)
    if name == "leading":
        n = np.arange(k)[::-1] * (n_total // k) + 1
        return _pin_ends(np.concatenate([vp_times(ns, n), [t1]]), vp_times(ns, n[0]), t1)
    if name == "trailing":
        n = np.round(n_total - np.arange(k) * n_total / k).astype(np.int64) - 1
        return _pin_ends(np.concatenate([vp_times(ns, n), [t1]]), vp_times(ns, n[0]), t1)
    # AYS: interpolate log(timestep) linearly over the step fraction (its authors' rule)
    base = np.asarray(AYS_TIMESTEPS[name], np.float64)
    scale = (n_total - 1) / 999.0                # tables are for 1000 training steps
    xs = np.linspace(0.0, 1.0, base.size)
    n = np.exp(np.interp(np.linspace(0.0, 1.0, k), xs, np.log(base)))
    n = np.round(n * scale)
    return _pin_ends(np.concatenate([vp_times(ns, n), [t1]]), vp_times(ns, n[0]), t1)


__all__ = ["AYS_TIMESTEPS", "GRIDS", "KARRAS_RHO", "make_grid", "sigma_grid", "vp_times"]
