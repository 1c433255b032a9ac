"""``UNet2DConditionModel``: the Stable Diffusion UNet (SD 1.x, SD 2.x, SDXL, class-conditional).

The module tree mirrors diffusers' so that every PyTorch key maps to one NNX path.
``encode`` runs conv_in, the down blocks and the mid block and returns what the decoder
needs; ``decode`` runs the up blocks and the output head. FasterDiffusion reuses the
encoder's features across steps by calling ``time_embedding_of`` and ``decode`` alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.attention import Transformer2DModel
from jaxdiff.models.config import Config, per_block
from jaxdiff.models.layers import Conv2d, Embedding, GroupNorm, Linear, activation, nearest_upsample


@dataclasses.dataclass(frozen=True)
class UNetConfig(Config):
    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                             "CrossAttnUpBlock2D")
    only_cross_attention: object = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: object = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: object = 1280
    transformer_layers_per_block: object = 1
    reverse_transformer_layers_per_block: Optional[tuple] = None
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    attention_head_dim: object = 8
    num_attention_heads: object = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    num_class_embeds: Optional[int] = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    timestep_post_act: Optional[str] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: Optional[int] = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: Optional[bool] = None
    cross_attention_norm: Optional[str] = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        n = len(self.down_block_types)
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"UNetConfig: unsupported down_block_types entry {t!r}")
        for t in self.up_block_types:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"UNetConfig: unsupported up_block_types entry {t!r}")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError("UNetConfig: down_block_types, up_block_types and block_out_channels "
                             f"must have the same length, got {n}, {len(self.up_block_types)}, "
                             f"{len(self.block_out_channels)}")
        self._require("mid_block_type", ("UNetMidBlock2DCrossAttn", None))
        self._require("dual_cross_attention", (False,))
        self._require("encoder_hid_dim_type", (None,))
        self._require("encoder_hid_dim", (None,))
        self._require("class_embed_type", (None, "timestep", "identity", "projection",
                                           "simple_projection"))
        self._require("addition_embed_type", (None, "text_time"))
        self._require("resnet_time_scale_shift", ("default", "scale_shift"))
        self._require("resnet_skip_time_act", (False,))
        self._require("time_embedding_type", ("positional",))
        self._require("time_cond_proj_dim", (None,))
        self._require("attention_type", ("default",))
        self._require("cross_attention_norm", (None,))
        self._require("reverse_transformer_layers_per_block", (None,))
        if self.num_attention_heads is not None:
            # diffusers reads `attention_head_dim` as the number of heads (a historical
            # naming bug) and refuses num_attention_heads for this class; so do we.
            raise ValueError("UNetConfig: unsupported num_attention_heads="
                             f"{self.num_attention_heads!r}; diffusers' UNet2DConditionModel "
                             "takes the head count from attention_head_dim")
        activation(self.act_fn)
        if self.time_embedding_act_fn is not None:
            activation(self.time_embedding_act_fn, "time_embedding_act_fn")
        self._require("timestep_post_act", (None,))
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None
                or self.projection_class_embeddings_input_dim is None):
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs "
                             "addition_time_embed_dim and projection_class_embeddings_input_dim")
        if self.class_embed_type in ("projection", "simple_projection") and \
                self.projection_class_embeddings_input_dim is None:
            raise ValueError(f"UNetConfig: class_embed_type={self.class_embed_type!r} needs "
                             "projection_class_embeddings_input_dim")
        for k in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, k) % 2 != 1:
                raise ValueError(f"UNetConfig: {k} must be odd, got {getattr(self, k)}")
        # Validate the per-block fields up front (raises naming the field).
        for f in ("only_cross_attention", "layers_per_block", "cross_attention_dim",
                  "transformer_layers_per_block", "attention_head_dim"):
            per_block(getattr(self, f), n, f)

    # Presets of well-known architectures (diffusers config values).
    @classmethod
    def sd15(cls, **kw) -> "UNetConfig":
        return cls(cross_attention_dim=768, attention_head_dim=8, sample_size=64, **kw)

    @classmethod
    def sd21(cls, **kw) -> "UNetConfig":
        return cls(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True, sample_size=96, **kw)

    @classmethod
    def sdxl(cls, **kw) -> "UNetConfig":
        base = dict(
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        base.update(kw)
        return cls(**base)


class Timesteps(nnx.Module):
    """Sinusoidal embedding of float timesteps (differentiable in t)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        self.dim = dim
        self.flip = flip_sin_to_cos
        self.shift = freq_shift

    def __call__(self, t):  # [N] -> [N, dim]
        half = self.dim // 2
        exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - self.shift)
        args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
        emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
        if self.flip:
            emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
        if self.dim % 2:
            emb = jnp.pad(emb, ((0, 0), (0, 1)))
        return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, dim: int, act_fn: str = "silu", *, dtype, rngs):
        self.linear_1 = Linear(in_dim, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.act = activation(act_fn)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
                 groups: int = 32, eps: float = 1e-6, act_fn: str = "silu",
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = activation(act_fn)
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (Linear(temb_channels, out_channels * (2 if self.scale_shift else 1),
                                     dtype=dtype, rngs=rngs) if temb_channels else None)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x, temb=None):  # x [B, H, W, C], temb [B, T]
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(self.act(temb))[:, None, None, :]
            if self.scale_shift:
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        else:
            h = self.norm2(h)
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, *, padding: int = 1, dtype, rngs):
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if self.padding == 0:  # diffusers pads right/bottom by one, then convolves unpadded
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype, rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x, size=None):
        return self.conv(nearest_upsample(x, size))


class DownBlock2D(nnx.Module):
    """DownBlock2D / CrossAttnDownBlock2D (attentions present when cross-attending)."""

    def __init__(self, in_channels, out_channels, temb_channels, *, num_layers, add_downsample,
                 cfg: UNetConfig, attn: dict | None, dtype, rngs):
        res = dict(temb_channels=temb_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                   output_scale_factor=cfg.resnet_out_scale_factor, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels,
                                               out_channels, **res) for i in range(num_layers)])
        self.attentions = (nnx.List([
            _transformer(out_channels, attn["layers"][i], attn, cfg, dtype, rngs)
            for i in range(num_layers)]) if attn is not None else None)
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=cfg.downsample_padding,
                                                    dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x, temb, context):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UpBlock2D(nnx.Module):
    """UpBlock2D / CrossAttnUpBlock2D: each resnet consumes one skip connection."""

    def __init__(self, in_channels, prev_channels, out_channels, temb_channels, *, num_layers,
                 add_upsample, cfg: UNetConfig, attn: dict | None, dtype, rngs):
        res = dict(temb_channels=temb_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                   output_scale_factor=cfg.resnet_out_scale_factor, dtype=dtype, rngs=rngs)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            first = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(first + skip, out_channels, **res))
        self.resnets = nnx.List(resnets)
        self.attentions = (nnx.List([
            _transformer(out_channels, attn["layers"][i], attn, cfg, dtype, rngs)
            for i in range(num_layers)]) if attn is not None else None)
        self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                           if add_upsample else None)

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, channels, temb_channels, *, cfg: UNetConfig, attn: dict, dtype, rngs):
        res = dict(temb_channels=temb_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                   output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **res) for _ in range(2)])
        self.attentions = nnx.List([_transformer(channels, attn["layers"][0], attn, cfg, dtype,
                                                 rngs)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


def _transformer(channels, num_layers, attn, cfg, dtype, rngs):
    heads = attn["heads"]
    return Transformer2DModel(heads, channels // heads, channels, num_layers=num_layers,
                              cross_attention_dim=attn["cross_attention_dim"],
                              norm_num_groups=cfg.norm_num_groups,
                              use_linear_projection=cfg.use_linear_projection,
                              only_cross_attention=attn["only_cross_attention"],
                              upcast_attention=cfg.upcast_attention, dtype=dtype, rngs=rngs)


class Encoded(NamedTuple):
    """What the decoder needs from the encoder: skip features, mid-block output, embedding."""
    skips: tuple      # of [B, H_i, W_i, C_i]
    mid: jax.Array    # [B, h, w, C]
    emb: jax.Array    # [B, T] time (+ class / added) embedding


def added_conditioning(added_cond, added_cond_kwargs):
    if added_cond is not None and added_cond_kwargs is not None:
        raise ValueError("pass added_cond or added_cond_kwargs (the same thing), not both")
    return added_cond if added_cond_kwargs is None else added_cond_kwargs


def _block_fields(cfg: UNetConfig) -> tuple:
    """The per-block config fields, one entry per down block: (heads, cross-attention dim,
    only_cross_attention, layers, transformer layers)."""
    n = len(cfg.down_block_types)
    return tuple(per_block(getattr(cfg, f), n, f) for f in (
        "attention_head_dim", "cross_attention_dim", "only_cross_attention", "layers_per_block",
        "transformer_layers_per_block"))


class UNetEncoderBase(nnx.Module):
    """The UNet's input half, shared with ControlNet: conv_in, the time (+ class, SDXL added)
    embedding, the down blocks and the mid block."""

    def _build_encoder(self, cfg: UNetConfig, dtype, rngs) -> int:
        """Create the input half's modules (attribute names as diffusers') -> the time
        embedding width the blocks take."""
        n = len(cfg.down_block_types)
        boc = cfg.block_out_channels
        heads, cross, only_cross, layers, tlayers = _block_fields(cfg)

        t_in = boc[0]
        t_dim = cfg.time_embedding_dim or boc[0] * 4
        self.conv_in = Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel,
                              padding=(cfg.conv_in_kernel - 1) // 2, dtype=dtype, rngs=rngs)
        self.time_proj = Timesteps(t_in, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(t_in, t_dim, cfg.act_fn, dtype=dtype, rngs=rngs)

        cet = cfg.class_embed_type
        if cet is None and cfg.num_class_embeds is not None:
            class_embedding = Embedding(cfg.num_class_embeds, t_dim, dtype=dtype, rngs=rngs)
        elif cet == "timestep":
            class_embedding = TimestepEmbedding(t_in, t_dim, cfg.act_fn, dtype=dtype, rngs=rngs)
        elif cet == "projection":
            class_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                t_dim, cfg.act_fn, dtype=dtype, rngs=rngs)
        elif cet == "simple_projection":
            class_embedding = Linear(cfg.projection_class_embeddings_input_dim, t_dim,
                                     dtype=dtype, rngs=rngs)
        else:  # none, or "identity"
            class_embedding = None
        self.class_embedding = class_embedding
        self.has_class_input = cet is not None or cfg.num_class_embeds is not None

        text_time = cfg.addition_embed_type == "text_time"
        self.add_time_proj = (Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                        cfg.freq_shift) if text_time else None)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, t_dim,
                                                dtype=dtype, rngs=rngs) if text_time else None)
        self.time_embed_act = (activation(cfg.time_embedding_act_fn)
                               if cfg.time_embedding_act_fn else None)
        blocks_t_dim = t_dim * 2 if cfg.class_embeddings_concat else t_dim

        def attn_args(i, tl, is_cross):
            return (dict(heads=heads[i], cross_attention_dim=cross[i],
                         only_cross_attention=only_cross[i], layers=tl) if is_cross else None)

        down = []
        out_ch = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            tl = tlayers[i]
            tl = tuple(tl) if isinstance(tl, (list, tuple)) else (tl,) * layers[i]
            down.append(DownBlock2D(in_ch, out_ch, blocks_t_dim, num_layers=layers[i],
                                    add_downsample=i < n - 1, cfg=cfg,
                                    attn=attn_args(i, tl, kind == "CrossAttnDownBlock2D"),
                                    dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(down)

        mid_block = None
        if cfg.mid_block_type is not None:
            tl = tlayers[-1]
            tl = (tl[0] if isinstance(tl, (list, tuple)) else tl,)
            mid_only = (cfg.mid_block_only_cross_attention
                        if cfg.mid_block_only_cross_attention is not None else only_cross[-1])
            mid_block = UNetMidBlock2DCrossAttn(
                boc[-1], blocks_t_dim, cfg=cfg,
                attn=dict(heads=heads[-1], cross_attention_dim=cross[-1],
                          only_cross_attention=mid_only, layers=tl),
                dtype=dtype, rngs=rngs)
        self.mid_block = mid_block
        return blocks_t_dim

    @property
    def dtype(self):
        return self.conv_in.kernel.dtype

    def time_embedding_of(self, timesteps, batch: int, class_labels=None, added_cond=None):
        """[B] or scalar float timesteps -> [B, T] embedding (plus class / SDXL conditioning)."""
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        emb = self.time_embedding(self.time_proj(t).astype(self.dtype))
        if self.has_class_input:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels")
            labels = class_labels
            if self.config.class_embed_type == "timestep":
                labels = self.time_proj(jnp.asarray(labels).reshape(-1)).astype(self.dtype)
            if self.class_embedding is None:  # "identity"
                class_emb = jnp.asarray(labels, self.dtype)
            else:
                class_emb = self.class_embedding(labels)
                if isinstance(self.class_embedding, Embedding):
                    class_emb = class_emb.reshape(batch, -1)
            class_emb = class_emb.astype(emb.dtype)
            emb = (jnp.concatenate([emb, class_emb], -1) if self.config.class_embeddings_concat
                   else emb + class_emb)
        if self.add_embedding is not None:
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet has addition_embed_type='text_time': pass "
                                 "added_cond={'text_embeds': [B, D], 'time_ids': [B, 6]}")
            time_ids = jnp.asarray(added_cond["time_ids"])
            time_emb = self.add_time_proj(time_ids.reshape(-1)).reshape(time_ids.shape[0], -1)
            add = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32),
                                   time_emb], -1)
            emb = emb + self.add_embedding(add.astype(self.dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def _check_inputs(self, sample, context):
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(f"UNet expects NHWC latents [B, H, W, {c.in_channels}], "
                             f"got shape {tuple(sample.shape)}")
        cross = per_block(c.cross_attention_dim, len(c.down_block_types), "cross_attention_dim")
        if context is not None and (context.ndim != 3 or context.shape[-1] != cross[0]
                                    or context.shape[0] != sample.shape[0]):
            raise ValueError(f"encoder_hidden_states must be [B={sample.shape[0]}, S, "
                             f"{cross[0]}], got shape {tuple(context.shape)}")

    def _features(self, x, emb, context):
        """conv_in's output x (plus any conditioning) -> (skips, mid) of the down/mid blocks."""
        skips = [x]
        for block in self.down_blocks:
            x, outs = block(x, emb, context)
            skips.extend(outs)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        return tuple(skips), x


class UNet2DConditionModel(UNetEncoderBase):
    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = self.config = config
        n = len(cfg.down_block_types)
        boc = cfg.block_out_channels
        heads, cross, only_cross, layers, tlayers = _block_fields(cfg)
        blocks_t_dim = self._build_encoder(cfg, dtype, rngs)

        up = []
        rboc = boc[::-1]
        r_heads, r_cross, r_only, r_layers, r_tl = (tuple(reversed(v)) for v in (
            heads, cross, only_cross, layers, tlayers))
        out_ch = rboc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out_ch = out_ch, rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            nl = r_layers[i] + 1
            tl = r_tl[i]
            tl = tuple(tl) if isinstance(tl, (list, tuple)) else (tl,) * nl
            attn = (dict(heads=r_heads[i], cross_attention_dim=r_cross[i],
                         only_cross_attention=r_only[i], layers=tl)
                    if kind == "CrossAttnUpBlock2D" else None)
            up.append(UpBlock2D(in_ch, prev, out_ch, blocks_t_dim, num_layers=nl,
                                add_upsample=i < n - 1, cfg=cfg, attn=attn, dtype=dtype,
                                rngs=rngs))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps, dtype=dtype)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = Conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel,
                               padding=(cfg.conv_out_kernel - 1) // 2, dtype=dtype, rngs=rngs)

    def encode(self, sample, timesteps, encoder_hidden_states, *, class_labels=None,
               added_cond=None, added_cond_kwargs=None) -> Encoded:
        added_cond = added_conditioning(added_cond, added_cond_kwargs)
        self._check_inputs(sample, encoder_hidden_states)
        emb = self.time_embedding_of(timesteps, sample.shape[0], class_labels, added_cond)
        x = sample.astype(self.dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        skips, mid = self._features(self.conv_in(x), emb, encoder_hidden_states)
        return Encoded(skips, mid, emb)

    def decode(self, skips, mid, emb, encoder_hidden_states):
        x = mid
        skips = list(skips)
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            mine, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[1:3] if skips else None
            x = block(x, mine, emb, encoder_hidden_states, upsample_size=size)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x

    def __call__(self, sample, timesteps, encoder_hidden_states, *, class_labels=None,
                 added_cond=None, added_cond_kwargs=None):
        """sample [B, H, W, C_in], timesteps [B] or scalar (float), context [B, S, D];
        SDXL: ``added_cond`` (or diffusers' spelling ``added_cond_kwargs``) =
        {'text_embeds': [B, D], 'time_ids': [B, 6]}."""
        enc = self.encode(sample, timesteps, encoder_hidden_states, class_labels=class_labels,
                          added_cond=added_conditioning(added_cond, added_cond_kwargs))
        return self.decode(enc.skips, enc.mid, enc.emb, encoder_hidden_states)
