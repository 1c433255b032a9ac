"""DDIM with tuned timesteps: the time grid, one step, and the whole loop as one lax.scan.

TimeTuner's observation is that a sampler's intermediate x_t does not carry exactly the
noise level of its nominal time t_i (the earlier steps' truncation errors shift it), so the
network should be asked at a corrected time r_i * t_i. Only the network's input time
changes: the DDIM update keeps the coefficients alpha/sigma of t_i and t_{i+1}. Everything
here is differentiable in the ratios r, which is what ``optimize_timesteps`` (and users who
tune end to end) differentiate.
"""

from __future__ import annotations

import collections
import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling.pytree import combine, partition
from tuning.schedule import NoiseScheduleVP

GRIDS = ("reference", "uniform")
SOLVERS = ("ddim", "dpmsolver++")

# How often each jitted function has been traced, for "does not recompile" tests.
TRACE_COUNTS: collections.Counter = collections.Counter()


def _check_num_steps(num_steps, total_n: int) -> int:
    if (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
            or not 1 <= int(num_steps) <= total_n):
        raise ValueError(f"num_steps must be an integer in [1, {total_n}], got {num_steps!r}")
    return int(num_steps)


def time_grid(noise_schedule: NoiseScheduleVP, num_steps: Optional[int] = None,
              timesteps=None, grid: str = "reference"):
    """-> (t [K], t_next [K]) as float64 numpy: step i goes from t[i] to t_next[i].

    ``grid='reference'`` is the grid of TimeTuner's DDIM: K training steps
    n_i = (K - 1 - i) * (N // K) + 1 (DDIM's "leading" spacing with offset 1), placed at
    their training times t = (n + 1) / N, and a final step to t = 1 / N (= eps). For
    continuous schedules the same grid is used with N = 1000. ``grid='uniform'``:
    K + 1 times evenly spaced from T down to eps (DPM-Solver's 'time_uniform').

    ``timesteps`` [K] overrides both: decreasing times in the network's own units (what
    ``model_wrapper`` passes to the network: 0..999 for 1000-step discrete models,
    continuous t otherwise), followed by the final step to eps.
    """
    ns = noise_schedule
    n_total = ns.total_N
    if timesteps is not None:
        ts = np.asarray(timesteps, np.float64)
        if ts.ndim != 1 or ts.shape[0] < 1:
            raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {ts.shape}")
        if num_steps is not None and int(num_steps) != ts.shape[0]:
            raise ValueError(f"num_steps={num_steps} disagrees with len(timesteps)="
                             f"{ts.shape[0]}")
        # inverse of model_input_time
        t = ts / 1000.0 + 1.0 / n_total if ns.schedule == "discrete" else ts
        t_next = np.concatenate([t[1:], [ns.eps]])
    elif grid == "reference":
        if num_steps is None:
            raise ValueError("pass num_steps or timesteps")
        k = _check_num_steps(num_steps, n_total)
        n = np.arange(k)[::-1] * (n_total // k) + 1
        t = (n + 1.0) / n_total
        t_next = np.concatenate([t[1:], [ns.eps]])
    elif grid == "uniform":
        if num_steps is None:
            raise ValueError("pass num_steps or timesteps")
        k = _check_num_steps(num_steps, n_total)
        ts = np.linspace(ns.T, ns.eps, k + 1)
        t, t_next = ts[:-1], ts[1:]
    else:
        raise ValueError(f"unsupported grid {grid!r}; choose one of {list(GRIDS)}")
    if not np.all(np.isfinite(t)) or np.any(t_next >= t):
        raise ValueError(f"timesteps must be finite and strictly decreasing to eps="
                         f"{ns.eps}; got times {t.tolist()}")
    return t, t_next


def predict_noise(model_fn, x, t, condition=None, uncond_condition=None):
    """model_fn at the scalar (or [B]) continuous time t for the batch x [B, ...]. The
    conditions are passed only when given, so plain ``fn(x, t)`` models work too."""
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if condition is None and uncond_condition is None:
        return model_fn(x, t)
    return model_fn(x, t, condition, uncond_condition)


def data_prediction(noise_schedule: NoiseScheduleVP, x, eps, t):
    """x0 predicted from x at time t and its predicted noise: (x - sigma_t eps) / alpha_t."""
    return (x - noise_schedule.marginal_std(t) * eps) / noise_schedule.marginal_alpha(t)


def ddim_update(noise_schedule: NoiseScheduleVP, x, eps, t, s, eta=0.0, noise=None):
    """The DDIM move from time t to s < t given predicted noise eps -> (x_s, x0_pred).

    ``noise`` None is the deterministic (eta = 0) update; otherwise the DDIM variance
    eta^2 * sigma_s^2 / sigma_t^2 * (1 - alpha_t^2 / alpha_s^2) of fresh noise is added.
    """
    ns = noise_schedule
    a_t, a_s = ns.marginal_alpha(t), ns.marginal_alpha(s)
    sig_t, sig_s = ns.marginal_std(t), ns.marginal_std(s)
    x0_pred = data_prediction(ns, x, eps, t)
    if noise is None:
        return a_s * x0_pred + sig_s * eps, x0_pred
    std = eta * (sig_s / sig_t) * jnp.sqrt(1.0 - jnp.square(a_t / a_s))
    direction = jnp.sqrt(jnp.square(sig_s) - jnp.square(std))
    return a_s * x0_pred + direction * eps + std * noise, x0_pred


def ddim_step(model_fn, noise_schedule, x, t, s, ratio=1.0, eta=0.0, noise=None,
              condition=None, uncond_condition=None):
    """One TimeTuner DDIM step: the network at ratio * t, the update with t's and s's
    coefficients. -> (x_s, x0_pred)."""
    eps = predict_noise(model_fn, x, ratio * t, condition, uncond_condition)
    return ddim_update(noise_schedule, x, eps, t, s, eta, noise)


@functools.partial(jax.jit, static_argnames=("spec", "stochastic", "intermediates"))
def _ddim_loop(dynamic, x, t_cur, t_next, ratios, eta, keys, *, spec, stochastic,
               intermediates):
    TRACE_COUNTS["ddim_sample"] += 1
    model_fn, ns, cond, uncond = combine(dynamic, spec)

    def body(x, inputs):  # x [B, ...]
        t, s, r, k = inputs
        noise = jax.random.normal(k, x.shape, x.dtype) if stochastic else None
        x_new, x0 = ddim_step(model_fn, ns, x, t, s, r, eta, noise, cond, uncond)
        x_new = x_new.astype(x.dtype)
        return x_new, ((x_new, x0.astype(x.dtype)) if intermediates else None)

    x_out, traj = jax.lax.scan(body, x, (t_cur, t_next, ratios, keys))
    return x_out, traj


def ddim_loop(model_fn, noise_schedule, x, t_cur, t_next, ratios, eta=0.0, key=None,
              condition=None, uncond_condition=None, intermediates=False):
    """Run all steps under jax.jit. x [B, ...]; t_cur, t_next, ratios [K].

    The model function, the schedule and the conditions are split into traced arrays and
    a static rest (like ``jaxdiff.sample``), so new weights, conditions, ratios or times
    reuse the compiled program; eta is traced too. -> (x_0, (x_t [K, B, ...],
    x0_pred [K, B, ...]) or None).
    """
    stochastic = key is not None
    if not stochastic and not (isinstance(eta, numbers.Real) and float(eta) == 0.0):
        raise ValueError("eta > 0 draws noise: pass key=")
    if isinstance(eta, numbers.Real) and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    k = t_cur.shape[0]
    keys = jax.random.split(key, k) if stochastic else jnp.zeros((k,), jnp.float32)
    dynamic, spec = partition((model_fn, noise_schedule, condition, uncond_condition))
    return _ddim_loop(dynamic, x, t_cur, t_next, ratios, jnp.asarray(eta, t_cur.dtype),
                      keys, spec=spec, stochastic=stochastic,
                      intermediates=bool(intermediates))


# ------------------------------------------------------------------------------ DPM-Solver++
def check_solver(solver: str, order: int = 2) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unsupported solver {solver!r}; choose one of {list(SOLVERS)}")
    if solver == "dpmsolver++" and (isinstance(order, bool) or order not in (1, 2)):
        raise ValueError(f"DPM-Solver++ order must be 1 or 2 (multistep 2M), got {order!r}")


def dpm_orders(num_steps: int, order: int = 2, lower_order_final: bool = True) -> np.ndarray:
    """[K] order of each multistep DPM-Solver++ step: first order at step 0 (no history),
    ``order`` after, and first order at the last step when ``lower_order_final`` and K < 15
    (diffusers' rule, which jaxdiff's DPMSolverPP follows, so tuned ratios transfer)."""
    orders = np.minimum(np.arange(num_steps) + 1, order).astype(np.int32)
    if lower_order_final and num_steps < 15:
        orders[-1] = 1
    return orders


def dpmpp_update(noise_schedule: NoiseScheduleVP, x, x0_pred, t, s, x0_prev=None,
                 t_prev=None, second=False):
    """The DPM-Solver++ (data prediction, multistep) move from t to s < t -> x_s.

    First order: x_s = sigma_s / sigma_t x - alpha_s expm1(-h) x0_pred, h = lambda_s -
    lambda_t (the same map as DDIM). Second order (2M, ``second`` true, may be traced) adds
    -alpha_s expm1(-h) D / 2 with D = (x0_pred - x0_prev) h / (lambda_t - lambda_prev),
    the previous step's data prediction x0_prev made at t_prev.
    """
    ns = noise_schedule
    lam_t, lam_s = ns.marginal_lambda(t), ns.marginal_lambda(s)
    h = lam_s - lam_t
    coef = -ns.marginal_alpha(s) * jnp.expm1(-h)
    x_s = (ns.marginal_std(s) / ns.marginal_std(t)) * x + coef * x0_pred
    if x0_prev is None:
        return x_s
    # without history the correction is exactly zero (and its gradient finite)
    x0_prev = jnp.where(second, x0_prev, x0_pred)
    t_prev = jnp.where(second, t_prev, 0.5 * (t + s))
    r0 = (lam_t - ns.marginal_lambda(t_prev)) / h
    return x_s + (0.5 * coef / r0) * (x0_pred - x0_prev)


def dpmpp_step(model_fn, noise_schedule, x, t, s, ratio=1.0, x0_prev=None, t_prev=None,
               second=False, condition=None, uncond_condition=None):
    """One tuned DPM-Solver++ step: the network at ratio * t, the update with the
    coefficients of t and s. -> (x_s, x0_pred); x0_pred is the next step's history."""
    eps = predict_noise(model_fn, x, ratio * t, condition, uncond_condition)
    x0_pred = data_prediction(noise_schedule, x, eps, t)
    return dpmpp_update(noise_schedule, x, x0_pred, t, s, x0_prev, t_prev, second), x0_pred


@functools.partial(jax.jit, static_argnames=("spec", "intermediates"))
def _dpmpp_loop(dynamic, x, t_cur, t_next, ratios, orders, *, spec, intermediates):
    TRACE_COUNTS["dpm_solver_sample"] += 1
    model_fn, ns, cond, uncond = combine(dynamic, spec)
    t_prev = jnp.concatenate([t_cur[:1], t_cur[:-1]])

    def body(carry, inputs):
        x, x0_prev = carry
        t, s, tp, r, o = inputs
        x_new, x0 = dpmpp_step(model_fn, ns, x, t, s, r, x0_prev, tp, o == 2, cond, uncond)
        x_new, x0 = x_new.astype(x.dtype), x0.astype(x.dtype)
        return (x_new, x0), ((x_new, x0) if intermediates else None)

    (x_out, _), traj = jax.lax.scan(body, (x, jnp.zeros_like(x)),
                                    (t_cur, t_next, t_prev, ratios, orders))
    return x_out, traj


def dpmpp_loop(model_fn, noise_schedule, x, t_cur, t_next, ratios, orders, condition=None,
               uncond_condition=None, intermediates=False):
    """All DPM-Solver++ steps under one jit (like ``ddim_loop``); orders [K] in {1, 2}."""
    dynamic, spec = partition((model_fn, noise_schedule, condition, uncond_condition))
    return _dpmpp_loop(dynamic, x, t_cur, t_next, ratios, jnp.asarray(orders, jnp.int32),
                       spec=spec, intermediates=bool(intermediates))
