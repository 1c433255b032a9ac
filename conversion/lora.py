"""LoRA adapters and textual-inversion embeddings for converted UNets and CLIP text encoders.

A LoRA layer stores two factors, ``down`` (A, ``[r, in]`` or a conv's ``[r, in, kh, kw]``)
and ``up`` (B, ``[out, r]`` or ``[out, r, 1, 1]``); merging it adds
``scale * alpha / r * B @ A`` to the layer's weight (rsLoRA: ``alpha / sqrt(r)``). jaxdiff
kernels are stored (in, out) and HWIO, so the product is formed directly in that layout:
``a [kh*kw*in, r] @ b [r, out]`` reshaped to the kernel's shape.

Files are read in the layouts people bring:

* diffusers / PEFT (``save_lora_weights``, ``get_peft_model_state_dict``):
  ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` with ``text_encoder.`` and
  ``text_encoder_2.`` prefixes (``base_model.model.`` and a PEFT adapter-name segment are
  accepted); alpha and rsLoRA from the ``lora_adapter_metadata`` entry of the safetensors
  header (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = r (scale 1);
  the older ``<module>.lora.down.weight`` / ``lora_linear_layer`` and attention-processor
  ``to_q_lora.down.weight`` spellings.
* kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha``; ``lora_te_`` (SD), ``lora_te1_`` / ``lora_te2_`` (SDXL); the UNet named after
  diffusers' modules (kohya's SD 1.x files) or after the original Stable Diffusion
  (``input_blocks_4_1_...``, ``middle_block_1_...``, ``output_blocks_...``; kohya's SDXL
  files), mapped by the UNet's config. Linear and conv layers (LoCon, 1x1 and 3x3).

Which keys a module takes (``prefix``): keys under the component's prefix (``unet`` for a
UNet; ``text_encoder`` for a CLIP text encoder unless ``prefix="text_encoder_2"``), plus keys
with no component prefix at all (a bare PEFT state dict of that one model). Keys of the
other components are ignored; a taken key that names no layer of the module, or whose
factors do not fit it, raises a ``ValueError`` listing all of them. DoRA, LoHa, LoKr, Tucker
(``lora_mid``) and full-weight diffs are refused by name rather than dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.safetensors_io import read_safetensors

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
          ("lora_te_", "text_encoder"))
_LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_METADATA_KEY = "lora_adapter_metadata"

# (pattern on the key after its component prefix, role); "m" is the module name
_ROLES = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[\w-]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
# attention processors of old diffusers files: attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"^(?P<m>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora"
                        r"\.(?P<r>down|up)\.weight$")
_UNSUPPORTED = re.compile(r"(dora_scale|lora_magnitude_vector|hada_|lokr_|lora_mid|\.diff$|"
                          r"\.diff_b$|lora_embedding_|\.lora_[AB](?:\.[\w-]+)?\.bias$)")


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


# ------------------------------------------------------------------------------ reading
def read_safetensors_metadata(path) -> dict:
    """The ``__metadata__`` strings of a safetensors header (empty when it has none)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return dict(header.get("__metadata__") or {})


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path} is a PyTorch pickle; reading it needs torch (pip install "
                          "jaxdiff[torch]), or convert it to .safetensors") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def _numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):          # a torch tensor, only when the caller brought one
        from conversion.convert import _torch_to_numpy
        return _torch_to_numpy(v)
    return np.asarray(v)


def _load_tensors(source) -> tuple[dict, dict, str]:
    """-> (name -> array, safetensors metadata, a description for messages)."""
    if isinstance(source, Mapping):
        return {k: _numpy(v) for k, v in source.items()}, {}, "<state dict>"
    path = Path(source)
    if path.is_dir():
        found = [path / n for n in _LORA_FILES if (path / n).exists()]
        if not found:
            cands = sorted(path.glob("*.safetensors"))
            if len(cands) != 1:
                raise FileNotFoundError(f"{path}: no {_LORA_FILES[0]} and not exactly one "
                                        f"*.safetensors file ({[c.name for c in cands]})")
            found = cands
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} not found")
    if path.suffix == ".safetensors":
        return dict(read_safetensors(path)), read_safetensors_metadata(path), str(path)
    sd = _torch_load(path)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: _numpy(v) for k, v in sd.items()}, {}, str(path)


def _split_component(key: str):
    """-> (component or None, rest of the key, flat kohya name?)."""
    key = key.removeprefix("base_model.model.")
    for prefix, component in _KOHYA:
        if key.startswith(prefix):
            return component, key[len(prefix):], True
    first, _, rest = key.partition(".")
    if first in COMPONENTS and rest:
        return first, rest.removeprefix("base_model.model."), False
    return None, key, False


def _role(rest: str, flat: bool):
    """-> (module name, "down" | "up" | "alpha") or None for an unknown key."""
    if flat:
        name, _, suffix = rest.partition(".")
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
                "lora_A.weight": "down", "lora_B.weight": "up"}.get(suffix)
        return None if role is None else (name, role)
    m = _PROCESSOR.match(rest)
    if m:
        proj = "to_out.0" if m["p"] == "to_out" else m["p"]
        return f"{m['m']}.{proj}", m["r"]
    for pattern, role in _ROLES:
        m = pattern.match(rest)
        if m:
            return m["m"], role
    return None


def _peft_config(metadata: dict) -> dict:
    """component (or None) -> the LoraConfig fields diffusers saved for it."""
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return {}
    cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    out: dict = {}
    for k, v in cfg.items():
        head, _, field = k.partition(".")
        if head in COMPONENTS and field:
            out.setdefault(head, {})[field] = v
        else:
            out.setdefault(None, {})[k] = v
    return out


def _pattern_value(patterns: dict, name: str):
    for pattern, value in (patterns or {}).items():
        if name == pattern or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
            return value
    return None


def read_lora(source) -> LoraWeights:
    """A LoRA file / folder / state dict (NumPy or torch arrays) -> ``LoraWeights``."""
    if isinstance(source, LoraWeights):
        return source
    tensors, metadata, where = _load_tensors(source)
    configs = _peft_config(metadata)
    groups: dict = {}
    unknown, unsupported = [], []
    for key, value in tensors.items():
        if _UNSUPPORTED.search(key):
            unsupported.append(key)
            continue
        component, rest, flat = _split_component(key)
        parsed = _role(rest, flat)
        if parsed is None:
            unknown.append(key)
            continue
        name, role = parsed
        slot = groups.setdefault((component, name, flat), {})
        if role in slot:
            raise ValueError(f"{where}: two {role} tensors for layer {name!r} "
                             f"({slot[role + '_key']!r} and {key!r})")
        slot[role], slot[role + "_key"] = value, key
    if unsupported:
        raise ValueError(f"{where}: LoRA variants jaxdiff does not merge (DoRA, LoHa, LoKr, "
                         f"Tucker, full diffs, LoRA biases); {len(unsupported)} keys:\n  "
                         + "\n  ".join(sorted(unsupported)))
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} keys are not LoRA weights in a known "
                         "layout:\n  " + "\n  ".join(sorted(unknown)))
    layers, incomplete = [], []
    for (component, name, flat), slot in groups.items():
        if "down" not in slot or "up" not in slot:
            incomplete.append(f"{name} ({component or 'no prefix'}): has "
                              f"{sorted(k for k in slot if not k.endswith('_key'))}")
            continue
        down, up = np.asarray(slot["down"]), np.asarray(slot["up"])
        cfg = configs.get(component, configs.get(None, {}))
        if cfg.get("use_dora"):
            raise ValueError(f"{where}: a DoRA adapter (use_dora) for {component}; jaxdiff "
                             "merges plain LoRA only")
        if "alpha" in slot:
            a = np.asarray(slot["alpha"], np.float64).reshape(-1)
            if a.size != 1:
                raise ValueError(f"{where}: {slot['alpha_key']} holds {a.size} values, not one")
            alpha = float(a[0])
        else:
            alpha = _pattern_value(cfg.get("alpha_pattern"), name)
            alpha = cfg.get("lora_alpha") if alpha is None else alpha
            alpha = float(down.shape[0] if alpha is None else alpha)
        layers.append(LoraLayer(slot["down_key"], component, name, flat, down, up, alpha,
                                bool(cfg.get("use_rslora", False))))
    if incomplete:
        raise ValueError(f"{where}: {len(incomplete)} LoRA layers lack a factor:\n  "
                         + "\n  ".join(incomplete))
    if not layers:
        raise ValueError(f"{where}: no LoRA layers found")
    return LoraWeights(tuple(layers), where)


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
    lora = read_lora(lora)
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


def _as_list(source, scale):
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(sources)
    if len(scales) != len(sources):
        raise ValueError(f"{len(sources)} LoRAs but {len(scales)} scales")
    return sources, [float(s) for s in scales]


def merge_lora(module, path_or_state, scale=1.0, *, prefix: Optional[str] = None):
    """``module`` (a converted UNet or CLIP text encoder) with LoRA merged into its weights:
    ``W + scale * alpha / r * B @ A`` per adapted layer -> a new module (the input is left
    as it was).

    ``path_or_state``: a LoRA file (.safetensors; .bin/.pt through torch), a folder holding
    ``pytorch_lora_weights.safetensors``, a state dict, a ``LoraWeights`` - or a list of
    them, with ``scale`` a list of per-adapter scales. ``prefix``: the component whose keys
    are taken ("unet", "text_encoder", "text_encoder_2"; default "unet" for a UNet and
    "text_encoder" for a CLIP text encoder; keys without a component prefix are always
    taken); keys of other components are ignored. Raises ``ValueError`` listing every taken
    key that names no layer or does not fit it, and when nothing is taken at all."""
    sources, scales = _as_list(path_or_state, scale)
    component = prefix or default_component(module)
    resolved = []
    for src in sources:
        lora = read_lora(src)
        res = resolve(module, lora, component)
        if not res:
            have = sorted(c or "no prefix" for c in lora.components())
            raise ValueError(f"{lora.source} has no LoRA weights for {component!r} (it has "
                             f"weights for {have}); pass prefix= to choose another component")
        resolved.append(res)
    return merge_resolved(module, resolved, scales)


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


# ------------------------------------------------------------------------------ textual inversion
_SDXL_TI = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def read_textual_inversion(source, token: Optional[str] = None):
    """A textual-inversion embedding -> (token or None, {encoder or None: [n, d] float32}).

    diffusers ``learned_embeds.safetensors`` / ``.bin`` ({token: [d] or [n, d]}), A1111 files
    (``.pt`` with ``string_to_param`` {'*': [n, d]} and ``name``; ``.safetensors`` with
    ``emb_params``, named by the file), SDXL files (``clip_l`` -> text_encoder, ``clip_g`` ->
    text_encoder_2), a state dict of those, or one array (then ``token`` is required).
    The encoder key None means "the pipeline's first text encoder". ``token`` overrides the
    file's own name."""
    stem = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            found = [path / n for n in ("learned_embeds.safetensors", "learned_embeds.bin")
                     if (path / n).exists()]
            if not found:
                raise FileNotFoundError(f"{path}: no learned_embeds.safetensors / .bin")
            path = found[0]
        if not path.exists():
            raise FileNotFoundError(f"textual inversion file {path} not found")
        stem = path.stem
        sd = dict(read_safetensors(path)) if path.suffix == ".safetensors" else _torch_load(path)
    elif isinstance(source, Mapping):
        sd = dict(source)
    else:
        if token is None:
            raise ValueError("an embedding given as an array needs token=")
        return token, {None: _rows(source)}
    if not isinstance(sd, Mapping):          # a bare tensor saved with torch.save
        if token is None:
            raise ValueError("this file holds a bare tensor: pass token=")
        return token, {None: _rows(sd)}
    if "string_to_param" in sd:                              # A1111 .pt
        params = sd["string_to_param"]
        if "*" not in params:
            raise ValueError(f"A1111 embedding without a '*' entry in string_to_param: "
                             f"{sorted(params)}")
        return token or sd.get("name") or stem, {None: _rows(params["*"])}
    if set(sd) & set(_SDXL_TI):
        extra = sorted(set(sd) - set(_SDXL_TI))
        if extra:
            raise ValueError(f"SDXL embedding with unexpected entries {extra}")
        return token or stem, {_SDXL_TI[k]: _rows(v) for k, v in sd.items()}
    if "emb_params" in sd and len(sd) == 1:                  # A1111 .safetensors
        return token or stem, {None: _rows(sd["emb_params"])}
    if len(sd) == 1:                                         # diffusers {token: vector}
        name, vec = next(iter(sd.items()))
        return token or name, {None: _rows(vec)}
    raise ValueError(f"not a textual inversion embedding (expected one {{token: vector}} entry, "
                     f"A1111's string_to_param / emb_params, or SDXL's clip_l / clip_g); keys: "
                     f"{sorted(sd)[:10]}")


def _rows(v) -> np.ndarray:
    a = _numpy(v).astype(np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"a textual inversion embedding must be [d] or [n, d], got shape "
                         f"{a.shape}")
    return a


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
           "default_component", "device_factors", "merge_lora", "merge_resolved", "read_lora",
           "read_safetensors_metadata", "read_textual_inversion", "resolve"]
