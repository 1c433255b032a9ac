"""Heun's method (Karras et al. 2022, Algorithm 1 without churn): two model evaluations per
step, the last step a plain Euler step to sigma = 0. ``timesteps`` has one entry per model
evaluation (2N - 1), like diffusers' ``HeunDiscreteScheduler.timesteps``; even entries are
Euler predictions, odd entries the trapezoidal corrections."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import (Solver, at, check_prediction_type, choose, f32,
                                  require_default, solver_dataclass, static_field, ve_x0)
from jaxdiff.solvers.euler import sigma_schedule

DIFFUSERS_CLASS = "HeunDiscreteScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace",
                steps_offset=0)
STEP_OPTIONS = {}


class HeunState(NamedTuple):
    derivative: jax.Array   # [...] Euler slope of the pending step
    dt: jax.Array           # scalar sigma_next - sigma of the pending step
    sample: jax.Array       # [...] x at the start of the pending step


@solver_dataclass
class Heun(Solver):
    timesteps: jax.Array          # [2N - 1]
    sigmas: jax.Array             # [2N - 1] sigma of each evaluation (model input scaling)
    dt: jax.Array                 # [2N - 1] sigma_next - sigma at first-order evaluations
    first: jax.Array              # [2N - 1] bool: Euler (predictor) evaluation
    init_noise_sigma: jax.Array   # scalar
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")
    clip_sample: bool = static_field(default=False)
    clip_sample_range: float = static_field(default=1.0)

    def scale_model_input(self, x, i):
        s = at(self.sigmas, i)
        return (x / ((s * s + 1) ** 0.5)).astype(x.dtype)

    def init(self, x):
        return HeunState(derivative=jnp.zeros_like(x), dt=jnp.zeros((), x.dtype),
                         sample=jnp.zeros_like(x))

    def step(self, state, i, x, model_output, noise):
        s = at(self.sigmas, i)
        x0 = ve_x0(self.prediction_type, model_output, x, s)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        d = (x - x0) / s
        first = at(self.first, i)
        dt1 = at(self.dt, i)
        x_first = x + d * dt1
        x_second = state.sample + (state.derivative + d) / 2 * state.dt
        x_next = jnp.where(first, x_first, x_second).astype(x.dtype)
        new = HeunState(derivative=jnp.where(first, d, state.derivative),
                        dt=jnp.where(first, dt1, state.dt).astype(state.dt.dtype),
                        sample=jnp.where(first, x, state.sample))
        return x_next, new


def build(cfg, num_inference_steps: int) -> Heun:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    require_default(cfg, DEFAULTS, ("use_exponential_sigmas", "use_beta_sigmas"), name)
    choose(cfg, "clip_sample", (True, False), name)
    ts, sigmas, init = sigma_schedule(cfg, num_inference_steps, name, karras_config_bounds=False,
                                      pin_terminal=False)
    # one entry per evaluation: s0, s1, s1, ..., s_{N-1}, s_{N-1} (and the final 0 after)
    sig = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    tt = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(np.float32)
    m = len(tt)
    first = np.arange(m) % 2 == 0
    dt = np.where(first, sig[1:m + 1] - sig[:m], 0).astype(np.float32)
    return Heun(timesteps=f32(tt), sigmas=f32(sig[:m]), dt=f32(dt), first=jnp.asarray(first),
                init_noise_sigma=f32(init), num_steps=m, prediction_type=pt,
                clip_sample=bool(cfg["clip_sample"]),
                clip_sample_range=float(cfg["clip_sample_range"]))
