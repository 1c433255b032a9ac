"""Leaf layers shared by the UNet, VAE and CLIP text encoder.

Parameter names (``kernel``, ``bias``, ``scale``, ``embedding``) are the only
vocabulary the weight converter needs: a PyTorch ``weight`` maps to one of
them, a ``bias`` to ``bias``. Arrays are NHWC; kernels are HWIO (conv) and
(in, out) (dense), the transposes of PyTorch's layouts.

Normalisations always compute their statistics in float32, so that bf16/fp16
weights and activations keep float32-quality group/layer norms.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# 3x3 convs on feature maps of at most this many pixels, with at least this many input
# channels, run as one im2col matmul on CPU. Measured per conv (B=2, XLA:CPU, 2 cores): the
# direct convolution is 1.2-2.8x slower at 640-1280 channels on 4x4-16x16 maps (SD's inner
# levels), equal or faster below 320 channels, and im2col's nine slices cost ~10x the
# direct conv's compile time (0.2 s vs 0.02 s per conv).
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 512


_STATE = threading.local()


@contextlib.contextmanager
def abstract_params():
    """Build modules whose parameters are ``jax.ShapeDtypeStruct`` placeholders.

    Same result as ``nnx.eval_shape`` of the constructor, without tracing any initialiser:
    the converter learns the full SD UNet's parameter tree in milliseconds, then fills it.
    """
    prev = getattr(_STATE, "abstract", False)
    _STATE.abstract = True
    try:
        yield
    finally:
        _STATE.abstract = prev


def _init(shape, dtype, make):
    if getattr(_STATE, "abstract", False):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return make()


def _uniform(rngs: nnx.Rngs, shape, bound: float, dtype) -> jax.Array:
    # PyTorch's default init for Linear/Conv (kaiming_uniform with a=sqrt(5)).
    return _init(shape, dtype, lambda: jax.random.uniform(rngs.params(), shape, dtype,
                                                          -bound, bound))


def _ones(shape, dtype):
    return _init(shape, dtype, lambda: jnp.ones(shape, dtype))


def _zeros(shape, dtype):
    return _init(shape, dtype, lambda: jnp.zeros(shape, dtype))


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(_uniform(rngs, (in_features, out_features), bound, dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_features,), bound, dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        lead = x.shape[:-1]
        y = jnp.dot(x.astype(kernel.dtype).reshape(-1, x.shape[-1]), kernel)
        y = y.reshape(*lead, kernel.shape[1])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Conv2d(nnx.Module):
    """NHWC convolution with PyTorch's symmetric integer padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 stride: int = 1, padding: int = 0, bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        self.kernel = nnx.Param(
            _uniform(rngs, (kernel_size, kernel_size, in_channels, out_channels), bound, dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound, dtype)) if bias else None
        self.stride = stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        kernel = self.kernel[...]
        kh = kernel.shape[0]
        x = x.astype(kernel.dtype)
        if kh == 1 and self.stride == 1 and self.padding == 0:
            y = jnp.dot(x, kernel[0, 0])  # a 1x1 conv is a matmul; XLA:CPU runs it faster
        elif (self.stride == 1 and 2 * self.padding == kh - 1 and x.shape[1] * x.shape[2] <= IM2COL_MAX_PIXELS
              and x.shape[3] >= IM2COL_MIN_CHANNELS and jax.default_backend() == "cpu"):
            y = _im2col_conv(x, kernel, self.padding)
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride, self.stride),
                padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _im2col_conv(x, kernel, pad):
    """'Same' stride-1 conv as one matmul over gathered patches. On XLA:CPU the direct
    convolution is slow at small spatial sizes with many channels (3x slower at 8x8x1280)."""
    b, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                              axis=-1)  # [B, H, W, kh*kw*C], (i, j, c) order = HWIO rows
    return jnp.dot(patches, kernel.reshape(kh * kw * c, -1))


class GroupNorm(nnx.Module):
    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 affine: bool = True, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by "
                             f"num_groups={num_groups}")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(_ones((num_channels,), dtype)) if affine else None
        self.bias = nnx.Param(_zeros((num_channels,), dtype)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, ..., C]
        dtype = x.dtype
        shape = x.shape
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
        # One pass for both moments (XLA fuses the two reductions); float32 accumulation of
        # E[x^2] - E[x]^2 is accurate to ~1e-7 relative for activations of unit scale.
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(xf), axis=(1, 3), keepdims=True) - mean * mean, 0.0)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True, bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(_ones((dim,), dtype)) if affine else None
        self.bias = nnx.Param(_zeros((dim,), dtype)) if affine and bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_init((num_embeddings, dim), dtype, lambda: jax.random.normal(
            rngs.params(), (num_embeddings, dim), dtype)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # PyTorch's F.gelu is exact
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
}


def activation(name: str, field: str = "act_fn"):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {field}={name!r}; jaxdiff supports {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def nearest_upsample(x: jax.Array, size: Sequence[int] | None = None) -> jax.Array:
    """PyTorch ``F.interpolate(mode="nearest")`` on NHWC: src = floor(dst * in / out)."""
    _, h, w, _ = x.shape
    oh, ow = (2 * h, 2 * w) if size is None else tuple(size)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]
