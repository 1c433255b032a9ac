"""int8 quantisation (jaxdiff.models.quantize, with qwix): the weight-only numerics against
the exact per-channel formula, which layers are chosen, every UNet path (call, encode /
decode, jit) running the int8 layers, a pipeline on a quantised UNet, and bad input."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

pytest.importorskip("qwix")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # qwix on flax 0.12

import conversion  # noqa: E402
from jaxdiff.models.layers import Conv2d, Linear  # noqa: E402
from jaxdiff.models.quantize import (default_filter, matching, quantize,  # noqa: E402
                                     quantised_paths)
from tiny import UNET_CONFIGS, rel_l2, torch_unet, unet_inputs  # noqa: E402


def _check_int8_kernel(layer, w, x, b):
    """qwix's symmetric absmax int8, per output channel: scale = absmax / 127.5 (the top
    bucket a full one), q = round(w / scale); the absmax entry itself lands on the tie
    +-127.5, which float rounding sends to 127 or 128 (clipped to [-128, 127]). Then the
    layer's output is x @ (q * scale) + b."""
    arr = nnx.state(layer)["kernel"]["array"]
    qv, sc = np.asarray(arr["qvalue"][...]).astype(np.float32), np.asarray(arr["scale"][...])
    s = np.abs(w).max(0, keepdims=True) / 127.5
    np.testing.assert_allclose(sc, s, rtol=1e-6)
    ratio = w / s
    tie = np.abs(ratio) > 127.49
    np.testing.assert_array_equal(qv[~tie], np.round(ratio)[~tie])
    assert np.all(np.isin(np.abs(qv[tie]), (127, 128)))
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))).reshape(len(x), -1),
                               x.reshape(len(x), -1) @ (qv * sc) + b, rtol=1e-5, atol=1e-5)


def _int8_kernel(layer):
    arr = nnx.state(layer)["kernel"]["array"]
    return np.asarray(arr["qvalue"][...]).astype(np.float32), np.asarray(arr["scale"][...])


def test_weight_only_is_the_per_channel_formula():
    lin = Linear(64, 32, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 64)))
    w, b = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    q, paths = quantize(lin, "weight", filter_fn=lambda p, l: True)
    _check_int8_kernel(q, w, x, b)
    assert np.abs(np.asarray(q(jnp.asarray(x))) - (x @ w + b)).max() > 1e-4   # quantised
    # dynamic: each row of x quantised the same way (absmax widened by ACT_HEADROOM, so
    # that its largest entry maps to +-127), an int32-exact matmul, both scales applied
    from jaxdiff.models.quantize import ACT_HEADROOM

    qd, _ = quantize(lin, "dynamic", filter_fn=lambda p, l: True)
    qv, sc = _int8_kernel(qd)
    sx = np.abs(x).max(1, keepdims=True) * np.float32(ACT_HEADROOM) / 127.5
    xq = np.round(x / sx)
    assert np.abs(xq).max() <= 127
    want = (xq @ qv) * sx * sc + b
    np.testing.assert_allclose(np.asarray(qd(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    g, st = nnx.split(qd)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda st, x: nnx.merge(g, st)(x))(st, x)),
                               want, rtol=1e-5, atol=1e-5)
    conv = Conv2d(64, 32, 1, rngs=nnx.Rngs(2))
    qc, _ = quantize(conv, "weight", filter_fn=lambda p, l: True)
    _check_int8_kernel(qc, np.asarray(conv.kernel[...])[0, 0], x.reshape(5, 1, 1, 64),
                       np.asarray(conv.bias[...]))


@pytest.fixture(scope="module")
def unet():
    cfg = UNET_CONFIGS["sd1"]
    m = conversion.convert(torch_unet(cfg))
    x, t, ctx, _ = unet_inputs(cfg, np.random.default_rng(0))
    return m, (jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))


@pytest.mark.parametrize("mode,tol", [("weight", 2e-2), ("dynamic", 5e-2)])
def test_unet_int8_every_path(unet, mode, tol):
    m, args = unet
    want = np.asarray(m(*args))
    q, paths = quantize(m, mode)
    expected = ["/".join(map(str, p)) for p, n in nnx.iter_graph(m)
                if isinstance(n, (Linear, Conv2d)) and default_filter("", n)]
    assert sorted(paths) == sorted(expected) and sorted(quantised_paths(q)) == sorted(paths)
    leaves = jax.tree.leaves(nnx.state(q))
    assert sum(leaf.dtype == jnp.int8 for leaf in leaves) == len(paths)
    assert quantised_paths(m) == []                          # the input is left as it was
    got = np.asarray(q(*args))
    err = rel_l2(got, want)
    print(f"int8 {mode}: UNet output rel L2 {err:.2e} vs float32 ({len(paths)} layers)")
    assert 1e-5 < err < tol
    graphdef, state = nnx.split(q)
    jitted = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    jit_out = np.asarray(jitted(state, *args))
    if mode == "weight":
        np.testing.assert_allclose(jit_out, got, atol=1e-4)
    else:   # XLA's fusions move activations across int8 rounding boundaries: noise-level
        assert rel_l2(jit_out, got) < tol / 2
    skips, mid, emb = q.encode(*args)            # encoder propagation's path
    np.testing.assert_allclose(np.asarray(q.decode(skips, mid, emb, args[2])), got, atol=1e-5)
    nbytes = lambda mod: sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(mod)))  # noqa
    assert nbytes(q) < 0.75 * nbytes(m)


def test_filters_and_bad_input(unet):
    m, args = unet
    q, paths = quantize(m, "weight", filter_fn=matching("attn1"))
    assert paths and all("attn1" in p for p in paths)
    with pytest.raises(ValueError, match="only Linear and 1x1 Conv2d"):
        quantize(m, "weight", filter_fn=lambda p, l: p == "conv_in")
    with pytest.raises(ValueError, match="chose no layer"):
        quantize(m, "weight", filter_fn=lambda p, l: False)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize(m, "int4")
    with pytest.raises(ValueError, match="flax.nnx"):
        quantize({"kernel": 1}, "weight")


def test_pipeline_on_an_int8_unet(tmp_path):
    import dataclasses

    from tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path)
    pipe = conversion.load_pipeline(tmp_path)
    # (guidance 1: a random tiny UNet under CFG 7.5 amplifies any change ~20x over 5 steps)
    kw = dict(prompt=["the cat"], num_inference_steps=5, solver="ddim", output_type="latent",
              seed=2, guidance_scale=1.0)
    want = np.asarray(pipe(**kw))
    q = dataclasses.replace(pipe, unet=quantize(pipe.unet, "dynamic")[0])
    got = np.asarray(q(**kw))
    err = rel_l2(got, want)
    print(f"int8 dynamic pipeline, DDIM-5 latents rel L2 {err:.2e}")
    assert 1e-6 < err < 5e-2
    fast = np.asarray(q(**kw, sampler="faster", sampler_options=dict(key_steps=[0, 2])))
    assert np.all(np.isfinite(fast))
