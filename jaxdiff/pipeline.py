"""Text-to-image pipeline: tokenizer -> text encoder -> sampler -> VAE."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional


@dataclasses.dataclass
class StableDiffusionPipeline:
    """The components of a Stable Diffusion model, as loaded by ``conversion.load_pipeline``."""

    COMPONENTS: ClassVar[tuple] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                   "text_encoder_2", "tokenizer_2")
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any = None
    scheduler: Optional[dict] = None   # the diffusers scheduler config dict
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor
