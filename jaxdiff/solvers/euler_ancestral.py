"""Euler ancestral (k-diffusion ``sample_euler_ancestral``): an Euler step down to sigma_down,
then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import (Solver, VEPrediction, at, check_prediction_type, f32, solver_dataclass,
                                  static_field, ve_step_variance, ve_x0)
from jaxdiff.solvers.euler import sigma_schedule

DIFFUSERS_CLASS = "EulerAncestralDiscreteScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)
STEP_OPTIONS = {}


@solver_dataclass
class EulerAncestral(VEPrediction, Solver):
    picard = "single"      # Picard support (a class attribute, not a field)
    timesteps: jax.Array          # [N]
    sigmas: jax.Array             # [N + 1]
    sigma_up: jax.Array           # [N]
    sigma_down: jax.Array         # [N]
    init_noise_sigma: jax.Array   # scalar
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")

    stochastic = True

    segmentable = True

    def scale_model_input(self, x, i):
        s = at(self.sigmas, i)
        return (x / ((s * s + 1) ** 0.5)).astype(x.dtype)

    def picard_variance(self):
        return ve_step_variance(self.sigmas)

    def picard_terms(self, i, x, model_output):
        s = at(self.sigmas, i)
        x0 = ve_x0(self.prediction_type, model_output, x, s)
        return (x - x0) / s * (at(self.sigma_down, i) - s), at(self.sigma_up, i)

    def step(self, state, i, x, model_output, noise):
        drift, up = self.picard_terms(i, x, model_output)
        return (x + drift + noise * up).astype(x.dtype), state


def build(cfg, num_inference_steps: int) -> EulerAncestral:
    name = DIFFUSERS_CLASS
    # diffusers raises for prediction_type="sample" here too
    pt = check_prediction_type(cfg, name, ("epsilon", "v_prediction"))
    ts, sigmas, init = sigma_schedule(cfg, num_inference_steps, name, karras_config_bounds=False,
                                      pin_terminal=True)
    s_from, s_to = sigmas[:-1], sigmas[1:]                       # float32, diffusers' op order
    up = np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
    down = np.sqrt(np.maximum(s_to ** 2 - up ** 2, 0))
    return EulerAncestral(timesteps=f32(ts), sigmas=f32(sigmas), sigma_up=f32(up),
                          sigma_down=f32(down), init_noise_sigma=f32(init), num_steps=len(ts),
                          prediction_type=pt)
