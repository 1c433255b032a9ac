"""DPM-Solver++ multistep (Lu et al. 2022), orders 1-3, and its SDE variant.

Every step is ``x' = a x + b0 D0 + b1 D1 + b2 D2 (+ c noise)`` where D0, D1, D2 are the data
prediction and its first and second divided differences over the last three steps (in
lambda = log(alpha / sigma)). Which order a step uses (warm-up, ``lower_order_final``) is
decided on the host, so the per-step tables carry zeros for unused terms and the traced step
is one fused expression.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import (vp_step_variance, Solver, at, check_prediction_type, choose, f32,
                                  postprocess_x0, push, require_default, schedule_from,
                                  solver_dataclass, static_field, vp_x0)
from jaxdiff.solvers.euler import spaced_sigmas

DIFFUSERS_CLASS = "DPMSolverMultistepScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, solver_order=2,
                prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
                lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                lambda_min_clipped=-float("inf"), variance_type=None,
                timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                use_dynamic_shifting=False, time_shift_type="exponential")
STEP_OPTIONS = {}
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class MultistepState(NamedTuple):
    history: jax.Array   # [order, ...] past data predictions, newest last


@solver_dataclass
class DPMSolverPP(Solver):
    timesteps: jax.Array      # [N]
    sigmas: jax.Array         # [N + 1] VE sigmas
    alpha: jax.Array          # [N] alpha_s of the current point (x0 conversion)
    sigma: jax.Array          # [N] sigma_s of the current point
    coef: jax.Array           # [N, 5]: a, b0, b1, b2, c (noise)
    diff: jax.Array           # [N, 4]: 1/r0, 1/r1, r0/(r0+r1), 1/(r0+r1)
    num_steps: int = static_field()
    order: int = static_field(default=2)
    prediction_type: str = static_field(default="epsilon")
    algorithm_type: str = static_field(default="dpmsolver++")
    thresholding: bool = static_field(default=False)
    dynamic_thresholding_ratio: float = static_field(default=0.995)
    sample_max_value: float = static_field(default=1.0)
    solver_type: str = static_field(default="midpoint")   # second-order form ("heun")

    init_noise_sigma = 1.0
    segmentable = True

    def add_noise(self, x0, noise, i):
        return (at(self.alpha, i) * x0 + at(self.sigma, i) * noise).astype(x0.dtype)

    def _restart(self, start):
        """Warm up again at a segment's first step, as diffusers does after
        ``set_begin_index``: first order there and (order 3) at most second order next;
        the other rows, including lower_order_final's, keep the full schedule's orders."""
        coef, diff = np.array(self.coef, np.float64), np.array(self.diff, np.float64)
        coef[0, 2:4], diff[0] = 0.0, 0.0
        if self.order == 3 and self.num_steps > 1 and diff[1, 1] != 0.0:   # 3rd -> 2nd order
            _, _, lam = vp_lambda(np.asarray(self.sigmas[1:3], np.float64))
            h = lam[1] - lam[0]
            a_t = 1.0 / np.sqrt(1.0 + float(self.sigmas[2]) ** 2)
            if self.solver_type == "midpoint":
                coef[1, 2] = 0.5 * coef[1, 1]
            elif self.stochastic:
                coef[1, 2] = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            else:
                coef[1, 2] = a_t * ((np.exp(-h) - 1.0) / h + 1.0)
            coef[1, 3], diff[1, 1:] = 0.0, 0.0
        return dataclasses.replace(self, coef=f32(coef), diff=f32(diff))

    @property
    def stochastic(self):
        return self.algorithm_type.startswith("sde")

    def init(self, x):
        return MultistepState(history=jnp.zeros((self.order,) + x.shape, x.dtype))

    def data_prediction(self, i, x, model_output):
        return self._x0(i, x, model_output)

    def _x0(self, i, x, model_output):
        x0 = vp_x0(self.prediction_type, model_output, x, at(self.alpha, i), at(self.sigma, i))
        return postprocess_x0(x0, thresholding=self.thresholding,
                              dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                              sample_max_value=self.sample_max_value)

    def _update(self, i, x, hist):  # hist [order, ...] data predictions, newest (step i) last
        a, b0, b1, b2, c = (at(self.coef, i)[k] for k in range(5))
        m0 = hist[-1]
        x_next = a * x + b0 * m0
        if self.order >= 2:
            inv_r0, inv_r1, q, inv_r01 = (at(self.diff, i)[k] for k in range(4))
            d10 = inv_r0 * (m0 - hist[-2])
            if self.order >= 3:
                d11 = inv_r1 * (hist[-2] - hist[-3])
                d1 = d10 + q * (d10 - d11)
                x_next = x_next + b1 * d1 + b2 * (inv_r01 * (d10 - d11))
            else:
                x_next = x_next + b1 * d10
        return x_next, c

    def step(self, state, i, x, model_output, noise):
        hist = push(state.history, self._x0(i, x, model_output))
        return self.picard_step(i, x, hist, noise), MultistepState(history=hist)

    def picard_step(self, i, x, hist, noise):
        """The step given the history of data predictions (newest: step i) -> x_{i+1}."""
        x_next, c = self._update(i, x, hist)
        if self.stochastic:
            x_next = x_next + c * noise
        return x_next.astype(x.dtype)

    # ParaDiGMS: step i reads the data predictions of steps i-order+1 .. i (lower-order steps
    # at the start have zero coefficients for the missing ones), so a Picard window evaluates
    # every position's prediction in one batch and then applies the updates.
    @property
    def picard_history(self) -> int:
        return self.order

    def picard_multistep(self, i, x, hist):
        x_next, c = self._update(i, x, hist)
        return x_next - x, c if self.stochastic else c * 0

    def picard_terms(self, i, x, model_output):
        if self.order != 1:
            raise NotImplementedError("DPM-Solver++ of order > 1 reads its history: use "
                                      "data_prediction / picard_multistep")
        return self.picard_multistep(i, x, self._x0(i, x, model_output)[None])

    def picard_variance(self):
        abar = 1.0 / (1.0 + jnp.square(self.sigmas))
        return vp_step_variance(abar[:-1], abar[1:])

    grid_family = "dpmsolver++"
    picard = "multistep"

    def grid_alpha_bars(self):
        return np.square(np.asarray(self.alpha, np.float64))

    def _on_grid(self, noise_schedule, t, network_times, options, where):
        order = int(options.get("order", self.order))
        if order != self.order:
            raise ValueError(f"{where} was learned for DPM-Solver++ order {order}, but this "
                             f"solver has order {self.order}")
        if self.stochastic or self.order > 2:
            raise ValueError(f"{where}: a learned grid applies to DPM-Solver++ 1M/2M (ODE); "
                             f"this solver is {self.algorithm_type} of order {self.order}")
        grid = on_vp_grid(noise_schedule, t[:-1], t[1:], order=self.order,
                          lower_order_final=bool(options.get("lower_order_final", True)),
                          prediction_type=self.prediction_type, network_times=network_times)
        return dataclasses.replace(grid, thresholding=self.thresholding,
                                   dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                                   sample_max_value=self.sample_max_value)


def vp_lambda(sigma):
    alpha, sig = schedules.vp_from_sigma(sigma)
    with np.errstate(divide="ignore"):
        return alpha, sig, np.log(alpha) - np.log(sig)


def step_orders(n: int, order: int, lower_order_final: bool, euler_at_final: bool,
                final_zero: bool) -> list:
    out = []
    for k in range(n):
        done = min(k, order)                       # diffusers' lower_order_nums
        final = k == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_zero)
        second = k == n - 2 and lower_order_final and n < 15
        if order == 1 or done < 1 or final:
            out.append(1)
        elif order == 2 or done < 2 or second:
            out.append(2)
        else:
            out.append(3)
    return out


def exponential_coefficients(algorithm_type, h, alpha_s, sigma_s, alpha_t, sigma_t):
    """The exponential-integrator weights of one DPM-Solver step from s to t (float64,
    h = lambda_t - lambda_s) -> (a, b0, b1_mid, b1_heun, b2, c): x_t = a x_s + b0 D0 +
    b1 D1 (+ b2 D2) (+ c noise), D0, D1, D2 the prediction and its first and second
    divided differences in lambda (scaled by h), b1 of the midpoint or the Heun form.
    The predictions are data (x0) for "dpmsolver++" / "sde-dpmsolver++", noise for
    "dpmsolver". Shared by the multistep and singlestep solvers."""
    em, em2 = np.exp(-h), np.exp(-2.0 * h)
    if algorithm_type == "sde-dpmsolver++":
        a = sigma_t / sigma_s * em
        b0 = alpha_t * (1 - em2)
        c = sigma_t * np.sqrt(1.0 - em2)
        b1_mid, b1_heun = 0.5 * alpha_t * (1 - em2), alpha_t * ((1.0 - em2) / (-2.0 * h) + 1.0)
        b2 = alpha_t * ((1.0 - em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    elif algorithm_type == "dpmsolver":
        ep = np.exp(h)
        a = alpha_t / alpha_s
        b0 = -(sigma_t * (ep - 1.0))
        c = 0.0
        b1_mid, b1_heun = -0.5 * (sigma_t * (ep - 1.0)), -(sigma_t * ((ep - 1.0) / h - 1.0))
        b2 = -(sigma_t * ((ep - 1.0 - h) / h ** 2 - 0.5))
    else:
        a = sigma_t / sigma_s
        b0 = -(alpha_t * (em - 1.0))
        c = 0.0
        b1_mid, b1_heun = -0.5 * (alpha_t * (em - 1.0)), alpha_t * ((em - 1.0) / h + 1.0)
        b2 = -(alpha_t * ((em - 1.0 + h) / h ** 2 - 0.5))
    return a, b0, b1_mid, b1_heun, b2, c


def dpm_tables(sigmas, orders, algorithm_type, solver_type):
    n = len(orders)
    coef, diff = np.zeros((n, 5)), np.zeros((n, 4))
    alpha, sig, lam = vp_lambda(np.asarray(sigmas, np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k, o in enumerate(orders):
            a_t, s_t = alpha[k + 1], sig[k + 1]
            h = lam[k + 1] - lam[k]
            a, b0, b1_mid, b1_heun, b2, c = exponential_coefficients(
                algorithm_type, h, alpha[k], sig[k], a_t, s_t)
            b2 = b2 if o == 3 else 0.0
            row_d = [0.0, 0.0, 0.0, 0.0]
            b1 = 0.0
            if o == 2:
                r0 = (lam[k] - lam[k - 1]) / h
                row_d[0] = 1.0 / r0
                b1 = b1_mid if solver_type == "midpoint" else b1_heun
            elif o == 3:
                r0 = (lam[k] - lam[k - 1]) / h
                r1 = (lam[k - 1] - lam[k - 2]) / h
                row_d = [1.0 / r0, 1.0 / r1, r0 / (r0 + r1), 1.0 / (r0 + r1)]
                b1 = b1_heun
            if o == 1 and s_t == 0:                # final step to sigma = 0: x' = x0 exactly
                a, b0, c = 0.0, 1.0, 0.0
            coef[k] = [a, b0, b1, b2, c]
            diff[k] = row_d
    if not (np.isfinite(coef).all() and np.isfinite(diff).all()):
        raise ValueError("DPMSolverMultistepScheduler: non-finite solver coefficients (a higher-"
                         "order step ends at sigma = 0); use lower_order_final=True")
    return coef, diff, alpha[:n], sig[:n]


def vp_sigma_schedule(cfg, num_inference_steps: int, solver: str, *, karras_config_bounds: bool,
                      karras_final_is_last: bool, clip_lambda: bool,
                      karras_round_cosine: bool = False):
    """Timesteps and sigmas of the VP solvers (DPM-Solver multistep and singlestep, UniPC,
    DEIS). ``karras_final_is_last``: respaced sigmas (Karras, exponential, beta) end on
    their own last sigma rather than the schedule's sigma_min (UniPC, DEIS);
    ``karras_round_cosine``: Karras timesteps are rounded for squaredcos_cap_v2 too
    (DPM-Solver singlestep). Exponential / beta sigmas (``euler.spaced_sigmas``) are used
    by the solvers that accept those fields, their timesteps truncated, not rounded."""
    spacing = choose(cfg, "timestep_spacing", schedules.TIMESTEP_SPACINGS, solver)
    final_type = choose(cfg, "final_sigmas_type", ("zero", "sigma_min"), solver)
    sched = schedule_from(cfg)
    T = sched.num_train_timesteps
    n = schedules.check_num_steps(num_inference_steps, T)
    ac = sched.alphas_cumprod.copy()
    if sched.rescale_betas_zero_snr:
        ac[-1] = np.float32(2.0 ** -24)
    train = schedules.sigmas_from_alphas_cumprod(ac)
    log_sigmas = np.log(train)
    last = T
    if clip_lambda and cfg.get("lambda_min_clipped", -np.inf) != -np.inf:
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
        last = T - int(np.searchsorted(lam[::-1], np.float32(cfg["lambda_min_clipped"])))
    ts = schedules.multistep_timesteps(T, n, spacing, int(cfg["steps_offset"]), last)
    sigma_last = np.sqrt((np.float32(1) - ac[0]) / ac[0])
    spaced, kind = spaced_sigmas(cfg, float(train[0]), float(train[-1]), n, solver,
                                 config_bounds=karras_config_bounds)
    if spaced is not None:
        sigmas = spaced
        ts = schedules.sigma_to_t(sigmas, log_sigmas)
        karras = kind == "use_karras_sigmas"
        if karras_final_is_last:                           # UniPC, DEIS
            ts = ts.round() if karras else ts
            sigma_last = sigmas[-1]
        elif karras and (karras_round_cosine or cfg["beta_schedule"] != "squaredcos_cap_v2"):
            ts = ts.round()                                # DPM-Solver
    else:
        sigmas = schedules.interp_sigmas(ts, train)
    sigmas = np.concatenate([sigmas, [sigma_last if final_type == "sigma_min" else 0.0]])
    ts = np.asarray(ts).astype(np.int64)
    schedules.check_timesteps(ts, T, solver)
    return ts.astype(np.float32), sigmas.astype(np.float32)


def build(cfg, num_inference_steps: int) -> DPMSolverPP:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    algo = choose(cfg, "algorithm_type", ALGORITHMS, name)
    solver_type = choose(cfg, "solver_type", ("midpoint", "heun"), name)
    order = choose(cfg, "solver_order", (1, 2, 3), name)
    choose(cfg, "variance_type", (None,), name)
    require_default(cfg, DEFAULTS, ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                    "use_flow_sigmas", "use_dynamic_shifting"), name)
    ts, sigmas = vp_sigma_schedule(cfg, num_inference_steps, name, karras_config_bounds=False,
                                   karras_final_is_last=False, clip_lambda=True)
    orders = step_orders(len(ts), order, bool(cfg["lower_order_final"]),
                         bool(cfg["euler_at_final"]), cfg["final_sigmas_type"] == "zero")
    coef, diff, alpha, sig = dpm_tables(sigmas, orders, algo, solver_type)
    return DPMSolverPP(timesteps=f32(ts), sigmas=f32(sigmas), alpha=f32(alpha), sigma=f32(sig),
                       coef=f32(coef), diff=f32(diff), num_steps=len(ts), order=int(order),
                       prediction_type=pt, algorithm_type=algo,
                       thresholding=bool(cfg["thresholding"]),
                       dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                       sample_max_value=float(cfg["sample_max_value"]), solver_type=solver_type)


def on_vp_grid(noise_schedule, t, t_next, *, order: int = 2, lower_order_final: bool = True,
               prediction_type: str = "epsilon", network_times=None) -> DPMSolverPP:
    """Multistep DPM-Solver++ (data prediction, midpoint form; order 1 or 2 = "2M") on any
    time grid of a continuous-time VP schedule: step i moves from t[i] to t_next[i]
    (``jaxdiff.schedules.NoiseScheduleVP``), its history being the data prediction made at
    t[i - 1].

    Orders as diffusers (``step_orders``): first order at step 0 and, with
    ``lower_order_final`` and K < 15, at the last step. The tables are jnp functions of the
    schedule (h = lambda_s - lambda_t, a = sigma_s / sigma_t, b0 = -alpha_s expm1(-h),
    b1 = b0 / 2, 1/r0 = h / (lambda_t - lambda_prev)), so t and t_next may be traced. The
    step is the ordinary ``DPMSolverPP.step``; ``sigmas`` is the VE table sigma/alpha of
    the K start times and the final time (ParaDiGMS' tolerance scale). ``timesteps``
    (what drivers pass to the model) are the continuous times t, or ``network_times`` [K].
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"DPM-Solver++ on a VP grid: order must be 1 or 2 (multistep 2M), "
                         f"got {order!r}")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    ns = noise_schedule
    t, t_next, times = schedules.vp_grid_times(ns, t, t_next, network_times)
    k = int(t.shape[0])
    second = jnp.asarray(np.asarray(step_orders(k, order, bool(lower_order_final), False,
                                                False)) == 2)
    a_t, sig_t = ns.marginal_alpha(t), ns.marginal_std(t)
    a_s, sig_s = ns.marginal_alpha(t_next), ns.marginal_std(t_next)
    lam_t, lam_s = ns.marginal_lambda(t), ns.marginal_lambda(t_next)
    h = lam_s - lam_t
    b0 = -a_s * jnp.expm1(-h)
    zero = jnp.zeros_like(h)
    lam_prev = jnp.concatenate([lam_t[:1], lam_t[:-1]])
    # where(second, ...) with a safe denominator: step 0 has no previous time, and its
    # gradient must stay finite
    gap = jnp.where(second, lam_t - lam_prev, 1.0)
    inv_r0 = jnp.where(second, h / gap, zero)
    b1 = jnp.where(second, 0.5 * b0, zero)
    coef = jnp.stack([sig_s / sig_t, b0, b1, zero, zero], axis=1)
    diff = jnp.stack([inv_r0, zero, zero, zero], axis=1)
    sigmas = jnp.concatenate([sig_t / a_t, (sig_s / a_s)[-1:]])
    return DPMSolverPP(timesteps=times, sigmas=sigmas, alpha=a_t, sigma=sig_t, coef=coef,
                       diff=diff, num_steps=k, order=int(order), prediction_type=prediction_type,
                       algorithm_type="dpmsolver++")
