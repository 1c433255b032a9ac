"""Classifier-free guidance (and its rescale) against diffusers' formulas; pytree model fns."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import conversion
from jaxdiff.guidance import classifier_free
from tiny import UNET_CONFIGS, nchw, nhwc, rel_l2, torch_unet, unet_inputs


def test_cfg_and_rescale_match_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cfg = UNET_CONFIGS["sd1"]
    tm = torch_unet(cfg)
    jm = conversion.convert(tm)
    rng = np.random.default_rng(0)
    x, t, ctx, _ = unet_inputs(cfg, rng)
    uncond = rng.standard_normal(ctx.shape).astype(np.float32)
    for scale, rescale in ((7.5, 0.0), (5.0, 0.7), (1.0, 0.0)):
        with torch.no_grad():
            out = tm(torch.from_numpy(nchw(np.concatenate([x, x]))),
                     torch.from_numpy(np.concatenate([t, t])),
                     torch.from_numpy(np.concatenate([uncond, ctx]))).sample
            u, c = out.chunk(2)
            want = u + scale * (c - u)
            if rescale > 0:
                want = rescale_noise_cfg(want, c, guidance_rescale=rescale)
        fn = classifier_free(jm, ctx, uncond, scale, guidance_rescale=rescale)
        assert rel_l2(fn(jnp.asarray(x), jnp.asarray(t)), nhwc(want.numpy())) <= 1e-4


def test_model_fn_is_a_pytree_and_does_not_recompile():
    cfg = UNET_CONFIGS["sd1"]
    jm = conversion.convert(torch_unet(cfg))
    rng = np.random.default_rng(0)
    x, t, ctx, _ = unet_inputs(cfg, rng)
    traces = []

    @jax.jit
    def run(fn, x, t):
        traces.append(1)
        return fn(x, t)

    a = run(classifier_free(jm, ctx, -ctx, 7.5), x, t)
    b = run(classifier_free(jm, 2 * ctx, ctx, 3.0, guidance_rescale=0.5), x, t)
    assert len(traces) == 1  # new prompt, scale and rescale: same compiled program
    assert not np.allclose(a, b)
    leaves = jax.tree.leaves(classifier_free(jm, ctx, ctx, 7.5))
    assert all(isinstance(v, jax.Array) for v in leaves)
