"""DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import (Solver, VPPrediction, vp_step_variance, at, check_prediction_type, choose, f32,
                                  schedule_from, solver_dataclass,
                                  static_field, vp_eps, vp_x0)

DIFFUSERS_CLASS = "DDIMScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, clip_sample=True,
                set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                sample_max_value=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False)
# diffusers passes these to step(), not to the constructor
STEP_OPTIONS = dict(eta=0.0, use_clipped_model_output=False)


@solver_dataclass
class DDIM(VPPrediction, Solver):
    timesteps: jax.Array             # [N]
    sqrt_abar: jax.Array             # [N] sqrt(abar_t)
    sqrt_1m_abar: jax.Array          # [N] sqrt(1 - abar_t)
    sqrt_abar_prev: jax.Array        # [N] sqrt(abar_{t - T/N}) (final alpha when < 0)
    dir_coef: jax.Array              # [N] sqrt(1 - abar_prev - std^2)
    std: jax.Array                   # [N] eta * sqrt(posterior variance)
    eta: jax.Array                   # scalar (informative; std already includes it)
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")
    stochastic: bool = static_field(default=False)
    use_clipped_model_output: bool = static_field(default=False)
    clip_sample: bool = static_field(default=True)
    clip_sample_range: float = static_field(default=1.0)
    thresholding: bool = static_field(default=False)
    dynamic_thresholding_ratio: float = static_field(default=0.995)
    sample_max_value: float = static_field(default=1.0)

    init_noise_sigma = 1.0

    segmentable = True

    def _mean_std(self, i, x, model_output):
        a, s = at(self.sqrt_abar, i), at(self.sqrt_1m_abar, i)
        x0 = self._post(vp_x0(self.prediction_type, model_output, x, a, s))
        eps = vp_eps(self.prediction_type, model_output, x, a, s)
        if self.use_clipped_model_output:
            eps = (x - a * x0) / s
        mean = at(self.sqrt_abar_prev, i) * x0 + at(self.dir_coef, i) * eps
        return mean, at(self.std, i)

    def step(self, state, i, x, model_output, noise):
        mean, std = self._mean_std(i, x, model_output)
        if self.stochastic:
            mean = mean + std * noise
        return mean.astype(x.dtype), state

    def picard_terms(self, i, x, model_output):
        mean, std = self._mean_std(i, x, model_output)
        return mean - x, std if self.stochastic else jnp.zeros_like(std)

    def picard_variance(self):
        return vp_step_variance(jnp.square(self.sqrt_abar), jnp.square(self.sqrt_abar_prev))

    grid_family = "ddim"
    picard = "single"

    def grid_alpha_bars(self):
        return np.square(np.asarray(self.sqrt_abar, np.float64))

    def _on_grid(self, noise_schedule, t, network_times, options, where):
        eta = float(self.eta) if self.stochastic else 0.0
        grid = on_vp_grid(noise_schedule, t[:-1], t[1:], eta=eta,
                          prediction_type=self.prediction_type, network_times=network_times)
        return dataclasses.replace(
            grid, use_clipped_model_output=self.use_clipped_model_output,
            clip_sample=self.clip_sample, clip_sample_range=self.clip_sample_range,
            thresholding=self.thresholding,
            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
            sample_max_value=self.sample_max_value)


def build(cfg, num_inference_steps: int, eta: float = 0.0,
          use_clipped_model_output: bool = False) -> DDIM:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    spacing = choose(cfg, "timestep_spacing", schedules.TIMESTEP_SPACINGS, name)
    eta = float(eta)
    if not eta >= 0.0:
        raise ValueError(f"{name}: eta must be >= 0, got {eta}")
    sched = schedule_from(cfg)
    T = sched.num_train_timesteps
    n = schedules.check_num_steps(num_inference_steps, T)
    ac = sched.alphas_cumprod
    ts = schedules.discrete_timesteps(T, n, spacing, int(cfg["steps_offset"]))
    schedules.check_timesteps(ts, T, name, cfg["steps_offset"])
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    prev = ts - T // n                                # diffusers' rule, whatever the spacing
    one = np.float32(1.0)
    a_t = ac[ts]
    a_prev = np.array([ac[p] if p >= 0 else final for p in prev], np.float32)
    beta_t, beta_prev = one - a_t, one - a_prev
    var = (beta_prev / beta_t) * (one - a_t / a_prev)
    std = np.float32(eta) * np.sqrt(var)
    dir_coef = np.sqrt(one - a_prev - std ** 2)
    return DDIM(timesteps=f32(ts), sqrt_abar=f32(np.sqrt(a_t)), sqrt_1m_abar=f32(np.sqrt(beta_t)),
                sqrt_abar_prev=f32(np.sqrt(a_prev)), dir_coef=f32(dir_coef), std=f32(std),
                eta=f32(eta), num_steps=len(ts), prediction_type=pt, stochastic=eta > 0,
                use_clipped_model_output=bool(use_clipped_model_output),
                clip_sample=bool(cfg["clip_sample"]),
                clip_sample_range=float(cfg["clip_sample_range"]),
                thresholding=bool(cfg["thresholding"]),
                dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                sample_max_value=float(cfg["sample_max_value"]))


def on_vp_grid(noise_schedule, t, t_next, *, eta=0.0, prediction_type: str = "epsilon",
               network_times=None) -> DDIM:
    """DDIM on any time grid of a continuous-time VP schedule: step i moves from t[i] to
    t_next[i] (continuous times, ``jaxdiff.schedules.NoiseScheduleVP``).

    The tables are jnp functions of the schedule's alpha_t = ``marginal_alpha(t)`` and
    sigma_t = ``marginal_std(t)``, so t and t_next may be traced (and differentiated).
    The step is the ordinary ``DDIM.step`` (no clipping): x' = alpha_s x0 + dir eps
    (+ std noise) with std = eta (sigma_s / sigma_t) sqrt(1 - (alpha_t / alpha_s)^2) and
    dir = sqrt(sigma_s^2 - std^2). ``eta`` may be traced; any value but a Python 0 makes
    the solver stochastic. ``timesteps`` (what drivers pass to the model) are the
    continuous times t, or ``network_times`` [K].
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    ns = noise_schedule
    t, t_next, times = schedules.vp_grid_times(ns, t, t_next, network_times)
    a_t, a_s = ns.marginal_alpha(t), ns.marginal_alpha(t_next)
    sig_t, sig_s = ns.marginal_std(t), ns.marginal_std(t_next)
    stochastic = not (isinstance(eta, (int, float)) and not isinstance(eta, bool)
                      and float(eta) == 0.0)
    if stochastic:
        eta_arr = jnp.asarray(eta, t.dtype)
        std = eta_arr * (sig_s / sig_t) * jnp.sqrt(1.0 - jnp.square(a_t / a_s))
        dir_coef = jnp.sqrt(jnp.square(sig_s) - jnp.square(std))
    else:
        eta_arr = jnp.zeros((), t.dtype)
        std, dir_coef = jnp.zeros_like(sig_s), sig_s
    return DDIM(timesteps=times, sqrt_abar=a_t, sqrt_1m_abar=sig_t, sqrt_abar_prev=a_s,
                dir_coef=dir_coef, std=std, eta=eta_arr, num_steps=int(t.shape[0]),
                prediction_type=prediction_type, stochastic=stochastic, clip_sample=False)
