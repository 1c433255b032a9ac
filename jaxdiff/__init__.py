"""jaxdiff: fast diffusion sampling in JAX/Flax."""

from jaxdiff import models
from jaxdiff.models import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection,
                            UNet2DConditionModel)

__version__ = "0.1.0"

__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection",
           "UNet2DConditionModel", "models"]
