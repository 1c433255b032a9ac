"""A whole diffusers StableDiffusionPipeline folder -> jaxdiff, directly and via `jaxdiff convert`."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import conversion
from tiny import nchw, nhwc, rel_l2, write_tiny_pipeline


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_tiny")
    pipe = write_tiny_pipeline(folder)
    return folder, pipe


def _check_components(jp, pipe):
    rng = np.random.default_rng(0)
    ids = pipe.tokenizer(["the cat", "a dog"], padding="max_length", max_length=16,
                         return_tensors="np").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    ctx = jp.text_encoder(ids).last_hidden_state
    assert rel_l2(ctx, ref) <= 1e-4
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([1.0, 500.0], np.float32)
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(nchw(x)), torch.from_numpy(t),
                         torch.from_numpy(ref)).sample.numpy()
        img = pipe.vae.decode(torch.from_numpy(nchw(x))).sample.numpy()
    assert rel_l2(jp.unet(x, t, jnp.asarray(ref)), nhwc(want)) <= 1e-4
    assert rel_l2(jp.vae.decode(x), nhwc(img)) <= 1e-4
    assert jp.scheduler["_class_name"] == "PNDMScheduler"
    assert jp.vae_scale_factor == 2
    assert jp.tokenizer("the cat").input_ids == pipe.tokenizer("the cat").input_ids


def test_load_pipeline(pipe_folder):
    folder, pipe = pipe_folder
    _check_components(conversion.load_pipeline(folder), pipe)


def test_convert_pipeline_then_load_without_reconversion(pipe_folder, tmp_path, monkeypatch):
    folder, pipe = pipe_folder
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "convert", str(folder),
                        str(tmp_path / "jx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for part in ("unet", "vae", "text_encoder"):
        assert conversion.is_checkpoint(tmp_path / "jx" / part)
        # the checkpoint's own state.safetensors only: no diffusers weights copied across
        assert [p.name for p in (tmp_path / "jx" / part).glob("*.safetensors")] == [
            "state.safetensors"]

    # the checkpoint fast path must not touch the converter
    # (`conversion.convert` is the contract function; the module is in sys.modules)
    cv = sys.modules["conversion.convert"]

    def boom(*a, **k):
        raise AssertionError("re-converted a checkpointed model")

    monkeypatch.setattr(cv, "convert_state_dict", boom)
    monkeypatch.setattr(sys.modules["conversion.loaders"], "convert_state_dict", boom)
    _check_components(conversion.load_pipeline(tmp_path / "jx"), pipe)


def test_missing_component_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="no loadable 'unet' component"):
        conversion.load_pipeline(tmp_path)
