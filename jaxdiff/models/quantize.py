"""int8 quantisation of a model's linear and 1x1 conv layers, with qwix.

Two modes, as diffusers' memory and speed guides offer them through torchao:
- ``"weight"``: weight-only int8 (per output channel scales); activations stay in the
  model's dtype and each layer dequantises its kernel before the matmul. Memory: the
  quantised kernels take a quarter of their float32 bytes.
- ``"dynamic"``: int8 weights and int8 activations quantised on the fly (per call, per
  token, symmetric absmax), an int8 x int8 matmul accumulated in int32, then rescaled.

Layers are chosen by ``filter_fn(path, layer) -> bool`` (diffusers'
``dynamic_quant_filter_fn``): ``path`` is the layer's "/"-joined NNX path
("down_blocks/1/attentions/0/transformer_blocks/0/attn1/to_q"), ``layer`` a
``jaxdiff.models.layers.Linear`` or ``Conv2d``. The default takes every Linear and 1x1
stride-1 Conv2d whose input and output widths are both at least ``MIN_FEATURES`` (small
layers cost more to quantise than they save). 3x3 convolutions are never quantised (qwix
has no weight-only int8 convolution, and they hold the precision-critical spatial mixing).

Each chosen layer is quantised on its own (``qwix.quantize_model`` of the layer with a
one-row example input; a 1x1 conv first becomes the Linear it is), so every path through the model - ``__call__``, the UNet's
``encode`` / ``decode`` used by encoder propagation, ControlNet residuals - runs the
quantised layers. The result is an ordinary NNX module: ``nnx.split`` / jit / the
pipelines' samplers take it as they take the float one.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.layers import Conv2d, Linear

MODES = ("weight", "dynamic")
MIN_FEATURES = 16
# qwix scales symmetric int8 by absmax / 127.5, so an activation's largest entry lands on
# the tie +-127.5, rounds to +-128 and overflows int8 when quantised inside jit (qwix clips
# weights, not activations): widen the activation range by 128 / 127.5 so it maps to +-127.
ACT_HEADROOM = 1.004
FilterFn = Callable[[str, nnx.Module], bool]


def _widths(layer):
    k = layer.kernel[...]
    return (k.shape[0], k.shape[1]) if isinstance(layer, Linear) else (k.shape[2], k.shape[3])


def is_pointwise(layer) -> bool:
    """A Linear, or a Conv2d that is a matmul over channels (1x1, stride 1, no padding)."""
    if isinstance(layer, Linear):
        return True
    return (isinstance(layer, Conv2d) and tuple(layer.kernel.shape[:2]) == (1, 1)
            and layer.stride == 1 and layer.padding == 0)


def default_filter(path: str, layer) -> bool:
    return is_pointwise(layer) and min(_widths(layer)) >= MIN_FEATURES


def _as_linear(conv: Conv2d) -> Linear:
    """A 1x1 conv as the Linear it is (Linear maps the last axis of NHWC input), so that
    qwix sees its kernel as the matmul's weight parameter."""
    k = conv.kernel[...]
    lin = nnx.eval_shape(lambda: Linear(k.shape[2], k.shape[3], bias=conv.bias is not None,
                                        dtype=k.dtype, rngs=nnx.Rngs(0)))
    lin.kernel = nnx.Param(k[0, 0])
    if conv.bias is not None:
        lin.bias = nnx.Param(conv.bias[...])
    return lin


def _quantised_layer(layer, mode: str):
    import qwix

    if isinstance(layer, Conv2d):
        layer = _as_linear(layer)
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype="int8",
                                 act_qtype="int8" if mode == "dynamic" else None,
                                 act_calibration_method=f"absmax,{ACT_HEADROOM}")
    dtype = layer.kernel.dtype
    width = _widths(layer)[0]
    example = jnp.zeros((1, width), dtype)
    return qwix.quantize_model(layer, qwix.PtqProvider([rule]), example)


def _set(parent, name, value):
    if isinstance(parent, (list, nnx.List)):
        parent[int(name)] = value
    else:
        setattr(parent, str(name), value)


def quantize(module: nnx.Module, mode: str = "dynamic",
             filter_fn: Optional[FilterFn] = None) -> tuple[nnx.Module, list[str]]:
    """-> (a quantised copy of ``module``, the paths of the layers quantised).

    ``module``: any jaxdiff model (UNet, ControlNet, text encoder); the input is not
    modified. ``mode``: "weight" or "dynamic" (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(module, nnx.Module):
        raise ValueError(f"quantize takes a jaxdiff (flax.nnx) module, got "
                         f"{type(module).__name__}")
    try:
        import qwix  # noqa: F401
    except ImportError as e:
        raise ImportError("int8 quantisation uses qwix: pip install 'jaxdiff[int8]' "
                          "(qwix>=0.1.8)") from e
    keep = default_filter if filter_fn is None else filter_fn
    model = nnx.clone(module)
    nodes = dict(nnx.iter_graph(model))
    chosen = []
    for path, node in list(nodes.items()):
        if not isinstance(node, (Linear, Conv2d)) or hasattr(type(node), "_unquantized_type"):
            continue
        name = "/".join(map(str, path))
        if not keep(name, node):
            continue
        if not is_pointwise(node):
            raise ValueError(f"filter_fn chose {name}, a {node.kernel.shape[0]}x"
                             f"{node.kernel.shape[1]} convolution: only Linear and 1x1 "
                             f"Conv2d layers can be quantised")
        new = _quantised_layer(node, mode)
        if not path:            # the module is itself one layer
            return new, [name]
        _set(nodes[path[:-1]], path[-1], new)
        chosen.append(name)
    if not chosen:
        raise ValueError("quantize: filter_fn chose no layer (nothing would change)")
    return model, chosen


def quantised_paths(module: nnx.Module) -> list[str]:
    """The paths of the layers of ``module`` that ``quantize`` replaced."""
    return ["/".join(map(str, p)) for p, n in nnx.iter_graph(module)
            if isinstance(n, Linear) and hasattr(type(n), "_unquantized_type")]


def matching(pattern: str) -> FilterFn:
    """A filter: the default layers whose path matches the regex ``pattern`` (re.search)."""
    rx = re.compile(pattern)
    return lambda path, layer: default_filter(path, layer) and rx.search(path) is not None


__all__ = ["MIN_FEATURES", "MODES", "default_filter", "is_pointwise", "matching", "quantize",
           "quantised_paths"]
