"""DPM-Solver-2 ancestral (k-diffusion ``sample_dpm_2_ancestral``): KDPM2's midpoint step
aimed at sigma_down instead of sigma_{k+1}, then fresh noise of std sigma_up, with
sigma_down^2 + sigma_up^2 = sigma_{k+1}^2 (as Euler ancestral); the midpoint is the
geometric mean of sigma_k and sigma_down.

One model evaluation per ``timesteps`` entry (2N - 1, diffusers'
``KDPM2AncestralDiscreteScheduler.timesteps``); ``step`` reads ``noise[i]`` (one standard
normal draw per evaluation index, as the other stochastic solvers) and uses it only at the
midpoint evaluations, where diffusers draws its noise."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import check_prediction_type, f32, solver_dataclass
from jaxdiff.solvers.kdpm2 import (KDPM2, PREDICTIONS, evaluation_tables, interleaved,
                                   lerp_half_log)

DIFFUSERS_CLASS = "KDPM2AncestralDiscreteScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="linear", trained_betas=None, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
                timestep_spacing="linspace", steps_offset=0)
STEP_OPTIONS = {}


@solver_dataclass
class KDPM2Ancestral(KDPM2):
    stochastic = True


def build(cfg, num_inference_steps: int) -> KDPM2Ancestral:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name, PREDICTIONS)
    ts, sigmas, init, log_sigmas = interleaved(cfg, num_inference_steps, name)
    n = len(ts)
    s_from, s_to = sigmas[:n - 1], sigmas[1:n]                 # float32, diffusers' op order
    up = np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
    down = np.sqrt(np.maximum(s_to ** 2 - up ** 2, 0))
    mid = lerp_half_log(s_from, down)
    mid_ts = schedules.sigma_to_t(mid, log_sigmas) if n > 1 else np.zeros(0)
    tt, s_eval, dt, ups, first = evaluation_tables(sigmas, mid, mid_ts, ts, down, up)
    return KDPM2Ancestral(timesteps=f32(tt), sigmas=f32(s_eval), dt=f32(dt), sigma_up=f32(ups),
                          first=jnp.asarray(first), init_noise_sigma=f32(init),
                          num_steps=len(tt), prediction_type=pt)
