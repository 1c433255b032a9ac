"""The embedded digits model: training code (fast smoke + resume), committed model quality,
input validation and no recompilation."""

import jax
import numpy as np
import pytest

from jaxdiff.sampling import Picard, sequential
from jaxdiff.zoo import digits
from jaxdiff.zoo.digits import data, metrics, train


@pytest.fixture(scope="module")
def pipe():
    return digits.load()


def test_data_split_is_fixed_and_scaled():
    tr, te = data.load("train"), data.load("test")
    assert tr.images.shape == (1437, 16, 16, 1) and te.images.shape == (360, 16, 16, 1)
    assert tr.images.min() >= -1.0 and tr.images.max() <= 1.0
    assert np.array_equal(np.bincount(te.labels, minlength=10) >= 35, np.ones(10, bool))
    np.testing.assert_array_equal(data.load("test").labels, te.labels)


def test_training_steps_finite_and_resume_is_exact(tmp_path):
    kw = dict(batch_size=8, ckpt_every=2, progress=False, export=False)
    straight = train.train(tmp_path / "a", 3, seed=1, **kw)
    assert np.isfinite(straight["final_loss_mean_last_200"])
    first = train.train(tmp_path / "b", 3, seed=1, stop_after=2, **kw)
    assert first["steps"] == 2 and first["resumed_from"] == 0
    assert (tmp_path / "b" / "checkpoints").exists()
    resumed = train.train(tmp_path / "b", 3, seed=1, **kw)
    assert resumed["resumed_from"] == 2 and int(resumed["state"].step) == 3
    for a, b in zip(jax.tree.leaves(straight["state"].ema), jax.tree.leaves(resumed["state"].ema)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_committed_model_draws_recognisable_digits(pipe):
    labels = [d for d in range(10) for _ in range(10)]
    images = pipe(labels=labels, num_inference_steps=50, solver="ddim", seed=0)
    assert images.shape == (100, 16, 16, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    acc = metrics.accuracy(images, labels)
    assert acc >= 0.9, f"DDIM-50 class-conditional accuracy {acc:.2f} < 0.9"


def test_no_recompile_when_labels_seed_guidance_change(pipe):
    pipe(labels=[1, 2, 3], num_inference_steps=4, solver="ddim", guidance_scale=2.0, seed=0)
    before = sequential._run._cache_size()
    out = pipe(labels=[7, 0, 9], num_inference_steps=4, solver="ddim", guidance_scale=3.0,
               seed=5)
    assert sequential._run._cache_size() == before
    assert out.shape == (3, 16, 16, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[10]), "0-9"), (dict(labels=[-1]), "0-9"), (dict(labels=[1.5]), "0-9"),
    (dict(labels=["3"]), "0-9"), (dict(labels=[True]), "0-9"), (dict(labels=[]), "non-empty"),
    (dict(labels=[1], num_inference_steps=0), "positive"),
    (dict(labels=[1], num_inference_steps=-3), "positive"),
    (dict(labels=[1], solver="nope"), "unknown solver"),
])
def test_bad_inputs_raise(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_classifier_and_fd_floor():
    te = data.load("test")
    assert metrics.accuracy(data.to_unit(te.images), te.labels) >= 0.97
    floor = metrics.fd_floor(100)
    assert 0 <= metrics.fd_floor() < floor


def test_paradigms_sampler_matches_sequential_with_guidance(pipe):
    """ParaDiGMS from the digits pipeline (CFG batched in the window, batch 3): at a tight
    tolerance the digits equal the sequential ones; at the default it saves iterations."""
    kw = dict(labels=[3, 8, 1], num_inference_steps=30, solver="ddpm", guidance_scale=2.0,
              seed=4)
    ref, seq_stats = pipe.generate(**kw)
    assert seq_stats.model_evaluations == 30
    tight, stats = pipe.generate(sampler=Picard(parallel=10, tolerance=1e-3), **kw)
    assert stats.iterations <= 30
    np.testing.assert_allclose(tight, ref, atol=2e-3)
    _, stats = pipe.generate(sampler="paradigms", sampler_options={"parallel": 10}, **kw)
    assert stats.iterations < 30
    with pytest.raises(ValueError, match="sampler"):
        pipe(sampler="pic4rd", **kw)
    with pytest.raises(ValueError, match="window"):
        pipe(sampler="paradigms", sampler_options={"window": 3}, **kw)


def test_cli_sample_digits(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "d.png"
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "sample", "--model", "digits",
                        "--labels", "3,1,4", "--steps", "5", "--solver", "dpm++", "--out",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "classifier accuracy" in r.stdout
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "sample", "--model", "digits",
                        "--labels", "3,12"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "0-9" in r.stderr
