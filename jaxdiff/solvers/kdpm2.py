"""DPM-Solver-2 in k-diffusion form (``sample_dpm_2``, Karras et al. 2022's second-order
sampler with a midpoint in log sigma): each step evaluates the model at sigma_k, moves by
Euler to the geometric mean sigma_mid = sqrt(sigma_k sigma_{k+1}), evaluates there and
redoes the whole step from sigma_k with the midpoint's slope. The last step is a plain
Euler step to sigma = 0.

``timesteps`` has one entry per model evaluation (2N - 1), like diffusers'
``KDPM2DiscreteScheduler.timesteps``: even entries are the Euler (first) evaluations, odd
entries the midpoint ones, whose times are the fractional training times of sigma_mid.
The ancestral variant (``kdpm2_ancestral``) shares the step and differs in its tables.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import (Solver, at, check_prediction_type, f32, schedule_from,
                                  solver_dataclass, static_field, ve_x0)
from jaxdiff.solvers.euler import sigma_schedule

DIFFUSERS_CLASS = "KDPM2DiscreteScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="linear", trained_betas=None, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
                timestep_spacing="linspace", steps_offset=0)
STEP_OPTIONS = {}
# diffusers raises NotImplementedError for prediction_type="sample" in both KDPM2 schedulers
PREDICTIONS = ("epsilon", "v_prediction")


class KDPM2State(NamedTuple):
    sample: jax.Array   # [...] x at the start of the pending step (set by a first evaluation)


@solver_dataclass
class KDPM2(Solver):
    timesteps: jax.Array          # [2N - 1]
    sigmas: jax.Array             # [2N - 1] sigma of each evaluation (input scaling, x0)
    dt: jax.Array                 # [2N - 1] first: sigma_mid - sigma_k; second: sigma_to - sigma_k
    sigma_up: jax.Array           # [2N - 1] noise std added after a second evaluation (0 here)
    first: jax.Array              # [2N - 1] bool: Euler (first) evaluation
    init_noise_sigma: jax.Array   # scalar
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")

    def scale_model_input(self, x, i):
        s = at(self.sigmas, i)
        return (x / ((s * s + 1) ** 0.5)).astype(x.dtype)

    def init(self, x):
        return KDPM2State(sample=jnp.zeros_like(x))

    def data_prediction(self, i, x, model_output):
        return ve_x0(self.prediction_type, model_output, x, at(self.sigmas, i))

    def step(self, state, i, x, model_output, noise):
        s = at(self.sigmas, i)
        d = (x - self.data_prediction(i, x, model_output)) / s
        first = at(self.first, i)
        start = jnp.where(first, x, state.sample)          # a second evaluation redoes the step
        x_next = start + d * at(self.dt, i)
        if self.stochastic:
            x_next = x_next + noise * at(self.sigma_up, i)
        return x_next.astype(x.dtype), KDPM2State(sample=start)


def lerp_half_log(a, b):
    """exp of the midpoint of log a and log b in float32, the way torch's ``lerp`` with
    weight 0.5 computes it (end - (end - start) / 2); a zero end gives 0."""
    la, lb = np.log(np.asarray(a, np.float32)), np.log(np.asarray(b, np.float32))
    with np.errstate(invalid="ignore"):
        return np.exp(lb - (lb - la) * np.float32(0.5)).astype(np.float32)


def interleaved(cfg, num_inference_steps: int, solver: str):
    """The sigma schedule of both KDPM2 schedulers -> (timesteps float32 [N],
    sigmas float32 [N + 1] ending at 0, init_noise_sigma, training log sigmas)."""
    ts, sigmas, init = sigma_schedule(cfg, num_inference_steps, solver,
                                      karras_config_bounds=False, pin_terminal=False,
                                      karras_round=True)
    train = schedules.sigmas_from_alphas_cumprod(schedule_from(cfg).alphas_cumprod)
    return ts, sigmas, init, np.log(train)


def evaluation_tables(sig, mid, mid_ts, ts, to, up=None):
    """Per-evaluation tables [2N - 1] from per-step ones: step k (of N) evaluates at sigma_k
    (time ts[k]), moves by Euler to mid[k], evaluates there (time mid_ts[k]) and redoes the
    step from sigma_k to to[k] (plus noise of std up[k]); the last step has no midpoint, its
    Euler move ends at sigma = 0. ``mid``, ``mid_ts``, ``to``, ``up``: [N - 1]."""
    n = len(ts)
    pad = lambda a: np.concatenate([np.asarray(a, np.float32)[:n - 1],   # noqa: E731
                                    np.zeros(1, np.float32)])
    mid, mid_ts, to = pad(mid), pad(mid_ts), pad(to)
    up = np.zeros(n, np.float32) if up is None else pad(up)
    m = 2 * n - 1
    first = np.arange(m) % 2 == 0
    k = np.arange(m) // 2                                    # the step an evaluation belongs to
    s_k = sig[k]
    tt = np.where(first, ts[k], mid_ts[k])
    s_eval = np.where(first, s_k, mid[k])
    dt = np.where(first, mid[k] - s_k, to[k] - s_k)          # float32, as diffusers
    ups = np.where(first, np.float32(0), up[k])
    return tt, s_eval, dt, ups, first


def build(cfg, num_inference_steps: int) -> KDPM2:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name, PREDICTIONS)
    ts, sigmas, init, log_sigmas = interleaved(cfg, num_inference_steps, name)
    n = len(ts)
    # midpoint of step k: between sigma_k and sigma_{k+1} (float32, as diffusers)
    mid = lerp_half_log(sigmas[1:n], sigmas[:n - 1]) if n > 1 else np.zeros(0, np.float32)
    mid_ts = schedules.sigma_to_t(mid, log_sigmas) if n > 1 else np.zeros(0)
    tt, s_eval, dt, ups, first = evaluation_tables(sigmas, mid, mid_ts, ts, sigmas[1:n])
    return KDPM2(timesteps=f32(tt), sigmas=f32(s_eval), dt=f32(dt), sigma_up=f32(ups),
                 first=jnp.asarray(first), init_noise_sigma=f32(init), num_steps=len(tt),
                 prediction_type=pt)
