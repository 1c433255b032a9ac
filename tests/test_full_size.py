"""Full-size architectures with random weights (slow; still run in CI).

SD 1.5 and SD 2.1 UNets as released; the SDXL UNet with its real widths, head dims and
conditioning but 2 (not 10) transformer layers in its deepest blocks so that the PyTorch
and Flax copies fit in memory together.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conversion
from jaxdiff.models import UNetConfig
from tiny import nchw, nhwc, rel_l2, torch_unet_forward

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("full_size")]

TOL = 1e-4


def _config(name):
    cfg = {"sd15": UNetConfig.sd15(), "sd21": UNetConfig.sd21(),
           "sdxl": UNetConfig.sdxl(transformer_layers_per_block=(1, 2, 2))}[name]
    return {k: v for k, v in cfg.to_dict().items() if v != UNetConfig.__dataclass_fields__[
        k].default or k in ("cross_attention_dim", "attention_head_dim")}


def _forward(model, *args, **kw):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, args, kw):
        return nnx.merge(graphdef, state)(*args, **kw)

    return run(state, args, kw)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_full_size_unet(name):
    import torch
    from diffusers import UNet2DConditionModel

    cfg = _config(name)
    torch.manual_seed(0)
    tm = UNet2DConditionModel(**cfg).eval()
    jm = conversion.convert(tm)
    rng = np.random.default_rng(0)
    size = 16
    x = rng.standard_normal((1, size, size, 4)).astype(np.float32)
    t = np.array([321.5], np.float32)
    ctx = rng.standard_normal((1, 77, tm.config.cross_attention_dim)).astype(np.float32)
    kw = {}
    if name == "sdxl":
        kw["added_cond"] = {"text_embeds": rng.standard_normal((1, 1280)).astype(np.float32),
                            "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)}
    ref = torch_unet_forward(tm, x, t, ctx, kw)
    del tm
    gc.collect()
    out = _forward(jm, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), **kw)
    err = rel_l2(out, ref)
    print(f"{name}: relative L2 error {err:.2e}")
    assert err <= TOL


def test_full_size_sdxl_controlnet():
    """The SDXL ControlNet architecture (the SDXL encoder with its real widths, heads and
    conditioning, 2 (not 10) transformer layers in the deepest block as the UNet above; the
    16/32/96/256 conditioning embedding) with random weights, its zero convolutions
    perturbed, on 16x16 latents: every residual within TOL of PyTorch's."""
    import torch
    from diffusers import ControlNetModel

    cfg = {k: v for k, v in _config("sdxl").items()
           if k not in ("up_block_types", "out_channels", "sample_size")}
    torch.manual_seed(0)
    tm = ControlNetModel(**cfg).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.normal_(0.0, 0.02)
    jm = conversion.convert(tm)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    t = np.array([321.5], np.float32)
    ctx = rng.standard_normal((1, 77, 2048)).astype(np.float32)
    cond = rng.uniform(0, 1, (1, 128, 128, 3)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((1, 1280)).astype(np.float32),
             "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)}
    with torch.no_grad():
        out = tm(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx),
                 torch.from_numpy(nchw(cond)), conditioning_scale=0.8,
                 added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()})
    want = [nhwc(r.numpy()) for r in out.down_block_res_samples] + [
        nhwc(out.mid_block_res_sample.numpy())]
    del tm, out
    gc.collect()
    down, mid = _forward(jm, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                         jnp.asarray(cond), conditioning_scale=0.8, added_cond_kwargs=added)
    errs = [rel_l2(g, w) for g, w in zip(list(down) + [mid], want)]
    print(f"SDXL ControlNet: worst relative L2 error of {len(errs)} residuals {max(errs):.2e}")
    assert len(errs) == len(want) and max(errs) <= TOL
