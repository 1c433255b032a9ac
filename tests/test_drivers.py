"""One contract for every driver x every solver it supports.

Each sampler value (Sequential, Picard, EncoderPropagation) runs through the same checks:
shape/dtype/finite, determinism, jit, no recompilation for new weights / x_T / key or an
equal solver rebuilt, key == explicit-noise equivalence, the stochastic-solver guard, and
gradients where the driver is differentiable (Sequential: lax.scan; Picard's while_loop and
encoder propagation's group loops have data-dependent trip counts, so reverse-mode is not
defined there). Then the cross-driver identities: Picard(parallel=1) == Sequential,
EncoderPropagation(every step a key step) == Sequential, and one key -> the same sample
from every driver (tight tolerance, stochastic solver).
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import solvers
from jaxdiff.sampling import EncoderPropagation, Picard, Sequential, prelude, run
from tiny import TRACES, ToyModel

# the driver modules (jaxdiff.sampling's names of the same spelling are the functions)
sequential, picard, propagation = (importlib.import_module(f"jaxdiff.sampling.{m}") for m in
                                   ("sequential", "picard", "encoder_propagation"))

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          _class_name="PNDMScheduler", skip_prk_steps=True)
ALL = ["ddpm", "ddim", "pndm", "euler", "euler_a", "heun", "lms", "dpm++", "unipc",
       "sde-dpm++", "dpm_single", "sde-dpm_single", "kdpm2", "kdpm2_a", "deis", "deis-1"]
# Picard: DPM-Solver++ singlestep through the multistep protocol (all orders, ODE), the SDE
# singlestep and DEIS at first order only; KDPM2 (two stages per step) has no Picard split
PICARD = ["ddpm", "ddim", "euler", "euler_a", "dpm++", "sde-dpm++", "dpm_single",
          "sde-dpm_single-1", "deis-1"]
OPTS = {"ddim": dict(eta=0.5), "dpm++": dict(solver_order=3),
        "sde-dpm++": dict(algorithm_type="sde-dpmsolver++"), "dpm_single": dict(solver_order=3),
        "sde-dpm_single": dict(algorithm_type="sde-dpmsolver++"),
        "sde-dpm_single-1": dict(algorithm_type="sde-dpmsolver++", solver_order=1),
        "deis": dict(solver_order=3), "deis-1": dict(solver_order=1)}
BASE = {"sde-dpm++": "dpm++", "sde-dpm_single": "dpm_single", "sde-dpm_single-1": "dpm_single",
        "deis-1": "deis"}
STEPS = 6

# the driver, the solvers it supports and its jitted program (for the compile cache)
DRIVERS = {
    "sequential": (Sequential(), ALL, sequential._run),
    "picard": (Picard(parallel=3, tolerance=1e-3), PICARD, picard._run),
    "parasolver": (Picard(parallel=3, tolerance=1e-3, method="parasolver"), PICARD,
                   picard._run),
    "taa": (Picard(parallel=3, tolerance=1e-3, method="taa"), PICARD, picard._run),
    "propagation": (EncoderPropagation(key_steps=[0, 2, 3], noise_injection=0.01), ALL,
                    propagation._run),
}
CASES = [(d, s) for d, (_, names, _) in DRIVERS.items() for s in names]
# Checks of the driver rather than of the solver (each compiles one more program per case):
# jit around the driver, on one stochastic solver; a deterministic solver without a key, on
# one deterministic solver. Both solvers are in every driver's list.
JIT_AROUND, NO_KEY = "euler_a", "euler"


def make_solver(name, steps=STEPS):
    return solvers.make(BASE.get(name, name), SD, steps, **OPTS.get(name, {}))


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(0), (2, 4, 4, 3))


@pytest.mark.parametrize("driver,name", CASES)
def test_driver_contract(driver, name, x_T):
    sampler, _, program = DRIVERS[driver]
    solver = make_solver(name)
    assert solver.num_steps == len(solver.timesteps)
    model = ToyModel(jnp.float32(1.0))
    k1, k2 = jax.random.key(1), jax.random.key(2)

    out, stats = run(sampler, model, solver, x_T, key=k1)
    assert out.shape == x_T.shape and out.dtype == x_T.dtype
    assert np.isfinite(np.asarray(out)).all()
    n = solver.num_steps                # PNDM: one more model evaluation than steps
    assert stats.num_steps == n
    again, _ = run(sampler, model, solver, x_T, key=k1)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))

    traces, cache = sum(TRACES.values()), program._cache_size()
    other, _ = run(sampler, ToyModel(jnp.float32(0.9)), solver, x_T * 0.5, key=k2)
    rebuilt = solver.__class__(**{f.name: getattr(solver, f.name)
                                  for f in dataclasses.fields(solver)})
    run(sampler, model, rebuilt, x_T, key=k2)     # an equal solver rebuilt: same program
    assert sum(TRACES.values()) == traces and program._cache_size() == cache, "recompiled"

    if solver.stochastic:
        with pytest.raises(ValueError, match="stochastic"):
            run(sampler, model, solver, x_T)
        # key == the explicit noise the one rule draws from it
        noise = prelude.all_noise("key", prelude.step_keys(k1, n), n, x_T.shape, x_T.dtype)
        by_noise, _ = run(sampler, model, solver, x_T, noise=noise)
        np.testing.assert_allclose(np.asarray(by_noise), np.asarray(out), rtol=2e-6, atol=1e-6)
        other_key, _ = run(sampler, ToyModel(jnp.float32(0.9)), solver, x_T * 0.5, key=k1)
        assert not np.allclose(np.asarray(other), np.asarray(other_key))
    elif name == NO_KEY:
        plain, _ = run(sampler, model, solver, x_T)
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(out))

    if name == JIT_AROUND:    # jit around the driver: the same result
        jitted = jax.jit(lambda x, k: run(sampler, model, solver, x, key=k)[0])
        np.testing.assert_allclose(np.asarray(jitted(x_T, k1)), np.asarray(out), rtol=1e-5,
                                   atol=1e-5)

    if driver == "sequential":
        def loss(x, w):
            return jnp.sum(run(sampler, ToyModel(w), solver, x, key=k1)[0] ** 2)

        gx, gw = jax.grad(loss, argnums=(0, 1))(x_T[:1], jnp.float32(1.0))
        assert np.isfinite(np.asarray(gx)).all() and np.isfinite(float(gw))
        assert float(jnp.abs(gx).max()) > 0
        eps = 1e-3   # the weight's gradient against a central difference
        fd = (loss(x_T[:1], jnp.float32(1 + eps)) - loss(x_T[:1], jnp.float32(1 - eps))) / (2 * eps)
        np.testing.assert_allclose(float(gw), float(fd), rtol=2e-2, atol=1e-3)


# (test_paradigms checks the same identity for its solvers under every Picard method)
@pytest.mark.parametrize("name", ["dpm_single", "sde-dpm_single-1", "deis-1"])
def test_picard_window_of_one_is_sequential(name, x_T):
    solver, model, key = make_solver(name), ToyModel(jnp.float32(1.0)), jax.random.key(4)
    ref, _ = run(Sequential(), model, solver, x_T, key=key)
    got, st = run(Picard(parallel=1, tolerance=0.1), model, solver, x_T, key=key)
    assert st.iterations == STEPS
    # |x| reaches 50 here: a few float32 ulps of two programs' fusion orders
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_every_step_a_key_step_is_sequential(name, x_T):
    solver, model, key = make_solver(name), ToyModel(jnp.float32(1.0)), jax.random.key(5)
    ref, _ = run(Sequential(), model, solver, x_T, key=key)
    for chunk in (None, 1):
        got, st = run(EncoderPropagation(key_steps="all", noise_injection=0, decode_chunk=chunk),
                      model, solver, x_T, key=key)
        assert st.encoder_calls == solver.num_steps
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "sde-dpm++", "sde-dpm_single-1"])
def test_one_key_one_sample_from_every_driver(name, x_T):
    """Same key, stochastic solver: Picard at a tight tolerance and encoder propagation with
    every step a key step converge to the sequential sample (before the shared prelude,
    jaxdiff.paradigms drew its noise by another rule and converged elsewhere)."""
    solver, model, key = make_solver(name, 10), ToyModel(jnp.float32(1.0)), jax.random.key(6)
    ref, _ = run(Sequential(), model, solver, x_T, key=key)
    par, _ = run(Picard(parallel=4, tolerance=1e-4), model, solver, x_T, key=key)
    prop, _ = run(EncoderPropagation(key_steps="all", noise_injection=0), model, solver, x_T,
                  key=key)
    np.testing.assert_allclose(np.asarray(par), np.asarray(ref), atol=1e-4)
    np.testing.assert_allclose(np.asarray(prop), np.asarray(ref), atol=1e-5)
    other, _ = run(Sequential(), model, solver, x_T, key=jax.random.key(7))
    assert np.abs(np.asarray(other) - np.asarray(ref)).max() > 1e-2


@pytest.mark.parametrize("name", ["kdpm2", "kdpm2_a", "deis", "sde-dpm_single"])
def test_no_picard_split_is_refused(name, x_T):
    with pytest.raises(ValueError, match="Picard split"):
        run(Picard(parallel=3), ToyModel(jnp.float32(1)), make_solver(name), x_T,
            key=jax.random.key(0))


def test_sampler_values_and_shorthands(x_T):
    from jaxdiff.sampling import as_sampler
    assert as_sampler("paradigms", parallel=4) == Picard(parallel=4)
    assert as_sampler("faster") == EncoderPropagation()
    assert as_sampler(Sequential()) == Sequential()
    assert hash(Picard(parallel=4)) == hash(Picard(parallel=4))
    with pytest.raises(ValueError, match="window"):
        as_sampler("paradigms", window=3)
    with pytest.raises(ValueError, match="sampler must be"):
        as_sampler("nope")
    with pytest.raises(ValueError, match="Picard method"):
        run(Picard(method="nope"), ToyModel(jnp.float32(1)), make_solver("euler"), x_T)
    with pytest.raises(ValueError, match="can run the UNet.s encoder and decoder"):
        run(EncoderPropagation(), lambda x, t: x, make_solver("euler"), x_T)


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_one_prelude_one_message(driver, x_T):
    """Every driver rejects the same bad inputs with the same message."""
    sampler = DRIVERS[driver][0]
    model, solver = ToyModel(jnp.float32(1)), make_solver("ddpm")
    for bad, match in [(dict(x=x_T.astype(jnp.int32)), "floating-point"),
                       (dict(key=jax.random.key(0), noise=jnp.zeros((STEPS,) + x_T.shape)),
                        "either key or noise"),
                       (dict(noise=jnp.zeros((STEPS + 1,) + x_T.shape)), "noise must have shape"),
                       (dict(), "stochastic: pass key= or noise=")]:
        x = bad.pop("x", x_T)
        with pytest.raises(ValueError, match=match):
            run(sampler, model, solver, x, **bad)
    with pytest.raises(ValueError, match="jaxdiff solver"):
        run(sampler, model, object(), x_T)


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_one_progress_protocol(driver, x_T):
    calls = []
    sampler = DRIVERS[driver][0]
    run(sampler, ToyModel(jnp.float32(1)), make_solver("ddim"), x_T, key=jax.random.key(0),
        progress=lambda done, total: calls.append((int(done), int(total))))
    jax.effects_barrier()
    done = sorted(calls)
    assert done and done[-1] == (STEPS, STEPS) and all(t == STEPS for _, t in done)
    assert all(0 < d <= STEPS for d, _ in done)
    with pytest.raises(ValueError, match="progress"):
        run(sampler, ToyModel(jnp.float32(1)), make_solver("euler"), x_T, progress="yes")
