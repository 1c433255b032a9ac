"""Drivers: run a solver's steps with a model function under ``jax.jit``."""

from jaxdiff.sampling.encoder_propagation import (PAPER_KEY_STEPS, PropagationStats,
                                                  encoder_propagation, key_step_schedule)
from jaxdiff.sampling.paradigms import ParadigmsStats, paradigms
from jaxdiff.sampling.sequential import sample

__all__ = ["PAPER_KEY_STEPS", "ParadigmsStats", "PropagationStats", "encoder_propagation", "key_step_schedule",
           "paradigms", "sample"]
