"""The sequential driver: the whole sampling loop as one ``lax.scan`` under ``jax.jit``.

``sample(model_fn, solver, x_T, key=..., noise=...)``::

    x = x_T * solver.init_noise_sigma
    for i in range(solver.num_steps):
        out = model_fn(solver.scale_model_input(x, i), broadcast(solver.timesteps[i], [N]))
        x, state = solver.step(state, i, x, out, noise[i])

The model function and the solver are pytrees: their array leaves (weights, embeddings,
guidance scale, timestep tables) are traced jit arguments and everything else (graph
definitions, step counts, prediction type, plain Python callables) is part of the compile
cache key. So a new seed, new latents, a new prompt or guidance scale reuse the compiled
program; a new number of steps or a different solver class compiles once more.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling.pytree import combine, partition


class _Bar:
    """Host-side tqdm bar driven from inside the jitted loop."""

    bar = None

    @classmethod
    def tick(cls, i, n):
        i, n = int(i), int(n)
        if i == 0 or cls.bar is None:
            from tqdm.auto import tqdm
            if cls.bar is not None:
                cls.bar.close()
            cls.bar = tqdm(total=n, desc="sampling")
        cls.bar.update(1)
        if i == n - 1:
            cls.bar.close()
            cls.bar = None


def _tqdm_progress(i, n):
    _Bar.tick(i, n)


@functools.partial(jax.jit, static_argnames=("spec", "mode", "progress", "trajectory"))
def _run(dynamic, x_T, rand, *, spec, mode, progress, trajectory):
    model_fn, solver = combine(dynamic, spec)
    n = solver.num_steps
    dtype = x_T.dtype
    x = (x_T * solver.init_noise_sigma).astype(dtype)
    state = solver.init(x)
    if mode == "key":
        rand = jax.random.split(rand, n)
    timesteps = jnp.asarray(solver.timesteps, jnp.float32)

    def body(carry, inputs):
        x, state = carry
        i, r = inputs
        if mode == "noise":
            eps = r.astype(dtype)
        elif mode == "key":
            eps = jax.random.normal(r, x.shape, dtype)
        else:
            eps = jnp.zeros_like(x)
        t = jnp.broadcast_to(timesteps[i], (x.shape[0],))
        out = model_fn(solver.scale_model_input(x, i), t)
        x, state = solver.step(state, i, x, out, eps)
        if progress is not None:
            jax.debug.callback(progress, i, n)
        return (x, state), (x if trajectory else None)

    (x, _), xs = jax.lax.scan(body, (x, state), (jnp.arange(n, dtype=jnp.int32), rand))
    return (x, xs) if trajectory else x


def sample(model_fn: Callable, solver, x_T, *, key: Optional[jax.Array] = None,
           noise: Optional[jax.Array] = None,
           progress: Union[bool, Callable[[Any, int], None]] = False,
           return_trajectory: bool = False):
    """Run ``solver`` from standard-normal ``x_T`` [N, H, W, C] to x_0 under ``jax.jit``.

    ``model_fn(x [N,H,W,C], t [N]) -> [N,H,W,C]`` is the raw network prediction in the
    solver's prediction type; it receives exactly what the network expects (input scaling
    applied) and t in the network's time units. Randomness: ``noise`` [num_steps, *x_T.shape]
    standard normals, or a PRNG ``key`` (split once per step); stochastic solvers require one,
    deterministic ones ignore them. ``progress``: True for a tqdm bar, or a host callable
    ``f(i, num_steps)`` called after each step (``jax.debug.callback``).
    ``return_trajectory``: also return every step's x, [num_steps, *x_T.shape].
    Differentiable in x_T, in the model function's array leaves and in the solver's tables.
    """
    for attr in ("init", "step", "timesteps", "num_steps", "scale_model_input"):
        if not hasattr(solver, attr):
            raise ValueError(f"solver must be a jaxdiff solver (see jaxdiff.solvers); got "
                             f"{type(solver).__name__} without {attr!r}")
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")
    if not hasattr(x_T, "shape") or not hasattr(x_T, "dtype"):
        x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError("x_T must have a leading batch dimension, got a scalar")
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a floating-point array, got dtype {x_T.dtype}")
    n = int(solver.num_steps)
    if key is not None and noise is not None:
        raise ValueError("pass either key or noise, not both")
    if noise is not None:
        want = (n,) + tuple(x_T.shape)
        if tuple(np.shape(noise)) != want:
            raise ValueError(f"noise must have shape [num_steps, *x_T.shape] = {want}, got "
                             f"{tuple(np.shape(noise))}")
    stochastic = bool(getattr(solver, "stochastic", False))
    if stochastic and key is None and noise is None:
        raise ValueError(f"{type(solver).__name__} is stochastic: pass key= or noise=")
    if not stochastic:
        mode, rand = "none", None
    elif noise is not None:
        mode, rand = "noise", jnp.asarray(noise)
    else:
        mode, rand = "key", key
    if progress is True:
        progress = _tqdm_progress
    elif progress is False or progress is None:
        progress = None
    elif not callable(progress):
        raise ValueError(f"progress must be a bool or a callable, got {progress!r}")
    dynamic, spec = partition((model_fn, solver))
    return _run(dynamic, x_T, rand, spec=spec, mode=mode, progress=progress,
                trajectory=bool(return_trajectory))
