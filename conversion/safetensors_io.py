"""Alias: the safetensors reader/writer lives in the core, ``jaxdiff.safetensors_io``."""

from jaxdiff.safetensors_io import (SafetensorsError, aligned_empty, dtype_of,  # noqa: F401
                                    read_header, read_safetensors, write_safetensors)
