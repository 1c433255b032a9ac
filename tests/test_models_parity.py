"""Numerical parity of jaxdiff's Flax models with diffusers / transformers PyTorch (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

import conversion
from tiny import (CLIP_CONFIGS, UNET_CONFIGS, VAE_CONFIG, nchw, nhwc, rel_l2, torch_clip,
                  torch_unet, torch_unet_forward, torch_vae, unet_inputs)

TOL = 1e-4  # relative L2 error, float32 vs float32


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_matches_diffusers(name, rng):
    cfg = UNET_CONFIGS[name]
    tm = torch_unet(cfg)
    jm = conversion.convert(tm)
    x, t, ctx, kw = unet_inputs(cfg, rng)
    ref = torch_unet_forward(tm, x, t, ctx, kw)
    out = jm(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), **kw)
    assert out.shape == ref.shape
    assert rel_l2(out, ref) <= TOL

    # The encoder/decoder split used by FasterDiffusion is the same computation.
    enc = jm.encode(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), **kw)
    out2 = jm.decode(enc.skips, enc.mid, enc.emb, jnp.asarray(ctx))
    assert rel_l2(out2, ref) <= TOL


def test_unet_odd_latent_size(rng):
    """Latents that are not a multiple of the down-sampling factor (diffusers passes
    upsample sizes explicitly)."""
    cfg = UNET_CONFIGS["sd1"]
    tm = torch_unet(cfg)
    jm = conversion.convert(tm)
    x, t, ctx, kw = unet_inputs(cfg, rng, size=13)
    ref = torch_unet_forward(tm, x, t, ctx, kw)
    assert rel_l2(jm(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)), ref) <= TOL


def test_vae_matches_diffusers(rng):
    import torch

    tm = torch_vae()
    jm = conversion.convert(tm)
    img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(torch.from_numpy(nchw(img))).latent_dist
        z = torch.from_numpy(rng.standard_normal(dist.mean.shape).astype(np.float32))
        dec = tm.decode(z).sample
    jd = jm.encode(jnp.asarray(img))
    assert rel_l2(jd.mean, nhwc(dist.mean.numpy())) <= TOL
    assert rel_l2(jd.logvar, nhwc(dist.logvar.numpy())) <= TOL
    assert rel_l2(jm.decode(jnp.asarray(nhwc(z.numpy()))), nhwc(dec.numpy())) <= TOL
    assert jm.config.scaling_factor == tm.config.scaling_factor


@pytest.mark.parametrize("act", sorted(CLIP_CONFIGS))
@pytest.mark.parametrize("projection", [False, True])
def test_clip_matches_transformers(act, projection, rng):
    import torch

    cfg = CLIP_CONFIGS[act]
    tm = torch_clip(cfg, projection)
    jm = conversion.convert(tm)
    ids = rng.integers(3, cfg["vocab_size"] - 2, (3, 12))
    ids[:, 0] = cfg["bos_token_id"]
    ids[0, 5] = cfg["eos_token_id"]  # EOS mid-sequence, then padding
    ids[0, 6:] = cfg["pad_token_id"]
    ids[1, -1] = cfg["eos_token_id"]
    ids[2, 3] = cfg["eos_token_id"]
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    for m in (None, mask):
        with torch.no_grad():
            ref = tm(torch.from_numpy(ids), attention_mask=None if m is None else
                     torch.from_numpy(m), output_hidden_states=True)
        out = jm(ids, m)
        assert rel_l2(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
        assert rel_l2(out.hidden_states[-2], ref.hidden_states[-2].numpy()) <= TOL
        assert len(out.hidden_states) == len(ref.hidden_states)
        if projection:
            assert rel_l2(out.text_embeds, ref.text_embeds.numpy()) <= TOL
        else:
            assert rel_l2(out.pooler_output, ref.pooler_output.numpy()) <= TOL


def test_unet_takes_diffusers_added_cond_kwargs_spelling(rng):
    cfg = UNET_CONFIGS["sdxl"]
    m = conversion.convert(torch_unet(cfg))
    x, t, ctx, kw = unet_inputs(cfg, rng)
    added = {k: jnp.asarray(v) for k, v in kw["added_cond"].items()}
    a = m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), added_cond=added)
    b = m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), added_cond_kwargs=added)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="not both"):
        m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), added_cond=added,
          added_cond_kwargs=added)


@pytest.mark.parametrize("kernel,stride,padding,channels,size", [
    (3, 1, 1, 512, 4),     # im2col matmul (>= IM2COL_MIN_CHANNELS on a small map)
    (3, 1, 1, 32, 8),      # direct convolution (few channels)
    (3, 1, 1, 512, 32),    # direct convolution (large map)
    (3, 2, 1, 16, 9),      # strided (downsampling)
    (1, 1, 0, 16, 5),      # 1x1: a matmul
])
def test_conv2d_paths_match_torch(kernel, stride, padding, channels, size, rng):
    """Every code path of Conv2d against torch.nn.functional.conv2d."""
    import torch
    from flax import nnx

    from jaxdiff.models.layers import IM2COL_MAX_PIXELS, IM2COL_MIN_CHANNELS, Conv2d

    assert (channels >= IM2COL_MIN_CHANNELS and size * size <= IM2COL_MAX_PIXELS) == (
        channels == 512 and size == 4)
    conv = Conv2d(channels, 8, kernel, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, size, size, channels)).astype(np.float32)
    weight = np.ascontiguousarray(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1))  # OIHW
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(nchw(x)), torch.from_numpy(weight),
        torch.from_numpy(np.asarray(conv.bias[...])), stride=stride, padding=padding)
    assert rel_l2(conv(jnp.asarray(x)), nhwc(ref.numpy())) <= TOL
