"""Drivers: run a solver's steps with a model function under ``jax.jit``.

``run(sampler, model_fn, solver, x_T, key=..., noise=..., progress=...)`` with a sampler
value (``Sequential()``, ``Picard(...)``, ``EncoderPropagation(...)``); ``sample`` and
``paradigms`` are the sequential and Picard drivers themselves.
"""

from jaxdiff.sampling.encoder_propagation import (PAPER_KEY_STEPS, PropagationStats,
                                                  encoder_propagation, key_step_schedule)
from jaxdiff.sampling.picard import METHODS, NonFiniteError, ParadigmsStats, paradigms
from jaxdiff.sampling.picard_methods import ParaSolver, ParaTAA, Paradigms, PicardMethod
from jaxdiff.sampling.run import (EncoderPropagation, Picard, Sequential, SequentialStats,
                                  as_sampler, run)
from jaxdiff.sampling.sequential import sample

__all__ = ["EncoderPropagation", "METHODS", "NonFiniteError", "PAPER_KEY_STEPS", "ParaSolver",
           "ParaTAA", "Paradigms", "ParadigmsStats", "Picard", "PicardMethod", "PropagationStats", "Sequential", "SequentialStats", "as_sampler",
           "encoder_propagation", "key_step_schedule", "paradigms", "run", "sample"]
