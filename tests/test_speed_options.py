"""Every speed / memory option agrees with the default float32 path (tolerances stated)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conversion
from jaxdiff.models import set_attention
from jaxdiff.pipeline import StableDiffusionPipeline
from tiny import UNET_CONFIGS, VAE_CONFIG, rel_l2, torch_unet, torch_vae, unet_inputs


@pytest.fixture(scope="module")
def unet_torch():
    return torch_unet(UNET_CONFIGS["sd1"])


def _run(model, x, t, ctx):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, x, t, ctx)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_low_precision_weights_and_activations(unet_torch, dtype, tol):
    x, t, ctx, _ = unet_inputs(UNET_CONFIGS["sd1"], np.random.default_rng(0))
    ref = _run(conversion.convert(unet_torch), x, t, ctx)
    low = conversion.convert(unet_torch, dtype=dtype)
    assert jax.tree.leaves(nnx.state(low))[0].dtype == dtype
    out = _run(low, x, t, ctx)
    assert out.dtype == dtype
    assert rel_l2(out.astype(jnp.float32), ref) <= tol


@pytest.mark.parametrize("impl,fuse", [("xla", False), ("chunked", False), (None, True),
                                       ("chunked", True)])
def test_attention_kernels_and_fused_qkv(unet_torch, impl, fuse):
    x, t, ctx, _ = unet_inputs(UNET_CONFIGS["sd1"], np.random.default_rng(0), size=32)
    ref = _run(conversion.convert(unet_torch), x, t, ctx)
    m = set_attention(conversion.convert(unet_torch), impl, fuse_qkv=fuse)
    if fuse:
        assert any(getattr(a, "fused_qkv", False) for _, a in m.iter_modules())
    # chunk size 256 < 32*32 tokens, so the chunked kernel really runs
    assert rel_l2(_run(m, x, t, ctx), ref) <= 1e-5


def test_matmul_precision_setting(unet_torch):
    x, t, ctx, _ = unet_inputs(UNET_CONFIGS["sd1"], np.random.default_rng(0))
    m = conversion.convert(unet_torch)
    ref = _run(m, x, t, ctx)
    with jax.default_matmul_precision("bfloat16"):
        out = _run(m, x, t, ctx)
    assert rel_l2(out, ref) <= 3e-2


def _pipe(vae, **kw):
    return StableDiffusionPipeline(unet=None, vae=vae, text_encoder=None, **kw)


def test_vae_slicing_exact():
    vae = conversion.convert(torch_vae())
    z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 4)), jnp.float32)
    ref = _pipe(vae).decode_latents(z)
    assert rel_l2(_pipe(vae, vae_slicing=True).decode_latents(z), ref) <= 1e-6


def test_vae_tiling_close_and_seamless():
    # No mid-block attention: the decoder is then local, so tiles can agree with the
    # whole-image decode away from their borders; with attention tiling is approximate.
    tm = torch_vae({**VAE_CONFIG, "mid_block_add_attention": False})
    vae = conversion.convert(tm)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 40, 40, 4)), jnp.float32)
    ref = np.asarray(_pipe(vae).decode_latents(z))
    tiled = np.asarray(_pipe(vae, vae_tiling=True, vae_tile_latent=16,
                             vae_tile_overlap=0.5).decode_latents(z))
    assert tiled.shape == ref.shape == (1, 80, 80, 3)
    err = np.abs(tiled - ref)
    assert err.mean() <= 2e-2, err.mean()
    assert rel_l2(tiled, ref) <= 5e-2
