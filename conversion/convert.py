"""PyTorch state dicts -> jaxdiff NNX modules, by one rule table.

An NNX parameter path such as ``('down_blocks', 1, 'attentions', 0, ..., 'to_q', 'kernel')``
names its PyTorch key by joining the path with dots and renaming the leaf
(kernel/scale/embedding -> weight). Values change layout only: conv kernels OIHW -> HWIO,
linear weights (out, in) -> (in, out). The expected key set comes from ``nnx.eval_shape``
(no weights are initialised); any missing, unexpected or mis-shaped key raises one
``ConversionError`` listing all of them.
"""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.clip import CLIPTextConfig
from jaxdiff.models.registry import MODELS, abstract_model as _abstract
from jaxdiff.safetensors_io import aligned_empty as _aligned_empty

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
    """Raised when a state dict does not match the model: lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_cls: type
    config_cls: type
    normalise: Callable[[dict], dict]


def _normalise_unet(sd: dict) -> dict:
    return sd


_VAE_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_OLD_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _normalise_vae(sd: dict) -> dict:
    """Old diffusers VAE files name the mid-block attention query/key/value/proj_attn, some
    with 1x1-conv shaped weights; map them to the current Linear layout."""
    out = {}
    for k, v in sd.items():
        m = _VAE_OLD_RE.match(k)
        if m:
            k = f"{m.group(1)}.{_VAE_OLD_ATTN[m.group(2)]}.{m.group(3)}"
        if re.search(r"\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", k) and v.ndim == 4 \
                and v.shape[2:] == (1, 1):
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def _normalise_clip(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        if k == "embeddings.position_ids":  # a buffer some checkpoints persisted; not a weight
            continue
        out[k] = v
    return out


_NORMALISE = {"AutoencoderKL": _normalise_vae, "CLIPTextModel": _normalise_clip,
              "CLIPTextModelWithProjection": _normalise_clip}
FAMILIES = {name: Family(name, model_cls, config_cls, _NORMALISE.get(name, _normalise_unet))
            for name, (model_cls, config_cls) in MODELS.items()}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"jaxdiff cannot convert {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def torch_key(path: tuple) -> str:
    *modules, leaf = path
    return ".".join(str(p) for p in modules) + "." + _LEAF_TO_TORCH[leaf]


def _torch_shape(shape: tuple, leaf: str) -> tuple:
    if leaf == "kernel" and len(shape) == 4:   # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:   # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def _transpose_2d(src: np.ndarray, dst: np.ndarray, block: int = 128) -> None:
    """dst = src.T in cache-sized tiles (NumPy's strided copy of a whole transpose is ~4x
    slower on large weights)."""
    rows, cols = src.shape
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            dst[j:j + block, i:i + block] = src[i:i + block, j:j + block].T


def _to_jax_layout(a: np.ndarray, leaf: str, dtype) -> np.ndarray:
    """PyTorch layout -> jaxdiff layout, cast to dtype, in a fresh aligned buffer."""
    a = np.asarray(a)
    if leaf == "kernel" and a.ndim == 4:
        o, i, kh, kw = a.shape
        out = _aligned_empty((kh, kw, i, o), dtype)
        if kh * kw == 1:
            _transpose_2d(a.reshape(o, i), out.reshape(i, o))
        else:
            # OIHW -> (I*H*W, O) by a tiled 2-D transpose, then HW to the front by rows of O.
            tmp = np.empty((i * kh * kw, o), dtype)
            _transpose_2d(a.reshape(o, -1), tmp)
            np.copyto(out, tmp.reshape(i, kh, kw, o).transpose(1, 2, 0, 3))
        return out
    if leaf == "kernel" and a.ndim == 2:
        out = _aligned_empty(a.shape[::-1], dtype)
        _transpose_2d(a, out)
        return out
    out = _aligned_empty(a.shape, dtype)
    np.copyto(out, a, casting="unsafe")
    return out


def abstract_model(family: Family, config, dtype=jnp.float32):
    """The model's structure with ShapeDtypeStructs for leaves: no weights materialised."""
    return _abstract(family.model_cls, config, dtype)


def convert_state_dict(family: Family | str, config, state_dict: Mapping[str, Any],
                       dtype=jnp.float32, *, threads: int = 2):
    """A PyTorch-layout state dict (NumPy arrays or anything np.asarray takes) -> NNX module."""
    if isinstance(family, str):
        family = family_of(family)
    if isinstance(config, Mapping):
        config = family.config_cls.from_dict(config)
    graphdef, abs_state = nnx.split(abstract_model(family, config, dtype))
    flat = list(nnx.to_flat_state(abs_state))
    sd = family.normalise(dict(state_dict))

    expected = {torch_key(path): (path, var) for path, var in flat}
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    misshaped = []
    for k, (path, var) in expected.items():
        if k in sd:
            want = _torch_shape(var.get_value().shape, path[-1])
            got = tuple(np.shape(sd[k]))
            if got != want:
                misshaped.append(f"{k}: expected {want}, got {got}")
    if missing or unexpected or misshaped:
        lines = [f"state dict does not match {family.name}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {x}" for x in items)
        raise ConversionError("\n".join(lines))

    np_dtype = np.dtype(dtype)

    def one(item):
        path, var = item
        arr = _to_jax_layout(sd[torch_key(path)], path[-1], np_dtype)
        return jax.device_put(arr)

    with ThreadPoolExecutor(threads) as pool:
        values = list(pool.map(one, flat))
    for (path, var), value in zip(flat, values):
        var.set_value(value)
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def torch_to_numpy(t) -> np.ndarray:
    import torch  # only reached when converting live torch modules

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def convert(torch_module, dtype=jnp.float32):
    """diffusers UNet2DConditionModel / AutoencoderKL or transformers CLIPTextModel(WithProjection)
    -> the equivalent jaxdiff module with the same weights."""
    family = family_of(type(torch_module).__name__)
    cfg = torch_module.config
    cfg = dict(cfg) if family.config_cls is not CLIPTextConfig else cfg.to_dict()
    config = family.config_cls.from_dict(cfg)
    sd = {k: torch_to_numpy(v) for k, v in torch_module.state_dict().items()}
    return convert_state_dict(family, config, sd, dtype)
