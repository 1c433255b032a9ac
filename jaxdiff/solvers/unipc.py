"""UniPC multistep (Zhao et al. 2023): a UniP predictor and, at the next model evaluation,
a UniC corrector that reuses that evaluation, so order p+1 costs no extra model call.

diffusers computes the B(h) weights and solves the small rho systems at every step; they only
depend on the sigma schedule, so here they are solved once on the host in float64 and stored
as per-step tables (zeros for unused history terms). The traced step applies the corrector
(where enabled), pushes the converted model output, then applies the predictor.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import (Solver, at, check_prediction_type, choose, f32,
                                  postprocess_x0, push, require_default, solver_dataclass,
                                  static_field, vp_eps, vp_x0)
from jaxdiff.solvers.dpm_solver import vp_lambda, vp_sigma_schedule

DIFFUSERS_CLASS = "UniPCMultistepScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, solver_order=2,
                prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True,
                disable_corrector=[], solver_p=None, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
                flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
                final_sigmas_type="zero", rescale_betas_zero_snr=False,
                use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
                sigma_max=None, shift_terminal=None)
STEP_OPTIONS = {}
MAX_ORDER = 4


class UniPCState(NamedTuple):
    history: jax.Array       # [order, ...] converted model outputs, newest last
    last_sample: jax.Array   # [...] x the previous predictor started from


@solver_dataclass
class UniPC(Solver):
    timesteps: jax.Array      # [N]
    sigmas: jax.Array         # [N + 1]
    alpha: jax.Array          # [N] alpha_s (model output conversion)
    sigma: jax.Array          # [N] sigma_s
    pred: jax.Array           # [N, order + 1]: x, m0, (m_j - m0) for j = 1..order-1
    corr: jax.Array           # [N, order + 2]: x_last, m0, (m_j - m0) ..., (m_t - m0)
    use_corrector: jax.Array  # [N] bool
    num_steps: int = static_field()
    order: int = static_field(default=2)
    prediction_type: str = static_field(default="epsilon")
    predict_x0: bool = static_field(default=True)
    thresholding: bool = static_field(default=False)
    dynamic_thresholding_ratio: float = static_field(default=0.995)
    sample_max_value: float = static_field(default=1.0)

    init_noise_sigma = 1.0

    def init(self, x):
        return UniPCState(history=jnp.zeros((self.order,) + x.shape, x.dtype),
                          last_sample=jnp.zeros_like(x))

    def _convert(self, i, x, model_output):
        a, s = at(self.alpha, i), at(self.sigma, i)
        if not self.predict_x0:
            return vp_eps(self.prediction_type, model_output, x, a, s)
        x0 = vp_x0(self.prediction_type, model_output, x, a, s)
        return postprocess_x0(x0, thresholding=self.thresholding,
                              dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                              sample_max_value=self.sample_max_value)

    def step(self, state, i, x, model_output, noise):
        m_t = self._convert(i, x, model_output)
        hist = state.history
        c = at(self.corr, i)
        m0 = hist[-1]
        xc = c[0] * state.last_sample + c[1] * m0
        for j in range(1, self.order):
            xc = xc + c[1 + j] * (hist[-1 - j] - m0)
        xc = xc + c[self.order + 1] * (m_t - m0)
        x = jnp.where(at(self.use_corrector, i), xc.astype(x.dtype), x)

        hist = push(hist, m_t)
        p = at(self.pred, i)
        m0 = hist[-1]
        x_next = p[0] * x + p[1] * m0
        for j in range(1, self.order):
            x_next = x_next + p[1 + j] * (hist[-1 - j] - m0)
        return x_next.astype(x.dtype), UniPCState(history=hist, last_sample=x)


def _bh(lam_t, lam_s0, lam_hist, order, solver_type, predict_x0):
    """rks, h_phi_1, B_h and the b vector of UniPC's B(h) formulation (float64)."""
    h = lam_t - lam_s0
    rks = [(lam_hist[j - 1] - lam_s0) / h for j in range(1, order)] + [1.0]
    rks = np.asarray(rks, np.float64)
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    R, b, fact = [], [], 1
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return rks, h_phi_1, B_h, np.stack(R), np.asarray(b)


def unipc_tables(sigmas, orders, order, solver_type, predict_x0, corrector_on):
    n = len(orders)
    alpha, sig, lam = vp_lambda(np.asarray(sigmas, np.float64))
    pred, corr = np.zeros((n, order + 1)), np.zeros((n, order + 2))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k in range(n):
            # predictor from sigma_k to sigma_{k+1}, history points sigma_{k-1}, sigma_{k-2}, ...
            o = orders[k]
            a_t, s_t = alpha[k + 1], sig[k + 1]
            base_x = s_t / sig[k] if predict_x0 else a_t / alpha[k]
            scale = a_t if predict_x0 else s_t
            if o == 1:
                h = lam[k + 1] - lam[k]
                hh = -h if predict_x0 else h
                pred[k, :2] = [base_x, -scale * np.expm1(hh)]
                if s_t == 0:                         # exact limit at sigma = 0: x0
                    pred[k, :2] = [0.0, 1.0] if predict_x0 else [1 / alpha[k], -sig[k] / alpha[k]]
            else:
                rks, h_phi_1, B_h, R, b = _bh(lam[k + 1], lam[k], [lam[k - j] for j in range(1, o)],
                                              o, solver_type, predict_x0)
                rhos = np.array([0.5]) if o == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
                pred[k, :2] = [base_x, -scale * h_phi_1]
                for j in range(1, o):
                    pred[k, 1 + j] = -scale * B_h * rhos[j - 1] / rks[j - 1]
            # corrector at step k, for the predictor of step k-1 (order orders[k-1])
            if k == 0 or not corrector_on[k]:
                continue
            o = orders[k - 1]
            a_t, s_t = alpha[k], sig[k]
            rks, h_phi_1, B_h, R, b = _bh(lam[k], lam[k - 1], [lam[k - 1 - j] for j in range(1, o)],
                                          o, solver_type, predict_x0)
            rhos = np.array([0.5]) if o == 1 else np.linalg.solve(R, b)
            scale = a_t if predict_x0 else s_t
            corr[k, :2] = [s_t / sig[k - 1] if predict_x0 else a_t / alpha[k - 1],
                           -scale * h_phi_1]
            for j in range(1, o):
                corr[k, 1 + j] = -scale * B_h * rhos[j - 1] / rks[j - 1]
            corr[k, order + 1] = -scale * B_h * rhos[-1]
    if not (np.isfinite(pred).all() and np.isfinite(corr).all()):
        raise ValueError("UniPCMultistepScheduler: non-finite solver coefficients (a higher-"
                         "order step ends at sigma = 0); use lower_order_final=True")
    return pred, corr, alpha[:n], sig[:n]


def build(cfg, num_inference_steps: int) -> UniPC:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name)
    solver_type = choose(cfg, "solver_type", ("bh1", "bh2"), name)
    order = cfg["solver_order"]
    if isinstance(order, bool) or order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"{name}: unsupported solver_order={order!r}; jaxdiff implements "
                         f"1..{MAX_ORDER}")
    choose(cfg, "predict_x0", (True, False), name)
    if cfg["solver_p"] is not None:
        raise ValueError(f"{name}: unsupported solver_p={cfg['solver_p']!r}; jaxdiff implements "
                         "only solver_p=None")
    require_default(cfg, DEFAULTS, ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                                    "use_dynamic_shifting", "shift_terminal"), name)
    ts, sigmas = vp_sigma_schedule(cfg, num_inference_steps, name, karras_config_bounds=True,
                                   karras_final_is_last=True, clip_lambda=False)
    n = len(ts)
    orders = []
    for k in range(n):
        o = min(order, n - k) if cfg["lower_order_final"] else order
        orders.append(min(o, min(k, order) + 1))
    disabled = set(int(d) for d in (cfg["disable_corrector"] or []))
    corrector_on = [k > 0 and (k - 1) not in disabled for k in range(n)]
    pred, corr, alpha, sig = unipc_tables(sigmas, orders, int(order), solver_type,
                                          bool(cfg["predict_x0"]), corrector_on)
    return UniPC(timesteps=f32(ts), sigmas=f32(sigmas), alpha=f32(alpha), sigma=f32(sig),
                 pred=f32(pred), corr=f32(corr), use_corrector=jnp.asarray(corrector_on),
                 num_steps=n, order=int(order), prediction_type=pt,
                 predict_x0=bool(cfg["predict_x0"]), thresholding=bool(cfg["thresholding"]),
                 dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                 sample_max_value=float(cfg["sample_max_value"]))
