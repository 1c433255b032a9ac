"""jaxdiff: fast diffusion sampling in JAX/Flax."""

from jaxdiff import guidance, models, parallel, schedules, solvers
from jaxdiff.pipeline import StableDiffusionPipeline
from jaxdiff.sampling import paradigms, sample
from jaxdiff.models import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection,
                            UNet2DConditionModel)

__version__ = "0.1.0"

__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection",
           "StableDiffusionPipeline", "UNet2DConditionModel", "guidance", "models", "paradigms",
           "parallel", "sample",
           "schedules", "solvers"]
