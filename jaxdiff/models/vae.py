"""``AutoencoderKL``: the Stable Diffusion VAE (encoder -> diagonal Gaussian -> decoder).

Images are NHWC in [-1, 1]; latents NHWC. ``scaling_factor`` / ``shift_factor`` are kept
on the config: pipelines map between VAE latents and diffusion latents with
``(z - shift) * scale`` and its inverse.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.attention import Attention
from jaxdiff.models.config import Config
from jaxdiff.models.layers import Conv2d, GroupNorm, activation
from jaxdiff.models.unet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclasses.dataclass(frozen=True)
class VAEConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Optional[int] = None
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"VAEConfig: unsupported down_block_types entry {t!r}")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"VAEConfig: unsupported up_block_types entry {t!r}")
        if not (len(self.down_block_types) == len(self.up_block_types)
                == len(self.block_out_channels)):
            raise ValueError("VAEConfig: down_block_types, up_block_types and block_out_channels "
                             "must have the same length")
        activation(self.act_fn)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class UNetMidBlock2D(nnx.Module):
    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool,
                 dtype, rngs):
        res = dict(temb_channels=None, groups=groups, eps=1e-6, act_fn=act_fn, dtype=dtype,
                   rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **res) for _ in range(2)])
        self.attentions = (nnx.List([Attention(channels, heads=1, dim_head=channels, bias=True,
                                               norm_num_groups=groups, eps=1e-6,
                                               residual_connection=True, dtype=dtype, rngs=rngs)])
                           if add_attention else None)

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D."""

    def __init__(self, cin, cout, *, num_layers, add_downsample, groups, act_fn, dtype, rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups,
                          eps=1e-6, act_fn=act_fn, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D."""

    def __init__(self, cin, cout, *, num_layers, add_upsample, groups, act_fn, dtype, rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups,
                          eps=1e-6, act_fn=act_fn, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)])
                           if add_upsample else None)

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, boc[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(boc[max(i - 1, 0)], boc[i], num_layers=cfg.layers_per_block,
                         add_downsample=i < len(boc) - 1, groups=g, act_fn=cfg.act_fn,
                         dtype=dtype, rngs=rngs) for i in range(len(boc))])
        self.mid_block = UNetMidBlock2D(boc[-1], groups=g, act_fn=cfg.act_fn,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype,
                                        rngs=rngs)
        self.conv_norm_out = GroupNorm(g, boc[-1], eps=1e-6, dtype=dtype)
        self.act = activation(cfg.act_fn)
        self.conv_out = Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype,
                               rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        rboc = boc[::-1]
        self.conv_in = Conv2d(cfg.latent_channels, boc[-1], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(boc[-1], groups=g, act_fn=cfg.act_fn,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype,
                                        rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(rboc[max(i - 1, 0)], rboc[i], num_layers=cfg.layers_per_block + 1,
                         add_upsample=i < len(boc) - 1, groups=g, act_fn=cfg.act_fn,
                         dtype=dtype, rngs=rngs) for i in range(len(boc))])
        self.conv_norm_out = GroupNorm(g, boc[0], eps=1e-6, dtype=dtype)
        self.act = activation(cfg.act_fn)
        self.conv_out = Conv2d(boc[0], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class LatentDistribution(NamedTuple):
    mean: jax.Array    # [B, h, w, C]
    logvar: jax.Array  # [B, h, w, C], clipped to [-30, 20] like diffusers

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class AutoencoderKL(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        c2 = 2 * config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = (Conv2d(c2, c2, 1, dtype=dtype, rngs=rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(config.latent_channels, config.latent_channels, 1,
                                       dtype=dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)

    @property
    def dtype(self):
        return self.encoder.conv_in.kernel.dtype

    def encode(self, images) -> LatentDistribution:  # [B, H, W, C_in] in [-1, 1]
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(f"VAE.encode expects NHWC images [B, H, W, {c.in_channels}], "
                             f"got shape {tuple(images.shape)}")
        f = c.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"VAE.encode: height and width must be multiples of {f}, "
                             f"got {images.shape[1]}x{images.shape[2]}")
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z):  # [B, h, w, latent_channels] -> [B, H, W, C_out] in ~[-1, 1]
        c = self.config
        if z.ndim != 4 or z.shape[-1] != c.latent_channels:
            raise ValueError(f"VAE.decode expects NHWC latents [B, h, w, {c.latent_channels}], "
                             f"got shape {tuple(z.shape)}")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images, *, key=None):
        dist = self.encode(images)
        z = dist.sample(key) if key is not None else dist.mode()
        return self.decode(z)


# ----------------------------------------------------------------------------- tiling
def _ramp(n: int, overlap: int, lo: bool, hi: bool) -> np.ndarray:
    """Blend weights along one axis of a tile: linear ramps on the sides shared with a
    neighbouring tile, 1 elsewhere (normalised by the weight sum after accumulation)."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        if lo:
            w[:overlap] *= ramp
        if hi:
            w[-overlap:] *= ramp[::-1]
    return w


def tiled_decode(vae, z, tile: int, overlap_frac: float):
    """Decode overlapping latent tiles and blend the seams: peak activation memory is one
    tile's whatever the image size. Like diffusers' tiling it is an approximation near the
    seams (each tile sees only its own context)."""
    n, h, w, _ = z.shape
    f = vae.config.downsample_factor
    if h <= tile and w <= tile:
        return vae.decode(z).astype(jnp.float32)
    overlap = max(int(tile * overlap_frac), 1)
    stride = tile - overlap

    def starts(size):
        if size <= tile:
            return [0]
        return sorted({min(s, size - tile) for s in range(0, size - overlap, stride)})

    out = jnp.zeros((n, h * f, w * f, vae.config.out_channels), jnp.float32)
    total = jnp.zeros((1, h * f, w * f, 1), jnp.float32)
    for y in starts(h):
        for x in starts(w):
            th, tw = min(tile, h - y), min(tile, w - x)
            img = vae.decode(z[:, y:y + th, x:x + tw]).astype(jnp.float32)
            wy = _ramp(th * f, overlap * f, y > 0, y + th < h)
            wx = _ramp(tw * f, overlap * f, x > 0, x + tw < w)
            wgt = jnp.asarray(wy[:, None] * wx[None, :])[None, :, :, None]
            out = out.at[:, y * f:(y + th) * f, x * f:(x + tw) * f].add(img * wgt)
            total = total.at[:, y * f:(y + th) * f, x * f:(x + tw) * f].add(wgt)
    return out / total
