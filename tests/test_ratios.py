"""TimeTuner ratios in jaxdiff's solvers: ``Solver.with_ratios`` / ``ratios=`` everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
import jaxdiff.zoo.digits
from jaxdiff import solvers
from jaxdiff.zoo.digits.model import SCHEDULE

STEPS = 10
TUNER_GRID = dict(SCHEDULE, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                  clip_sample=False)


def model_fn(x, t):
    """Depends on t non-trivially, so retiming changes the result."""
    t = jnp.asarray(t, jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 * x * jnp.cos(t / 150.0) + 0.1 * jnp.sin(t / 70.0)


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))


def ratios(n, seed=0):
    return 1.0 + 0.05 * np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "ddpm"])
def test_ratios_one_is_the_same_solver(name, x_T):
    s = solvers.make(name, SCHEDULE, STEPS)
    r = s.with_ratios(np.ones(STEPS))
    np.testing.assert_array_equal(np.asarray(r.timesteps), np.asarray(s.timesteps))
    kw = {"key": jax.random.PRNGKey(1)} if s.stochastic else {}
    np.testing.assert_array_equal(np.asarray(jaxdiff.sample(model_fn, r, x_T, **kw)),
                                  np.asarray(jaxdiff.sample(model_fn, s, x_T, **kw)))


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_model_time_is_tuned_and_coefficients_are_not(name):
    s = solvers.make(name, TUNER_GRID, STEPS)
    r = ratios(STEPS)
    t = s.with_ratios(r)
    # TimeTuner's discrete time of timestep t is (t + 1) / T: the network gets r (t + 1) - 1
    np.testing.assert_allclose(np.asarray(t.timesteps),
                               r * (np.asarray(s.timesteps, np.float64) + 1) - 1, rtol=1e-6)
    leaves_s = jax.tree.leaves(s)
    leaves_t = jax.tree.leaves(t)
    changed = [i for i, (a, b) in enumerate(zip(leaves_s, leaves_t))
               if a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b))]
    assert len(changed) == 1      # only the timesteps table


def test_equals_timetuner_ddim(x_T):
    """Two routes to tuned DDIM agree: jaxdiff.sample with the diffusers-built DDIM's
    ``with_ratios``, and TimeTuner.ddim_sample on its own grid (which is jaxdiff.sample with
    jaxdiff's DDIM built on that grid, the network asked at ratio_i * t_i)."""
    import tuning
    s = solvers.make("ddim", TUNER_GRID, STEPS)
    r = ratios(STEPS, 1)
    a = jaxdiff.sample(model_fn, s.with_ratios(r), x_T)
    ns = tuning.NoiseScheduleVP("discrete", alphas_cumprod=np.asarray(
        jaxdiff.zoo.digits.model.alphas_cumprod(SCHEDULE)))
    b = tuning.TimeTuner(tuning.model_wrapper(model_fn, ns), ns).ddim_sample(
        x_T, STEPS, t_ratios=r)
    # float32 rounding of two table computations; |x| reaches ~100 with this model_fn
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-5)
    assert float(jnp.max(jnp.abs(a - jaxdiff.sample(model_fn, s, x_T)))) > 1e-3


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_paradigms_and_make_accept_ratios(name, x_T):
    r = ratios(STEPS, 2)
    s = solvers.make(name, SCHEDULE, STEPS, ratios=r)
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.asarray(
        solvers.make(name, SCHEDULE, STEPS).with_ratios(r).timesteps))
    ref = jaxdiff.sample(model_fn, s, x_T)
    x, _ = jaxdiff.paradigms(model_fn, s, x_T, parallel=1, tolerance=0.1)
    assert float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref)) <= 1e-6


def test_ratios_file_round_trip_and_grid_check(tmp_path):
    from tuning import save_ratios
    s = solvers.make("ddim", TUNER_GRID, STEPS)
    r = ratios(STEPS, 3)
    path = save_ratios(tmp_path / "r.json", r, {"timesteps": np.asarray(s.timesteps)})
    np.testing.assert_array_equal(np.asarray(s.with_ratios(path).timesteps),
                                  np.asarray(s.with_ratios(r).timesteps))
    other = solvers.make("ddim", SCHEDULE, STEPS)        # trailing spacing: another grid
    with pytest.raises(ValueError, match="tuned for timesteps"):
        other.with_ratios(path)
    with pytest.raises(ValueError, match="tuned for timesteps"):
        solvers.make("ddim", TUNER_GRID, STEPS + 1).with_ratios(
            np.ones(STEPS + 1), expect_timesteps=s.timesteps)


@pytest.mark.parametrize("bad, match", [(np.ones(STEPS - 1), "one entry per model evaluation"),
                                        (np.ones((STEPS, 1)), "1-D"),
                                        (np.r_[np.ones(STEPS - 1), 0.0], "positive"),
                                        (np.r_[np.ones(STEPS - 1), np.nan], "finite")])
def test_bad_ratios_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        solvers.make("ddim", SCHEDULE, STEPS).with_ratios(bad)


def test_digits_pipeline_samples_with_ratios():
    pipe = jaxdiff.zoo.digits.load()
    r = ratios(STEPS, 4)
    kw = dict(labels=[0, 7], num_inference_steps=STEPS, seed=5)
    plain = pipe(**kw)
    np.testing.assert_array_equal(pipe(ratios=np.ones(STEPS), **kw), plain)
    tuned = pipe(ratios=r, **kw)
    tuned_p = pipe(ratios=r, sampler=jaxdiff.sampling.Picard(parallel=1), **kw)
    assert np.abs(tuned - plain).max() > 1e-4
    np.testing.assert_allclose(tuned_p, tuned, atol=1e-5)
    with pytest.raises(ValueError, match="one entry per model evaluation"):
        pipe(ratios=np.ones(STEPS + 2), **kw)
