"""The model classes a checkpoint or a diffusers folder can name, by their diffusers /
transformers class name, and the module structure without weights."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.models.controlnet import ControlNetConfig, ControlNetModel
from jaxdiff.models.layers import abstract_params
from jaxdiff.models.taesd import AutoencoderTiny, TinyAutoencoderConfig
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig

# class name -> (module class, config class)
MODELS = {
    "UNet2DConditionModel": (UNet2DConditionModel, UNetConfig),
    "AutoencoderKL": (AutoencoderKL, VAEConfig),
    "AutoencoderTiny": (AutoencoderTiny, TinyAutoencoderConfig),
    "ControlNetModel": (ControlNetModel, ControlNetConfig),
    "CLIPTextModel": (CLIPTextModel, CLIPTextConfig),
    "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig),
}


def model_classes(name: str):
    """(module class, config class) for a class name; ``ValueError`` naming the known ones."""
    if name not in MODELS:
        raise ValueError(f"jaxdiff has no model class {name!r}; supported: {sorted(MODELS)}")
    return MODELS[name]


def class_name(model) -> str:
    name = type(model).__name__
    if name not in MODELS:
        raise ValueError(f"{name} is not one of jaxdiff's model classes {sorted(MODELS)}")
    return name


def abstract_model(model_cls, config, dtype=jnp.float32):
    """The model's structure with ShapeDtypeStructs for leaves: no weights materialised."""
    with abstract_params():
        return model_cls(config, dtype=dtype, rngs=nnx.Rngs(0))
