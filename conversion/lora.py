"""LoRA and textual-inversion files -> the values ``jaxdiff.lora`` merges at run time.

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

import json
import os
import re
import struct
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from jaxdiff import lora as _core
from jaxdiff.lora import (COMPONENTS, LoraLayer, LoraWeights, add_token_embeddings,  # noqa: F401
                          apply_lora, default_component, device_factors, merge_resolved,
                          resolve)
from jaxdiff.safetensors_io import read_safetensors

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
        from conversion.convert import torch_to_numpy
        return torch_to_numpy(v)
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


_core.set_readers(lora=read_lora, textual_inversion=read_textual_inversion)

__all__ = ["COMPONENTS", "LoraLayer", "LoraWeights", "add_token_embeddings", "apply_lora",
           "default_component", "device_factors", "merge_lora", "merge_resolved", "read_lora",
           "read_safetensors_metadata", "read_textual_inversion", "resolve"]
