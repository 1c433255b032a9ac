"""DPM-Solver singlestep (Lu et al. 2022, DPM-Solver-2/3 as "singlestep" groups): the
steps are split into groups of 1, 2 or 3 (``solver_order``; diffusers' order list), and
every step of a group restarts from the latent at the group's start, using the model
evaluations made inside the group so far: step j of a group is a DPM-Solver update of order
j + 1 from the group start to its own end point. The exponential-integrator weights are
``dpm_solver.exponential_coefficients`` (data prediction for "dpmsolver++" and its SDE
variant, noise prediction for "dpmsolver").

The weights only depend on the sigma schedule, so each step is stored on the host as one
row ``x' = a x_start + w0 m_k + w1 m_{k-1} + w2 m_{k-2} (+ c noise)`` over the converted
model outputs m (newest first), and the traced step is one fused expression.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import (Solver, at, check_prediction_type, choose, f32,
                                  postprocess_x0, push, require_default, solver_dataclass,
                                  static_field, vp_eps, vp_output, vp_step_variance, vp_x0)
from jaxdiff.solvers.dpm_solver import exponential_coefficients, vp_lambda, vp_sigma_schedule

DIFFUSERS_CLASS = "DPMSolverSinglestepScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, solver_order=2,
                prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
                lower_order_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
                use_dynamic_shifting=False, time_shift_type="exponential")
STEP_OPTIONS = {}
ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


class SinglestepState(NamedTuple):
    history: jax.Array   # [order, ...] converted model outputs, newest last
    sample: jax.Array    # [...] the latent at the start of the current group


@solver_dataclass
class DPMSolverSinglestep(Solver):
    timesteps: jax.Array      # [N]
    sigmas: jax.Array         # [N + 1] VE sigmas
    alpha: jax.Array          # [N] alpha_s of the current point (model output conversion)
    sigma: jax.Array          # [N] sigma_s of the current point
    coef: jax.Array           # [N, 5]: a (group start), w0, w1, w2 (newest first), c (noise)
    start: jax.Array          # [N] bool: the step starts a group (its latent is kept)
    chain: jax.Array          # [N, 4]: A, v0, v1, v2: the same step from the current latent
    num_steps: int = static_field()
    order: int = static_field(default=2)
    prediction_type: str = static_field(default="epsilon")
    algorithm_type: str = static_field(default="dpmsolver++")
    thresholding: bool = static_field(default=False)
    dynamic_thresholding_ratio: float = static_field(default=0.995)
    sample_max_value: float = static_field(default=1.0)

    init_noise_sigma = 1.0

    @property
    def stochastic(self):
        return self.algorithm_type.startswith("sde")

    def init(self, x):
        return SinglestepState(history=jnp.zeros((self.order,) + x.shape, x.dtype),
                               sample=jnp.zeros_like(x))

    def add_noise(self, x0, noise, i):
        return (at(self.alpha, i) * x0 + at(self.sigma, i) * noise).astype(x0.dtype)

    def data_prediction(self, i, x, model_output):
        x0 = vp_x0(self.prediction_type, model_output, x, at(self.alpha, i), at(self.sigma, i))
        return postprocess_x0(x0, thresholding=self.thresholding,
                              dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                              sample_max_value=self.sample_max_value)

    def output_for_x0(self, i, x, x0):
        return vp_output(self.prediction_type, x0, x, at(self.alpha, i), at(self.sigma, i))

    def _converted(self, i, x, model_output):
        """What the update weighs: the data prediction, or for "dpmsolver" the noise."""
        if self.algorithm_type == "dpmsolver":
            return vp_eps(self.prediction_type, model_output, x, at(self.alpha, i),
                          at(self.sigma, i))
        return self.data_prediction(i, x, model_output)

    def _weighted(self, row, hist):      # row [k], hist [order, ...] newest last
        out = row[0] * hist[-1]
        for k in range(1, self.order):
            out = out + row[k] * hist[-1 - k]
        return out

    def step(self, state, i, x, model_output, noise):
        hist = push(state.history, self._converted(i, x, model_output))
        start = jnp.where(at(self.start, i), x, state.sample)
        row = at(self.coef, i)
        x_next = row[0] * start + self._weighted(row[1:4], hist)
        if self.stochastic:
            x_next = x_next + row[4] * noise
        return x_next.astype(x.dtype), SinglestepState(history=hist, sample=start)

    # ParaDiGMS. A step is linear in the group's start latent, so it can be re-expressed
    # from the current latent and the data predictions of the group so far (``chain``):
    # that is the multistep protocol of DPM-Solver++ (a history of data predictions), exact
    # for the ODE "dpmsolver++" at every order. The SDE variant drops the noise of earlier
    # steps in the group and "dpmsolver" weighs noise predictions of past latents, so there
    # only order 1 (one step per group) has a Picard split.
    @property
    def picard_history(self) -> int:
        return self.order

    @property
    def picard(self):
        return "multistep" if self.order == 1 or self.algorithm_type == "dpmsolver++" else None

    @property
    def picard_unsupported(self):
        return None if self.picard else (f"{self.algorithm_type} of order {self.order} restarts "
                                         f"from the group's first latent; use algorithm_type="
                                         f"'dpmsolver++' or solver_order=1")

    def _picard_ok(self):
        if self.order != 1 and self.algorithm_type != "dpmsolver++":
            raise NotImplementedError(
                f"DPM-Solver singlestep {self.algorithm_type} of order {self.order} has no "
                "Picard split (its steps restart from the group's first latent); use "
                "algorithm_type='dpmsolver++' or solver_order=1")

    def picard_step(self, i, x, hist, noise):
        """The step from the current latent given the data predictions (newest: step i)."""
        self._picard_ok()
        if self.order == 1:
            m = hist[-1]
            if self.algorithm_type == "dpmsolver":
                m = (x - at(self.alpha, i) * m) / at(self.sigma, i)
            row = at(self.coef, i)
            x_next = row[0] * x + row[1] * m
            if self.stochastic:
                x_next = x_next + row[4] * noise
            return x_next.astype(x.dtype)
        row = at(self.chain, i)
        return (row[0] * x + self._weighted(row[1:4], hist)).astype(x.dtype)

    def picard_multistep(self, i, x, hist):
        x_next = self.picard_step(i, x, hist, jnp.zeros_like(x))
        c = at(self.coef, i)[4]
        return x_next - x, c if self.stochastic else c * 0

    def picard_terms(self, i, x, model_output):
        if self.order != 1:
            raise NotImplementedError("DPM-Solver singlestep of order > 1 reads its group's "
                                      "history: use data_prediction / picard_multistep")
        return self.picard_multistep(i, x, self.data_prediction(i, x, model_output)[None])

    def picard_variance(self):
        self._picard_ok()
        abar = 1.0 / (1.0 + jnp.square(self.sigmas))
        return vp_step_variance(abar[:-1], abar[1:])


def order_list(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list:
    """diffusers' singlestep order list: repeating groups 1, 2, .., order; with
    lower_order_final the tail is shortened so that no group is cut, and a step ending at
    sigma = 0 is first order."""
    if lower_order_final and order > 1:
        full, rest = divmod(n, order)
        if rest == 0:
            full, rest = full - 1, order
        orders = list(range(1, order + 1)) * full
        if order == 3 and rest == 3:
            orders += [1, 2, 1]
        elif order == 2 and rest == 2:
            orders += [1, 1]
        else:
            orders += list(range(1, rest + 1))
    else:
        orders = list(range(1, order + 1)) * (n // order)
    if final_zero and orders:
        orders[-1] = 1
    return orders


def singlestep_tables(sigmas, orders, algorithm_type, solver_type):
    """-> coef [N, 5], start [N], chain [N, 4], alpha [N], sigma [N] (float64)."""
    n = len(orders)
    alpha, sig, lam = vp_lambda(np.asarray(sigmas, np.float64))
    coef, chain = np.zeros((n, 5)), np.zeros((n, 4))
    start = np.asarray(orders) == 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k, o in enumerate(orders):
            g = k - o + 1                                     # the group's first step
            h = lam[k + 1] - lam[g]
            a, b0, b1_mid, b1_heun, b2, c = exponential_coefficients(
                algorithm_type, h, alpha[g], sig[g], alpha[k + 1], sig[k + 1])
            # the predictions the update combines, as weights over (m_k, m_{k-1}, m_{k-2})
            m = np.eye(3)
            if o == 1:
                w = b0 * m[0]
                if sig[k + 1] == 0:                            # to sigma = 0: x' = x0
                    a, w, c = 0.0, m[0], 0.0
            elif o == 2:
                r0 = (lam[k] - lam[k - 1]) / h
                d1 = (m[0] - m[1]) / r0
                w = b0 * m[1] + (b1_mid if solver_type == "midpoint" else b1_heun) * d1
            else:
                r0, r1 = (lam[k] - lam[k - 2]) / h, (lam[k - 1] - lam[k - 2]) / h
                d1_0, d1_1 = (m[1] - m[2]) / r1, (m[0] - m[2]) / r0
                if solver_type == "midpoint":
                    w = b0 * m[2] + b1_heun * d1_1
                else:
                    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                    w = b0 * m[2] + b1_heun * d1 + b2 * d2
            coef[k] = [a, *w, c]
            # from the current latent: x_k = a_prev x_start + w_prev . m, so
            # x' = (a / a_prev) x_k + (w - (a / a_prev) w_prev shifted by one step) . m
            if o == 1:
                chain[k] = [a, *w]
            else:
                ratio = a / coef[k - 1, 0]
                prev = np.concatenate([[0.0], coef[k - 1, 1:3]])   # m_{k-1}, m_{k-2} of step k-1
                chain[k] = [ratio, *(w - ratio * prev)]
    if not (np.isfinite(coef).all() and np.isfinite(chain).all()):
        raise ValueError(f"{DIFFUSERS_CLASS}: non-finite solver coefficients (a higher-order "
                         "step ends at sigma = 0); use lower_order_final=True")
    return coef, start, chain, alpha[:n], sig[:n]


def build(cfg, num_inference_steps: int) -> DPMSolverSinglestep:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    algo = choose(cfg, "algorithm_type", ALGORITHMS, name)
    solver_type = choose(cfg, "solver_type", ("midpoint", "heun"), name)
    order = choose(cfg, "solver_order", (1, 2, 3), name)
    choose(cfg, "variance_type", (None,), name)
    final_type = choose(cfg, "final_sigmas_type", ("zero", "sigma_min"), name)
    if algo == "dpmsolver":
        # diffusers refuses a final sigma of zero for the noise-prediction form, and its
        # thresholding there indexes its tables with a timestep it no longer has
        choose(cfg, "final_sigmas_type", ("sigma_min",), f"{name} (algorithm_type='dpmsolver')")
        choose(cfg, "thresholding", (False,), f"{name} (algorithm_type='dpmsolver')")
    require_default(cfg, DEFAULTS, ("use_flow_sigmas", "use_dynamic_shifting"), name)
    # singlestep schedules have no spacing option: always linspace, no offset
    ts, sigmas = vp_sigma_schedule({**cfg, "timestep_spacing": "linspace", "steps_offset": 0},
                                   num_inference_steps, name, karras_config_bounds=False,
                                   karras_final_is_last=False, clip_lambda=True,
                                   karras_round_cosine=True)
    n = len(ts)
    lof = bool(cfg["lower_order_final"])
    if n % order != 0 or final_type == "zero":    # diffusers switches lower_order_final on
        lof = True
    orders = order_list(n, int(order), lof, final_type == "zero")
    coef, start, chain, alpha, sig = singlestep_tables(sigmas, orders, algo, solver_type)
    return DPMSolverSinglestep(timesteps=f32(ts), sigmas=f32(sigmas), alpha=f32(alpha),
                               sigma=f32(sig), coef=f32(coef), start=jnp.asarray(start),
                               chain=f32(chain), num_steps=n, order=int(order),
                               prediction_type=pt, algorithm_type=algo,
                               thresholding=bool(cfg["thresholding"]),
                               dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                               sample_max_value=float(cfg["sample_max_value"]))
