"""TimeTuner (tuning/) with DDIM and DPM-Solver++ (every shared test runs for both): the VP
schedule and the model wrapper against independent float64 NumPy formulas, jaxdiff's grid
solvers (ddim.on_vp_grid, dpm_solver.on_vp_grid) step by step against the DDIM and
DPM-Solver++ formulas, the tuned samplers (jaxdiff.sample) and the tuning loss against NumPy
transcriptions of the reference's loops, gradients against finite differences, equality
with jaxdiff's diffusers-built solvers and their ``with_ratios``, tuning on an analytic
Gaussian problem (closed-form epsilon and probability-flow ODE), no recompilation, SIGKILL
resume, non-finite loss handling and the ratios file.

Data model used throughout: x0 ~ N(mu, c^2 I). Then x_t ~ N(alpha mu, (alpha^2 c^2 +
sigma^2) I) and, with v = alpha^2 c^2 + sigma^2,
    eps(x, t) = sigma (x - alpha mu) / v        x0(x, t) = mu + alpha c^2 (x - alpha mu) / v
    score = -(x - alpha mu) / v                 v-pred = alpha eps - sigma x0,
and the probability-flow ODE keeps (x - alpha mu) / sqrt(v) constant.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tuning
from tuning import (NoiseScheduleVP, NonFiniteLossError, TimeTuner, load_ratios,
                    model_wrapper, save_ratios)
from tuning import tuner as tuner_mod

N_TRAIN = 1000
SOLVER_NAMES = ["ddim", "dpmsolver++"]
BETAS = np.linspace(1e-4, 0.02, N_TRAIN)           # DDPM's linear betas, float64
COSINE_S = 0.008


# ----------------------------------------------------------------- float64 NumPy references
def np_log_alpha(kind, t, betas=BETAS, b0=0.1, b1=20.0):
    """log alpha_t written from the definitions (not from tuning/)."""
    t = np.asarray(t, np.float64)
    if kind == "discrete":
        la = 0.5 * np.cumsum(np.log(1.0 - betas))
        knots = np.arange(1, len(la) + 1) / len(la)
        out = np.interp(t, knots, la)
        lo, hi = t < knots[0], t > knots[-1]
        out = np.where(lo, la[0] + (t - knots[0]) * (la[1] - la[0]) / (knots[1] - knots[0]),
                       out)
        out = np.where(hi, la[-1] + (t - knots[-1]) * (la[-1] - la[-2])
                       / (knots[-1] - knots[-2]), out)
        return out
    if kind == "linear":
        # log alpha = -1/2 int_0^t beta(s) ds with beta(s) = b0 + s (b1 - b0)
        return -0.5 * (b0 * t + 0.5 * (b1 - b0) * t ** 2)
    f = lambda u: np.cos((u + COSINE_S) / (1 + COSINE_S) * np.pi / 2)  # noqa: E731
    return np.log(f(t) / f(0.0))


def np_alpha_sigma(kind, t):
    a = np.exp(np_log_alpha(kind, t))
    return a, np.sqrt(1.0 - a ** 2)


def np_inverse_lambda(kind, lamb, lo, hi):
    """Bisection on the (decreasing) lambda(t): independent of any closed form."""
    lamb = np.asarray(lamb, np.float64)
    lo, hi = np.full_like(lamb, lo), np.full_like(lamb, hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        a, s = np_alpha_sigma(kind, mid)
        above = np.log(a / s) > lamb      # lambda(mid) too large -> t is later
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def np_gauss(x, a, s, mu, c):
    """(eps, x0, score, v) of N(mu, c^2) data, float64. a, s broadcast against x."""
    var = a ** 2 * c ** 2 + s ** 2
    eps = s * (x - a * mu) / var
    x0 = mu + a * c ** 2 * (x - a * mu) / var
    return eps, x0, -(x - a * mu) / var, a * eps - s * x0


def np_ddim(x, t, t_next, ratios, eps_fn, kind, eta=0.0, noises=None):
    """The reference's DDIM loop (ddim_step_fn), float64."""
    x = np.asarray(x, np.float64)
    for i in range(len(t)):
        e = eps_fn(x, ratios[i] * t[i])
        a_t, _ = np_alpha_sigma(kind, t[i])
        a_s, _ = np_alpha_sigma(kind, t_next[i])
        sigma = eta * np.sqrt((1 - a_s ** 2) / (1 - a_t ** 2)) * np.sqrt(1 - a_t ** 2 / a_s ** 2)
        x0 = (x - np.sqrt(1 - a_t ** 2) * e) / a_t
        x = a_s * x0 + np.sqrt(1 - a_s ** 2 - sigma ** 2) * e
        if eta:
            x = x + sigma * np.asarray(noises[i], np.float64)
    return x


def np_tuning_loss(x0, noise, idx, ratio, ratios, t, t_next, eps_fn, kind, sequential, big_t):
    """The reference's optimize_timesteps loss for one (index, batch), float64."""
    x0, noise = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
    if sequential:
        a, s = np_alpha_sigma(kind, big_t)
        x = a * x0 + s * noise
        x = np_ddim(x, t[:idx], t_next[:idx], ratios[:idx], eps_fn, kind)
    else:
        a, s = np_alpha_sigma(kind, t[idx])
        x = a * x0 + s * noise
    target = eps_fn(x, t[idx])
    x_s = np_ddim(x, t[idx:idx + 1], t_next[idx:idx + 1], [ratio], eps_fn, kind)
    d = target - eps_fn(x_s, t_next[idx])
    return np.mean(np.sum(d.reshape(d.shape[0], -1) ** 2, axis=1))


# DPM-Solver++ (multistep, data prediction, midpoint form), float64
def np_orders(k, lower_order_final=True, order=2):
    return [1 if order == 1 or i == 0 or (lower_order_final and k < 15 and i == k - 1) else 2
            for i in range(k)]


def np_lambda(kind, t):
    a, s = np_alpha_sigma(kind, t)
    return np.log(a) - np.log(s)


def np_dpm_step(x, x0, x0_prev, t, s, t_prev, second, kind):
    """DPM-Solver++ multistep (midpoint form) from t to s given the data predictions."""
    a_s, s_s = np_alpha_sigma(kind, s)
    _, s_t = np_alpha_sigma(kind, t)
    h = np_lambda(kind, s) - np_lambda(kind, t)
    out = (s_s / s_t) * x - a_s * (np.exp(-h) - 1.0) * x0
    if second:
        r0 = (np_lambda(kind, t) - np_lambda(kind, t_prev)) / h
        out = out - 0.5 * a_s * (np.exp(-h) - 1.0) * (x0 - x0_prev) / r0
    return out


def np_x0(x, t, e, kind):
    a, s = np_alpha_sigma(kind, t)
    return (x - s * e) / a


def np_dpmpp(x, t, t_next, ratios, eps_fn, kind, orders, x0_prev=None):
    """The tuned DPM-Solver++ loop -> (x, last data prediction)."""
    x = np.asarray(x, np.float64)
    for i in range(len(t)):
        x0 = np_x0(x, t[i], eps_fn(x, ratios[i] * t[i]), kind)
        x = np_dpm_step(x, x0, x0_prev, t[i], t_next[i], t[i - 1] if i else None,
                        orders[i] == 2, kind)
        x0_prev = x0
    return x, x0_prev


def np_dpm_loss(x0, noise, idx, ratio, ratios, t, t_next, eps_fn, kind, sequential, orders,
                big_t=1.0):
    x0, noise = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
    if sequential:
        a, s = np_alpha_sigma(kind, big_t)
        x, hist = np_dpmpp(a * x0 + s * noise, t[:idx], t_next[:idx], ratios[:idx], eps_fn,
                           kind, orders[:idx])
    else:
        a, s = np_alpha_sigma(kind, t[idx])
        x, hist = a * x0 + s * noise, None
        if idx > 0:
            ap, sp = np_alpha_sigma(kind, t[idx - 1])
            xp = ap * x0 + sp * noise
            hist = np_x0(xp, t[idx - 1], eps_fn(xp, ratios[idx - 1] * t[idx - 1]), kind)
    target = eps_fn(x, t[idx])
    x0_here = np_x0(x, t[idx], eps_fn(x, ratio * t[idx]), kind)
    x_s = np_dpm_step(x, x0_here, hist, t[idx], t_next[idx], t[idx - 1] if idx else None,
                      orders[idx] == 2, kind)
    d = target - eps_fn(x_s, t_next[idx])
    return np.mean(np.sum(d.reshape(d.shape[0], -1) ** 2, axis=1))


def np_loss(solver, x0, noise, idx, ratio, ratios, t, t_next, eps_fn, kind, sequential):
    if solver == "ddim":
        return np_tuning_loss(x0, noise, idx, ratio, ratios, t, t_next, eps_fn, kind,
                              sequential, 1.0)
    return np_dpm_loss(x0, noise, idx, ratio, ratios, t, t_next, eps_fn, kind, sequential,
                       np_orders(len(t)))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_schedule(kind, dtype=jnp.float32):
    if kind == "discrete":
        return NoiseScheduleVP("discrete", betas=BETAS, dtype=dtype)
    return NoiseScheduleVP(kind, dtype=dtype)


def gauss_eps_fn(ns, mu, c):
    """JAX eps(x [B, D], t [B]) of N(mu, c^2) data under the schedule ``ns``."""
    def fn(x, t):
        a = ns.marginal_alpha(t)[:, None]
        s = ns.marginal_std(t)[:, None]
        return s * (x - a * mu) / (a ** 2 * c ** 2 + s ** 2)
    return fn


def np_gauss_eps_fn(kind, mu, c):
    def fn(x, t):
        a, s = np_alpha_sigma(kind, t)
        return np_gauss(x, a, s, mu, c)[0]
    return fn


# ======================================================================= NoiseScheduleVP
T_INSIDE = np.array([1e-3, 2.5e-3, 0.0137, 0.1, 0.3333, 0.5, 0.77, 0.9, 0.999, 1.0])
T_OUTSIDE = np.array([0.0, 2e-4, 7e-4, 1.0004, 1.003, 1.02])


@pytest.mark.parametrize("kind", ["discrete", "linear", "cosine"])
def test_schedule_matches_numpy_float64(kind):
    t = T_INSIDE if kind != "cosine" else np.clip(T_INSIDE, 0, 0.99)
    if kind == "discrete":            # linear extrapolation outside the knots [1/N, 1]
        t = np.concatenate([t, T_OUTSIDE])
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        tj = jnp.asarray(t)
        la = np.asarray(ns.marginal_log_mean_coeff(tj))
        a, s = np.asarray(ns.marginal_alpha(tj)), np.asarray(ns.marginal_std(tj))
        lam = np.asarray(ns.marginal_lambda(tj))
    la_ref = np_log_alpha(kind, t)
    a_ref = np.exp(la_ref)
    np.testing.assert_allclose(la, la_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a, a_ref, rtol=1e-12)
    if kind == "discrete":
        # where log alpha > 0 (t < 0 after extrapolation) sigma is NaN, as in the reference
        keep = la_ref < 0
    else:
        keep = np.ones_like(t, bool)
    with np.errstate(invalid="ignore"):
        s_ref = np.sqrt(1 - a_ref ** 2)
    np.testing.assert_allclose(s[keep], s_ref[keep], rtol=1e-9)
    np.testing.assert_allclose(lam[keep], np.log(a_ref / s_ref)[keep], rtol=1e-9)
    # float32 (the default) stays close to the float64 truth (up to the rounding of t
    # itself, amplified by the cosine schedule's steep end)
    ns32 = make_schedule(kind)
    np.testing.assert_allclose(np.asarray(ns32.marginal_alpha(jnp.asarray(t, jnp.float32))),
                               a_ref, rtol=1e-5)
    assert ns32.T == (0.9946 if kind == "cosine" else 1.0)
    assert ns32.eps == 1e-3 and ns32.total_N == N_TRAIN


def test_schedule_from_alphas_cumprod_equals_betas():
    ac = np.cumprod(1 - BETAS)
    with jax.enable_x64(True):
        a = make_schedule("discrete", jnp.float64)
        b = NoiseScheduleVP("discrete", alphas_cumprod=ac, dtype=jnp.float64)
        t = jnp.asarray(np.concatenate([T_INSIDE, T_OUTSIDE]))
        np.testing.assert_allclose(np.asarray(b.marginal_log_mean_coeff(t)),
                                   np.asarray(a.marginal_log_mean_coeff(t)), rtol=1e-10)


@pytest.mark.parametrize("kind", ["discrete", "linear", "cosine"])
def test_inverse_lambda_round_trip_and_bisection(kind):
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        t = np.linspace(ns.eps, ns.T, 37)
        lam = ns.marginal_lambda(jnp.asarray(t))
        back = np.asarray(ns.inverse_lambda(lam))
        np.testing.assert_allclose(back, t, rtol=1e-9, atol=1e-12)
        if kind != "discrete":   # the discrete inverse is the inverse of the interpolant
            lams = np.linspace(float(lam[-1]), float(lam[0]), 11)
            ref = np_inverse_lambda(kind, lams, 0.0, ns.T)
            np.testing.assert_allclose(np.asarray(ns.inverse_lambda(jnp.asarray(lams))), ref,
                                       rtol=1e-9, atol=1e-12)


def test_schedule_is_a_differentiable_pytree():
    ns = make_schedule("discrete")
    leaves = jax.tree_util.tree_leaves(ns)
    assert len(leaves) == 2 and leaves[0].shape == (N_TRAIN,)
    f = jax.jit(lambda sched, t: sched.marginal_std(t))          # schedule as a jit argument
    np.testing.assert_allclose(np.asarray(f(ns, jnp.float32(0.5))),
                               np.sqrt(1 - np.exp(2 * np_log_alpha("discrete", 0.5))),
                               rtol=1e-6)
    with jax.enable_x64(True):
        for kind in ("discrete", "linear", "cosine"):
            sched = make_schedule(kind, jnp.float64)
            t0, h = 0.4321, 1e-6    # not on a knot: log-alpha is smooth there
            g = float(jax.grad(lambda t: sched.marginal_lambda(t))(jnp.float64(t0)))
            lam = lambda u: float(sched.marginal_lambda(jnp.float64(u)))  # noqa: E731
            assert g == pytest.approx((lam(t0 + h) - lam(t0 - h)) / (2 * h), rel=1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError, match="'quadratic'"):
        NoiseScheduleVP("quadratic")
    with pytest.raises(ValueError, match="exactly one of betas or alphas_cumprod"):
        NoiseScheduleVP("discrete")
    with pytest.raises(ValueError, match="exactly one"):
        NoiseScheduleVP("discrete", betas=BETAS, alphas_cumprod=np.cumprod(1 - BETAS))
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseScheduleVP("discrete", betas=np.r_[0.0, BETAS[1:]])
    with pytest.raises(ValueError, match="continuous_beta_0 < continuous_beta_1"):
        NoiseScheduleVP("linear", continuous_beta_0=5.0, continuous_beta_1=1.0)


# ======================================================================= model_wrapper
MU = np.array([0.3, -0.5, 0.8, 0.1], np.float64)
C = 0.7


def typed_gauss_model(kind, model_type, n=N_TRAIN):
    """A 'network' predicting ``model_type`` for N(MU, C^2) data, taking the network's
    time input: discrete index 1000 (t - 1/N), or continuous t. Its alpha comes from a
    table lookup / closed form of its own, not from NoiseScheduleVP."""
    la = jnp.asarray(0.5 * np.cumsum(np.log(1 - BETAS)), jnp.float32)

    def model(x, t_input, **kwargs):
        assert kwargs == {"tag": "kw"}, kwargs           # model_kwargs are passed through
        if kind == "discrete":
            log_a = jnp.interp(t_input * n / 1000.0, jnp.arange(n, dtype=jnp.float32), la)
        else:
            log_a = -0.5 * (0.1 * t_input + 0.5 * 19.9 * t_input ** 2)
        a = jnp.exp(log_a)[:, None]
        s = jnp.sqrt(1 - a ** 2)
        var = a ** 2 * C ** 2 + s ** 2
        mu = jnp.asarray(MU, jnp.float32)
        eps = s * (x - a * mu) / var
        x0 = mu + a * C ** 2 * (x - a * mu) / var
        return {"noise": eps, "x_start": x0, "score": -(x - a * mu) / var,
                "v": a * eps - s * x0}[model_type]
    return model


@pytest.mark.parametrize("kind", ["discrete", "linear"])
@pytest.mark.parametrize("model_type", ["noise", "x_start", "v", "score"])
def test_model_wrapper_converts_every_model_type_to_noise(kind, model_type):
    ns = make_schedule(kind)
    fn = model_wrapper(typed_gauss_model(kind, model_type), ns, model_type=model_type,
                       model_kwargs={"tag": "kw"})
    rng = np.random.default_rng(1)
    t = np.array([0.003, 0.05, 0.2, 0.5, 0.8, 0.97])
    x = rng.normal(size=(t.shape[0], MU.shape[0]))
    a, s = np_alpha_sigma(kind, t)
    eps_ref = np_gauss(x, a[:, None], s[:, None], MU, C)[0]
    # the wrapped model is a pytree: pass it into jit as an argument
    got = np.asarray(jax.jit(lambda f, x, t: f(x, t))(fn, jnp.asarray(x, jnp.float32),
                                                       jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(got, eps_ref, rtol=2e-4, atol=2e-5)


def test_model_wrapper_classifier_free_guidance_formula():
    ns = make_schedule("discrete")
    calls = []

    def model(x, t_input, cond):      # cond [B] scalars: a condition-dependent eps
        calls.append(x.shape[0])
        return jnp.sin(x) * (1 + cond[:, None]) + 1e-3 * t_input[:, None]

    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32)
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    cond, uncond = jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([0.0])   # uncond broadcasts
    t_in = (np.asarray(t, np.float64) - 1 / N_TRAIN) * 1000
    e_c = np.sin(np.asarray(x, np.float64)) * (1 + np.asarray(cond)[:, None]) + 1e-3 * t_in[:, None]
    e_u = np.sin(np.asarray(x, np.float64)) + 1e-3 * t_in[:, None]
    for scale in (3.5, jnp.float32(3.5)):
        fn = model_wrapper(model, ns, guidance_type="classifier-free", condition=cond,
                           unconditional_condition=uncond, guidance_scale=scale)
        np.testing.assert_allclose(np.asarray(fn(x, t)), e_u + 3.5 * (e_c - e_u), rtol=1e-5)
    assert calls[-1] == 6                                     # one batched call, [u; c]
    # a Python 1.0 skips the unconditional half; call-time conditions override
    fn1 = model_wrapper(model, ns, guidance_type="classifier-free", condition=cond * 0,
                        unconditional_condition=uncond, guidance_scale=1.0)
    np.testing.assert_allclose(np.asarray(fn1(x, t, cond)), e_c, rtol=1e-5)
    assert calls[-1] == 3
    with pytest.raises(ValueError, match="needs a condition"):
        model_wrapper(model, ns, guidance_type="classifier-free")(x, t)


def test_model_wrapper_classifier_guidance_uses_the_gradient():
    ns = make_schedule("linear")
    w = 0.3

    def model(x, t_input, cond):
        return 0.5 * x

    def classifier(x, t_input, cond):          # log p(c | x) = -w/2 |x - c|^2 per sample
        return -0.5 * w * jnp.sum((x - cond) ** 2, axis=1)

    fn = model_wrapper(model, ns, guidance_type="classifier", classifier_fn=classifier,
                       guidance_scale=2.0)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3)), jnp.float32)
    cond = jnp.asarray([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    t = jnp.asarray([0.3, 0.7])
    sigma = np_alpha_sigma("linear", np.asarray(t, np.float64))[1][:, None]
    expect = 0.5 * np.asarray(x) - 2.0 * sigma * (-w * (np.asarray(x) - np.asarray(cond)))
    np.testing.assert_allclose(np.asarray(fn(x, t, cond)), expect, rtol=1e-5)


def test_model_wrapper_errors():
    ns = make_schedule("linear")
    with pytest.raises(ValueError, match="'eps'"):
        model_wrapper(lambda x, t: x, ns, model_type="eps")
    with pytest.raises(ValueError, match="'cfg'"):
        model_wrapper(lambda x, t: x, ns, guidance_type="cfg")
    with pytest.raises(ValueError, match="classifier_fn"):
        model_wrapper(lambda x, t: x, ns, guidance_type="classifier")



# ======================================================================= jaxdiff's grid solvers
GRID_T = np.array([0.9, 0.7, 0.41, 0.2, 0.05])
GRID_T_NEXT = np.r_[GRID_T[1:], 1e-3]


@pytest.mark.parametrize("kind", ["discrete", "linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_grid_ddim_step_is_the_ddim_formula(kind, eta):
    """jaxdiff's DDIM on a VP grid (ddim.on_vp_grid), one ordinary DDIM.step per index,
    against TimeTuner's DDIM update written here in float64 NumPy: x0 = (x - s_t eps) / a_t,
    x_s = a_s x0 + sqrt(s_s^2 - std^2) eps + std z, std = eta s_s / s_t sqrt(1 - a_t^2/a_s^2)."""
    from jaxdiff.solvers import DDIM, ddim
    rng = np.random.default_rng(21)
    x, e, z = (rng.normal(size=(3, 4)) for _ in range(3))
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        solver = ddim.on_vp_grid(ns, GRID_T, GRID_T_NEXT, eta=eta)
        assert isinstance(solver, DDIM) and not solver.clip_sample
        assert solver.stochastic == (eta > 0)
        np.testing.assert_array_equal(np.asarray(solver.timesteps), GRID_T)
        for i in range(len(GRID_T)):
            got, _ = solver.step(solver.init(jnp.asarray(x)), i, jnp.asarray(x),
                                 jnp.asarray(e), jnp.asarray(z))
            a_t, s_t = np_alpha_sigma(kind, GRID_T[i])
            a_s, s_s = np_alpha_sigma(kind, GRID_T_NEXT[i])
            std = eta * (s_s / s_t) * np.sqrt(1 - (a_t / a_s) ** 2)
            want = a_s * (x - s_t * e) / a_t + np.sqrt(s_s ** 2 - std ** 2) * e + std * z
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("kind", ["discrete", "linear", "cosine"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_grid_dpm_step_is_the_dpmpp_formula(kind, lower_order_final):
    """jaxdiff's DPMSolverPP on a VP grid (dpm_solver.on_vp_grid), one DPMSolverPP.step per
    index with the previous data prediction in state.history, against DPM-Solver++ written
    here in float64 NumPy (first order at step 0 and, with lower_order_final and K < 15,
    at the last step; second order between). Its sigmas are the VE table sigma / alpha."""
    from jaxdiff.solvers import DPMSolverPP, MultistepState, dpm_solver
    rng = np.random.default_rng(22)
    x, e, x0_prev = (rng.normal(size=(3, 4)) for _ in range(3))
    k = len(GRID_T)
    orders = np_orders(k, lower_order_final)
    assert orders[1] == 2 and orders[-1] == (1 if lower_order_final else 2)
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        solver = dpm_solver.on_vp_grid(ns, GRID_T, GRID_T_NEXT,
                                       lower_order_final=lower_order_final)
        assert isinstance(solver, DPMSolverPP) and solver.order == 2
        for i in range(k):
            state = MultistepState(history=jnp.stack([jnp.zeros((3, 4)), jnp.asarray(x0_prev)]))
            got, new_state = solver.step(state, i, jnp.asarray(x), jnp.asarray(e),
                                         jnp.zeros((3, 4)))
            x0 = np_x0(x, GRID_T[i], e, kind)
            want = np_dpm_step(x, x0, x0_prev, GRID_T[i], GRID_T_NEXT[i],
                               GRID_T[i - 1] if i else None, orders[i] == 2, kind)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(np.asarray(new_state.history[-1]), x0, rtol=1e-12)
        a, s = np_alpha_sigma(kind, np.r_[GRID_T, GRID_T_NEXT[-1]])
        np.testing.assert_allclose(np.asarray(solver.sigmas), s / a, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(solver.picard_variance()),
                                   (1 - a[1:] ** 2) / (1 - a[:-1] ** 2)
                                   * (1 - a[:-1] ** 2 / a[1:] ** 2), rtol=1e-10)
        # order 1 is DDIM
        first = dpm_solver.on_vp_grid(ns, GRID_T, GRID_T_NEXT, order=1)
        from jaxdiff.solvers import ddim
        d = ddim.on_vp_grid(ns, GRID_T, GRID_T_NEXT)
        for i in range(k):
            a_, _ = first.step(first.init(jnp.asarray(x)), i, jnp.asarray(x), jnp.asarray(e),
                               None)
            b_, _ = d.step(d.init(jnp.asarray(x)), i, jnp.asarray(x), jnp.asarray(e), None)
            np.testing.assert_allclose(np.asarray(a_), np.asarray(b_), rtol=1e-12)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        dpm_solver.on_vp_grid(make_schedule(kind), GRID_T, GRID_T_NEXT, order=3)


@pytest.mark.parametrize("solver_name", SOLVER_NAMES)
def test_grid_solver_tables_are_traceable_and_ratio_gradients_flow_through_sample(solver_name):
    """The grid solver can be built inside jit from traced times; with the network time
    model_input_time(r * t) (network units, a raw discrete-time network),
    d/dr of jaxdiff.sample's output matches central differences."""
    from jaxdiff import sample
    from jaxdiff.schedules import model_input_time
    k, mu, c = 5, 0.3, 0.4
    with jax.enable_x64(True):
        ns = make_schedule("discrete", jnp.float64)
        t, t_next = tuning.time_grid(ns, k)

        def net(x, t_input):        # eps of N(mu, c^2) data, the network's own time units
            u = t_input / 1000.0 + 1.0 / N_TRAIN
            a, s = ns.marginal_alpha(u)[:, None], ns.marginal_std(u)[:, None]
            return s * (x - a * mu) / (a ** 2 * c ** 2 + s ** 2)

        built = jax.jit(lambda tt, tn: tuning.grid_solver(ns, tt, tn, solver_name))(
            jnp.asarray(t), jnp.asarray(t_next))
        eager = tuning.grid_solver(ns, jnp.asarray(t), jnp.asarray(t_next), solver_name)
        for a_, b_ in zip(jax.tree.leaves(built), jax.tree.leaves(eager)):
            np.testing.assert_allclose(np.asarray(a_), np.asarray(b_), rtol=1e-12)
        x_T = jnp.asarray(np.random.default_rng(23).normal(size=(4, 3)))
        y = jnp.asarray(np.random.default_rng(24).normal(size=(4, 3)))

        def obj(r):
            solver = eager.with_network_times(model_input_time(ns, r * jnp.asarray(t)))
            return jnp.sum((sample(net, solver, x_T) - y) ** 2)

        r0 = (np.floor(t * N_TRAIN * np.array([1.03, 0.97, 1.05, 0.98, 1.0])) + 0.5) / (
            t * N_TRAIN)                          # mid-way between training knots
        g = np.asarray(jax.grad(obj)(jnp.asarray(r0)))
        h = 1e-5
        for i in range(k):
            e = np.zeros(k)
            e[i] = h
            fd = (float(obj(jnp.asarray(r0 + e))) - float(obj(jnp.asarray(r0 - e)))) / (2 * h)
            assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-10), i
        assert np.all(np.abs(g) > 1e-6)


# ======================================================================= tuned samplers
def test_reference_time_grid():
    ns = make_schedule("discrete")
    t, t_next = tuning.time_grid(ns, 10)
    n = np.arange(901, 0, -100)                       # the reference: arange(0,1000,100)+1
    np.testing.assert_allclose(t, (n + 1) / 1000)     # = n / 1000 + 1 / N
    np.testing.assert_allclose(t_next, np.r_[t[1:], 1e-3])
    t2, _ = tuning.time_grid(ns, timesteps=n)         # given in the network's units
    np.testing.assert_allclose(t2, t)
    tu, tnu = tuning.time_grid(make_schedule("cosine"), 4, grid="uniform")
    np.testing.assert_allclose(np.r_[tu, tnu[-1]], np.linspace(0.9946, 1e-3, 5))
    with pytest.raises(ValueError, match="'trailing'"):
        tuning.time_grid(ns, 10, grid="trailing")


def test_orders():
    np.testing.assert_array_equal(tuning.dpm_orders(5), [1, 2, 2, 2, 1])
    np.testing.assert_array_equal(tuning.dpm_orders(5, lower_order_final=False), [1, 2, 2, 2, 2])
    np.testing.assert_array_equal(tuning.dpm_orders(16), [1] + [2] * 15)
    np.testing.assert_array_equal(tuning.dpm_orders(4, order=1), [1, 1, 1, 1])


@pytest.mark.parametrize("solver, kind, grid, option", [
    ("ddim", "discrete", "reference", 0.0), ("ddim", "linear", "reference", 0.0),
    ("ddim", "cosine", "uniform", 0.0), ("ddim", "discrete", "reference", 0.6),
    ("dpmsolver++", "discrete", "reference", True), ("dpmsolver++", "linear", "reference", False),
    ("dpmsolver++", "cosine", "uniform", True)])
def test_sample_matches_numpy(solver, kind, grid, option):
    """``option``: DDIM's eta, DPM-Solver++'s lower_order_final. Also the intermediates:
    x_t is the trajectory, x0_pred each step's data prediction (x - s_t eps(r t)) / a_t."""
    k, mu, c = 6, np.array([0.4, -0.2, 1.0]), 0.3
    rng = np.random.default_rng(4 if solver == "ddim" else 14)
    ratios = 1 + 0.05 * rng.uniform(-1, 1, size=k)
    ratios[0] = 0.98      # r * T must stay below 1 for the cosine schedule (alpha_1 = 0)
    x_np = rng.normal(size=(5, 3))
    eta = option if solver == "ddim" else 0.0
    key = jax.random.key(7) if eta else None
    eps_np = np_gauss_eps_fn(kind, mu, c)
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        t, t_next = tuning.time_grid(ns, k, grid=grid)
        x = jnp.asarray(x_np)
        if solver == "ddim":
            got, inter = tuner.ddim_sample(x, k, t_ratios=ratios, eta=eta, key=key, grid=grid,
                                           return_intermediates=True)
            plain = tuner.ddim_sample(x, k, t_ratios=ratios, eta=eta, key=key, grid=grid)
            via_name = tuner.sample(x, k, t_ratios=ratios, eta=eta, key=key, grid=grid)
        else:
            got, inter = tuner.dpm_solver_sample(x, k, t_ratios=ratios, grid=grid,
                                                 lower_order_final=option,
                                                 return_intermediates=True)
            plain = tuner.dpm_solver_sample(x, k, t_ratios=ratios, grid=grid,
                                            lower_order_final=option)
            via_name = tuner.sample(x, k, t_ratios=ratios, grid=grid, solver="dpmsolver++",
                                    lower_order_final=option)
        noises = None
        if eta:       # the sampler draws step i's noise from split(key, K)[i]
            noises = [np.asarray(jax.random.normal(kk, x.shape, x.dtype))
                      for kk in jax.random.split(key, k)]
    if solver == "ddim":
        ref = np_ddim(x_np, t, t_next, ratios, eps_np, kind, eta, noises)
        assert rel(got, ref) < 1e-6
    else:
        ref, _ = np_dpmpp(x_np, t, t_next, ratios, eps_np, kind, np_orders(k, option))
        assert rel(got, ref) < 1e-9
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(got))
    np.testing.assert_array_equal(np.asarray(via_name), np.asarray(got))
    xt, x0p = np.asarray(inter["x_t"]), np.asarray(inter["x0_pred"])
    assert xt.shape == x0p.shape == (k + 1, 5, 3)
    np.testing.assert_array_equal(xt[0], x_np)
    np.testing.assert_array_equal(x0p[0], x_np)
    np.testing.assert_array_equal(xt[-1], np.asarray(got))
    for i in range(k):
        want = np_x0(xt[i], t[i], eps_np(xt[i], ratios[i] * t[i]), kind)
        assert rel(x0p[i + 1], want) < 1e-8, i


def test_dpm_solver_is_not_ddim_but_order_one_is():
    k, mu, c = 6, np.array([0.4, -0.2, 1.0]), 0.3
    rng = np.random.default_rng(14)
    ratios = 1 + 0.05 * rng.uniform(-1, 1, size=k)
    x = rng.normal(size=(5, 3))
    with jax.enable_x64(True):
        ns = make_schedule("linear", jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        ddim = tuner.ddim_sample(jnp.asarray(x), k, t_ratios=ratios)
        second = tuner.dpm_solver_sample(jnp.asarray(x), k, t_ratios=ratios)
        first = tuner.dpm_solver_sample(jnp.asarray(x), k, t_ratios=ratios, order=1)
    assert rel(ddim, second) > 1e-6
    assert rel(first, ddim) < 1e-12


def _jaxdiff_problem():
    from jaxdiff.schedules import alphas_cumprod, make_betas

    abar = alphas_cumprod(make_betas(1000, 1e-4, 0.02, "linear"))   # float32, as diffusers
    ns = NoiseScheduleVP("discrete", alphas_cumprod=abar)
    table = jnp.asarray(abar)

    def net(x, t_model):          # eps of N(0.2, 0.5^2) data; t in the network's units
        ab = jnp.interp(t_model, jnp.arange(1000, dtype=jnp.float32), table)
        ab = ab.reshape(-1, *([1] * (x.ndim - 1)))
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * 0.2) / (ab * 0.25 + 1 - ab)

    return ns, net


# jaxdiff's solvers whose steps are TimeTuner's grids (see tuning/cli.py: solver_config)
JAXDIFF_CONFIG = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                  "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False}
JAXDIFF_SOLVER = {"ddim": ("ddim", dict(JAXDIFF_CONFIG, set_alpha_to_one=False)),
                  "dpmsolver++": ("dpm++", dict(JAXDIFF_CONFIG, final_sigmas_type="sigma_min"))}


def _jaxdiff_solver(solver, k, **kw):
    from jaxdiff import solvers
    name, cfg = JAXDIFF_SOLVER[solver]
    cfg = {key: v for key, v in cfg.items() if solver == "ddim" or key != "clip_sample"}
    return solvers.make(name, cfg, k, **kw)


@pytest.mark.parametrize("solver, k", [("ddim", 10), ("dpmsolver++", 8), ("dpmsolver++", 16)])
def test_matches_jaxdiff_diffusers_solver_plain_and_tuned(solver, k):
    """With all ratios 1 the tuner's sampler is jaxdiff's diffusers-built solver on the same
    grid (DDIM: leading spacing, steps_offset=1, final alpha = alphas_cumprod[0];
    DPM-Solver++: its own timesteps, last step to the first training time) driven by
    jaxdiff.sample; with ratios, that solver's ``with_ratios`` gives the same samples as
    t_ratios here (two routes to tuned sampling)."""
    from jaxdiff import sample

    ns, net = _jaxdiff_problem()
    tuner = TimeTuner(model_wrapper(net, ns), ns)
    target = _jaxdiff_solver(solver, k)
    ts = np.asarray(target.timesteps)
    if solver == "ddim":
        np.testing.assert_array_equal(ts, np.arange(901, 0, -100))
        np.testing.assert_allclose(tuning.time_grid(ns, k)[0],
                                   tuning.time_grid(ns, timesteps=ts)[0], rtol=1e-15)
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    plain = tuner.sample(x_T, timesteps=ts, solver=solver)
    ones = tuner.sample(x_T, timesteps=ts, t_ratios=np.ones(k), solver=solver)
    np.testing.assert_array_equal(np.asarray(ones), np.asarray(plain))
    assert rel(plain, sample(net, target, x_T)) < 2e-5
    ratios = 1 + 0.04 * np.random.default_rng(8).uniform(-1, 1, size=k)
    tuned = tuner.sample(x_T, timesteps=ts, t_ratios=ratios, solver=solver)
    got = sample(net, target.with_ratios(ratios), x_T)
    assert rel(got, tuned) < 2e-5 and rel(tuned, plain) > 1e-3


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_sample_is_jitted_once_and_validates(solver):
    ns = make_schedule("linear")
    tuner = TimeTuner(gauss_eps_fn(ns, 0.1, 0.5), ns)
    x = jnp.ones((3, 7 if solver == "ddim" else 9))
    name = "ddim_sample" if solver == "ddim" else "dpm_solver_sample"
    tuner.sample(x, 5, t_ratios=np.full(5, 0.97), solver=solver)
    before = tuner_mod.TRACE_COUNTS[name]
    for r in (0.98, 1.01):                         # new ratios: same program
        tuner.sample(x, 5, t_ratios=np.full(5, r), solver=solver)
    assert tuner_mod.TRACE_COUNTS[name] == before
    out, inter = tuner.sample(x, 5, return_intermediates=True, solver=solver)
    assert inter["x_t"].shape == (6,) + x.shape and inter["x0_pred"].shape == (6,) + x.shape
    np.testing.assert_array_equal(np.asarray(inter["x_t"][-1]), np.asarray(out))
    with pytest.raises(ValueError, match=r"t_ratios must have shape \[num_steps\] = \(5,\)"):
        tuner.sample(x, 5, t_ratios=np.ones(4), solver=solver)
    if solver == "ddim":
        with pytest.raises(ValueError, match="pass key="):
            tuner.ddim_sample(x, 5, eta=0.5)
        key = jax.random.key(0)
        tuner.ddim_sample(x, 5, eta=0.3, key=key)
        before = tuner_mod.TRACE_COUNTS[name]
        tuner.ddim_sample(x, 5, eta=0.7, key=key)  # eta is a traced table entry
        assert tuner_mod.TRACE_COUNTS[name] == before


def test_sampler_errors():
    ns = make_schedule("linear")
    tuner = TimeTuner(gauss_eps_fn(ns, 0.1, 0.5), ns)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unsupported solver 'heun'"):
        tuner.optimize_timesteps([np.ones((2, 3))], 4, solver="heun")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        tuner.dpm_solver_sample(x, 4, order=3)
    with pytest.raises(ValueError, match="unsupported solver"):
        tuner.sample(x, 4, solver="euler")


# ======================================================================= loss and gradients
@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("tune_type", ["parallel", "sequential"])
def test_loss_matches_reference_definition(tune_type, solver):
    k, mu, c = 5, np.array([0.5, -0.3]), 0.2
    rng = np.random.default_rng(5 if solver == "ddim" else 15)
    x0 = mu + c * rng.normal(size=(8, 2))
    noise = rng.normal(size=(8, 2))
    ratios = np.array([1.03, 0.96, 1.02, 0.99, 1.0])
    with jax.enable_x64(True):
        ns = make_schedule("discrete", jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        t, t_next = tuning.time_grid(ns, k)
        for idx in range(k - 1):
            got = float(tuner.loss(jnp.asarray(x0), jnp.asarray(noise), idx, 1.04, k,
                                   tune_type=tune_type, t_ratios=ratios, solver=solver))
            ref = np_loss(solver, x0, noise, idx, 1.04, ratios, t, t_next,
                          np_gauss_eps_fn("discrete", mu, c), "discrete",
                          tune_type == "sequential")
            assert got == pytest.approx(ref, rel=1e-9), idx
            if solver != "ddim" and idx > 0:     # the history matters from the second step
                ddim = float(tuner.loss(jnp.asarray(x0), jnp.asarray(noise), idx, 1.04, k,
                                        tune_type=tune_type, t_ratios=ratios))
                assert abs(ddim - got) > 1e-6 * got


@pytest.mark.parametrize("solver, kind", [("ddim", "linear"), ("ddim", "discrete"),
                                          ("dpmsolver++", "linear")])
def test_gradients_match_central_differences(solver, kind):
    k, mu, c = 5, np.array([0.5, -0.3, 0.1]), 0.3
    rng = np.random.default_rng(6)
    x0 = jnp.asarray(mu + c * rng.normal(size=(6, 3)))
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        x0 = jnp.asarray(np.asarray(x0), jnp.float64)
        noise = jnp.asarray(rng.normal(size=(6, 3)))
        t, _ = tuning.time_grid(ns, k)
        # ratios whose r * t sits mid-way between training knots (log-alpha is piecewise
        # linear there, so derivatives are one-sided exactly on a knot)
        ratios = (np.floor(t * N_TRAIN * np.array([1.03, 0.97, 1.05, 0.98, 1.0])) + 0.5) / (
            t * N_TRAIN)
        h = 1e-5
        for tune_type in ("parallel", "sequential"):
            for idx in (0, 2, 3):
                f = lambda r: tuner.loss(x0, noise, idx, r, k, tune_type=tune_type,  # noqa
                                         t_ratios=ratios, solver=solver)
                r0 = float(ratios[idx])
                g = float(jax.grad(f)(jnp.float64(r0)))
                fd = (float(f(r0 + h)) - float(f(r0 - h))) / (2 * h)
                assert g == pytest.approx(fd, rel=1e-6, abs=1e-10), (tune_type, idx)
        # end to end through jaxdiff.sample: d/dr_i of |x_0(r) - y|^2
        x_T = jnp.asarray(rng.normal(size=(4, 3)))
        y = jnp.asarray(rng.normal(size=(4, 3)))
        obj = lambda r: jnp.sum((tuner.sample(x_T, k, t_ratios=r, solver=solver)  # noqa
                                 - y) ** 2)
        g = np.asarray(jax.grad(obj)(jnp.asarray(ratios)))
        for i in range(k):
            e = np.zeros(k)
            e[i] = h
            up, down = float(obj(jnp.asarray(ratios + e))), float(obj(jnp.asarray(ratios - e)))
            fd = (up - down) / (2 * h)
            assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-10), i


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("tune_type", ["parallel", "sequential"])
def test_training_minimises_exactly_the_loss(tune_type, solver):
    """The first logged loss of each index is TimeTuner.loss at ratio 1 on the first batch
    with the noise of (index, iteration 0); Adam's first move is -lr * sign(grad).
    (float64: in float32 the loss is a difference of nearly equal noises.)"""
    k, mu, c = 4, np.array([0.5, -0.3]), 0.2
    lr = 1e-3
    with jax.enable_x64(True):
        ns = make_schedule("discrete", jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        batch = mu + c * np.random.default_rng(7 if solver == "ddim" else 17).normal(
            size=(16, 2))
        key = jax.random.key(3)
        ratios, log = tuner.optimize_timesteps([batch], k, tune_type=tune_type, lr=lr,
                                               total_iters=1, key=key, solver=solver)
        for idx in range(k - 1):
            noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, idx), 0),
                                      batch.shape, jnp.float64)
            # sequential: the earlier steps run with the ratios already learned; parallel:
            # every index trains at once, the history at the starting ratios (1)
            hist = ratios if tune_type == "sequential" else np.ones(k)
            f = lambda r: tuner.loss(batch, noise, idx, r, k, tune_type=tune_type,  # noqa
                                     t_ratios=hist, solver=solver)
            assert float(log["loss"][idx, 0]) == pytest.approx(float(f(1.0)), rel=1e-6)
            g = float(jax.grad(f)(jnp.float64(1.0)))
            assert ratios[idx] == pytest.approx(1 - lr * np.sign(g), rel=1e-7)
    assert ratios[-1] == 1.0
    meta = log["meta"]
    assert meta["solver"] == solver
    np.testing.assert_allclose(meta["timesteps"], [751, 501, 251, 1])
    if solver != "ddim":
        assert meta["orders"] == [1, 2, 2, 1]


def test_batches_with_labels_condition_the_model():
    """(images, labels) and {'image', 'label'} batches: the labels reach the network as
    the condition, with classifier-free guidance against ``uncond_condition``."""
    k, key = 3, jax.random.key(5)
    with jax.enable_x64(True):
        ns = make_schedule("discrete", jnp.float64)

        def net(x, t_input, cond):          # eps of N(0.3 * cond, 0.2^2) data
            t = t_input / 1000.0 + 1.0 / N_TRAIN
            a, s = ns.marginal_alpha(t)[:, None], ns.marginal_std(t)[:, None]
            return s * (x - a * 0.3 * cond[:, None]) / (a ** 2 * 0.04 + s ** 2)

        fn = model_wrapper(net, ns, guidance_type="classifier-free",
                           guidance_scale=jnp.float64(2.0))
        tuner = TimeTuner(fn, ns)
        rng = np.random.default_rng(9)
        labels = rng.integers(0, 3, size=8).astype(np.float64)
        images = 0.3 * labels[:, None] + 0.2 * rng.normal(size=(8, 2))
        null = jnp.asarray([-1.0])
        for batch in ((images, labels), {"image": images, "label": labels}):
            _, log = tuner.optimize_timesteps([batch], k, tune_type="parallel",
                                              total_iters=1, key=key, uncond_condition=null)
            for idx in range(k - 1):
                noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, idx), 0),
                                          images.shape, jnp.float64)
                want = float(tuner.loss(images, noise, idx, 1.0, k, condition=labels,
                                        uncond_condition=null))
                other = float(tuner.loss(images, noise, idx, 1.0, k, condition=labels * 0,
                                         uncond_condition=null))
                assert float(log["loss"][idx, 0]) == pytest.approx(want, rel=1e-6)
                assert abs(other - want) > 1e-3 * want
        # and sampling with conditions: a pytree condition bound into jaxdiff.sample's
        # model function; new labels reuse the compiled program
        x_T = jnp.asarray(rng.normal(size=(8, 2)))
        a = tuner.ddim_sample(x_T, k, condition=jnp.asarray(labels), uncond_condition=null)
        before = tuner_mod.TRACE_COUNTS["ddim_sample"]
        b = tuner.ddim_sample(x_T, k, condition=jnp.asarray(labels * 0), uncond_condition=null)
        assert tuner_mod.TRACE_COUNTS["ddim_sample"] == before
        assert rel(a, b) > 1e-3


# ======================================================================= tuning helps
# N(mu, c^2) data with c = 0.05; the "network" believes c = 0.025 (a slightly wrong data
# variance). Probability-flow ODE: x_u = alpha_u mu + sqrt(v_u / v_t) (x_t - alpha_t mu).
GAUSS_D, GAUSS_C = 8, 0.05


def _gauss_problem():
    mu = np.random.default_rng(0).normal(size=GAUSS_D).astype(np.float32) * 0.5
    ns = make_schedule("discrete")
    model = gauss_eps_fn(ns, jnp.asarray(mu), GAUSS_C / 2)
    rng = np.random.default_rng(1)
    data = [np.asarray(mu + GAUSS_C * rng.normal(size=(32, GAUSS_D)), np.float32)
            for _ in range(4)]
    return mu, ns, model, data


@pytest.mark.parametrize("solver, tune_type, k", [("ddim", "parallel", 5),
                                                  ("ddim", "sequential", 5),
                                                  ("ddim", "parallel", 10),
                                                  ("dpmsolver++", "sequential", 5)])
def test_tuning_reduces_error_to_exact_ode_solution(solver, tune_type, k):
    mu, ns, model, data = _gauss_problem()
    tuner = TimeTuner(model, ns)
    t, t_next = tuning.time_grid(ns, k)
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (2000, GAUSS_D)), np.float64)

    def v(u):
        a, s = np_alpha_sigma("discrete", u)
        return a, a ** 2 * GAUSS_C ** 2 + s ** 2
    (a0, v0), (a1, v1) = v(t[0]), v(t_next[-1])
    exact = a1 * mu + np.sqrt(v1 / v0) * (x_T - a0 * mu)

    def err(r):
        out = tuner.sample(x_T.astype(np.float32), k, t_ratios=r, solver=solver)
        return np.sqrt(np.mean((np.asarray(out) - exact) ** 2))
    ratios, log = tuner.optimize_timesteps(data, k, tune_type=tune_type, lr=5e-3,
                                           total_iters=100, solver=solver)
    before, after = err(None), err(ratios)
    assert after < 0.5 * before, (before, after, ratios)
    if solver == "ddim":
        assert np.all(log["loss"][:, -10:].mean(1) <= log["loss"][:, :3].mean(1) + 1e-9)
        # the network overestimates |eps| near the data: the tuned times move later
        assert ratios.shape == (k,) and ratios[-1] == 1.0 and ratios[-2] > 1.01


# ======================================================================= compilation
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_sequential_mode_compiles_one_step_for_all_indices(solver):
    ns = make_schedule("discrete")
    tuner = TimeTuner(gauss_eps_fn(ns, jnp.float32(0.2), 0.1), ns)
    # a batch shape no other test uses
    data = [np.full((5, 11 if solver == "ddim" else 13), 0.2, np.float32)]
    counts = tuner_mod.TRACE_COUNTS
    before, cache = counts["sequential"], tuner_mod._sequential_update._cache_size()
    tuner.optimize_timesteps(data, 6, tune_type="sequential", total_iters=3,    # 5 indices
                             solver=solver)
    assert counts["sequential"] == before + 1
    assert tuner_mod._sequential_update._cache_size() == cache + 1
    tuner.optimize_timesteps(data, 6, tune_type="sequential", total_iters=2, lr=1e-2,
                             key=jax.random.key(9), solver=solver)   # new lr, key: same program
    assert counts["sequential"] == before + 1
    pbefore = counts["parallel"]
    tuner.optimize_timesteps(data, 6, tune_type="parallel", total_iters=3, solver=solver)
    tuner.optimize_timesteps(data, 6, tune_type="parallel", total_iters=3, lr=1e-2,
                             solver=solver)
    assert counts["parallel"] == pbefore + 1


def test_progress_reports_done_and_total():
    ns = make_schedule("discrete")
    tuner = TimeTuner(gauss_eps_fn(ns, jnp.float32(0.2), 0.1), ns)
    calls = []
    tuner.optimize_timesteps([np.full((5, 11), 0.2, np.float32)], 3, tune_type="sequential",
                             total_iters=2, progress=lambda done, total: calls.append(
                                 (done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


# ======================================================================= fault tolerance
RESUME_JOB = '''
import sys, time
sys.path.insert(0, {root!r})
import numpy as np, jax, jax.numpy as jnp
from tuning import NoiseScheduleVP, TimeTuner

def run(checkpoint_dir, stall_at_27=False, tune_type="sequential", callback=None):
    ns = NoiseScheduleVP("discrete", betas=np.linspace(1e-4, 0.02, 1000))
    mu = jnp.asarray([0.4, -0.3, 0.2])
    def model(x, t):
        a, s = ns.marginal_alpha(t)[:, None], ns.marginal_std(t)[:, None]
        return s * (x - a * mu) / (a ** 2 * 0.02 + s ** 2) + 0.01 * jnp.sin(3 * x)
    rng = np.random.default_rng(0)
    data = [np.asarray(np.asarray(mu) + 0.2 * rng.normal(size=(8, 3)), np.float32)
            for _ in range(3)]
    def stall(idx, it, loss, ratio):
        # a job that is still working when the test kills it, however slow the machine
        if idx * 20 + it >= 27:
            while True:
                time.sleep(1)
    return TimeTuner(model, ns).optimize_timesteps(
        data, 5, tune_type=tune_type, lr=1e-2, total_iters=20, key=jax.random.key(4),
        checkpoint_dir=checkpoint_dir, checkpoint_every=5,
        callback=stall if stall_at_27 else callback)

if __name__ == "__main__":
    run(sys.argv[1], stall_at_27=True)
'''


@pytest.fixture(scope="module")
def resume_job(tmp_path_factory):
    path = tmp_path_factory.mktemp("job") / "resume_job.py"
    root = str(pathlib.Path(tuning.__file__).resolve().parent.parent)
    path.write_text(RESUME_JOB.format(root=root))
    spec = importlib.util.spec_from_file_location("resume_job", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return path, mod


def _steps(directory):
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def test_sigkill_then_rerun_resumes_with_identical_ratios(resume_job, tmp_path):
    path, job = resume_job
    baseline, base_log = job.run(None)                 # uninterrupted, no checkpoints
    ckpt = tmp_path / "ckpt"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(path), str(ckpt)], env=dict(os.environ),
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    try:
        # the job checkpoints every 5 iterations and stalls at iteration 27 (index 1)
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and 25 in _steps(ckpt):
                break
            time.sleep(0.05)
        assert proc.poll() is None, ("the job died before it could be killed: "
                                     + (tmp_path / "stderr.txt").read_text()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_steps(ckpt))
    assert killed_at == 25                             # mid-run (4 indices x 20 iterations)
    ratios, log = job.run(str(ckpt))                   # the same call again
    assert log["resumed_from"] == killed_at
    np.testing.assert_array_equal(ratios, baseline)
    np.testing.assert_array_equal(log["loss"], base_log["loss"])
    # and once more: the finished run is just read back
    again, log2 = job.run(str(ckpt))
    assert log2["resumed_from"] == 80
    np.testing.assert_array_equal(again, baseline)


def test_parallel_mode_resumes_after_an_interruption(resume_job, tmp_path):
    _, job = resume_job
    baseline, _ = job.run(None, tune_type="parallel")

    def stop(idx, it, loss, ratio):
        if it == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.run(str(tmp_path), tune_type="parallel", callback=stop)
    assert max(_steps(tmp_path)) == 10
    ratios, log = job.run(str(tmp_path), tune_type="parallel")
    assert log["resumed_from"] == 10
    np.testing.assert_array_equal(ratios, baseline)
    with pytest.raises(ValueError, match="different settings.*tune_type"):
        job.run(str(tmp_path), tune_type="sequential")


def test_non_finite_loss_names_index_and_iteration_and_keeps_checkpoint(tmp_path):
    ns = make_schedule("discrete")
    tuner = TimeTuner(gauss_eps_fn(ns, jnp.float32(0.1), 0.2), ns)
    good = np.full((4, 3), 0.1, np.float32)
    bad = [good, good, good, np.full((4, 3), np.nan, np.float32), good]
    with pytest.raises(NonFiniteLossError, match=r"step index 0 \(t=0\.668\), iteration 3; "
                                                 r"the last good checkpoint \(iteration 2\)"):
        tuner.optimize_timesteps(bad, 3, total_iters=6, checkpoint_dir=tmp_path,
                                 checkpoint_every=2)
    assert _steps(tmp_path) == [2]
    # with the data fixed, the same call resumes from that checkpoint and finishes
    ratios, log = tuner.optimize_timesteps([good], 3, total_iters=6,
                                           checkpoint_dir=tmp_path, checkpoint_every=2)
    assert log["resumed_from"] == 2 and np.all(np.isfinite(ratios))
    with pytest.raises(NonFiniteLossError, match=r"step indices \[0, 1\], iteration 0; "
                                                 r"no checkpoint_dir was given"):
        tuner.optimize_timesteps([bad[3]], 3, tune_type="parallel", total_iters=2)


# ======================================================================= artifacts and checks
def test_save_and_load_ratios_round_trip(tmp_path):
    ratios = np.asarray([1.0123457, 0.99871, 1.0], np.float32)
    meta = {"num_steps": 3, "t": np.array([0.6, 0.3, 0.1]), "schedule": "discrete"}
    path = save_ratios(tmp_path / "r" / "ratios.json", ratios, meta)
    back, meta2 = load_ratios(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, ratios)
    assert meta2 == {"num_steps": 3, "t": [0.6, 0.3, 0.1], "schedule": "discrete"}
    (tmp_path / "x.json").write_text('{"ratios": [1.0]}')
    with pytest.raises(ValueError, match="not a ratios file"):
        load_ratios(tmp_path / "x.json")
    with pytest.raises(ValueError, match="non-finite"):
        save_ratios(tmp_path / "y.json", [1.0, np.nan])


def test_optimize_timesteps_rejects_bad_arguments():
    ns = make_schedule("discrete")
    tuner = TimeTuner(gauss_eps_fn(ns, jnp.float32(0.1), 0.2), ns)
    data = [np.zeros((2, 3), np.float32)]
    with pytest.raises(ValueError, match="'joint'"):
        tuner.optimize_timesteps(data, 3, tune_type="joint")
    with pytest.raises(ValueError, match="re-iterable"):
        tuner.optimize_timesteps(iter(data), 3)
    with pytest.raises(ValueError, match="not a single array"):
        tuner.optimize_timesteps(data[0], 3)
    with pytest.raises(ValueError, match="num_steps >= 2"):
        tuner.optimize_timesteps(data, 1)
    with pytest.raises(ValueError, match="lr must be"):
        tuner.optimize_timesteps(data, 3, lr=-1.0)
    with pytest.raises(ValueError, match="data yielded no batches"):
        tuner.optimize_timesteps([], 3)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_ratios_file_plugs_into_jaxdiff_solver(solver, tmp_path):
    """Tune on the jaxdiff solver's timesteps, save with log['meta']: the jaxdiff solver
    loads the file (its timesteps are checked) and samples as TimeTuner's tuned sampler
    does; a solver with other timesteps refuses it."""
    from jaxdiff import sample

    ns, net = _jaxdiff_problem()
    tuner = TimeTuner(model_wrapper(net, ns), ns)
    k = 6
    ts = np.asarray(_jaxdiff_solver(solver, k).timesteps)
    data = [np.asarray(0.2 + 0.5 * np.random.default_rng(1).normal(size=(8, 4, 4, 3)),
                       np.float32)]
    ratios, log = tuner.optimize_timesteps(data, timesteps=ts, tune_type="parallel", lr=1e-2,
                                           total_iters=5, solver=solver)
    assert np.any(np.abs(ratios[:-1] - 1) > 1e-3)
    path = tuning.save_ratios(tmp_path / "r.json", ratios, log["meta"])
    x_T = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
    got = sample(net, _jaxdiff_solver(solver, k, ratios=str(path)), x_T)
    want = tuner.sample(x_T, timesteps=ts, t_ratios=ratios, solver=solver)
    assert rel(got, want) < 2e-5
    with pytest.raises(ValueError, match="tuned for timesteps"):
        from jaxdiff import solvers
        name, cfg = JAXDIFF_SOLVER[solver]
        solvers.make(name, dict(cfg, timestep_spacing="trailing"), k, ratios=str(path))
