"""LoRA adapters and textual-inversion embeddings at run time: merging parsed factors into
converted UNets and CLIP text encoders, on the host or inside one jitted function.

A LoRA layer stores two factors, ``down`` (A, ``[r, in]`` or a conv's ``[r, in, kh, kw]``)
and ``up`` (B, ``[out, r]`` or ``[out, r, 1, 1]``); merging it adds
``scale * alpha / r * B @ A`` to the layer's weight (rsLoRA: ``alpha / sqrt(r)``). jaxdiff
kernels are stored (in, out) and HWIO, so the product is formed directly in that layout:
``a [kh*kw*in, r] @ b [r, out]`` reshaped to the kernel's shape.

Reading the files people bring (diffusers/PEFT, kohya, A1111; safetensors or torch pickles)
is a foreign format, so it is ``conversion.lora``'s: ``conversion.read_lora`` makes the
``LoraWeights`` value this module merges, and ``conversion.read_textual_inversion`` the
embedding rows. Importing ``conversion`` registers those readers here (``set_readers``), so a
pipeline's ``load_lora_weights(path)`` reads files; a ``LoraWeights`` is taken as it is.
Layers are found under their diffusers module names, their kohya spelling (``_`` for ``.``)
or, for a UNet, the original Stable Diffusion names (``input_blocks_4_1_...``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_READERS: dict = {}


def set_readers(*, lora: Callable, textual_inversion: Callable) -> None:
    """Install the file readers (``conversion`` does on import): ``lora(source) ->
    LoraWeights`` and ``textual_inversion(source, token) -> (token, {encoder: rows})``."""
    _READERS.update(lora=lora, textual_inversion=textual_inversion)


def _reader(kind: str) -> Callable:
    if kind not in _READERS:
        raise ValueError(f"reading a {kind.replace('_', ' ')} file is conversion's job: "
                         f"`import conversion` first (conversion.load_pipeline does), or pass "
                         f"the value conversion.read_{'lora' if kind == 'lora' else kind}() "
                         f"returns")
    return _READERS[kind]


def read(source) -> "LoraWeights":
    """``source`` as ``LoraWeights``: taken as it is, else read by the installed reader."""
    return source if isinstance(source, LoraWeights) else _reader("lora")(source)


def read_embedding(source, token: Optional[str] = None):
    """A textual-inversion source -> (token, {encoder or None: [n, d] rows}); a
    ``(token, tables)`` pair is taken as it is."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], dict):
        return (token or source[0]), source[1]
    return _reader("textual_inversion")(source, token)


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted layer as the file names it."""

    key: str                 # the file's name of its down factor (for messages)
    component: Optional[str]  # "unet" / "text_encoder" / "text_encoder_2"; None: unprefixed
    name: str                # module name: dotted (diffusers) or with "_" (kohya, flat=True)
    flat: bool
    down: np.ndarray         # [r, in] or [r, in, kh, kw]
    up: np.ndarray           # [out, r] or [out, r, 1, 1]
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """A parsed LoRA file: its layers, in file order."""

    layers: tuple
    source: str = "<state dict>"

    def components(self) -> set:
        return {layer.component for layer in self.layers}

    def select(self, component: Optional[str], unprefixed: bool = True) -> list:
        return [layer for layer in self.layers if layer.component == component
                or (unprefixed and layer.component is None)]


# ------------------------------------------------------------------------------ layer names
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
            "conv_out": "out.2"}


def _ldm_name(name: str, cfg) -> Optional[str]:
    """A diffusers UNet module name -> its name in the original Stable Diffusion UNet
    (``input_blocks`` / ``middle_block`` / ``output_blocks``), as kohya's SDXL files use."""
    if name in _TOP_LDM:
        return _TOP_LDM[name]
    n = len(cfg.down_block_types)
    lpb = cfg.layers_per_block
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    parts = name.split(".")

    def resnet(rest):
        head = rest[0]
        return ".".join([_RESNET_LDM[head]] + rest[1:]) if head in _RESNET_LDM else None

    if parts[0] == "down_blocks" and len(parts) >= 4:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        base = 1 + sum(lpb[k] + 1 for k in range(i))
        if kind == "resnets" and rest:
            r = resnet(rest)
            return None if r is None else f"input_blocks.{base + j}.0.{r}"
        if kind == "attentions":
            return ".".join([f"input_blocks.{base + j}.1"] + rest)
        if kind == "downsamplers" and rest == ["conv"]:
            return f"input_blocks.{base + lpb[i]}.0.op"
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets" and rest:
            r = resnet(rest)
            return None if r is None else f"middle_block.{2 * j}.{r}"
        if kind == "attentions":
            return ".".join(["middle_block.1"] + rest)
    if parts[0] == "up_blocks" and len(parts) >= 4:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        up = [v + 1 for v in reversed(lpb)]
        base = sum(up[k] for k in range(i))
        if kind == "resnets" and rest:
            r = resnet(rest)
            return None if r is None else f"output_blocks.{base + j}.0.{r}"
        if kind == "attentions":
            return ".".join([f"output_blocks.{base + j}.1"] + rest)
        if kind == "upsamplers" and rest == ["conv"]:
            has_attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
            return f"output_blocks.{base + up[i] - 1}.{2 if has_attn else 1}.conv"
    return None


_CLIP_PROCESSOR = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}


def _aliases(module, name: str) -> list:
    from jaxdiff.models import CLIPTextModel, UNet2DConditionModel

    out = [name]
    if isinstance(module, UNet2DConditionModel):
        ldm = _ldm_name(name, module.config)
        if ldm is not None:
            out.append(ldm)
    elif isinstance(module, CLIPTextModel):
        head, _, last = name.rpartition(".")
        if last in _CLIP_PROCESSOR:
            out.append(f"{head}.{_CLIP_PROCESSOR[last]}")
        out += ["text_model." + a for a in out]
    return out


def _targets(module):
    """-> (dotted name -> kernel path, flat name -> kernel path or None when ambiguous,
    kernel path -> shape)."""
    dotted, shapes = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(module)):
        if path[-1] != "kernel" or (len(path) > 1 and path[-2] == "to_qkv"):
            continue                 # fused q/k/v is derived from to_q/k/v, never adapted
        shapes[path] = tuple(var.get_value().shape)
        for alias in _aliases(module, ".".join(str(p) for p in path[:-1])):
            dotted.setdefault(alias, path)
    flat: dict = {}
    for alias, path in dotted.items():
        key = alias.replace(".", "_")
        flat[key] = path if flat.get(key, path) == path else None
    return dotted, flat, shapes


def default_component(module) -> str:
    from jaxdiff.models import CLIPTextModel, UNet2DConditionModel

    if isinstance(module, UNet2DConditionModel):
        return "unet"
    if isinstance(module, CLIPTextModel):
        return "text_encoder"
    raise TypeError(f"LoRA merges into a UNet2DConditionModel or a CLIP text encoder, not "
                    f"{type(module).__name__}")


def _factors(layer: LoraLayer, shape: tuple):
    """(a [K, r], b [r, out] with alpha/r folded in) for a kernel of jaxdiff ``shape``, or an
    error string."""
    if len(shape) == 2:
        kh = kw = 1
        cin, cout = shape
    else:
        kh, kw, cin, cout = shape
    r = layer.rank
    down, up = layer.down, layer.up
    din = down.shape[1:] if down.ndim == 4 else (down.shape[1:] + (1, 1) if down.ndim == 2
                                                  else None)
    ok = (din == (cin, kh, kw) and up.ndim in (2, 4) and up.shape[:2] == (cout, r)
          and up.shape[2:] in ((), (1, 1)))
    if not ok:
        want = (cout, cin) if len(shape) == 2 else (cout, cin, kh, kw)
        return (f"{layer.key}: factors down {tuple(down.shape)} x up {tuple(up.shape)} do not "
                f"fit the layer's weight {want} (PyTorch layout)")
    d = down.astype(np.float32).reshape(r, cin, kh, kw)
    a = d.transpose(2, 3, 1, 0).reshape(kh * kw * cin, r)          # HWI order, as the kernel
    b = up.astype(np.float32).reshape(cout, r).T * np.float32(layer.factor)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def resolve(module, lora, component: Optional[str] = None, *, unprefixed: bool = True) -> dict:
    """The layers of ``lora`` selected for ``module`` -> {kernel path: (a, b)} such that the
    kernel's update is ``(a @ b).reshape(kernel.shape)``. Raises listing every selected key
    that matches no layer or does not fit it."""
    lora = read(lora)
    component = component or default_component(module)
    if component not in COMPONENTS:
        raise ValueError(f"prefix must be one of {COMPONENTS}, got {component!r}")
    dotted, flat, shapes = _targets(module)
    out, unmatched, misfit = {}, [], []
    for layer in lora.select(component, unprefixed):
        path = (flat if layer.flat else dotted).get(layer.name)
        if path is None:
            unmatched.append(layer.key)
            continue
        f = _factors(layer, shapes[path])
        if isinstance(f, str):
            misfit.append(f)
        elif path in out:
            raise ValueError(f"{lora.source}: layer {layer.key} adapts "
                             f"{'.'.join(map(str, path[:-1]))} a second time")
        else:
            out[path] = f
    if unmatched or misfit:
        lines = [f"{lora.source}: LoRA weights do not match the {type(module).__name__} "
                 f"({component}):"]
        if unmatched:
            lines.append(f"  {len(unmatched)} keys name no layer of the module:")
            lines += [f"    {k}" for k in sorted(unmatched)]
        if misfit:
            lines.append(f"  {len(misfit)} keys have mis-shaped factors:")
            lines += [f"    {m}" for m in misfit]
        raise ValueError("\n".join(lines))
    return out


# ------------------------------------------------------------------------------ merging
def _qkv_parents(paths, all_paths: set) -> list:
    parents = {p[:-2] for p in paths if len(p) >= 2 and p[-2] in ("to_q", "to_k", "to_v")}
    return sorted((q for q in parents if q + ("to_qkv", "kernel") in all_paths),
                  key=lambda p: tuple(map(str, p)))


def _rebuild(module, new_values: dict):
    """A new module: ``new_values`` (path -> array) replace those leaves; every Variable is
    fresh, so in-place edits of one module never reach the other."""
    graphdef, state = nnx.split(module)
    flat = []
    for path, var in nnx.to_flat_state(state):
        flat.append((path, var.replace(new_values[path] if path in new_values
                                       else var.get_value())))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def merge_resolved(module, resolved: Sequence[dict], scales: Sequence[float]):
    """Host (NumPy) merge of resolved LoRAs with per-adapter ``scales`` -> a new module."""
    leaves = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module))}
    deltas: dict = {}
    for res, s in zip(resolved, scales):
        s = np.float32(s)
        for path, (a, b) in res.items():
            d = a @ (b * s)
            if path in deltas:
                deltas[path] += d
            else:
                deltas[path] = d
    new = {}
    for path, d in deltas.items():
        w = leaves[path]
        host = np.asarray(w)
        d = d.reshape(host.shape)
        d += host                                   # float32 accumulate, then cast back
        new[path] = jax.device_put(d.astype(host.dtype, copy=False),
                                   getattr(w, "sharding", None))
    for parent in _qkv_parents(new, set(leaves)):
        parts = [new.get(parent + (p, "kernel"), leaves[parent + (p, "kernel")])
                 for p in ("to_q", "to_k", "to_v")]
        new[parent + ("to_qkv", "kernel")] = jnp.concatenate(parts, -1)
    return _rebuild(module, new)


def _key(path) -> str:
    return "/".join(str(p) for p in path)


@jax.jit
def _lora_leaves(base: dict, factors: tuple, scales):
    """base {name: kernel}, factors ({name: (a, b)} per adapter), scales [n] (traced) ->
    {name: kernel + sum_j scales[j] * a_j @ b_j}: no recompile when only the scales change."""
    out = {}
    for k, w in base.items():
        acc = w.astype(jnp.float32)
        for j, f in enumerate(factors):
            if k in f:
                a, b = f[k]
                acc = acc + (a @ (b * scales[j])).reshape(w.shape)
        out[k] = acc.astype(w.dtype)
    return out


def device_factors(resolved: dict) -> dict:
    """Resolved factors as device arrays keyed for ``apply_lora``."""
    return {_key(p): (jnp.asarray(a), jnp.asarray(b)) for p, (a, b) in resolved.items()}


def apply_lora(module, factors: Sequence[dict], scales):
    """``module`` with LoRA factors (``device_factors`` of each adapter) merged inside one
    jitted function of the traced ``scales`` [n] -> a new module (the unmerged mode of a
    pipeline: changing the scales does not recompile)."""
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module))}
    by_key = {_key(p): p for p in flat}
    touched = {k for f in factors for k in f}
    out = _lora_leaves({k: flat[by_key[k]] for k in sorted(touched)}, tuple(factors),
                       jnp.asarray(scales, jnp.float32))
    new = {by_key[k]: v for k, v in out.items()}
    for parent in _qkv_parents(new, set(flat)):
        parts = [new.get(parent + (p, "kernel"), flat[parent + (p, "kernel")])
                 for p in ("to_q", "to_k", "to_v")]
        new[parent + ("to_qkv", "kernel")] = jnp.concatenate(parts, -1)
    return _rebuild(module, new)


def add_token_embeddings(text_encoder, ids: Sequence[int], rows: np.ndarray):
    """``text_encoder`` with rows [n, d] at token ids (the table grows as needed) -> a new
    module; its config's vocab_size follows the table."""
    table = text_encoder.embeddings.token_embedding.embedding.get_value()
    vocab, dim = table.shape
    if rows.shape[1] != dim:
        raise ValueError(f"embedding width {rows.shape[1]} does not match the text encoder's "
                         f"hidden size {dim}")
    size = max(vocab, max(ids) + 1)
    if size > vocab:
        table = jnp.concatenate([table, jnp.zeros((size - vocab, dim), table.dtype)], 0)
    table = table.at[jnp.asarray(ids)].set(jnp.asarray(rows, table.dtype))
    path = ("embeddings", "token_embedding", "embedding")
    out = _rebuild(text_encoder, {path: table})
    if size != vocab:
        out.config = dataclasses.replace(out.config, vocab_size=int(size))
    return out


__all__ = ["COMPONENTS", "LoraLayer", "LoraWeights", "add_token_embeddings", "apply_lora",
           "default_component", "device_factors", "merge_resolved", "read", "read_embedding",
           "resolve", "set_readers"]
