"""``ControlNetModel`` (Zhang et al. 2023): a trainable copy of the UNet's input half that
turns a conditioning image into residuals for the UNet's skip features and mid block.

The module tree mirrors diffusers' ``ControlNetModel`` (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block`` beside the UNet's ``conv_in``, time
embedding, ``down_blocks`` and ``mid_block``, which are built by the UNet's own code), so
its weights convert by the UNet's rule table.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.layers import Conv2d
from jaxdiff.models.unet import UNetConfig, UNetEncoderBase, added_conditioning

_UP_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    up_block_types: Optional[tuple] = None      # a ControlNet has no up blocks

    def __post_init__(self):
        if self.up_block_types is None:   # (the UNet's checks want one per down block)
            object.__setattr__(self, "up_block_types", tuple(
                _UP_OF.get(t, t) for t in reversed(self.down_block_types)))
        super().__post_init__()
        self._require("controlnet_conditioning_channel_order", ("rgb", "bgr"))
        if len(self.conditioning_embedding_out_channels) < 1:
            raise ValueError("ControlNetConfig: conditioning_embedding_out_channels is empty")


class ControlNetConditioningEmbedding(nnx.Module):
    """Conditioning image [B, H, W, C] -> features at the latent resolution (convolutions with
    stride 2 between the channel widths)."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple, *, dtype, rngs):
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1, dtype=dtype, rngs=rngs)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks.append(Conv2d(a, a, 3, padding=1, dtype=dtype, rngs=rngs))
            blocks.append(Conv2d(a, b, 3, padding=1, stride=2, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv2d(widths[-1], out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.silu(self.conv_in(x))
        for conv in self.blocks:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(UNetEncoderBase):
    def __init__(self, config: ControlNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = self.config = config
        self._build_encoder(cfg, dtype, rngs)
        boc = cfg.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            boc[0], cfg.conditioning_channels, tuple(cfg.conditioning_embedding_out_channels),
            dtype=dtype, rngs=rngs)
        one = lambda c: Conv2d(c, c, 1, dtype=dtype, rngs=rngs)  # noqa: E731
        heads = [one(boc[0])]
        for i, block in enumerate(self.down_blocks):
            heads.extend(one(boc[i]) for _ in block.resnets)
            if block.downsamplers is not None:
                heads.append(one(boc[i]))
        self.controlnet_down_blocks = nnx.List(heads)
        self.controlnet_mid_block = one(boc[-1])

    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, *,
                 conditioning_scale=1.0, guess_mode: bool = False, class_labels=None,
                 added_cond=None, added_cond_kwargs=None):
        """sample [B, h, w, C] latents (as the UNet sees them), controlnet_cond [B, H, W, c]
        the conditioning image in [0, 1] -> (down residuals, one per UNet skip feature;
        mid residual), scaled by ``conditioning_scale`` (guess mode: 0.1 .. 1 from the
        first skip to the mid block, diffusers' logspace)."""
        cfg = self.config
        added_cond = added_conditioning(added_cond, added_cond_kwargs)
        self._check_inputs(sample, encoder_hidden_states)
        cond = jnp.asarray(controlnet_cond)
        f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        if cond.ndim != 4 or cond.shape[-1] != cfg.conditioning_channels or \
                cond.shape[1:3] != (sample.shape[1] * f, sample.shape[2] * f) or \
                cond.shape[0] != sample.shape[0]:
            raise ValueError(f"ControlNet: controlnet_cond must be [B={sample.shape[0]}, "
                             f"{sample.shape[1] * f}, {sample.shape[2] * f}, "
                             f"{cfg.conditioning_channels}] (NHWC, {f}x the latents), got "
                             f"shape {tuple(cond.shape)}")
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        emb = self.time_embedding_of(timesteps, sample.shape[0], class_labels, added_cond)
        x = self.conv_in(sample.astype(self.dtype))
        x = x + self.controlnet_cond_embedding(cond.astype(self.dtype))
        skips, mid = self._features(x, emb, encoder_hidden_states)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1) * scale
        else:
            scales = jnp.broadcast_to(scale, (len(down) + 1,))
        down = [(d * scales[i]).astype(d.dtype) for i, d in enumerate(down)]
        mid = (mid * scales[-1]).astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid
