"""Euler (Karras et al. 2022, Algorithm 2 without churn) on the VE sigma schedule.

Also home of the sigma schedule shared by the k-diffusion style solvers (Euler, Euler
ancestral, Heun, LMS): timesteps in model time, float32 sigmas [N + 1] ending with the final
sigma, and ``init_noise_sigma``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import (Solver, VEPrediction, at, check_prediction_type, choose, f32,
                                  require_default, schedule_from, solver_dataclass,
                                  static_field, ve_step_variance, ve_x0)

DIFFUSERS_CLASS = "EulerDiscreteScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                interpolation_type="linear", use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero")
STEP_OPTIONS = {}


SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def spaced_sigmas(cfg, sigma_min: float, sigma_max: float, num: int, solver: str, *,
                  config_bounds: bool):
    """Sigmas respaced as the config's ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
    ``use_beta_sigmas`` asks (float64, descending), with the field that chose them; or
    (None, None) when none is set. Bounds as ``schedules.karras_sigmas_for``."""
    chosen = [k for k in SIGMA_SPACINGS if cfg.get(k)]
    if len(chosen) > 1:
        raise ValueError(f"{solver}: only one of {list(SIGMA_SPACINGS)} may be set, got "
                         f"{chosen}")
    if not chosen:
        return None, None
    kind = chosen[0]
    if kind == "use_karras_sigmas":
        return schedules.karras_sigmas_for(cfg, sigma_min, sigma_max, num, config_bounds), kind
    lo = cfg.get("sigma_min") if config_bounds else None
    hi = cfg.get("sigma_max") if config_bounds else None
    lo, hi = (sigma_min if lo is None else lo), (sigma_max if hi is None else hi)
    if kind == "use_exponential_sigmas":      # uniform in log sigma
        return np.exp(np.linspace(np.log(hi), np.log(lo), num)), kind
    # "Beta sampling" (Lee et al. 2024): the Beta(0.6, 0.6) quantiles of a uniform ramp
    from scipy.stats import beta
    ppf = beta.ppf(1 - np.linspace(0, 1, num), 0.6, 0.6)
    return np.asarray(lo + ppf * (hi - lo), np.float64), kind


def sigma_schedule(cfg, num_inference_steps: int, solver: str, *, karras_config_bounds: bool,
                   pin_terminal: bool, karras_round: bool = False):
    """-> (timesteps float32 [N], sigmas float32 [N + 1], init_noise_sigma float32).

    ``karras_config_bounds``: the scheduler reads sigma_min/sigma_max from its config.
    ``pin_terminal``: with rescale_betas_zero_snr, alphas_cumprod[-1] is set to 2**-24 so
    that the terminal sigma is finite (Euler, Euler ancestral).
    ``karras_round``: Karras timesteps are rounded to integers (KDPM2). Exponential and beta
    sigmas (``spaced_sigmas``) are taken only by the solvers that accept those fields."""
    spacing = choose(cfg, "timestep_spacing", schedules.TIMESTEP_SPACINGS, solver)
    sched = schedule_from(cfg)
    T = sched.num_train_timesteps
    n = schedules.check_num_steps(num_inference_steps, T)
    ac = sched.alphas_cumprod.copy()
    if pin_terminal and sched.rescale_betas_zero_snr:
        ac[-1] = np.float32(2.0 ** -24)
    train_sigmas = schedules.sigmas_from_alphas_cumprod(ac)          # float32 [T]
    log_sigmas = np.log(train_sigmas)
    ts = schedules.sigma_timesteps(T, n, spacing, int(cfg.get("steps_offset", 0)))
    sigmas = schedules.interp_sigmas(ts, train_sigmas)
    spaced, kind = spaced_sigmas(cfg, float(sigmas[-1]), float(sigmas[0]), n, solver,
                                 config_bounds=karras_config_bounds)
    if spaced is not None:
        sigmas = spaced
        ts = schedules.sigma_to_t(sigmas, log_sigmas)
        if karras_round and kind == "use_karras_sigmas":
            ts = ts.round()
    final_type = cfg.get("final_sigmas_type", "zero")
    if final_type == "sigma_min":
        last = np.sqrt((np.float32(1) - ac[0]) / ac[0])
    else:
        last = 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    smax = sigmas.max()
    init = smax if spacing in ("linspace", "trailing") else np.sqrt(smax ** 2 + np.float32(1))
    return ts.astype(np.float32), sigmas, np.float32(init)


@solver_dataclass
class Euler(VEPrediction, Solver):
    picard = "single"      # Picard support (a class attribute, not a field)
    timesteps: jax.Array          # [N]
    sigmas: jax.Array             # [N + 1]
    init_noise_sigma: jax.Array   # scalar
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")

    segmentable = True

    def scale_model_input(self, x, i):
        s = at(self.sigmas, i)
        return (x / ((s * s + 1) ** 0.5)).astype(x.dtype)

    def _drift(self, i, x, model_output):
        s, s_next = at(self.sigmas, i), at(self.sigmas, i + 1)
        x0 = ve_x0(self.prediction_type, model_output, x, s)
        return (x - x0) / s * (s_next - s)

    def step(self, state, i, x, model_output, noise):
        return (x + self._drift(i, x, model_output)).astype(x.dtype), state

    def picard_variance(self):
        return ve_step_variance(self.sigmas)

    def picard_terms(self, i, x, model_output):
        return self._drift(i, x, model_output), at(self.sigmas, i) * 0


def build(cfg, num_inference_steps: int) -> Euler:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    choose(cfg, "interpolation_type", ("linear",), name)
    choose(cfg, "timestep_type", ("discrete",), name)
    choose(cfg, "final_sigmas_type", ("zero", "sigma_min"), name)
    require_default(cfg, DEFAULTS, ("use_exponential_sigmas", "use_beta_sigmas"), name)
    ts, sigmas, init = sigma_schedule(cfg, num_inference_steps, name, karras_config_bounds=True,
                                      pin_terminal=True)
    return Euler(timesteps=f32(ts), sigmas=f32(sigmas), init_noise_sigma=f32(init),
                 num_steps=len(ts), prediction_type=pt)
