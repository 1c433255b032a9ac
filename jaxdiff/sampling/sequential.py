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

from jaxdiff.sampling import prelude
from jaxdiff.sampling import progress as prog
from jaxdiff.sampling.pytree import combine, partition


@functools.partial(jax.jit, static_argnames=("spec", "mode", "progress", "trajectory", "every"))
def _run(dynamic, x_T, rand, token, *, spec, mode, progress, trajectory, every):
    model_fn, solver = combine(dynamic, spec)
    n = solver.num_steps
    dtype = x_T.dtype
    x = (x_T * solver.init_noise_sigma).astype(dtype)
    state = solver.init(x)
    timesteps = jnp.asarray(solver.timesteps)

    def body(carry, i):
        x, state = carry
        eps = prelude.step_noise(mode, rand, i, x.shape, dtype)
        t = jnp.broadcast_to(timesteps[i], (x.shape[0],))
        out = model_fn(solver.scale_model_input(x, i), t)
        x, state = solver.step(state, i, x, out, eps)
        prog.report(progress, i + 1, n)
        prog.notify(every, token, i, i + 1, n, timesteps, x)
        return (x, state), (x if trajectory else None)

    (x, _), xs = jax.lax.scan(body, (x, state), jnp.arange(n, dtype=jnp.int32))
    return (x, xs) if trajectory else x


def sample(model_fn: Callable, solver, x_T, *, key: Optional[jax.Array] = None,
           noise: Optional[jax.Array] = None,
           progress: Union[bool, Callable[[Any, int], None]] = False,
           return_trajectory: bool = False, callback: Optional[prog.StepCallback] = None,
           callback_steps: int = 1):
    """Run ``solver`` from standard-normal ``x_T`` [N, H, W, C] to x_0 under ``jax.jit``.

    ``model_fn(x [N,H,W,C], t [N]) -> [N,H,W,C]`` is the raw network prediction in the
    solver's prediction type; it receives exactly what the network expects (input scaling
    applied) and t in the network's time units. Randomness: ``noise`` [num_steps, *x_T.shape]
    standard normals, or a PRNG ``key`` (one key per step, ``prelude.step_keys``: every driver
    draws the same noise from the same key); stochastic solvers require one, deterministic
    ones ignore them. ``progress``: True for a tqdm bar, or a host callable
    ``f(done, num_steps)`` called after each step (``jaxdiff.sampling.progress``).
    ``return_trajectory``: also return every step's x, [num_steps, *x_T.shape].
    ``callback(step, timestep, latents)``: a host function called after step ``step`` when
    ``step % callback_steps == 0`` and after the last step, with the latents after that step
    (numpy, the solver's own scaling); changing it does not recompile.
    Differentiable in x_T, in the model function's array leaves and in the solver's tables.
    """
    x_T, rand = prelude.prepare(model_fn, solver, x_T, key=key, noise=noise,
                                driver="jaxdiff.sample")
    progress = prog.resolve(progress, "sampling")
    dynamic, spec = partition((model_fn, solver))
    with prog.listening(callback, callback_steps, "jaxdiff.sample", x_T) as (every, token):
        return _run(dynamic, x_T, rand.value, token, spec=spec, mode=rand.mode,
                    progress=progress, trajectory=bool(return_trajectory), every=every)
