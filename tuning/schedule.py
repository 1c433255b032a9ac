"""The continuous-time VP noise schedule that TimeTuner works in.

TimeTuner evaluates the network at r * t, a time that usually falls between the training
timesteps of a discrete model. So the schedule must be defined for every real t (and for t
slightly outside [1/N, 1], which a ratio above 1 or a small final time can reach) and be
differentiable in t: gradients of the tuning loss flow through alpha_t and sigma_t. For
discrete models log(alpha) is interpolated linearly between the training timesteps and
extended linearly past the first and last ones, the convention of DPM-Solver and TimeTuner.

Notation (DPM-Solver): q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), alpha_t^2 + sigma_t^2 = 1,
lambda_t = log(alpha_t / sigma_t) (half the log-SNR).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("discrete", "linear", "cosine")

# The cosine schedule of Nichol & Dhariwal as a continuous-time VP process (DPM-Solver's
# constants): alpha_t = cos((t + s) / (1 + s) * pi / 2) / cos(s / (1 + s) * pi / 2).
COSINE_S = 0.008
COSINE_LOG_ALPHA_0 = math.log(math.cos(COSINE_S / (1.0 + COSINE_S) * math.pi / 2.0))
# alpha_t reaches 0 at t = 1, where lambda is -inf; like DPM-Solver we stop a bit earlier.
COSINE_T_END = 0.9946
CONTINUOUS_EPS = 1e-3


def interpolate(x, xp, fp):
    """Piecewise-linear f(x) through the knots (xp, fp), continued linearly beyond them.

    ``np.interp`` clamps outside [xp[0], xp[-1]]; we extend the first and last segments
    instead, so that alpha_t keeps a useful slope (and a gradient) when a tuned time
    r * t leaves the training range. xp must be strictly increasing, [K] with K >= 2;
    x has any shape and the result has x's shape.
    """
    k = xp.shape[0]
    seg = jnp.clip(jnp.searchsorted(xp, x, side="right") - 1, 0, k - 2)
    x0, x1 = xp[seg], xp[seg + 1]
    y0, y1 = fp[seg], fp[seg + 1]
    return y0 + (x - x0) * ((y1 - y0) / (x1 - x0))


def _concrete_1d(name, value) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except Exception as err:  # a traced array, a ragged list, ...
        raise ValueError(f"{name} must be a concrete 1-D array of numbers, got "
                         f"{type(value).__name__}") from err
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


@jax.tree_util.register_pytree_node_class
class NoiseScheduleVP:
    """alpha_t, sigma_t, lambda_t and the inverse of lambda for a VP diffusion.

    ``schedule``: 'discrete' (a model trained on n = 0..N-1; give ``betas`` or
    ``alphas_cumprod``, [N]; training step n sits at t = (n + 1) / N), 'linear' (the
    VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0)) or 'cosine'.

    A pytree: the knot arrays (discrete) and beta_0, beta_1 (linear) are leaves, so the
    schedule can be passed into jitted code as an argument; the schedule name, N, T and
    eps are static. ``T`` is the time sampling starts from, ``eps`` the time it ends at.
    """

    def __init__(self, schedule: str = "discrete", betas=None, alphas_cumprod=None,
                 continuous_beta_0: float = 0.1, continuous_beta_1: float = 20.0,
                 dtype=jnp.float32):
        if schedule not in SCHEDULES:
            raise ValueError(f"unsupported noise schedule {schedule!r}; choose one of "
                             f"{list(SCHEDULES)}")
        self.schedule = schedule
        self.dtype = jnp.dtype(dtype)
        self.log_alpha_array: Optional[jax.Array] = None   # [N]
        self.t_array: Optional[jax.Array] = None           # [N]
        self.beta_0: Optional[jax.Array] = None
        self.beta_1: Optional[jax.Array] = None
        if schedule == "discrete":
            if (betas is None) == (alphas_cumprod is None):
                raise ValueError("the 'discrete' schedule needs exactly one of betas or "
                                 "alphas_cumprod")
            if betas is not None:
                b = _concrete_1d("betas", betas)
                if np.any(b <= 0) or np.any(b >= 1):
                    raise ValueError("betas must lie in (0, 1): the interpolation and "
                                     "inverse_lambda need strictly decreasing alphas")
                # Accumulate in float64 so a float32 schedule is correctly rounded.
                log_alphas = 0.5 * np.cumsum(np.log1p(-b))
            else:
                ac = _concrete_1d("alphas_cumprod", alphas_cumprod)
                if np.any(ac <= 0) or np.any(ac > 1) or np.any(np.diff(ac) >= 0):
                    raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1]")
                log_alphas = 0.5 * np.log(ac)
            n = log_alphas.shape[0]
            self.total_N = int(n)
            self.T = 1.0
            self.eps = 1.0 / n
            self.log_alpha_array = jnp.asarray(log_alphas, self.dtype)
            self.t_array = jnp.asarray(np.linspace(0.0, 1.0, n + 1)[1:], self.dtype)
        else:
            # Continuous-time models have no training grid; N = 1000 only sets the step
            # grid of the reference sampler (and eps = 1 / N).
            self.total_N = 1000
            self.eps = CONTINUOUS_EPS
            if schedule == "linear":
                b0, b1 = float(continuous_beta_0), float(continuous_beta_1)
                if not (0.0 <= b0 < b1) or not math.isfinite(b1):
                    raise ValueError(f"the 'linear' schedule needs 0 <= continuous_beta_0 < "
                                     f"continuous_beta_1, got {b0} and {b1}")
                self.beta_0 = jnp.asarray(b0, self.dtype)
                self.beta_1 = jnp.asarray(b1, self.dtype)
                self.T = 1.0
            else:
                self.T = COSINE_T_END

    # --------------------------------------------------------------------------- pytree
    def tree_flatten(self):
        children = (self.log_alpha_array, self.t_array, self.beta_0, self.beta_1)
        aux = (self.schedule, self.total_N, self.T, self.eps, self.dtype.name)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.schedule, obj.total_N, obj.T, obj.eps, dtype = aux
        obj.dtype = jnp.dtype(dtype)
        obj.log_alpha_array, obj.t_array, obj.beta_0, obj.beta_1 = children
        return obj

    def __repr__(self):
        return (f"NoiseScheduleVP(schedule={self.schedule!r}, total_N={self.total_N}, "
                f"T={self.T}, eps={self.eps}, dtype={self.dtype.name})")

    # --------------------------------------------------------------------------- maths
    def marginal_log_mean_coeff(self, t):
        """log(alpha_t); t of any shape."""
        t = jnp.asarray(t)
        if self.schedule == "discrete":
            return interpolate(t, self.t_array, self.log_alpha_array)
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        angle = (t + COSINE_S) / (1.0 + COSINE_S) * (math.pi / 2.0)
        return jnp.log(jnp.cos(angle)) - COSINE_LOG_ALPHA_0

    def marginal_alpha(self, t):
        return jnp.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        # -expm1 keeps sigma accurate near t = 0 where 1 - alpha^2 cancels in float32.
        return jnp.sqrt(-jnp.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lamb):
        """The t with marginal_lambda(t) == lamb (exact for the continuous schedules, and
        for 'discrete' the inverse of the same piecewise-linear log-alpha)."""
        lamb = jnp.asarray(lamb)
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 log(1 + exp(-2 lambda))
        log_alpha = -0.5 * jnp.logaddexp(0.0, -2.0 * lamb)
        if self.schedule == "discrete":
            # log alpha decreases in t: interpolate on the reversed (increasing) knots.
            return interpolate(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])
        if self.schedule == "linear":
            # -4 log alpha = (beta_1 - beta_0) t^2 + 2 beta_0 t: the positive root, written
            # without the cancellation of (-b + sqrt(b^2 + 4ac)) / 2a.
            b0, db = self.beta_0, self.beta_1 - self.beta_0
            c = -4.0 * log_alpha
            return c / (jnp.sqrt(b0 ** 2 + db * c) + b0)
        angle = jnp.arccos(jnp.exp(log_alpha + COSINE_LOG_ALPHA_0))
        return angle * (2.0 * (1.0 + COSINE_S) / math.pi) - COSINE_S
