"""Load diffusers-format folders (model_index.json + component subfolders) into jaxdiff.

Weights are read from ``*.safetensors`` (single, sharded via ``*.safetensors.index.json``,
or a variant such as ``fp16``) with NumPy; ``.bin`` pickles go through torch only when no
safetensors file is present and torch is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import is_checkpoint, load_model
from conversion.convert import FAMILIES, convert_state_dict, family_of
from jaxdiff.safetensors_io import read_safetensors
from jaxdiff.pipeline import StableDiffusionPipeline, StableDiffusionXLPipeline

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def _variant_name(stem: str, variant: str | None, ext: str) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


def read_weights(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of one component folder, as NumPy arrays keyed by PyTorch names."""
    folder = Path(folder)
    for stem in _WEIGHT_STEMS:
        single = folder / _variant_name(stem, variant, "safetensors")
        if single.exists():
            return read_safetensors(single)
        index = folder / _variant_name(stem, variant, "safetensors.index.json")
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            out = {}
            for shard in sorted(set(weight_map.values())):
                tensors = read_safetensors(folder / shard)
                out.update(tensors)
            absent = sorted(set(weight_map) - set(out))
            if absent:
                raise FileNotFoundError(f"{index}: shards lack {len(absent)} tensors, "
                                        f"e.g. {absent[:5]}")
            return out
    for stem in ("diffusion_pytorch_model", "pytorch_model"):
        pickle = folder / _variant_name(stem, variant, "bin")
        if pickle.exists():
            return _read_pickle(pickle)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"no weights in {folder} (variant={variant!r}); looked for "
        f"{[_variant_name(s, variant, 'safetensors') for s in _WEIGHT_STEMS]} and sharded "
        f"indexes; the folder holds {found}")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path} is a PyTorch pickle; install jaxdiff[torch] to read it, or "
                          "convert it to safetensors") from e
    from conversion.convert import torch_to_numpy

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: torch_to_numpy(v) for k, v in sd.items()}


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a diffusers/transformers model folder")
    return json.loads(path.read_text())


def _family_for(folder: Path, cfg: dict, class_name: str | None):
    if class_name is None:
        class_name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if class_name is None:
        raise ValueError(f"{folder}/config.json names no model class (_class_name/architectures)")
    return family_of(class_name)


def load_component(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None,
                   class_name: str | None = None):
    """One model folder (config.json + weights, or a jaxdiff orbax checkpoint) -> module."""

    folder = Path(folder)
    if is_checkpoint(folder):  # fast path: already converted, no re-conversion
        model = load_model(folder)
        if class_name is not None and type(model).__name__ != class_name:
            raise ValueError(f"{folder} holds a {type(model).__name__}, expected {class_name}")
        return _cast(model, dtype)
    cfg = read_config(folder)
    family = _family_for(folder, cfg, class_name)
    config = family.config_cls.from_dict(cfg)
    return convert_state_dict(family, config, read_weights(folder, variant), dtype)


def _cast(model, dtype):
    """Cast a model's parameters to dtype (a no-op when they already are)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    if all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(state)):
        return model
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(dtype), state))


def load_unet(folder, dtype=jnp.float32, *, variant=None):
    return load_component(folder, dtype, variant=variant, class_name="UNet2DConditionModel")


def load_vae(folder, dtype=jnp.float32, *, variant=None):
    return load_component(folder, dtype, variant=variant, class_name="AutoencoderKL")


def load_tiny_vae(folder, dtype=jnp.float32, *, variant=None):
    """A diffusers ``AutoencoderTiny`` (TAESD) folder -> ``jaxdiff.models.AutoencoderTiny``;
    a pipeline takes it as its VAE (``pipe.vae = ...``)."""
    return load_component(folder, dtype, variant=variant, class_name="AutoencoderTiny")


def load_controlnet(folder, dtype=jnp.float32, *, variant=None):
    """A diffusers ``ControlNetModel`` folder -> ``jaxdiff.models.ControlNetModel``."""
    return load_component(folder, dtype, variant=variant, class_name="ControlNetModel")


def load_text_encoder(folder, dtype=jnp.float32, *, variant=None):
    return load_component(folder, dtype, variant=variant)


def load_tokenizer(folder):
    from transformers import CLIPTokenizer  # tokenizer only; transformers 5 has no Flax models

    return CLIPTokenizer.from_pretrained(str(folder))


def load_pipeline(path: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None):
    """A diffusers-format Stable Diffusion folder -> ``jaxdiff.StableDiffusionPipeline``, or
    ``StableDiffusionXLPipeline`` for an SDXL base or refiner folder."""

    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: not a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    parts = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        _, cls = spec[0], spec[1]
        sub = path / name
        if cls in FAMILIES:
            parts[name] = load_component(sub, dtype, variant=variant, class_name=cls)
        elif name.startswith("tokenizer"):
            parts[name] = load_tokenizer(sub)
        elif name == "scheduler":
            sched = sub / "scheduler_config.json"
            parts[name] = json.loads(sched.read_text()) if sched.exists() else None
        # safety_checker / feature_extractor / image_encoder are not part of sampling.
    xl = "XL" in str(index.get("_class_name", "")) or (
        "unet" in parts and parts["unet"].config.addition_embed_type == "text_time")
    if xl:
        for required in ("unet", "vae", "text_encoder_2", "tokenizer_2"):
            if required not in parts:
                raise ValueError(f"{index_path}: an SDXL folder needs {required!r} (the "
                                 f"second text encoder and its tokenizer); it has none")
        vae = parts["vae"]
        if vae.config.force_upcast and jnp.dtype(dtype) == jnp.float16:
            parts["vae"] = _cast(vae, jnp.float32)   # as diffusers: SDXL's VAE overflows in fp16
        flags = {k: bool(index[k]) for k in ("force_zeros_for_empty_prompt",
                                             "requires_aesthetics_score") if k in index}
        comps = {k: parts.get(k) for k in StableDiffusionXLPipeline.COMPONENTS}
        return StableDiffusionXLPipeline(**comps, **flags)
    for required in ("unet", "vae", "text_encoder"):
        if required not in parts:
            raise ValueError(f"{index_path}: no loadable {required!r} component")
    return StableDiffusionPipeline(**{k: v for k, v in parts.items()
                                      if k in StableDiffusionPipeline.COMPONENTS})
