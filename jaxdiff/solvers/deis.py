"""DEIS multistep (Zhang & Chen 2023, "log-rho" variant), orders 1-3.

DEIS integrates the probability-flow ODE in rho = sigma / alpha with the noise prediction
extrapolated by a Lagrange polynomial in log rho through the last ``order`` evaluations:
``x' = (alpha_t / alpha_s) x + alpha_t sum_j c_j eps_j``. The integrals c_j have closed
forms; they only depend on the sigma schedule, so they are computed once on the host in
float64 (diffusers evaluates them at every step) and stored per step, zeros for the history
terms a step does not use (warm-up, ``lower_order_final``: the orders of
``dpm_solver.step_orders``). First order is DDIM / DPM-Solver-1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import (Solver, at, check_prediction_type, choose, f32,
                                  postprocess_x0, push, require_default, solver_dataclass,
                                  static_field, vp_output, vp_step_variance, vp_x0)
from jaxdiff.solvers.dpm_solver import step_orders, vp_lambda, vp_sigma_schedule

DIFFUSERS_CLASS = "DEISMultistepScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, solver_order=2,
                prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, algorithm_type="deis", solver_type="logrho",
                lower_order_final=True, use_karras_sigmas=False, use_exponential_sigmas=False,
                use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
                time_shift_type="exponential")
STEP_OPTIONS = {}


class DEISState(NamedTuple):
    history: jax.Array   # [order, ...] noise predictions, newest last


@solver_dataclass
class DEIS(Solver):
    timesteps: jax.Array      # [N]
    sigmas: jax.Array         # [N + 1] VE sigmas
    alpha: jax.Array          # [N] alpha_s of the current point
    sigma: jax.Array          # [N] sigma_s of the current point
    coef: jax.Array           # [N, 4]: a (on x), c0, c1, c2 (on eps, newest first)
    num_steps: int = static_field()
    order: int = static_field(default=2)
    prediction_type: str = static_field(default="epsilon")
    thresholding: bool = static_field(default=False)
    dynamic_thresholding_ratio: float = static_field(default=0.995)
    sample_max_value: float = static_field(default=1.0)

    init_noise_sigma = 1.0

    def init(self, x):
        return DEISState(history=jnp.zeros((self.order,) + x.shape, x.dtype))

    def add_noise(self, x0, noise, i):
        return (at(self.alpha, i) * x0 + at(self.sigma, i) * noise).astype(x0.dtype)

    def data_prediction(self, i, x, model_output):
        x0 = vp_x0(self.prediction_type, model_output, x, at(self.alpha, i), at(self.sigma, i))
        return postprocess_x0(x0, thresholding=self.thresholding,
                              dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                              sample_max_value=self.sample_max_value)

    def output_for_x0(self, i, x, x0):
        return vp_output(self.prediction_type, x0, x, at(self.alpha, i), at(self.sigma, i))

    def _eps(self, i, x, x0):
        # as diffusers: the noise that goes with the (possibly thresholded) data prediction
        return (x - at(self.alpha, i) * x0) / at(self.sigma, i)

    def _update(self, i, x, hist):
        row = at(self.coef, i)
        out = row[0] * x + row[1] * hist[-1]
        for k in range(1, self.order):
            out = out + row[1 + k] * hist[-1 - k]
        return out.astype(x.dtype)

    def step(self, state, i, x, model_output, noise):
        eps = self._eps(i, x, self.data_prediction(i, x, model_output))
        hist = push(state.history, eps)
        return self._update(i, x, hist), DEISState(history=hist)

    # ParaDiGMS: the history is of noise predictions at past latents, which the Picard
    # drivers' multistep protocol (data predictions only) cannot rebuild, so only first
    # order (no history: DDIM) has a Picard split.
    @property
    def picard(self):
        return "single" if self.order == 1 else None

    @property
    def picard_unsupported(self):
        return None if self.order == 1 else "DEIS of order > 1 extrapolates past noise " \
            "predictions; use solver_order=1"

    def picard_terms(self, i, x, model_output):
        if self.order != 1:
            raise NotImplementedError("DEIS of order > 1 extrapolates past noise predictions: "
                                      "it has no single-step Picard split (use solver_order=1)")
        eps = self._eps(i, x, self.data_prediction(i, x, model_output))
        return self._update(i, x, eps[None]) - x, at(self.alpha, i) * 0

    def picard_variance(self):
        if self.order != 1:
            raise NotImplementedError("DEIS of order > 1 has no Picard split")
        abar = 1.0 / (1.0 + jnp.square(self.sigmas))
        return vp_step_variance(abar[:-1], abar[1:])


def _log_rho_integral2(t, b, c):
    """Antiderivative in rho of the degree-1 Lagrange basis through log rho = log b, log c
    (the one that is 1 at b), at rho = t."""
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def _log_rho_integral3(t, b, c, d):
    """The same for degree 2 (basis through log b, log c, log d, 1 at b)."""
    lc, ld, lt, lb = np.log(c), np.log(d), np.log(t), np.log(b)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt ** 2 - 2 * lt + 2)
    return num / ((lb - lc) * (lb - ld))


def deis_tables(sigmas, orders):
    """-> coef [N, 4] (float64): x' = a x + c0 eps_k + c1 eps_{k-1} + c2 eps_{k-2}."""
    n = len(orders)
    alpha, sig, lam = vp_lambda(np.asarray(sigmas, np.float64))
    with np.errstate(divide="ignore"):
        rho = sig / alpha
    coef = np.zeros((n, 4))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k, o in enumerate(orders):
            a_t, s_t = alpha[k + 1], sig[k + 1]
            a = a_t / alpha[k]
            if o == 1:
                h = lam[k + 1] - lam[k]
                coef[k] = [a, -(s_t * np.expm1(h)), 0.0, 0.0]
            elif o == 2:
                rt, r0, r1 = rho[k + 1], rho[k], rho[k - 1]
                f = _log_rho_integral2
                c0 = f(rt, r0, r1) - f(r0, r0, r1)
                c1 = f(rt, r1, r0) - f(r0, r1, r0)
                coef[k] = [a, a_t * c0, a_t * c1, 0.0]
            else:
                rt, r0, r1, r2 = rho[k + 1], rho[k], rho[k - 1], rho[k - 2]
                f = _log_rho_integral3
                c0 = f(rt, r0, r1, r2) - f(r0, r0, r1, r2)
                c1 = f(rt, r1, r2, r0) - f(r0, r1, r2, r0)
                c2 = f(rt, r2, r0, r1) - f(r0, r2, r0, r1)
                coef[k] = [a, a_t * c0, a_t * c1, a_t * c2]
    if not np.isfinite(coef).all():
        raise ValueError(f"{DIFFUSERS_CLASS}: non-finite solver coefficients")
    return coef, alpha[:n], sig[:n]


def build(cfg, num_inference_steps: int) -> DEIS:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    choose(cfg, "algorithm_type", ("deis",), name)
    choose(cfg, "solver_type", ("logrho",), name)
    order = choose(cfg, "solver_order", (1, 2, 3), name)
    require_default(cfg, DEFAULTS, ("use_flow_sigmas", "use_dynamic_shifting"), name)
    # DEIS ends on the schedule's sigma_min (respaced sigmas: on their own last one)
    ts, sigmas = vp_sigma_schedule({**cfg, "final_sigmas_type": "sigma_min"},
                                   num_inference_steps, name, karras_config_bounds=False,
                                   karras_final_is_last=True, clip_lambda=False)
    orders = step_orders(len(ts), int(order), bool(cfg["lower_order_final"]), False, False)
    coef, alpha, sig = deis_tables(sigmas, orders)
    return DEIS(timesteps=f32(ts), sigmas=f32(sigmas), alpha=f32(alpha), sigma=f32(sig),
                coef=f32(coef), num_steps=len(ts), order=int(order), prediction_type=pt,
                thresholding=bool(cfg["thresholding"]),
                dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                sample_max_value=float(cfg["sample_max_value"]))
