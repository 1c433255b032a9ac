"""Attention and transformer blocks (diffusers ``Attention``, ``BasicTransformerBlock``,
``Transformer2DModel``), with a selectable attention kernel.

Kernels (``Attention.impl``):
  None        automatic: on CPU, "chunked" for long sequences, head-major einsums for
              short ones with heads of 32+ channels, XLA's for narrower heads; elsewhere jax.nn.dot_product_attention's own choice (cuDNN on GPU
              when it can, XLA otherwise)
  "xla"       plain XLA softmax(QK^T)V
  "cudnn"     cuDNN flash attention (GPU only)
  "chunked"   queries processed in chunks under lax.map: memory O(chunk x L_k) instead of
              O(L_q x L_k), for long sequences (large latents)
The kernel is a static attribute, so switching it recompiles; `set_attention` sets it on
every attention layer of a model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.layers import GroupNorm, LayerNorm, Linear, Conv2d

IMPLEMENTATIONS = (None, "xla", "cudnn", "chunked")


def dot_product_attention(q, k, v, *, heads: int, mask=None, is_causal: bool = False,
                          upcast: bool = False, impl=None, chunk_size: int = 256):
    """q [B, Lq, H*D], k/v [B, Lk, H*D] -> [B, Lq, H*D]; mask broadcastable to [B, H, Lq, Lk]."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLEMENTATIONS}")
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    q = q.reshape(b, lq, heads, d)
    k = k.reshape(b, lk, heads, d)
    v = v.reshape(b, lk, heads, d)
    scale = 1.0 / math.sqrt(d)
    if impl is None and jax.default_backend() == "cpu":
        # XLA:CPU materialises [B, H, Lq, Lk] logits and streams them through memory
        # several times; per-head query chunks keep them in cache (5x faster at 4096^2).
        # Short problems run best as two head-major einsums when the heads are wide (SD's
        # 40-160), but with narrow heads (tiny test models, head dim <= 16) those einsums
        # are 2-6x slower than XLA's own attention (benchmarks/window_cost.py).
        if lq * lk >= 1 << 19 and lq > chunk_size:
            out = _chunked_attention(q, k, v, scale, mask, is_causal, chunk_size)
        elif d < 32 and q.dtype != jnp.float16:   # (XLA:CPU has no f16 x f16 -> f32 dot)
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask,
                                               is_causal=is_causal, implementation="xla")
        else:
            out = _einsum_attention(q, k, v, scale, mask, is_causal)
    elif impl == "chunked" and lq > chunk_size:
        out = _chunked_attention(q, k, v, scale, mask, is_causal, chunk_size)
    else:
        xla_impl = "xla" if impl == "chunked" else impl
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal,
                                           implementation=xla_impl)
    return out.reshape(b, lq, inner).astype(dtype)


def _einsum_attention(q, k, v, scale, mask, is_causal):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    if is_causal:
        lq, lk = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((lq, lk), bool)), logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _chunked_attention(q, k, v, scale, mask, is_causal, chunk):
    """Exact softmax attention, one head and `chunk` queries at a time (lax.map loops)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    n = -(-lq // chunk)
    pad = n * chunk - lq
    qh = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    qh = qh.reshape(b * h, n, chunk, d)
    kh = k.transpose(0, 2, 1, 3).reshape(b * h, lk, d)
    vh = v.transpose(0, 2, 1, 3).reshape(b * h, lk, d)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, lq, lk))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        mask = mask.reshape(b * h, n, chunk, lk)
    rows = jnp.arange(n * chunk).reshape(n, chunk)
    cols = jnp.arange(lk)

    def head(args):
        qq, kk, vv, mm = args

        def block(args):
            qc, rc, mc = args
            logits = jnp.dot(qc, kk.T, preferred_element_type=jnp.float32) * scale
            if mc is not None:
                logits = jnp.where(mc, logits, -jnp.inf)
            if is_causal:
                logits = jnp.where(rc[:, None] >= cols[None], logits, -jnp.inf)
            p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
            out = jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
            return (out / jnp.sum(p, axis=-1, keepdims=True)).astype(vv.dtype)

        return jax.lax.map(block, (qq, rows, mm))

    out = jax.lax.map(head, (qh, kh, vh, mask))  # [B*H, n, chunk, D]
    out = out.reshape(b, h, n * chunk, d)[:, :, :lq]
    return out.transpose(0, 2, 1, 3)


class Dropout(nnx.Module):
    """Placeholder that keeps diffusers' list indices (``to_out.0``, ``ff.net.2``); inference only."""

    def __call__(self, x):
        return x


class Attention(nnx.Module):
    """diffusers ``Attention``: self- or cross-attention over [B, L, C] tokens.

    With ``norm_num_groups`` it is the VAE's spatial self-attention: group norm in front,
    [B, H, W, C] in and out, and a residual connection.
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int,
                 cross_attention_dim: int | None = None, bias: bool = False,
                 out_bias: bool = True, upcast_attention: bool = False,
                 norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.upcast = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.impl = None
        self.group_norm = (GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype)
                           if norm_num_groups is not None else None)
        self.to_q = Linear(query_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = Linear(kv_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = Linear(kv_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(inner, query_dim, bias=out_bias, dtype=dtype, rngs=rngs),
                                Dropout()])
        self.fused_qkv = False

    def fuse_qkv(self):
        """Concatenate the q/k/v projections into one matmul (self-attention only)."""
        if self.fused_qkv:
            return
        if self.to_q.kernel.shape[0] != self.to_k.kernel.shape[0]:
            return  # cross-attention: keys come from another input
        kernel = jnp.concatenate([m.kernel[...] for m in (self.to_q, self.to_k, self.to_v)], -1)
        self.to_qkv = Linear(kernel.shape[0], kernel.shape[1], bias=self.to_q.bias is not None,
                             dtype=kernel.dtype, rngs=nnx.Rngs(0))
        self.to_qkv.kernel[...] = kernel
        if self.to_q.bias is not None:
            self.to_qkv.bias[...] = jnp.concatenate(
                [m.bias[...] for m in (self.to_q, self.to_k, self.to_v)], -1)
        self.fused_qkv = True

    def __call__(self, x, context=None, mask=None, is_causal=False):
        residual = x
        spatial = x.ndim == 4
        if self.group_norm is not None:
            x = self.group_norm(x)
        if spatial:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        if self.fused_qkv and context is None:
            q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
        else:
            ctx = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        out = dot_product_attention(q, k, v, heads=self.heads, mask=mask, is_causal=is_causal,
                                    upcast=self.upcast, impl=self.impl)
        out = self.to_out[0](out)
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, dim_out * 2, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, rngs=rngs), Dropout(),
                             Linear(inner, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None,
                 only_cross_attention: bool = False, upcast_attention: bool = False,
                 norm_eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs):
        self.only_cross_attention = only_cross_attention
        common = dict(heads=heads, dim_head=dim_head, upcast_attention=upcast_attention,
                      dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention
                               else None, **common)
        if cross_attention_dim is not None:
            self.norm2 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **common)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, context):  # x [B, L, C], context [B, S, D]
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """Spatial transformer: group norm, projection in, transformer blocks, projection out, residual."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int = 1,
                 cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner, dtype=dtype, rngs=rngs)
            self.proj_out = Linear(inner, in_channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1, dtype=dtype, rngs=rngs)
            self.proj_out = Conv2d(inner, in_channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention,
                                  upcast_attention=upcast_attention, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])

    def __call__(self, x, context):  # x [B, H, W, C]
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)
        # Both projections are per-pixel, so the linear and the 1x1-conv variants agree on
        # [B, H*W, C] tokens; only the parameter layout differs.
        x = x.reshape(b, h * w, c)
        x = self.proj_in(x) if self.use_linear_projection else self.proj_in(x[:, None])[:, 0]
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x) if self.use_linear_projection else self.proj_out(x[:, None])[:, 0]
        return x.reshape(b, h, w, c) + residual


def set_attention(model: nnx.Module, impl=None, *, fuse_qkv: bool | None = None) -> nnx.Module:
    """Select the attention kernel (and optionally fused QKV) for every attention layer, in place."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLEMENTATIONS}")
    for _, m in model.iter_modules():
        if isinstance(m, Attention):
            m.impl = impl
            if fuse_qkv:
                m.fuse_qkv()
    return model
