"""Alias: checkpoints of converted models live in the core, ``jaxdiff.checkpoint``."""

from jaxdiff.checkpoint import FORMATS, is_checkpoint, load_model, save_model  # noqa: F401
