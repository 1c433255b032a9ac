"""Flax NNX model definitions whose module trees mirror diffusers / transformers."""

from jaxdiff.models.attention import set_attention
from jaxdiff.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                 CLIPTextOutput)
from jaxdiff.models.controlnet import ControlNetConfig, ControlNetModel
from jaxdiff.models.taesd import AutoencoderTiny, TinyAutoencoderConfig
from jaxdiff.models.unet import Encoded, UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, LatentDistribution, VAEConfig

__all__ = [
    "AutoencoderKL", "AutoencoderTiny", "CLIPTextConfig", "CLIPTextModel",
    "CLIPTextModelWithProjection", "CLIPTextOutput", "ControlNetConfig", "ControlNetModel",
    "Encoded", "LatentDistribution", "TinyAutoencoderConfig", "UNet2DConditionModel",
    "UNetConfig", "VAEConfig", "set_attention",
]
