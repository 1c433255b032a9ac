"""Step callbacks from the jitted loops: which steps report, the latents they carry, every
driver, and no recompilation when the callback (or its state) changes."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import solvers
from jaxdiff.sampling import EncoderPropagation, Picard, run, sample
from jaxdiff.sampling import picard as picard_mod
from jaxdiff.sampling import sequential as seq_mod
from tiny import ToyModel

ep_mod = importlib.import_module("jaxdiff.sampling.encoder_propagation")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _setup(steps=10, name="ddim"):
    solver = solvers.make(name, SD, steps)
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    return ToyModel(jnp.float32(1.0)), solver, x_T


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, step, timestep, latents):
        self.calls.append((step, timestep, latents))


def test_sequential_reports_every_kth_step_with_its_latents():
    model_fn, solver, x_T = _setup()
    x0, traj = sample(model_fn, solver, x_T, return_trajectory=True)
    rec = Recorder()
    got = sample(model_fn, solver, x_T, callback=rec, callback_steps=3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x0))
    assert [c[0] for c in rec.calls] == [0, 3, 6, 9]       # multiples of 3, and the last
    for step, t, lat in rec.calls:
        assert t == pytest.approx(float(solver.timesteps[step]))
        np.testing.assert_allclose(lat, np.asarray(traj[step]), rtol=1e-6, atol=1e-6)
    rec = Recorder()
    sample(model_fn, solver, x_T, callback=rec, callback_steps=4)
    assert [c[0] for c in rec.calls] == [0, 4, 8, 9]


def test_a_new_callback_does_not_recompile():
    model_fn, solver, x_T = _setup(8)
    sample(model_fn, solver, x_T, callback=Recorder(), callback_steps=2)
    before = seq_mod._run._cache_size()
    seen = []
    for j in range(3):       # new functions, with state of their own
        sample(model_fn, solver, x_T, callback=lambda s, t, x, j=j: seen.append((j, s)),
               callback_steps=2)
    assert seq_mod._run._cache_size() == before
    assert seen == [(j, s) for j in range(3) for s in (0, 2, 4, 6, 7)]


def test_picard_and_propagation_report_accepted_steps():
    model_fn, solver, x_T = _setup(12, "euler")
    seq = np.asarray(sample(model_fn, solver, x_T))
    rec = Recorder()
    x0, stats = run(Picard(parallel=4, tolerance=1e-6), model_fn, solver, x_T,
                    callback=rec, callback_steps=5)
    np.testing.assert_allclose(np.asarray(x0), seq, atol=1e-5)
    steps = [c[0] for c in rec.calls]
    assert steps[-1] == 11 and steps == sorted(steps) and len(steps) <= stats.iterations
    assert np.allclose(rec.calls[-1][2], np.asarray(x0))
    # every multiple of 5 was passed by some report: the reported step is at or after it
    assert all(any(s >= m for s in steps) for m in (0, 5, 10))
    before = picard_mod._run._cache_size()
    run(Picard(parallel=4, tolerance=1e-6), model_fn, solver, x_T, callback=Recorder(),
        callback_steps=5)
    assert picard_mod._run._cache_size() == before
    rec = Recorder()
    ep = EncoderPropagation(key_steps=[0, 1, 2, 4, 7], noise_injection=0.0)
    x0, _ = run(ep, model_fn, solver, x_T, callback=rec, callback_steps=3)
    # groups end at steps 0, 1, 3, 6, 11: reported where a group holds a multiple of 3
    assert [c[0] for c in rec.calls] == [0, 3, 6, 11]
    assert np.allclose(rec.calls[-1][2], np.asarray(x0))
    before = ep_mod._run._cache_size()
    run(ep, model_fn, solver, x_T, callback=Recorder(), callback_steps=3)
    assert ep_mod._run._cache_size() == before


def test_callbacks_refused_when_bad_or_traced():
    model_fn, solver, x_T = _setup(4)
    with pytest.raises(ValueError, match="callback must be a callable"):
        sample(model_fn, solver, x_T, callback="preview")
    with pytest.raises(ValueError, match="callback_steps must be a positive integer"):
        sample(model_fn, solver, x_T, callback=Recorder(), callback_steps=0)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda x: sample(model_fn, solver, x, callback=Recorder()))(x_T)


def test_pipeline_callback_gives_previews(tmp_path):
    import conversion
    from tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path)
    pipe = conversion.load_pipeline(tmp_path)
    rec = Recorder()
    kw = dict(prompt=["the cat"], num_inference_steps=6, solver="dpm++", output_type="latent",
              seed=3)
    final = np.asarray(pipe(**kw, callback=rec, callback_steps=2))
    assert [c[0] for c in rec.calls] == [0, 2, 4, 5]
    np.testing.assert_allclose(rec.calls[-1][2], final, rtol=1e-6, atol=1e-6)
    previews = pipe.decode_latents(np.stack([c[2][0] for c in rec.calls]))
    assert previews.shape == (4, 32, 32, 3)
    # a later step's preview is closer to the final image than an earlier one
    image = np.asarray(pipe.decode_latents(final))[0]
    err = [np.abs(np.asarray(p) - image).mean() for p in previews]
    assert err[-1] < 1e-5 and err[0] > err[2]
