"""``AutoencoderTiny`` (TAESD, Bohan Ollin Boer): a small convolutional VAE stand-in that
encodes and decodes SD / SDXL latents at a fraction of AutoencoderKL's cost.

The module tree mirrors diffusers' ``AutoencoderTiny`` (``encoder.layers.i`` /
``decoder.layers.i`` sequential indices, parameter-free activations and upsamplers keeping
their slots), so weights convert by the shared rule table. ``encode`` returns a
``LatentDistribution`` whose mean is the latent (TAESD is deterministic), so pipelines use
it exactly like ``AutoencoderKL``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.config import Config
from jaxdiff.models.layers import Conv2d, activation, nearest_upsample
from jaxdiff.models.vae import LatentDistribution


@dataclasses.dataclass(frozen=True)
class TinyAutoencoderConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple = (64, 64, 64, 64)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple = (1, 3, 3, 3)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    block_out_channels: Optional[tuple] = None   # older configs repeat the encoder's widths

    latents_mean = None      # (AutoencoderKL's SDXL-style statistics: TAESD has none)
    latents_std = None

    def __post_init__(self):
        self._require("upsample_fn", ("nearest",))
        activation(self.act_fn)
        if len(self.encoder_block_out_channels) != len(self.num_encoder_blocks) or \
                len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
            raise ValueError("TinyAutoencoderConfig: one block count per block width needed")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)


class _Act(nnx.Module):
    """A parameter-free sequential slot (activation)."""

    def __init__(self, name: str):
        self.fn = activation(name)

    def __call__(self, x):
        return self.fn(x)


class _Upsample(nnx.Module):
    def __init__(self, factor: int):
        self.factor = factor

    def __call__(self, x):
        return nearest_upsample(x, (x.shape[1] * self.factor, x.shape[2] * self.factor))


class AutoencoderTinyBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, act_fn: str, *, dtype, rngs):
        conv = lambda a, b: Conv2d(a, b, 3, padding=1, dtype=dtype, rngs=rngs)  # noqa: E731
        self.conv = nnx.List([conv(cin, cout), _Act(act_fn), conv(cout, cout), _Act(act_fn),
                              conv(cout, cout)])
        self.skip = (Conv2d(cin, cout, 1, bias=False, dtype=dtype, rngs=rngs)
                     if cin != cout else None)

    def __call__(self, x):
        h = x
        for layer in self.conv:
            h = layer(h)
        return jax.nn.relu(h + (x if self.skip is None else self.skip(x)))


class EncoderTiny(nnx.Module):
    def __init__(self, cfg: TinyAutoencoderConfig, *, dtype, rngs):
        layers = []
        for i, (ch, n) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            if i == 0:
                layers.append(Conv2d(cfg.in_channels, ch, 3, padding=1, dtype=dtype, rngs=rngs))
            else:
                layers.append(Conv2d(ch, ch, 3, padding=1, stride=2, bias=False, dtype=dtype,
                                     rngs=rngs))
            layers.extend(AutoencoderTinyBlock(ch, ch, cfg.act_fn, dtype=dtype, rngs=rngs)
                          for _ in range(n))
        layers.append(Conv2d(cfg.encoder_block_out_channels[-1], cfg.latent_channels, 3,
                             padding=1, dtype=dtype, rngs=rngs))
        self.layers = nnx.List(layers)

    def __call__(self, x):  # [-1, 1] images -> latents
        x = (x + 1.0) / 2.0
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderTiny(nnx.Module):
    def __init__(self, cfg: TinyAutoencoderConfig, *, dtype, rngs):
        widths, counts = cfg.decoder_block_out_channels, cfg.num_decoder_blocks
        layers = [Conv2d(cfg.latent_channels, widths[0], 3, padding=1, dtype=dtype, rngs=rngs),
                  _Act(cfg.act_fn)]
        for i, (ch, n) in enumerate(zip(widths, counts)):
            final = i == len(widths) - 1
            layers.extend(AutoencoderTinyBlock(ch, ch, cfg.act_fn, dtype=dtype, rngs=rngs)
                          for _ in range(n))
            if not final:
                layers.append(_Upsample(cfg.upsampling_scaling_factor))
            layers.append(Conv2d(ch, cfg.out_channels if final else ch, 3, padding=1,
                                 bias=final, dtype=dtype, rngs=rngs))
        self.layers = nnx.List(layers)
        self.magnitude = cfg.latent_magnitude

    def __call__(self, z):  # latents -> [-1, 1] images
        x = jnp.tanh(z / self.magnitude) * self.magnitude
        for layer in self.layers:
            x = layer(x)
        return x * 2.0 - 1.0


class AutoencoderTiny(nnx.Module):
    def __init__(self, config: TinyAutoencoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.encoder = EncoderTiny(config, dtype=dtype, rngs=rngs)
        self.decoder = DecoderTiny(config, dtype=dtype, rngs=rngs)

    @property
    def dtype(self):
        return self.encoder.layers[0].kernel.dtype

    def encode(self, images) -> LatentDistribution:  # [B, H, W, C] in [-1, 1]
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(f"AutoencoderTiny.encode expects NHWC images [B, H, W, "
                             f"{c.in_channels}], got shape {tuple(images.shape)}")
        z = self.encoder(images.astype(self.dtype))
        return LatentDistribution(z, jnp.full_like(z, -30.0))   # deterministic

    def decode(self, z):  # [B, h, w, latent_channels] -> [B, H, W, C] in ~[-1, 1]
        c = self.config
        if z.ndim != 4 or z.shape[-1] != c.latent_channels:
            raise ValueError(f"AutoencoderTiny.decode expects NHWC latents [B, h, w, "
                             f"{c.latent_channels}], got shape {tuple(z.shape)}")
        return self.decoder(z.astype(self.dtype))

    def __call__(self, images):
        return self.decode(self.encode(images).mean)
