"""PyTorch (diffusers / transformers) weights -> jaxdiff Flax modules; orbax save/load.

Importing this package does not import torch: safetensors are read with NumPy.
"""

from jaxdiff.checkpoint import is_checkpoint, load_model, save_model
from conversion.convert import ConversionError, convert, convert_state_dict, torch_key
from conversion.loaders import (load_component, load_controlnet, load_pipeline,
                                load_text_encoder, load_tiny_vae, load_tokenizer, load_unet,
                                load_vae,
                                read_config, read_weights)
from conversion.lora import (LoraWeights, merge_lora, read_lora, read_safetensors_metadata,
                             read_textual_inversion)
from jaxdiff.safetensors_io import read_safetensors, write_safetensors

__all__ = [
    "ConversionError", "LoraWeights", "convert", "convert_state_dict", "is_checkpoint",
    "load_component", "load_controlnet", "load_model", "load_pipeline", "load_text_encoder",
    "load_tiny_vae", "load_tokenizer", "load_unet", "load_vae", "merge_lora", "read_config",
    "read_lora", "read_safetensors", "read_safetensors_metadata", "read_textual_inversion",
    "read_weights", "save_model", "torch_key", "write_safetensors",
]
