"""Conversion: folders (single, sharded, fp16 variant, .bin), strictness, orbax, CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conversion
from conversion.convert import ConversionError
from jaxdiff.models import UNetConfig
from tiny import (CLIP_CONFIGS, UNET_CONFIGS, rel_l2, torch_clip, torch_unet,
                  torch_unet_forward, torch_vae, unet_inputs)


@pytest.fixture(scope="module")
def unet_pair():
    tm = torch_unet(UNET_CONFIGS["sd1"])
    return tm, conversion.convert(tm)


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


@pytest.mark.parametrize("how", ["single", "sharded", "bin"])
def test_load_unet_folder(unet_pair, tmp_path, how):
    tm, jm = unet_pair
    kw = {"single": dict(safe_serialization=True),
          "sharded": dict(safe_serialization=True, max_shard_size="200KB"),
          "bin": dict(safe_serialization=False)}[how]
    tm.save_pretrained(tmp_path, **kw)
    if how == "sharded":
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = conversion.load_unet(tmp_path)
    _assert_same_params(loaded, jm)


def test_fp16_variant(unet_pair, tmp_path):
    import torch

    tm, _ = unet_pair
    half = torch_unet(UNET_CONFIGS["sd1"]).half()
    half.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no weights"):
        conversion.load_unet(tmp_path)  # only the variant is present
    jm16 = conversion.load_unet(tmp_path, jnp.float16, variant="fp16")
    jm32 = conversion.load_unet(tmp_path, jnp.float32, variant="fp16")
    assert jax.tree.leaves(nnx.state(jm16))[0].dtype == jnp.float16
    ref = half.float()
    x, t, ctx, kw = unet_inputs(UNET_CONFIGS["sd1"], np.random.default_rng(0))
    want = torch_unet_forward(ref, x, t, ctx, kw)
    assert rel_l2(jm32(x, t, ctx), want) <= 1e-4  # fp16 weights, float32 compute
    assert rel_l2(jm16(x, t, ctx), want) <= 2e-2  # float16 compute


def test_safetensors_read_without_torch(tmp_path):
    """import jaxdiff / conversion and reading safetensors work with torch unimportable."""
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.ones((4,), np.float16)}
    conversion.write_safetensors(tensors, tmp_path / "x.safetensors")
    code = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import jaxdiff, conversion
t = conversion.read_safetensors({str(tmp_path / 'x.safetensors')!r})
assert t['a'].tolist() == [[0, 1, 2], [3, 4, 5]] and t['b'].dtype.name == 'float16'
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_safetensors_interop_with_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32),
               "h": rng.standard_normal((7,)).astype(np.float16),
               "i": np.arange(4, dtype=np.int64)}
    save_file(tensors, tmp_path / "ref.safetensors")
    ours = conversion.read_safetensors(tmp_path / "ref.safetensors")
    conversion.write_safetensors(tensors, tmp_path / "ours.safetensors")
    theirs = load_file(tmp_path / "ours.safetensors")
    for k, v in tensors.items():
        assert np.array_equal(ours[k], v) and ours[k].dtype == v.dtype
        assert np.array_equal(theirs[k], v) and theirs[k].dtype == v.dtype


def _sd(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_strict_missing_extra_misshaped(unet_pair):
    tm, _ = unet_pair
    sd = _sd(tm)
    cfg = dict(tm.config)
    bad = dict(sd)
    del bad["conv_in.weight"]
    del bad["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    bad["down_blocks.0.extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as e:
        conversion.convert_state_dict("UNet2DConditionModel", cfg, bad)
    msg = str(e.value)
    assert "2 missing keys" in msg and "conv_in.weight" in msg
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in msg
    assert "1 unexpected keys" in msg and "down_blocks.0.extra.weight" in msg
    assert "1 mis-shaped keys" in msg and "conv_out.bias: expected (4,), got (7,)" in msg


def test_unsupported_config_values():
    base = dict(UNET_CONFIGS["sd1"])
    with pytest.raises(ValueError, match="unknown config field.*'brand_new_option'"):
        UNetConfig.from_dict({**base, "brand_new_option": 3})
    with pytest.raises(ValueError, match="attention_type='gated'"):
        UNetConfig.from_dict({**base, "attention_type": "gated"})
    with pytest.raises(ValueError, match="down_block_types entry 'SimpleCrossAttnDownBlock2D'"):
        UNetConfig.from_dict({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D",
                                                           "DownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        from jaxdiff.models import CLIPTextConfig
        CLIPTextConfig.from_dict({**CLIP_CONFIGS["gelu"], "hidden_act": "relu"})
    # bookkeeping keys of real config files are accepted
    UNetConfig.from_dict({**base, "_class_name": "UNet2DConditionModel",
                          "_diffusers_version": "0.6.0"})


def test_bad_inputs_named(unet_pair):
    _, jm = unet_pair
    with pytest.raises(ValueError, match=r"NHWC latents \[B, H, W, 4\]"):
        jm(jnp.zeros((1, 4, 16, 16)), 1.0, jnp.zeros((1, 7, 24)))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        jm(jnp.zeros((1, 16, 16, 4)), 1.0, jnp.zeros((1, 7, 23)))


def test_vae_legacy_attention_names():
    """Old diffusers VAE files call the mid-block attention query/key/value/proj_attn."""
    tm = torch_vae()
    sd = _sd(tm)
    old = {}
    for k, v in sd.items():
        for new, legacy in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                            (".to_out.0.", ".proj_attn.")):
            if "attentions" in k and new in k:
                k = k.replace(new, legacy)
                if v.ndim == 2 and legacy != ".proj_attn.":
                    v = v[:, :, None, None]  # stored as 1x1 convs
        old[k] = v
    assert any(".query." in k for k in old)
    a = conversion.convert_state_dict("AutoencoderKL", dict(tm.config), old)
    b = conversion.convert(tm)
    _assert_same_params(a, b)


def test_clip_prefix_normalised():
    tm = torch_clip(CLIP_CONFIGS["quick_gelu"])
    sd = _sd(tm)
    assert not any(k.startswith("text_model.") for k in sd)  # transformers 5 layout
    hub = {"text_model." + k: v for k, v in sd.items()}
    hub["text_model.embeddings.position_ids"] = np.arange(16)[None]  # old persisted buffer
    a = conversion.convert_state_dict("CLIPTextModel", tm.config.to_dict(), hub)
    _assert_same_params(a, conversion.convert(tm))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_checkpoint_round_trip_bit_exact(unet_pair, tmp_path, dtype, fmt):
    tm, _ = unet_pair
    jm = conversion.convert(tm, dtype=dtype)
    conversion.save_model(jm, tmp_path / "ckpt", format=fmt)
    back = conversion.load_model(tmp_path / "ckpt")
    assert back.config == jm.config
    _assert_same_params(back, jm)
    with pytest.raises(FileExistsError):
        conversion.save_model(jm, tmp_path / "ckpt")


def test_checkpoint_that_does_not_fit_is_named(unet_pair, tmp_path):
    import json

    from conversion.safetensors_io import read_safetensors, write_safetensors

    tm, _ = unet_pair
    jm = conversion.convert(tm)
    path = conversion.save_model(jm, tmp_path / "ckpt")
    arrays = {k: np.array(v) for k, v in read_safetensors(path / "state.safetensors").items()}
    key = sorted(arrays)[0]
    arrays["extra/kernel"] = np.zeros(3, np.float32)
    arrays[key] = np.zeros((1,) + arrays[key].shape, arrays[key].dtype)
    dropped = sorted(arrays)[-1]
    del arrays[dropped]
    write_safetensors(arrays, path / "state.safetensors")
    with pytest.raises(ValueError, match=r"missing \[" + f"'{dropped}'") as err:
        conversion.load_model(path)
    assert "extra/kernel" in str(err.value) and key in str(err.value)
    meta = json.loads((path / "jaxdiff.json").read_text())
    (path / "jaxdiff.json").write_text(json.dumps({**meta, "format": "pickle"}))
    with pytest.raises(ValueError, match="unknown checkpoint format 'pickle'"):
        conversion.load_model(path)
    with pytest.raises(ValueError, match="format must be one of"):
        conversion.save_model(jm, tmp_path / "other", format="npz")


def test_cli_convert_component_and_fast_reload(unet_pair, tmp_path):
    tm, jm = unet_pair
    tm.save_pretrained(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "convert", str(tmp_path / "src"),
                        str(tmp_path / "dst")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert conversion.is_checkpoint(tmp_path / "dst")
    _assert_same_params(conversion.load_unet(tmp_path / "dst"), jm)
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "convert", str(tmp_path / "nope"),
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a folder" in r.stderr
