"""ParaDiGMS (Shih et al., NeurIPS 2023): Picard iterations over a sliding window of steps.

Sequential sampling runs x_{k+1} = x_k + drift_k(x_k) + s_k z_k one step after another. A
Picard iteration instead guesses the whole window x_b .. x_{b+p}, evaluates the model at
every position in one batched call, and rebuilds the window from its start by cumulative
sums, x_{b+j+1} = x_b + sum_{i<=j} (drift_i + s_i z_i), with the noise z drawn once per step
beforehand. Positions whose new value moved less than the tolerance are accepted, and the
window slides to the first position that did not converge (at least one step per iteration,
so the result is the sequential one after at most ``num_steps`` iterations; with
``parallel=1`` every iteration is exactly one sequential step).

Convergence test, as the paper and diffusers' pipeline define it: for the latent entering
step k, ||x_new - x_old||^2 / dim > tolerance^2 * variance_k, where variance_k is the
solver's per-step noise variance (``picard_variance``; for DDIM the eta = 1 variance, so the
tolerance is "a fraction of the noise this step would add"). Any sample of the batch over
tolerance holds the window back. The final latent is never declared converged early (its
variance is 0); the window simply reaches the end.

The loop is one ``lax.while_loop`` under ``jax.jit`` with a fixed-shape window (positions
past the end are masked), so it compiles once per (solver class, steps, window, shapes).
With a ``mesh``, the window's model evaluations are split over the mesh's ``"data"`` axis
with ``shard_map`` and every device computes the same (tiny) cumulative sums and window
moves; under ``jax.distributed`` the same code spans hosts.

Multistep solvers (DPM-Solver++ 2M/3M): step k reads the data predictions of the last
``order`` steps. The window evaluates its positions' predictions in one batch, takes the
earlier ones from a per-step buffer (kept from the iteration that evaluated them), and
applies the multistep update at every position; the fixed point is again the sequential
trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel as par
from jaxdiff.guidance import ModelFn
from jaxdiff.sampling import prelude
from jaxdiff.sampling import progress as prog
from jaxdiff.sampling.pytree import combine, partition


@dataclasses.dataclass(frozen=True)
class ParadigmsStats:
    """What the Picard loop did. ``model_evaluations`` counts window positions evaluated
    (one position = one model call on the whole batch; sequential sampling needs
    ``num_steps``). ``begins[i]`` is the window start at iteration i; ``errors[i, j]`` is
    max over the batch of (error / (tolerance^2 * variance)) at window position j
    (<= 1 means converged, NaN where the window ran past the end)."""

    iterations: int            # (traced arrays, padded to num_steps, under an outer jit)
    model_evaluations: int
    num_steps: int
    parallel: int
    begins: np.ndarray        # [iterations]
    errors: np.ndarray        # [iterations, parallel]

    @property
    def speedup_bound(self) -> float:
        """num_steps / iterations: the wall-clock speed-up if a window evaluation cost as
        much as one sequential step (enough devices)."""
        return self.num_steps / max(self.iterations, 1)


METHODS = ("paradigms",)


def _check_solver(solver):
    for attr in ("timesteps", "num_steps", "scale_model_input", "picard_variance"):
        if not hasattr(solver, attr):
            raise ValueError(f"solver must be a jaxdiff solver, got {type(solver).__name__}")
    multistep = hasattr(solver, "picard_multistep")
    try:
        solver.picard_variance()
        if not multistep:
            solver.picard_terms(0, jnp.zeros((1, 1)), jnp.zeros((1, 1)))
    except NotImplementedError:
        raise ValueError(f"ParaDiGMS supports DDPM, DDIM, Euler, Euler ancestral and "
                         f"DPM-Solver++; {type(solver).__name__} has no Picard split") from None


@functools.partial(jax.jit, static_argnames=("spec", "window", "parallel", "mode", "mesh",
                                             "progress", "chunk", "leaf_specs"))
def _run(dynamic, x_T, rand, tolerance, *, spec, window, parallel, mode, mesh, progress, chunk,
         leaf_specs):
    model_fn, solver = combine(dynamic, spec)
    n, W, p = solver.num_steps, window, parallel
    dtype = x_T.dtype
    per_sample = math.prod(x_T.shape[1:])
    multistep = hasattr(solver, "picard_multistep")
    x0 = (x_T * solver.init_noise_sigma).astype(dtype)
    buf = jnp.broadcast_to(x0, (n + W + 1,) + x0.shape)          # latents x_0 .. x_n (+ pad)
    noise = prelude.all_noise(mode, rand, n, x0.shape, dtype)
    noise = jnp.concatenate([noise, jnp.zeros((W,) + x0.shape, dtype)])
    var = jnp.asarray(solver.picard_variance(), jnp.float32)
    # the latent leaving step k enters step k + 1: scale by that step's variance (0 at the end)
    inv_norm = (1.0 / jnp.concatenate([var[1:], jnp.zeros((1,), jnp.float32)])) / per_sample
    inv_norm = jnp.concatenate([inv_norm, jnp.zeros((W,), jnp.float32)])
    timesteps = jnp.asarray(solver.timesteps, jnp.float32)
    tol2 = jnp.square(jnp.asarray(tolerance, jnp.float32))
    # only the model function's array leaves cross the shard_map boundary
    m_dynamic, m_spec = partition(model_fn)
    evaluate = par.window_evaluator(lambda leaves, x, t: combine(leaves, m_spec)(x, t), mesh,
                                    chunk=chunk, leaf_specs=leaf_specs)
    pos = jnp.arange(W, dtype=jnp.int32)

    def bcast(v, like):  # [W] -> [W, 1, ...]
        return v.reshape(v.shape + (1,) * (like.ndim - 1))

    if multistep:
        order = int(solver.picard_history)
        preds0 = jnp.zeros((n + W,) + x0.shape, jnp.float32)
    else:
        order, preds0 = 0, jnp.zeros((), jnp.float32)

    def body(c):
        begin, it, evals, buf, preds, begins, errors = c
        idx = begin + pos
        valid = (idx < n) & (pos < p)
        idc = jnp.minimum(idx, n - 1)
        xw = jax.lax.dynamic_slice_in_dim(buf, begin, W)                  # [W, B, ...]
        t = jnp.broadcast_to(timesteps[idc][:, None], (W, x0.shape[0]))
        xin = jax.vmap(solver.scale_model_input)(xw, idc)
        out = evaluate(m_dynamic, xin, t, valid)
        if multistep:
            d = jax.vmap(solver.picard_prediction)(idc, xw, out).astype(jnp.float32)
            old_d = jax.lax.dynamic_slice_in_dim(preds, begin, W)
            preds = jax.lax.dynamic_update_slice_in_dim(
                preds, jnp.where(bcast(valid, d), d, old_d), begin, 0)
            lag = jnp.arange(order - 1, -1, -1, dtype=jnp.int32)          # oldest first
            src = idc[:, None] - lag[None, :]                               # [W, order]
            hist = preds[jnp.maximum(src, 0)]                                # [W, order, B, ...]
            hist = jnp.where((src >= 0).reshape(src.shape + (1,) * x0.ndim), hist, 0.0)
            drift, scale = jax.vmap(solver.picard_multistep)(idc, xw, hist)
        else:
            drift, scale = jax.vmap(solver.picard_terms)(idc, xw, out)
        z = jax.lax.dynamic_slice_in_dim(noise, begin, W)
        inc = drift.astype(jnp.float32)
        if mode != "none":
            inc = inc + bcast(jnp.asarray(scale, jnp.float32), z) * z.astype(jnp.float32)
        inc = jnp.where(bcast(valid & (pos > 0), inc), inc, 0.0)
        # The window's first step starts from an accepted latent: take it with the solver's
        # own step (bit-identical to sequential sampling), then add the later increments.
        if multistep:
            first = solver.picard_step(idc[0], xw[0], hist[0], z[0])
        else:
            first, _ = solver.step(solver.init(xw[0]), idc[0], xw[0], out[0], z[0])
        new = (first.astype(jnp.float32)[None] + jnp.cumsum(inc, axis=0)).astype(dtype)
        old = jax.lax.dynamic_slice_in_dim(buf, begin + 1, W)
        diff = (new - old).astype(jnp.float32)
        err = jnp.sum(jnp.square(diff).reshape(W, x0.shape[0], -1), axis=-1)   # [W, B]
        ratio = err * jax.lax.dynamic_slice_in_dim(inv_norm, begin, W)[:, None]
        over = jnp.where(valid, jnp.any(ratio > tol2, axis=1), True)
        ind = jnp.argmax(jnp.concatenate([over, jnp.ones((1,), bool)]))
        new_begin = begin + jnp.minimum(ind + 1, p)
        buf = jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(bcast(valid, new), new, old), begin + 1, 0)
        # latents the next window sees for the first time start from the window's last one
        end = jnp.minimum(begin + p, n)
        new_end = jnp.minimum(new_begin + p, n)
        seg = jax.lax.dynamic_slice_in_dim(buf, end, W + 1)
        fill = jnp.arange(W + 1) <= new_end - end
        seg = jnp.where(bcast(fill, seg), buf[end][None], seg)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, seg, end, 0)
        begins = begins.at[it].set(begin)
        errors = errors.at[it].set(jnp.where(valid, jnp.max(ratio, axis=1) / tol2, jnp.nan)[:p])
        prog.report(progress, jnp.minimum(new_begin, n), n)
        return (new_begin, it + 1, evals + jnp.sum(valid.astype(jnp.int32)), buf, preds,
                begins, errors)

    init = (jnp.int32(0), jnp.int32(0), jnp.int32(0), buf, preds0,
            jnp.full((n,), -1, jnp.int32), jnp.full((n, p), jnp.nan, jnp.float32))
    begin, it, evals, buf, _, begins, errors = jax.lax.while_loop(
        lambda c: c[0] < n, body, init)
    x_final = buf[n]
    if mesh is not None:   # every process can read the result, whatever the batch layout
        x_final = jax.lax.with_sharding_constraint(
            x_final, jax.sharding.NamedSharding(mesh, par.P()))
    return x_final, (it, evals, begins, errors)


def paradigms(model_fn: Callable, solver, x_T, *, parallel: int, tolerance: float,
              key: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
              mesh=None, progress: Union[bool, Callable] = False,
              chunk: Union[int, str, None] = "auto", method: str = "paradigms"):
    """Sample with Picard iterations over a window of ``parallel`` steps -> (x_0, stats).

    Same conventions as ``jaxdiff.sample``: ``model_fn(x [N,...], t [N])`` is the raw network
    prediction (guidance included), ``x_T`` standard normal, the solver's initial and input
    scaling applied here; ``noise`` [num_steps, *x_T.shape] standard normals or a PRNG
    ``key`` for stochastic solvers (the same draws give the same sample as ``sample``).
    ``tolerance``: convergence threshold as a fraction of each step's noise std (the
    paper's default 0.1; smaller is closer to sequential, larger converges in fewer
    iterations). ``mesh``: a ``jax.sharding.Mesh`` with a ``"data"`` axis over which the
    window is split (the window is padded to a multiple of its size) and optionally a
    ``"prompts"`` axis over which the batch is split (``jaxdiff.parallel.make_mesh(
    prompts=k)``): a ``jaxdiff.guidance`` model function's conditioning is split with it
    automatically; for another model function, lay out its per-sample arrays with
    ``jaxdiff.parallel.shard_batch`` first. The result does not depend on the mesh.
    ``chunk``: None evaluates the whole window as one batched model call; an int evaluates it
    ``chunk`` positions per call (``lax.map``; same result, less memory, and window positions
    past the end of the trajectory are skipped); "auto" (default) is 1 on CPU devices, where
    one very large batch runs about 2x slower per sample than small ones (measured on the
    tiny SD UNet), and None on GPUs/TPUs.
    ``progress``: True for a tqdm bar of accepted steps, or a host callable
    ``f(done, num_steps)`` called after every iteration with the number of steps accepted.
    ``method``: "paradigms" (the window's new positions start from a copy of its last
    latent, as in the paper).
    """
    x_T, rand = prelude.prepare(model_fn, solver, x_T, key=key, noise=noise,
                                driver="jaxdiff.paradigms")
    _check_solver(solver)
    n = int(solver.num_steps)
    if isinstance(parallel, bool) or not isinstance(parallel, (int, np.integer)) or parallel < 1:
        raise ValueError(f"parallel must be a positive int (the window size), got {parallel!r}")
    tol = float(tolerance)
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if method not in METHODS:
        raise ValueError(f"unknown Picard method {method!r}; jaxdiff implements {list(METHODS)}")
    mode, rand = rand.mode, rand.value
    if mesh is not None:
        par.check_mesh(mesh)
    if isinstance(chunk, str) and chunk == "auto":
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        chunk = 1 if platform == "cpu" else None
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer))
                              or chunk < 1):
        raise ValueError(f"chunk must be a positive int (window positions per model call), "
                         f"None or 'auto', got {chunk!r}")
    chunk = None if chunk is None else int(chunk)
    p = min(int(parallel), n)
    devices = 1 if mesh is None else par.check_mesh(mesh)
    shards = par.prompt_shards(mesh)
    if shards > 1:
        if x_T.shape[0] % shards:
            raise ValueError(f"the batch of {x_T.shape[0]} does not split over the mesh's "
                             f"{par.PROMPTS!r} axis of {shards}")
        model_fn = _shard_model_fn(model_fn, mesh)
    window = -(-p // devices) * devices
    progress = prog.resolve(progress, "paradigms (steps accepted)")
    leaf_specs = None
    if mesh is not None:
        m_dynamic, _ = partition(model_fn)
        leaf_specs = par.batch_leaf_specs([d for d in m_dynamic if d is not None], mesh)
        it_specs = iter(leaf_specs)
        leaf_specs = tuple(None if d is None else next(it_specs) for d in m_dynamic)
    dynamic, spec = partition((model_fn, solver))
    if mesh is not None:
        split = par.P(par.PROMPTS)
        nm = len(leaf_specs)       # the model function's leaves come first
        dynamic = [d if (i < nm and leaf_specs[i] == split) else par.replicate(d, mesh)
                   for i, d in enumerate(dynamic)]
        if shards > 1:
            x_T = par.place(x_T, mesh, split)
            rand = par.place(rand, mesh, par.P(None, par.PROMPTS)) if mode == "noise" else \
                par.replicate(rand, mesh)
        else:
            x_T, rand = par.replicate((x_T, rand), mesh)
    x0, (it, evals, begins, errors) = _run(dynamic, x_T, rand, jnp.float32(tol), spec=spec,
                                           window=window, parallel=p, mode=mode, mesh=mesh,
                                           progress=progress, chunk=chunk,
                                           leaf_specs=leaf_specs)
    if isinstance(it, jax.core.Tracer):     # paradigms itself under an outer jit
        stats = ParadigmsStats(iterations=it, model_evaluations=evals, num_steps=n,
                               parallel=p, begins=begins, errors=errors)
    else:
        it = int(it)
        stats = ParadigmsStats(iterations=it, model_evaluations=int(evals), num_steps=n,
                               parallel=p, begins=np.asarray(begins)[:it],
                               errors=np.asarray(errors)[:it])
    return x0, stats


def _shard_model_fn(model_fn, mesh):
    """A guidance model function with its per-sample conditioning split over the mesh's
    prompts axis; other model functions are returned as they are (their owner lays them out)."""
    if not isinstance(model_fn, ModelFn):
        return model_fn
    return model_fn.map_batch(lambda leaf: par.shard_batch(leaf, mesh))


__all__ = ["METHODS", "ParadigmsStats", "paradigms"]
