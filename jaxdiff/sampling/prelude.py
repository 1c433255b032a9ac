"""What every driver does before it samples: validate, and turn ``key`` into per-step noise.

One rule for randomness serves every driver, so the same ``key`` gives the same sample
whether the steps run one after another, in Picard windows or in encoder-propagation
groups: the key is split into one key per step, and step i's noise is a standard normal
of x_T's shape drawn with key i (``step_noise``; ``all_noise`` draws all of them at once,
value for value the same). Explicit ``noise`` [num_steps, *x_T.shape] replaces the draws;
deterministic solvers use neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

SOLVER_ATTRS = ("init", "step", "timesteps", "num_steps", "scale_model_input")


@dataclasses.dataclass(frozen=True)
class Randomness:
    """``mode``: "none" | "key" | "noise" (static); ``value``: None, a [num_steps] array of
    per-step keys, or the explicit noise [num_steps, *x_T.shape] (traced)."""

    mode: str
    value: Any


def check_solver(solver, driver: str = "sampling") -> int:
    for attr in SOLVER_ATTRS:
        if not hasattr(solver, attr):
            raise ValueError(f"{driver}: solver must be a jaxdiff solver (see jaxdiff.solvers); "
                             f"got {type(solver).__name__} without {attr!r}")
    return int(solver.num_steps)


def check_x_T(x_T, driver: str = "sampling", ndim: Optional[int] = None) -> jax.Array:
    if not hasattr(x_T, "shape") or not hasattr(x_T, "dtype"):
        x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError(f"{driver}: x_T must have a leading batch dimension, got a scalar")
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"{driver}: x_T must be a floating-point array, got dtype {x_T.dtype}")
    if ndim is not None and x_T.ndim != ndim:
        raise ValueError(f"{driver}: x_T must have {ndim} dimensions ([B, H, W, C]), got shape "
                         f"{tuple(x_T.shape)}")
    return x_T


def randomness(solver, x_T, key=None, noise=None, driver: str = "sampling") -> Randomness:
    """Check ``key`` / ``noise`` against the solver and x_T -> the driver's Randomness."""
    n = int(solver.num_steps)
    if key is not None and noise is not None:
        raise ValueError(f"{driver}: pass either key or noise, not both")
    if noise is not None:
        want = (n,) + tuple(x_T.shape)
        if tuple(np.shape(noise)) != want:
            raise ValueError(f"{driver}: noise must have shape [num_steps, *x_T.shape] = "
                             f"{want}, got {tuple(np.shape(noise))}")
    stochastic = bool(getattr(solver, "stochastic", False))
    if not stochastic:
        return Randomness("none", None)
    if key is None and noise is None:
        raise ValueError(f"{driver}: {type(solver).__name__} is stochastic: pass key= or noise=")
    if noise is not None:
        return Randomness("noise", jnp.asarray(noise))
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    return Randomness("key", step_keys(key, n))


def step_keys(key, num_steps: int) -> jax.Array:
    """[num_steps] keys, one per step: THE rule that turns a key into per-step noise."""
    return jax.random.split(key, num_steps)


def step_noise(mode: str, value, i, shape, dtype) -> jax.Array:
    """Step i's standard-normal noise (inside jitted code; ``i`` may be traced)."""
    if mode == "noise":
        return value[i].astype(dtype)
    if mode == "key":
        return jax.random.normal(value[i], shape, dtype)
    return jnp.zeros(shape, dtype)


def all_noise(mode: str, value, num_steps: int, shape, dtype) -> jax.Array:
    """[num_steps, *shape]: every step's ``step_noise`` at once."""
    if mode == "noise":
        return value.astype(dtype)
    if mode == "key":
        return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(value)
    return jnp.zeros((num_steps,) + tuple(shape), dtype)


def prepare(model_fn, solver, x_T, *, key=None, noise=None, driver: str = "sampling",
            ndim: Optional[int] = None):
    """The shared prelude -> (x_T as an array, Randomness)."""
    check_solver(solver, driver)
    if not callable(model_fn):
        raise ValueError(f"{driver}: model_fn must be callable, got {type(model_fn).__name__}")
    x_T = check_x_T(x_T, driver, ndim)
    if hasattr(model_fn, "check_batch"):
        model_fn.check_batch(int(x_T.shape[0]))
    return x_T, randomness(solver, x_T, key, noise, driver)


__all__ = ["Randomness", "all_noise", "check_solver", "check_x_T", "prepare", "randomness",
           "step_keys", "step_noise"]
