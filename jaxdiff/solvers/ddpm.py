"""DDPM (Ho et al. 2020): ancestral sampling of the posterior q(x_{t'} | x_t, x0_pred)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import (Solver, VPPrediction, at, check_prediction_type, choose, f32,
                                  postprocess_x0, schedule_from, solver_dataclass,
                                  static_field, vp_x0)

DIFFUSERS_CLASS = "DDPMScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, variance_type="fixed_small",
                clip_sample=True, prediction_type="epsilon", thresholding=False,
                dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
STEP_OPTIONS = {}
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@solver_dataclass
class DDPM(VPPrediction, Solver):
    picard = "single"      # Picard support (a class attribute, not a field)
    timesteps: jax.Array             # [N] model time
    sqrt_abar: jax.Array             # [N] sqrt(alphas_cumprod[t])
    sqrt_1m_abar: jax.Array          # [N] sqrt(1 - alphas_cumprod[t])
    coef_x0: jax.Array               # [N] posterior mean coefficient of x0_pred
    coef_x: jax.Array                # [N] posterior mean coefficient of x_t
    std: jax.Array                   # [N] posterior std (0 where diffusers adds no noise, t = 0)
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")
    clip_sample: bool = static_field(default=True)
    clip_sample_range: float = static_field(default=1.0)
    thresholding: bool = static_field(default=False)
    dynamic_thresholding_ratio: float = static_field(default=0.995)
    sample_max_value: float = static_field(default=1.0)

    stochastic = True
    init_noise_sigma = 1.0

    segmentable = True

    def _mean_std(self, i, x, model_output):
        x0 = vp_x0(self.prediction_type, model_output, x, at(self.sqrt_abar, i),
                   at(self.sqrt_1m_abar, i))
        x0 = postprocess_x0(x0, thresholding=self.thresholding, clip_sample=self.clip_sample,
                            clip_sample_range=self.clip_sample_range,
                            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                            sample_max_value=self.sample_max_value)
        mean = at(self.coef_x0, i) * x0 + at(self.coef_x, i) * x
        return mean, at(self.std, i)

    def step(self, state, i, x, model_output, noise):
        mean, std = self._mean_std(i, x, model_output)
        return (mean + std * noise).astype(x.dtype), state

    def picard_terms(self, i, x, model_output):
        mean, std = self._mean_std(i, x, model_output)
        return mean - x, std

    def picard_variance(self):
        # diffusers' DDPM _get_variance: the step's variance, clamped at 1e-20 (also at t = 0)
        return jnp.maximum(jnp.square(self.std), 1e-20)


def build(cfg, num_inference_steps: int) -> DDPM:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    variance_type = choose(cfg, "variance_type", VARIANCE_TYPES, name)
    spacing = choose(cfg, "timestep_spacing", schedules.TIMESTEP_SPACINGS, name)
    sched = schedule_from(cfg)
    T = sched.num_train_timesteps
    n = schedules.check_num_steps(num_inference_steps, T)
    ac = sched.alphas_cumprod                                   # float32 [T]
    ts = schedules.discrete_timesteps(T, n, spacing, int(cfg["steps_offset"]))
    schedules.check_timesteps(ts, T, name, cfg["steps_offset"])

    one = np.float32(1.0)
    a_t = ac[ts]
    a_prev = np.array([ac[p] if p >= 0 else one for p in list(ts[1:]) + [-1]], np.float32)
    # float32, in diffusers' order of operations
    beta_t, beta_prev = one - a_t, one - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = one - cur_alpha
    coef_x0 = (np.sqrt(a_prev) * cur_beta) / beta_t
    coef_x = np.sqrt(cur_alpha) * beta_prev / beta_t
    var = np.maximum(beta_prev / beta_t * cur_beta, np.float32(1e-20))
    if variance_type == "fixed_small":
        std = np.sqrt(var)
    elif variance_type == "fixed_small_log":
        std = np.exp(np.float32(0.5) * np.log(var))   # diffusers multiplies by this, unsquared
    else:
        std = np.sqrt(cur_beta)
    std = np.where(ts > 0, std, 0).astype(np.float32)
    return DDPM(timesteps=f32(ts), sqrt_abar=f32(np.sqrt(a_t)), sqrt_1m_abar=f32(np.sqrt(beta_t)),
                coef_x0=f32(coef_x0), coef_x=f32(coef_x), std=f32(std), num_steps=len(ts),
                prediction_type=pt, clip_sample=bool(cfg["clip_sample"]),
                clip_sample_range=float(cfg["clip_sample_range"]),
                thresholding=bool(cfg["thresholding"]),
                dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                sample_max_value=float(cfg["sample_max_value"]))
