"""Every attention kernel computes the same exact softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.attention import dot_product_attention
from tiny import rel_l2


def _reference(q, k, v, heads, mask=None, causal=False):
    b, lq, c = q.shape
    d = c // heads
    qh = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    kh = k.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    vh = v.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, lq, c)


@pytest.mark.parametrize("impl", [None, "xla", "chunked"])
@pytest.mark.parametrize("lq,lk,masked,causal", [
    (300, 300, False, False), (300, 300, True, False), (300, 300, False, True),
    (1100, 1000, False, False), (1100, 1000, True, False), (1100, 1100, False, True),
    (64, 7, False, False), (64, 7, True, False)])
def test_attention_kernels(impl, lq, lk, masked, causal, rng):
    heads = 2
    q = rng.standard_normal((2, lq, 16)).astype(np.float32)
    k = rng.standard_normal((2, lk, 16)).astype(np.float32)
    v = rng.standard_normal((2, lk, 16)).astype(np.float32)
    mask = None
    if masked:
        mask = rng.uniform(size=(2, 1, 1, lk)) > 0.3
        mask[..., 0] = True
    out = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, heads=heads, mask=mask, is_causal=causal, impl=impl, chunk_size=128))(q, k, v)
    assert rel_l2(out, _reference(q, k, v, heads, mask, causal)) < 1e-5


def test_unknown_implementation():
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dot_product_attention(x, x, x, heads=2, impl="flash")
