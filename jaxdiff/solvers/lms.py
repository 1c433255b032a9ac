"""Linear multistep (k-diffusion ``sample_lms``) on the VE sigma schedule.

The coefficients integrate Lagrange polynomials through the last ``order`` sigmas over
[sigma_i, sigma_{i+1}]. diffusers integrates them numerically (scipy quad) at every step;
the integrands are polynomials, so here they are integrated exactly, in float64, once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import (Solver, at, check_prediction_type, f32, push,
                                  require_default, solver_dataclass, static_field, ve_x0)
from jaxdiff.solvers.euler import sigma_schedule

DIFFUSERS_CLASS = "LMSDiscreteScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
                timestep_spacing="linspace", steps_offset=0)
STEP_OPTIONS = dict(order=4)     # an argument of diffusers' step()


class LMSState(NamedTuple):
    derivatives: jax.Array   # [order, ...] newest last


def lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
    """[N, order] coefficients; column j multiplies the derivative from j steps back."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    out = np.zeros((n, order))
    for i in range(n):
        k = min(i + 1, order)
        for j in range(k):
            poly = np.polynomial.Polynomial([1.0])
            for m in range(k):
                if m != j:
                    poly = poly * np.polynomial.Polynomial([-s[i - m], 1.0]) / (s[i - j] - s[i - m])
            integral = poly.integ()
            out[i, j] = integral(s[i + 1]) - integral(s[i])
    return out


@solver_dataclass
class LMS(Solver):
    timesteps: jax.Array          # [N]
    sigmas: jax.Array             # [N + 1]
    coeffs: jax.Array             # [N, order]
    init_noise_sigma: jax.Array   # scalar
    num_steps: int = static_field()
    order: int = static_field(default=4)
    prediction_type: str = static_field(default="epsilon")

    def scale_model_input(self, x, i):
        s = at(self.sigmas, i)
        return (x / ((s * s + 1) ** 0.5)).astype(x.dtype)

    def init(self, x):
        return LMSState(derivatives=jnp.zeros((self.order,) + x.shape, x.dtype))

    def step(self, state, i, x, model_output, noise):
        s = at(self.sigmas, i)
        x0 = ve_x0(self.prediction_type, model_output, x, s)
        ds = push(state.derivatives, (x - x0) / s)
        c = at(self.coeffs, i)
        acc = c[0] * ds[-1]
        for j in range(1, self.order):
            acc = acc + c[j] * ds[-1 - j]
        return (x + acc).astype(x.dtype), LMSState(derivatives=ds)


def build(cfg, num_inference_steps: int, order: int = 4) -> LMS:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    require_default(cfg, DEFAULTS, ("use_exponential_sigmas", "use_beta_sigmas"), name)
    if int(order) != order or not 1 <= int(order) <= 4:
        raise ValueError(f"{name}: unsupported order={order!r}; jaxdiff implements 1..4")
    ts, sigmas, init = sigma_schedule(cfg, num_inference_steps, name, karras_config_bounds=False,
                                      pin_terminal=False)
    return LMS(timesteps=f32(ts), sigmas=f32(sigmas), coeffs=f32(lms_coefficients(sigmas, order)),
               init_noise_sigma=f32(init), num_steps=len(ts), order=int(order), prediction_type=pt)
