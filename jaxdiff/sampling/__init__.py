"""Drivers: run a solver's steps with a model function under ``jax.jit``."""

from jaxdiff.sampling.paradigms import ParadigmsStats, paradigms
from jaxdiff.sampling.sequential import sample

__all__ = ["ParadigmsStats", "paradigms", "sample"]
