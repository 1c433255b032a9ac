"""Samplers as values, and the one entry that runs any of them.

A sampler says how a solver's steps are run; it holds no arrays and no state, so it can be
built once, stored in a config, compared and passed to pipelines:

    x0, stats = jaxdiff.sampling.run(Picard(parallel=16, tolerance=0.1), model_fn, solver,
                                     x_T, key=jax.random.key(0))

``Sequential()`` runs one step after another (``lax.scan``; differentiable end to end),
``Picard(...)`` solves the whole trajectory by Picard iterations over a window of steps
evaluated as one batched call (ParaDiGMS), ``EncoderPropagation(...)`` runs the UNet encoder
at key steps only (FasterDiffusion). All share the prelude (validation, one rule from
``key`` to per-step noise) and the progress protocol, so one key gives one sample from
every sampler, up to its tolerance.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

from jaxdiff.sampling.encoder_propagation import PAPER_KEY_STEPS, encoder_propagation
from jaxdiff.sampling.picard import drive
from jaxdiff.sampling.picard_methods import PicardMethod, picard_method
from jaxdiff.sampling.sequential import sample


@dataclasses.dataclass(frozen=True)
class SequentialStats:
    """``model_evaluations``: one model call per step."""

    model_evaluations: int
    num_steps: int


@dataclasses.dataclass(frozen=True)
class Sequential:
    """One step after another, the whole loop one jitted ``lax.scan``."""

    def run(self, model_fn, solver, x_T, *, key=None, noise=None, progress=None,
            callback=None, callback_steps=1):
        x0 = sample(model_fn, solver, x_T, key=key, noise=noise, progress=progress,
                    callback=callback, callback_steps=callback_steps)
        n = int(solver.num_steps)
        return x0, SequentialStats(model_evaluations=n, num_steps=n)


@dataclasses.dataclass(frozen=True)
class Picard:
    """Picard iterations over a sliding window of ``parallel`` steps (``jaxdiff.paradigms``):
    ``tolerance`` as a fraction of each step's noise std; ``method`` a Picard method value
    (``Paradigms()``, ``ParaSolver()``, ``ParaTAA(order, history, lam, hold, accept)``) or its
    name; ``mesh`` splits the window over devices; ``chunk`` is the window layout (None: one
    batched call; int: that many positions per call; "auto"); ``warmup`` sequential steps
    before the window opens (None: the method's default).

    ``order``, ``history``, ``lam``, ``hold`` and ``accept`` are the keyword form of
    ``ParaTAA(...)``: they are folded into ``method`` when the value is made, so
    ``Picard(method="taa", order=8) == Picard(method=ParaTAA(order=8))``."""

    parallel: int = 16
    tolerance: float = 0.1
    method: Union[str, PicardMethod] = "paradigms"
    mesh: Any = None
    chunk: Union[int, str, None] = "auto"
    warmup: Optional[int] = None
    order: Optional[int] = None
    history: Optional[int] = None
    lam: Optional[float] = None
    hold: Optional[str] = None
    accept: Optional[str] = None

    def __post_init__(self):
        method = picard_method(self.method, order=self.order, history=self.history,
                               lam=self.lam, hold=self.hold, accept=self.accept)
        object.__setattr__(self, "method", method)
        for name in ("order", "history", "lam", "hold", "accept"):
            object.__setattr__(self, name, None)

    def run(self, model_fn, solver, x_T, *, key=None, noise=None, progress=None,
            callback=None, callback_steps=1, init=None, resolve=None, trajectory=False):
        """``init`` / ``resolve`` / ``trajectory``: the warm start of ``jaxdiff.paradigms``."""
        return drive(model_fn, solver, x_T, parallel=self.parallel, tolerance=self.tolerance,
                     method=self.method, mesh=self.mesh, chunk=self.chunk,
                     warmup=self.warmup, key=key, noise=noise, progress=progress,
                     callback=callback, callback_steps=callback_steps, init=init,
                     resolve=resolve, trajectory=trajectory)


@dataclasses.dataclass(frozen=True)
class EncoderPropagation:
    """FasterDiffusion: the encoder at ``key_steps`` only ("paper", "all", "every:k", k or a
    list; "auto" is the paper's list for 50 / 20 steps and every 5th step otherwise), the
    following decoder calls batched (``decode_chunk`` steps per call; None: a whole group),
    prior noise injection ``noise_injection`` x x_T below model time ``injection_threshold``."""

    key_steps: Union[str, int, Sequence[int]] = "auto"
    noise_injection: float = 0.003
    injection_threshold: float = 500
    decode_chunk: Optional[int] = None

    def run(self, model_fn, solver, x_T, *, key=None, noise=None, progress=None,
            callback=None, callback_steps=1):
        ks = self.key_steps
        if isinstance(ks, str) and ks == "auto":
            ks = "paper" if int(solver.num_steps) in PAPER_KEY_STEPS else 5
        return encoder_propagation(model_fn, solver, x_T, key_steps=ks,
                                   noise_injection=self.noise_injection,
                                   injection_threshold=self.injection_threshold,
                                   decode_chunk=self.decode_chunk, key=key, noise=noise,
                                   progress=progress, callback=callback,
                                   callback_steps=callback_steps)


SAMPLERS = (Sequential, Picard, EncoderPropagation)
SHORTHANDS = {"sequential": Sequential, "paradigms": Picard, "picard": Picard,
              "faster": EncoderPropagation, "encoder_propagation": EncoderPropagation}


def as_sampler(sampler, **options):
    """A sampler value, or a shorthand name ("sequential", "paradigms", "faster") with the
    value's fields as ``options``."""
    if isinstance(sampler, SAMPLERS):
        if options:
            raise ValueError(f"options {sorted(options)} go into the sampler value itself "
                             f"(dataclasses.replace), not beside {sampler!r}")
        return sampler
    if isinstance(sampler, str) and sampler in SHORTHANDS:
        cls = SHORTHANDS[sampler]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"sampler {sampler!r} ({cls.__name__}) takes {sorted(names)}, "
                             f"not {sorted(unknown)}")
        return cls(**options)
    raise ValueError(f"sampler must be Sequential(), Picard(...), EncoderPropagation(...) or "
                     f"one of {sorted(SHORTHANDS)}, got {sampler!r}")


def run(sampler, model_fn, solver, x_T, *, key=None, noise=None, progress=None,
        callback=None, callback_steps: int = 1, **options):
    """Run ``sampler`` -> (x_0, stats): the one entry of every driver (``jaxdiff.sample``
    and ``jaxdiff.paradigms`` are its keyword forms). ``model_fn``, ``solver``, ``x_T``,
    ``key`` / ``noise``, ``progress`` and the step ``callback(step, timestep, latents)``
    every ``callback_steps`` steps mean what they mean for ``jaxdiff.sample``; ``options``
    are the sampler's own per-call options (``Picard``: ``init``, ``resolve``,
    ``trajectory``)."""
    return as_sampler(sampler).run(model_fn, solver, x_T, key=key, noise=noise,
                                   progress=progress, callback=callback,
                                   callback_steps=callback_steps, **options)


__all__ = ["EncoderPropagation", "Picard", "SAMPLERS", "SHORTHANDS", "Sequential",
           "SequentialStats", "as_sampler", "run"]
