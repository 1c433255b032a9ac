"""Noise schedules: betas, alphas_cumprod, timestep spacings, sigmas; and the continuous-time
VP schedule (``NoiseScheduleVP``) that TimeTuner and the VP-grid solvers work in.

Everything but ``NoiseScheduleVP`` is host-side numpy, run once when a solver is built. The arithmetic follows
diffusers' PyTorch schedulers operation by operation, in the same precisions (float32 betas
and cumulative products, float64 where diffusers goes through numpy float64), because the
solvers are tested step by step against diffusers at 1e-5 and the integer timesteps a UNet
sees must be identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unsupported {name}={value!r}; jaxdiff implements {list(allowed)}")


def linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)`` bit for bit: a float32 step,
    the first half counted up from ``start`` and the second half down from ``end``, each
    value rounded once (fused multiply-add). ``np.linspace`` differs in the last bit."""
    a, b = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([a], np.float32)
    step = np.float64((b - a) / np.float32(num - 1))
    idx = np.arange(num, dtype=np.float64)
    up = np.float64(a) + step * idx
    down = np.float64(b) - step * (num - 1 - idx)
    return np.where(idx < num // 2, up, down).astype(np.float32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal), discretised as 1 - abar(t2) / abar(t1)."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_train_timesteps
    out = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return np.asarray(out, np.float64).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on float32 CPU tensors accumulates in float64: so do we."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so that the last
    timestep has zero SNR while the first keeps its value."""
    betas = np.asarray(betas, np.float32)
    abar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = abar_sqrt - last
    abar_sqrt = abar_sqrt * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001,
               beta_end: float = 0.02, beta_schedule: str = "linear",
               trained_betas: Optional[Sequence[float]] = None,
               rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """float32 betas [num_train_timesteps] as diffusers' schedulers compute them."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
    else:
        _check("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            betas = linspace_f32(beta_start, beta_end, num_train_timesteps)
        elif beta_schedule == "scaled_linear":
            betas = linspace_f32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
        else:
            betas = betas_for_alpha_bar(num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


rescale_betas_zero_snr = rescale_zero_terminal_snr


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return cumprod_f32(np.float32(1.0) - np.asarray(betas, np.float32))


def sigmas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    """VE sigmas sqrt((1 - abar) / abar), float32, indexed by training timestep."""
    ac = np.asarray(ac, np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The training-time discretisation a model was trained with (diffusers' scheduler
    config fields that define it). ``betas``/``alphas_cumprod`` are float32 numpy."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[tuple] = None
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.trained_betas is None:
            _check("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        elif len(self.trained_betas) != self.num_train_timesteps:
            object.__setattr__(self, "num_train_timesteps", len(self.trained_betas))
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @property
    def betas(self) -> np.ndarray:
        tb = None if self.trained_betas is None else list(self.trained_betas)
        return make_betas(self.num_train_timesteps, self.beta_start, self.beta_end,
                          self.beta_schedule, tb, self.rescale_betas_zero_snr)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(self.betas)


def check_num_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n < 1 or n > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps="
                         f"{num_train_timesteps}], got {n}")
    return n


def check_timesteps(ts, num_train_timesteps: int, name: str, steps_offset=None) -> None:
    """Refuse timesteps outside the training schedule, naming the offending range (not the
    whole list: DDPM-1000 has a thousand)."""
    ts = np.asarray(ts)
    T = int(num_train_timesteps)
    if len(ts) and (ts.min() < 0 or ts.max() >= T):
        bad = ts[(ts < 0) | (ts >= T)]
        offset = "" if steps_offset is None else f" with steps_offset={steps_offset}"
        raise ValueError(f"{name}: {len(ts)} timesteps from {int(ts.max())} to {int(ts.min())}"
                         f"{offset} fall outside [0, {T}) ({len(bad)} of them, e.g. "
                         f"{int(bad[0])}); use fewer steps, another timestep_spacing or "
                         f"steps_offset=0")


def discrete_timesteps(num_train_timesteps: int, num_inference_steps: int,
                       spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps of DDPM/DDIM (one per step)."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.int64)
        return ts + steps_offset
    return np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1


def sigma_timesteps(num_train_timesteps: int, num_inference_steps: int,
                    spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """Descending float32 timesteps of the k-diffusion style (Euler, Heun, LMS) schedulers:
    linspace is not rounded, so the UNet sees fractional timesteps."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    return np.arange(T, 0, -T / N).round().astype(np.float32) - np.float32(1)


def multistep_timesteps(num_train_timesteps: int, num_inference_steps: int,
                        spacing: str = "linspace", steps_offset: int = 0,
                        last_timestep: Optional[int] = None) -> np.ndarray:
    """Descending int64 timesteps of the multistep solvers (DPM-Solver, UniPC): N + 1
    points with the final (t = 0 end) one dropped."""
    _check("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, N + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (N + 1)
        ts = (np.arange(0, N + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + steps_offset
    return np.arange(last, 0, -T / N).round().copy().astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, num: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: float64, descending from sigma_max to sigma_min."""
    ramp = np.linspace(0, 1, num)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_sigmas_for(cfg, sigma_min: float, sigma_max: float, num: int,
                      config_bounds: bool) -> np.ndarray:
    """Karras sigmas between the schedule's extremes, or the config's ``sigma_min`` /
    ``sigma_max`` where the scheduler honours them (``config_bounds``) and they are set."""
    lo = cfg.get("sigma_min") if config_bounds else None
    hi = cfg.get("sigma_max") if config_bounds else None
    return karras_sigmas(sigma_min if lo is None else lo, sigma_max if hi is None else hi, num)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma between
    the two neighbouring training sigmas (clipped to the table), as diffusers does, one sigma
    at a time so the float32/float64 promotions are the same as theirs."""
    log_sigmas = np.asarray(log_sigmas)
    out = []
    for sigma in np.asarray(sigmas).reshape(-1):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        out.append(((1 - w) * low_idx + w * high_idx).reshape(()))
    return np.asarray(out)


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Training sigmas linearly interpolated at (possibly fractional) timesteps (float64)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def vp_from_sigma(sigma):
    """VE sigma -> (alpha_t, sigma_t) of the VP process, float64."""
    sigma = np.asarray(sigma, np.float64)
    alpha = 1.0 / np.sqrt(sigma ** 2 + 1.0)
    return alpha, sigma * alpha



# ------------------------------------------------------------------- continuous-time VP
# The continuous-time VP schedule of DPM-Solver and TimeTuner (Xia et al. 2024): defined for
# every real t (also slightly outside [1/N, 1], which a tuned time r * t can reach) and
# differentiable in t, because TimeTuner's loss differentiates through alpha_t and sigma_t.
# For discrete models log(alpha) is interpolated linearly between the training timesteps and
# extended linearly past the first and last ones. Notation (DPM-Solver):
# q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), alpha_t^2 + sigma_t^2 = 1,
# lambda_t = log(alpha_t / sigma_t) (half the log-SNR). Unlike the rest of this module this
# part is jnp (traceable), so that solvers can be built on traced time grids
# (``jaxdiff.solvers.ddim.on_vp_grid``, ``jaxdiff.solvers.dpm_solver.on_vp_grid``).

VP_SCHEDULES = ("discrete", "linear", "cosine")

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
        if schedule not in VP_SCHEDULES:
            raise ValueError(f"unsupported noise schedule {schedule!r}; choose one of "
                             f"{list(VP_SCHEDULES)}")
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


def model_input_time(noise_schedule: NoiseScheduleVP, t_continuous):
    """Continuous t -> the time the network was trained with.

    A discrete model trained on n = 0..N-1 sees n at t = (n + 1) / N; like DPM-Solver we
    feed 1000 * (t - 1 / N) (= n when N = 1000), so fractional n are passed through as
    they are. Continuous-time models take t itself. jnp, so t may be traced.
    """
    if noise_schedule.schedule == "discrete":
        return (t_continuous - 1.0 / noise_schedule.total_N) * 1000.0
    return t_continuous


def continuous_time(noise_schedule: NoiseScheduleVP, t_input):
    """The inverse of ``model_input_time``: network time -> continuous t."""
    if noise_schedule.schedule == "discrete":
        return t_input / 1000.0 + 1.0 / noise_schedule.total_N
    return t_input


__all__ = ["BETA_SCHEDULES", "TIMESTEP_SPACINGS", "Schedule", "alphas_cumprod",
           "betas_for_alpha_bar", "check_num_steps", "cumprod_f32", "discrete_timesteps",
           "interp_sigmas", "karras_sigmas", "linspace_f32", "make_betas",
           "multistep_timesteps", "rescale_betas_zero_snr", "rescale_zero_terminal_snr",
           "sigma_timesteps", "sigma_to_t",
           "sigmas_from_alphas_cumprod", "vp_from_sigma",
           "COSINE_S", "COSINE_T_END", "CONTINUOUS_EPS", "NoiseScheduleVP", "VP_SCHEDULES",
           "continuous_time", "interpolate", "model_input_time", "vp_grid_times"]


def vp_grid_times(noise_schedule, t, t_next, network_times):
    """A time grid on a continuous VP schedule, checked: (t, t_next, network times) as
    arrays of the schedule's dtype; t, t_next [K] may be traced."""
    dt = noise_schedule.dtype
    t = jnp.asarray(t, dt)
    t_next = jnp.asarray(t_next, dt)
    if t.ndim != 1 or t.shape != t_next.shape or t.shape[0] < 1:
        raise ValueError(f"t and t_next must be 1-D of the same non-zero length, got shapes "
                         f"{tuple(t.shape)} and {tuple(t_next.shape)}")
    times = t if network_times is None else jnp.asarray(network_times)
    if times.shape != t.shape:
        raise ValueError(f"network_times must have shape {tuple(t.shape)}, got "
                         f"{tuple(times.shape)}")
    return t, t_next, times
