"""TimeTuner with DPM-Solver++ (tuning/, solver='dpmsolver++'): the tuned multistep sampler
and its tuning loss against independent float64 NumPy transcriptions, equality with
jaxdiff's own DPMSolverPP (plain and with ratios), gradients against finite differences,
one compiled step for all indices, the ratios file accepted by jaxdiff's solver, and tuning
on the analytic Gaussian problem of tests/test_tuning.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tuning
from test_tuning import (GAUSS_C, GAUSS_D, _gauss_problem, gauss_eps_fn, make_schedule,
                         np_alpha_sigma, np_gauss_eps_fn, rel)
from tuning import TimeTuner, model_wrapper
from tuning import tuner as tuner_mod


# ----------------------------------------------------------------- float64 NumPy references
def np_orders(k, lower_order_final=True):
    return [1 if i == 0 or (lower_order_final and k < 15 and i == k - 1) else 2
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


# ======================================================================= the sampler
def test_orders():
    np.testing.assert_array_equal(tuning.dpm_orders(5), [1, 2, 2, 2, 1])
    np.testing.assert_array_equal(tuning.dpm_orders(5, lower_order_final=False), [1, 2, 2, 2, 2])
    np.testing.assert_array_equal(tuning.dpm_orders(16), [1] + [2] * 15)
    np.testing.assert_array_equal(tuning.dpm_orders(4, order=1), [1, 1, 1, 1])


@pytest.mark.parametrize("kind, grid, lower_order_final", [("discrete", "reference", True),
                                                           ("linear", "reference", False),
                                                           ("cosine", "uniform", True)])
def test_dpm_solver_sample_matches_numpy(kind, grid, lower_order_final):
    k, mu, c = 6, np.array([0.4, -0.2, 1.0]), 0.3
    rng = np.random.default_rng(14)
    ratios = 1 + 0.05 * rng.uniform(-1, 1, size=k)
    ratios[0] = 0.98
    x_np = rng.normal(size=(5, 3))
    with jax.enable_x64(True):
        ns = make_schedule(kind, jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        t, t_next = tuning.time_grid(ns, k, grid=grid)
        got, inter = tuner.dpm_solver_sample(jnp.asarray(x_np), k, t_ratios=ratios, grid=grid,
                                             lower_order_final=lower_order_final,
                                             return_intermediates=True)
        via_name = tuner.sample(jnp.asarray(x_np), k, t_ratios=ratios, grid=grid,
                                solver="dpmsolver++", lower_order_final=lower_order_final)
    ref, _ = np_dpmpp(x_np, t, t_next, ratios, np_gauss_eps_fn(kind, mu, c), kind,
                      np_orders(k, lower_order_final))
    assert rel(got, ref) < 1e-9
    np.testing.assert_array_equal(np.asarray(via_name), np.asarray(got))
    assert inter["x_t"].shape == (k + 1, 5, 3)
    # second order is not DDIM: the two samplers differ at the same ratios
    with jax.enable_x64(True):
        ddim = tuner.ddim_sample(jnp.asarray(x_np), k, t_ratios=ratios, grid=grid)
    assert rel(ddim, ref) > 1e-6
    # order 1 is DDIM
    with jax.enable_x64(True):
        first = tuner.dpm_solver_sample(jnp.asarray(x_np), k, t_ratios=ratios, grid=grid,
                                        order=1)
    assert rel(first, ddim) < 1e-12


def _jaxdiff_problem():
    from jaxdiff.schedules import alphas_cumprod, make_betas

    abar = alphas_cumprod(make_betas(1000, 1e-4, 0.02, "linear"))
    ns = tuning.NoiseScheduleVP("discrete", alphas_cumprod=abar)
    table = jnp.asarray(abar)

    def net(x, t_model):          # eps of N(0.2, 0.5^2) data; t in the network's units
        ab = jnp.interp(t_model, jnp.arange(1000, dtype=jnp.float32), table)
        ab = ab.reshape(-1, *([1] * (x.ndim - 1)))
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * 0.2) / (ab * 0.25 + 1 - ab)

    return ns, net


DPM_CONFIG = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
              "final_sigmas_type": "sigma_min", "timestep_spacing": "leading",
              "steps_offset": 1}


@pytest.mark.parametrize("k", [8, 16])
def test_matches_jaxdiff_dpm_solver_plain_and_tuned(k):
    """On the solver's own timesteps (timesteps=solver.timesteps) and ending at the first
    training time (final_sigmas_type='sigma_min'), TimeTuner's DPM-Solver++ is jaxdiff's
    DPMSolverPP driven by jaxdiff.sample; with ratios, Solver.with_ratios gives the same
    samples as t_ratios here."""
    from jaxdiff import sample, solvers

    ns, net = _jaxdiff_problem()
    tuner = TimeTuner(model_wrapper(net, ns), ns)
    solver = solvers.make("dpm++", DPM_CONFIG, k)
    ts = np.asarray(solver.timesteps)
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    plain = tuner.dpm_solver_sample(x_T, timesteps=ts)
    ref = sample(net, solver, x_T)
    assert rel(plain, ref) < 2e-5
    ratios = 1 + 0.04 * np.random.default_rng(8).uniform(-1, 1, size=k)
    tuned = tuner.dpm_solver_sample(x_T, timesteps=ts, t_ratios=ratios)
    got = sample(net, solver.with_ratios(ratios), x_T)
    assert rel(got, tuned) < 2e-5 and rel(tuned, plain) > 1e-3


# ======================================================================= loss and gradients
@pytest.mark.parametrize("tune_type", ["parallel", "sequential"])
def test_loss_matches_numpy(tune_type):
    k, mu, c = 5, np.array([0.5, -0.3]), 0.2
    rng = np.random.default_rng(15)
    x0 = mu + c * rng.normal(size=(8, 2))
    noise = rng.normal(size=(8, 2))
    ratios = np.array([1.03, 0.96, 1.02, 0.99, 1.0])
    with jax.enable_x64(True):
        ns = make_schedule("discrete", jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        t, t_next = tuning.time_grid(ns, k)
        for idx in range(k - 1):
            got = float(tuner.loss(jnp.asarray(x0), jnp.asarray(noise), idx, 1.04, k,
                                   tune_type=tune_type, t_ratios=ratios,
                                   solver="dpmsolver++"))
            ref = np_dpm_loss(x0, noise, idx, 1.04, ratios, t, t_next,
                              np_gauss_eps_fn("discrete", mu, c), "discrete",
                              tune_type == "sequential", np_orders(k))
            assert got == pytest.approx(ref, rel=1e-9), idx
            ddim = float(tuner.loss(jnp.asarray(x0), jnp.asarray(noise), idx, 1.04, k,
                                    tune_type=tune_type, t_ratios=ratios))
            if idx > 0:      # the history matters from the second step on
                assert abs(ddim - got) > 1e-6 * got


def test_gradients_match_central_differences():
    k, mu, c = 5, np.array([0.5, -0.3, 0.1]), 0.3
    rng = np.random.default_rng(16)
    with jax.enable_x64(True):
        ns = make_schedule("linear", jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        x0 = jnp.asarray(mu + c * rng.normal(size=(6, 3)))
        noise = jnp.asarray(rng.normal(size=(6, 3)))
        ratios = np.array([1.03, 0.97, 1.05, 0.98, 1.0])
        h = 1e-5
        for tune_type in ("parallel", "sequential"):
            for idx in (0, 2, 3):
                f = lambda r: tuner.loss(x0, noise, idx, r, k, tune_type=tune_type,  # noqa
                                         t_ratios=ratios, solver="dpmsolver++")
                r0 = float(ratios[idx])
                g = float(jax.grad(f)(jnp.float64(r0)))
                fd = (float(f(r0 + h)) - float(f(r0 - h))) / (2 * h)
                assert g == pytest.approx(fd, rel=1e-6, abs=1e-10), (tune_type, idx)
        x_T = jnp.asarray(rng.normal(size=(4, 3)))
        y = jnp.asarray(rng.normal(size=(4, 3)))
        obj = lambda r: jnp.sum((tuner.dpm_solver_sample(x_T, k, t_ratios=r) - y) ** 2)  # noqa
        g = np.asarray(jax.grad(obj)(jnp.asarray(ratios)))
        for i in range(k):
            e = np.zeros(k)
            e[i] = h
            fd = (float(obj(jnp.asarray(ratios + e))) - float(obj(jnp.asarray(ratios - e)))) / (
                2 * h)
            assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-10), i


@pytest.mark.parametrize("tune_type", ["parallel", "sequential"])
def test_training_minimises_exactly_the_loss(tune_type):
    """First logged loss = TimeTuner.loss(solver='dpmsolver++') at ratio 1 on the first batch
    with the noise of (index, iteration 0); Adam's first move is -lr * sign(grad)."""
    k, mu, c, lr = 4, np.array([0.5, -0.3]), 0.2, 1e-3
    with jax.enable_x64(True):
        ns = make_schedule("discrete", jnp.float64)
        tuner = TimeTuner(gauss_eps_fn(ns, jnp.asarray(mu), c), ns)
        batch = mu + c * np.random.default_rng(17).normal(size=(16, 2))
        key = jax.random.key(3)
        ratios, log = tuner.optimize_timesteps([batch], k, tune_type=tune_type, lr=lr,
                                               total_iters=1, key=key, solver="dpmsolver++")
        for idx in range(k - 1):
            noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, idx), 0),
                                      batch.shape, jnp.float64)
            # parallel: every index trains at once, the history at the starting ratios (1)
            hist = ratios if tune_type == "sequential" else np.ones(k)
            f = lambda r: tuner.loss(batch, noise, idx, r, k, tune_type=tune_type,  # noqa
                                     t_ratios=hist, solver="dpmsolver++")
            assert float(log["loss"][idx, 0]) == pytest.approx(float(f(1.0)), rel=1e-6)
            g = float(jax.grad(f)(jnp.float64(1.0)))
            assert ratios[idx] == pytest.approx(1 - lr * np.sign(g), rel=1e-7)
    assert ratios[-1] == 1.0
    meta = log["meta"]
    assert meta["solver"] == "dpmsolver++" and meta["orders"] == [1, 2, 2, 1]
    np.testing.assert_allclose(meta["timesteps"], [751, 501, 251, 1])


def test_sequential_mode_compiles_one_step_for_all_indices():
    ns = make_schedule("discrete")
    tuner = TimeTuner(gauss_eps_fn(ns, jnp.float32(0.2), 0.1), ns)
    data = [np.full((5, 13), 0.2, np.float32)]          # a batch shape no other test uses
    counts = tuner_mod.TRACE_COUNTS
    before = counts["sequential"]
    tuner.optimize_timesteps(data, 6, tune_type="sequential", total_iters=2,
                             solver="dpmsolver++")
    tuner.optimize_timesteps(data, 6, tune_type="sequential", total_iters=2, lr=1e-2,
                             solver="dpmsolver++")
    assert counts["sequential"] == before + 1
    pbefore = counts["parallel"]
    for lr in (1e-3, 1e-2):
        tuner.optimize_timesteps(data, 6, tune_type="parallel", total_iters=2, lr=lr,
                                 solver="dpmsolver++")
    assert counts["parallel"] == pbefore + 1


def test_ratios_file_plugs_into_jaxdiff_dpm_solver(tmp_path):
    """Tune on the solver's timesteps, save with log['meta']: the jaxdiff solver loads the
    file (its timesteps are checked) and samples as TimeTuner's tuned sampler does; a
    solver with other timesteps refuses it."""
    from jaxdiff import sample, solvers

    ns, net = _jaxdiff_problem()
    tuner = TimeTuner(model_wrapper(net, ns), ns)
    k = 6
    solver = solvers.make("dpm++", DPM_CONFIG, k)
    data = [np.asarray(0.2 + 0.5 * np.random.default_rng(1).normal(size=(8, 4, 4, 3)),
                       np.float32)]
    ratios, log = tuner.optimize_timesteps(data, timesteps=np.asarray(solver.timesteps),
                                           tune_type="parallel", lr=1e-2, total_iters=5,
                                           solver="dpmsolver++")
    assert np.any(np.abs(ratios[:-1] - 1) > 1e-3)
    path = tuning.save_ratios(tmp_path / "r.json", ratios, log["meta"])
    x_T = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
    got = sample(net, solvers.make("dpm++", DPM_CONFIG, k, ratios=str(path)), x_T)
    want = tuner.dpm_solver_sample(x_T, timesteps=np.asarray(solver.timesteps),
                                   t_ratios=ratios)
    assert rel(got, want) < 2e-5
    with pytest.raises(ValueError, match="tuned for timesteps"):
        solvers.make("dpm++", dict(DPM_CONFIG, timestep_spacing="trailing"), k,
                     ratios=str(path))


def test_tuning_reduces_error_to_exact_ode_solution():
    """The Gaussian problem of test_tuning (a network that assumes half the data spread):
    tuned DPM-Solver++(2M) ends closer to the exact probability-flow solution."""
    mu, ns, model, data = _gauss_problem()
    tuner = TimeTuner(model, ns)
    k = 5
    t, t_next = tuning.time_grid(ns, k)
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (2000, GAUSS_D)), np.float64)

    def v(u):
        a, s = np_alpha_sigma("discrete", u)
        return a, a ** 2 * GAUSS_C ** 2 + s ** 2
    (a0, v0), (a1, v1) = v(t[0]), v(t_next[-1])
    exact = a1 * mu + np.sqrt(v1 / v0) * (x_T - a0 * mu)

    def err(r):
        out = tuner.dpm_solver_sample(x_T.astype(np.float32), k, t_ratios=r)
        return np.sqrt(np.mean((np.asarray(out) - exact) ** 2))
    ratios, log = tuner.optimize_timesteps(data, k, tune_type="sequential", lr=5e-3,
                                           total_iters=100, solver="dpmsolver++")
    before, after = err(None), err(ratios)
    assert after < 0.5 * before, (before, after, ratios)


def test_errors():
    ns = make_schedule("linear")
    tuner = TimeTuner(gauss_eps_fn(ns, 0.1, 0.5), ns)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unsupported solver 'heun'"):
        tuner.optimize_timesteps([np.ones((2, 3))], 4, solver="heun")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        tuner.dpm_solver_sample(x, 4, order=3)
    with pytest.raises(ValueError, match="unsupported solver"):
        tuner.sample(x, 4, solver="euler")
