"""Time grids: zero-cost grids, schedule files and ``Solver.with_schedule``, the teacher, the
LD3 and GITS learners and the paired measurement.

The exact reference is Gaussian data x0 ~ N(mu, c^2 I): its noise prediction is known in
closed form and its probability-flow ODE maps x_T to
  x_t = alpha_t mu + sqrt(alpha_t^2 c^2 + sigma_t^2) z,  z = (x_T - alpha_T mu) / s_T,
so the teacher and every learned grid are checked against the exact solution.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import schedule_files, solvers, time_grids
from jaxdiff.sampling import Picard, run
from jaxdiff.schedules import NoiseScheduleVP, continuous_time, discrete_timesteps, make_betas
from tuning import gits, ld3, measure, teacher
from tuning.tuner import NonFiniteLossError, time_grid

CFG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
           beta_end=0.02, prediction_type="epsilon", clip_sample=False)
MU, C, D = 0.4, 0.5, 8


def schedule():
    betas = make_betas(1000, 0.0001, 0.02, "linear")
    return NoiseScheduleVP("discrete", alphas_cumprod=np.cumprod(1 - betas.astype(np.float64)))


NS = schedule()
AC = solvers.alphas_cumprod(CFG)


def gauss_model(ns, mu=MU, c=C):
    """eps(x [B, D], network time [B]) of N(mu, c^2) data."""
    def fn(x, t_net):
        t = continuous_time(ns, t_net)
        a, s = ns.marginal_alpha(t)[:, None], ns.marginal_std(t)[:, None]
        return s * (x - a * mu) / (a ** 2 * c ** 2 + s ** 2)
    return fn


def exact(ns, x_T, t_end=None, mu=MU, c=C):
    t0, t1 = jnp.float32(ns.T), jnp.float32(ns.eps if t_end is None else t_end)
    a0, s0 = ns.marginal_alpha(t0), ns.marginal_std(t0)
    a1, s1 = ns.marginal_alpha(t1), ns.marginal_std(t1)
    z = (x_T - a0 * mu) / jnp.sqrt(a0 ** 2 * c ** 2 + s0 ** 2)
    return np.asarray(a1 * mu + jnp.sqrt(a1 ** 2 * c ** 2 + s1 ** 2) * z)


FN = gauss_model(NS)


def model_for(cond):          # one function object: the learners' jitted steps compile once
    return FN


def pairs(n, seed):
    x_T = np.asarray(jax.random.normal(jax.random.key(seed), (n, D)), np.float32)
    return x_T, exact(NS, jnp.asarray(x_T)), np.zeros((n,), np.int32)


# ------------------------------------------------------------------------- zero-cost grids
@pytest.mark.parametrize("name", time_grids.GRIDS)
@pytest.mark.parametrize("k", [1, 3, 4, 10])
def test_zero_cost_grids_are_valid(name, k):
    t = time_grids.make_grid(name, NS, k)
    assert t.shape == (k + 1,) and np.all(np.diff(t) < 0)
    assert t[-1] == NS.eps and t[0] <= NS.T


def test_zero_cost_grids_follow_their_rules():
    k = 6
    lam = lambda t: np.asarray(NS.marginal_lambda(jnp.asarray(t, jnp.float32)), np.float64)
    sig = lambda t: np.exp(-lam(t))
    t = time_grids.make_grid("logsnr_uniform", NS, k)
    np.testing.assert_allclose(np.diff(lam(t)), np.diff(lam(t)).mean(), rtol=2e-3)
    t = time_grids.make_grid("karras", NS, k)
    np.testing.assert_allclose(np.diff(sig(t) ** (1 / 7)), np.diff(sig(t) ** (1 / 7)).mean(),
                               rtol=2e-3)
    t = time_grids.make_grid("kl_optimal", NS, k)
    np.testing.assert_allclose(np.diff(np.arctan(sig(t))), np.diff(np.arctan(sig(t))).mean(),
                               rtol=2e-3)
    np.testing.assert_allclose(time_grids.make_grid("time_uniform", NS, k),
                               np.linspace(1.0, 1e-3, k + 1))
    # leading = TimeTuner's reference grid; trailing = diffusers' trailing timesteps
    ref_t, ref_next = time_grid(NS, k, grid="reference")
    np.testing.assert_allclose(time_grids.make_grid("leading", NS, k)[:-1], ref_t)
    trail = discrete_timesteps(1000, k, "trailing", 0)
    np.testing.assert_allclose(time_grids.make_grid("trailing", NS, k)[:-1],
                               (trail + 1.0) / 1000)
    ays = time_grids.make_grid("ays_sd15", NS, 10)
    np.testing.assert_allclose(ays[:-1] * 1000 - 1, time_grids.AYS_TIMESTEPS["ays_sd15"])
    with pytest.raises(ValueError, match="unknown grid 'cosine'"):
        time_grids.make_grid("cosine", NS, 4)
    with pytest.raises(ValueError, match="positive integer"):
        time_grids.make_grid("karras", NS, 0)


# ------------------------------------------------------------------------- teacher
def test_teacher_matches_the_exact_ode_solution():
    x_T, want, cond = pairs(64, 0)
    got = teacher.solve_batches(model_for, cond, x_T, teacher.teacher_solver(NS, 500), batch=64)
    err = measure.rmse(got, want)
    assert err.max() < 2e-4, err.max()
    few = teacher.solve_batches(model_for, cond, x_T, teacher.student_solver(
        NS, "ddim", time_grids.make_grid("time_uniform", NS, 4)), batch=64)
    assert measure.rmse(few, want).mean() > 50 * err.mean()     # the check can fail
    gap = teacher.teacher_gap(model_for, cond[:16], x_T[:16], NS, steps=100, check_steps=200)
    assert gap["rmse_mean"] < 1e-3
    with pytest.raises(ValueError, match="teacher must take more steps than the student"):
        teacher.check_teacher_steps(4, 8)


# ------------------------------------------------------------------------- schedule files
def _learned_like(k, seed=0):
    rng = np.random.default_rng(seed)
    t = time_grids.make_grid("logsnr_uniform", NS, k)
    t[1:-1] *= 1 + 0.05 * rng.uniform(-1, 1, k - 1)
    net = t[:-1].copy()
    net[1:] += 0.3 * np.minimum(-np.diff(t)[1:], -np.diff(t)[:-1]) * rng.uniform(-1, 1, k - 1)
    return t, net


@pytest.mark.parametrize("family,name", [("ddim", "ddim"), ("dpmsolver++", "dpm++")])
def test_schedule_file_drives_every_sampler(tmp_path, family, name):
    k = 6
    t, net = _learned_like(k)
    path = schedule_file(tmp_path, family, t, net)
    doc = schedule_files.load_schedule(path)
    np.testing.assert_array_equal(doc["t"], t)                 # bit for bit
    np.testing.assert_array_equal(doc["network_t"], net)
    sol = solvers.make(name, CFG, k, schedule=path)
    assert sol.num_steps == k
    want = teacher.student_solver(NS, family, t, net)
    x_T, _, _ = pairs(8, 1)
    fn = gauss_model(NS)
    a = jaxdiff.sample(fn, sol, jnp.asarray(x_T))
    b = jaxdiff.sample(fn, want, jnp.asarray(x_T))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert measure.rmse(a, jaxdiff.sample(fn, solvers.make(name, CFG, k), jnp.asarray(x_T))
                        ).mean() > 1e-3                      # the grid did change something
    x_p, stats = run(Picard(parallel=k, tolerance=1e-6), fn, sol, jnp.asarray(x_T))
    np.testing.assert_allclose(np.asarray(x_p), np.asarray(a), atol=1e-4)
    # a dict works as well as a path, and from_diffusers takes schedule= too
    cfg = {**CFG, "_class_name": type(sol).__name__ + ("Scheduler" if family == "ddim" else "")}
    if family == "ddim":
        again = solvers.from_diffusers({**cfg, "_class_name": "DDIMScheduler"}, k,
                                       schedule=json.loads(path.read_text()))
        np.testing.assert_array_equal(np.asarray(again.timesteps), np.asarray(sol.timesteps))


def schedule_file(tmp_path, family, t, net, **kw):
    return schedule_files.save_schedule(tmp_path / f"{family}.json", solver=family, t=t,
                                        network_t=net, alphas_cumprod=AC, **kw)


def test_schedule_file_refusals(tmp_path):
    k = 5
    t, net = _learned_like(k)
    path = schedule_file(tmp_path, "ddim", t, net)
    with pytest.raises(ValueError, match="made for solver 'ddim', not for DPMSolverPP"):
        solvers.make("dpm++", CFG, k, schedule=path)
    with pytest.raises(ValueError, match="made for 5 steps, but this DDIM has 6"):
        solvers.make("ddim", CFG, 6, schedule=path)
    with pytest.raises(ValueError, match="another noise schedule"):
        solvers.make("ddim", {**CFG, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                              "beta_end": 0.012}, k, schedule=path)
    with pytest.raises(ValueError, match="Euler cannot take a learned time grid"):
        solvers.make("euler", CFG, k, schedule=path)
    with pytest.raises(ValueError, match="not both"):
        solvers.make("ddim", CFG, k, schedule=path, ratios=np.ones(k))
    dpm = schedule_file(tmp_path, "dpmsolver++", t, net, options={"order": 2})
    with pytest.raises(ValueError, match="order 2, but this solver has order 1"):
        solvers.make("dpm++", CFG, k, schedule=dpm, solver_order=1)
    with pytest.raises(ValueError, match="sde-dpmsolver"):
        solvers.make("dpm++", CFG, k, schedule=dpm, algorithm_type="sde-dpmsolver++")
    bad = t.copy()
    bad[2] = bad[1] + 1e-3
    with pytest.raises(ValueError, match=r"strictly decreasing, but t\[1\]"):
        schedule_file(tmp_path, "ddim", bad, net)
    doc = json.loads(path.read_text())
    for field, value, message in [("t", [1.5] + doc["t"][1:], "outside the schedule"),
                                  ("network_t", doc["network_t"][:-1], "one time per step"),
                                  ("num_steps", 7, "num_steps=7"),
                                  ("format", "other", "is not a schedule file"),
                                  ("solver", "heun", "\"solver\" must be one of")]:
        edited = tmp_path / "edited.json"
        edited.write_text(json.dumps({**doc, field: value}))
        with pytest.raises(ValueError, match=message):
            solvers.make("ddim", CFG, k, schedule=edited)
    # a TimeTuner ratios file is the special case and keeps loading
    ratios = schedule_files.save_ratios(tmp_path / "r.json", np.full(k, 1.01))
    np.testing.assert_array_equal(
        np.asarray(solvers.make("ddim", CFG, k, schedule=ratios).timesteps),
        np.asarray(solvers.make("ddim", CFG, k, ratios=ratios).timesteps))


# ------------------------------------------------------------------------- LD3
def _small_config(**kw):
    base = dict(solver="ddim", init="time_uniform", lr=0.05, batch=16, epochs=12, patience=12)
    return ld3.LD3Config(**{**base, **kw})


def test_ld3_gradient_matches_finite_differences():
    k = 3
    x_T, ref, _ = pairs(8, 2)
    fn = gauss_model(NS)
    t0, t1 = float(NS.T), float(NS.eps)

    def loss(logits, offsets):
        p = ld3.GridParams(logits, offsets)
        t, net = ld3.unpack(p, t0, t1, 0.5)
        x = jaxdiff.sample(fn, teacher.student_solver(NS, "ddim", t, net), jnp.asarray(x_T))
        return jnp.mean(ld3.per_sample_rmse(x, jnp.asarray(ref)))

    logits = jnp.asarray(ld3.logits_for_grid(time_grids.make_grid("time_uniform", NS, k)))
    # the network-time window (the smaller neighbouring gap) is held fixed in the gradient,
    # as in LD3, so the grid's gradient is checked with zero offsets (no shift to hold)
    zero, offsets = jnp.zeros(k), jnp.asarray([0.0, 0.3, -0.2])
    g_l, _ = jax.grad(loss, argnums=(0, 1))(logits, zero)
    _, g_o = jax.grad(loss, argnums=(0, 1))(logits, offsets)
    h = 1e-2
    for i in range(k):
        e = jnp.zeros(k).at[i].set(h)
        fd = (loss(logits + e, zero) - loss(logits - e, zero)) / (2 * h)
        assert abs(float(fd) - float(g_l[i])) < 0.03 * abs(float(fd)) + 1e-4, (i, fd, g_l[i])
    for i in (1, 2):
        e = jnp.zeros(k).at[i].set(h)
        fd = (loss(logits, offsets + e) - loss(logits, offsets - e)) / (2 * h)
        assert abs(float(fd) - float(g_o[i])) < 0.03 * abs(float(fd)) + 1e-4, (i, fd, g_o[i])
    assert float(g_o[0]) == 0.0                                  # step 0's time is fixed


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_ld3_beats_its_starting_grid_on_the_exact_solution(solver):
    k = 3
    train, valid = pairs(32, 3), pairs(16, 4)
    res = ld3.learn(model_for, NS, k, train, valid,
                    config=_small_config(solver=solver, epochs=8, lr=0.08), progress=False)
    assert res.valid_rmse < 0.6 * res.init_valid_rmse, (res.valid_rmse, res.init_valid_rmse)
    t, net = res.t, res.network_t
    assert t[0] == NS.T and abs(t[-1] - NS.eps) < 1e-7 and np.all(np.diff(t) < 0)
    gaps = -np.diff(t)
    room = np.minimum(gaps, np.concatenate([gaps[:1], gaps[:-1]]))
    assert net[0] == t[0] and np.all(np.abs(net - t[:-1]) <= 0.5 * room + 1e-7)
    # fresh seeds, exact solution: the learned grid's error really is lower
    x_T, want, cond = pairs(200, 5)
    err = lambda tt, nn: measure.rmse(teacher.solve_batches(
        model_for, cond, x_T, teacher.student_solver(NS, solver, tt, nn), batch=200), want)
    diff = measure.paired_difference(err(t, net), err(res.init_t, None))
    assert diff[2] < 0, diff


def test_ld3_refuses_other_settings_and_stops_on_nan(tmp_path):
    k = 2
    train, valid = pairs(32, 6), pairs(16, 7)
    cfg = _small_config(epochs=2, forcing=0.01)
    ld3.learn(model_for, NS, k, train, valid, config=cfg, checkpoint_dir=tmp_path / "a",
              progress=False)
    with pytest.raises(ValueError, match="different settings"):
        ld3.learn(model_for, NS, k, train, valid, config=dataclasses.replace(cfg, lr=0.1),
                  checkpoint_dir=tmp_path / "a", progress=False)

    nan_fn = lambda x, t: jnp.where(t[:, None] < 600, jnp.nan, 1.0) * FN(x, t)
    nan_model = lambda cond: nan_fn
    with pytest.raises(NonFiniteLossError, match="starting grid"):
        ld3.learn(nan_model, NS, k, train, valid, config=cfg, progress=False)
    with pytest.raises(ValueError, match="rate must be in"):
        ld3.learn(model_for, NS, k, train, valid, config=dataclasses.replace(cfg, rate=1.0))


def test_ld3_checkpoint_resume_is_exact(tmp_path):
    k = 2
    train, valid = pairs(32, 8), pairs(16, 9)
    cfg = _small_config(epochs=4, patience=10, forcing=0.01)
    whole = ld3.learn(model_for, NS, k, train, valid, config=cfg, progress=False)
    d = tmp_path / "run"
    import tuning.ld3 as mod
    calls = {"n": 0}
    orig = mod.RunCheckpoints.save

    def stop_after_two(self, step, state):
        orig(self, step, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
    mod.RunCheckpoints.save = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            ld3.learn(model_for, NS, k, train, valid, config=cfg, checkpoint_dir=d,
                      progress=False)
    finally:
        mod.RunCheckpoints.save = orig
    resumed = ld3.learn(model_for, NS, k, train, valid, config=cfg, checkpoint_dir=d,
                        progress=False)
    np.testing.assert_allclose(resumed.t, whole.t, rtol=1e-6)
    np.testing.assert_allclose(resumed.history["valid"], whole.history["valid"], rtol=1e-6)


# ------------------------------------------------------------------------- GITS
def test_shortest_path_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    m, k = 7, 3
    cost = rng.uniform(0.1, 1.0, (m + 1, m + 1))
    path = gits.shortest_path(cost, k)
    best = min(itertools.combinations(range(1, m), k - 1),
               key=lambda mid: sum(cost[a, b] for a, b in zip((0,) + mid, mid + (m,))))
    assert tuple(path) == (0,) + best + (m,)
    # a priced start: the path may begin at any node below m
    start = rng.uniform(0.0, 0.5, m + 1)
    start[m] = np.inf
    path = gits.shortest_path(cost, k, start)
    best = min(itertools.combinations(range(m), k),
               key=lambda p: start[p[0]] + sum(cost[a, b] for a, b in zip(p, p[1:] + (m,))))
    assert tuple(path) == best + (m,)
    with pytest.raises(ValueError, match="num_steps must be in"):
        gits.shortest_path(cost, 8)


def test_gits_grid_beats_uniform_on_the_exact_solution():
    k = 3
    x_T, _, cond = pairs(64, 10)
    res = gits.learn(model_for, NS, k, x_T, cond, fine=50, teacher_steps=200,
                     free_start=False)
    t = res["t"]
    assert t.shape == (k + 1,) and t[0] == NS.T and np.all(np.diff(t) < 0)
    free = gits.learn(model_for, NS, k, x_T, cond, fine=50, teacher_steps=200)["t"]
    assert free.shape == (k + 1,) and free[0] <= NS.T and np.all(np.diff(free) < 0)
    x_e, want, c_e = pairs(200, 11)
    err = lambda tt: measure.rmse(teacher.solve_batches(
        model_for, c_e, x_e, teacher.student_solver(NS, "ddim", tt), batch=200), want)
    diff = measure.paired_difference(err(t), err(time_grids.make_grid("time_uniform", NS, k)))
    assert diff[2] < 0, diff
    with pytest.raises(ValueError, match="teacher must take more steps"):
        gits.learn(model_for, NS, 8, x_T, cond, fine=4, teacher_steps=4)


# ------------------------------------------------------------------------- measurement
def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    v = rng.normal(0.3, 1.0, 4000)
    mean, lo, hi = measure.bootstrap_mean(v)
    assert lo < mean < hi and lo < 0.3 < hi and hi - lo < 0.1
    assert measure.paired_difference(v, v)[0] == 0.0
    with pytest.raises(ValueError, match="finite"):
        measure.bootstrap_mean([1.0, np.nan])
    np.testing.assert_allclose(measure.psnr(np.zeros((1, 4)), np.full((1, 4), 0.2)),
                               20 * np.log10(2 / 0.2))


def test_ld3_starts_from_a_given_grid_and_keeps_its_ends():
    k = 3
    train, valid = pairs(32, 8), pairs(16, 9)
    start = (0.8, 0.5, 0.2, float(NS.eps))          # a free start below T, as GITS may choose
    res = ld3.learn(model_for, NS, k, train, valid,
                    config=_small_config(init=start, epochs=2), progress=False)
    np.testing.assert_allclose(res.init_t, start)
    assert abs(res.t[0] - 0.8) < 1e-7 and abs(res.t[-1] - NS.eps) < 1e-7
    assert res.valid_rmse <= res.init_valid_rmse
    with pytest.raises(ValueError, match="2 steps, not num_steps=3"):
        ld3.learn(model_for, NS, k, train, valid, config=_small_config(init=(0.8, 0.4, 0.1)))
    with pytest.raises(ValueError, match="strictly decreasing"):
        ld3.learn(model_for, NS, k, train, valid, config=_small_config(init=(0.8, 0.9, 0.4, 0.1)))
