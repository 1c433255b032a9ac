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
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel as par
from jaxdiff.guidance import ModelFn
from jaxdiff.sampling import prelude
from jaxdiff.sampling import progress as prog
from jaxdiff.sampling.picard_methods import (ACCEPTS, HOLDS, METHODS, Loop, ParaSolver,  # noqa: F401
                                            ParaTAA, Paradigms, PicardMethod, Round,
                                            picard_method)
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
    trajectory: Optional[jax.Array] = None   # [num_steps + 1, *x_T.shape] with trajectory=True

    @property
    def speedup_bound(self) -> float:
        """num_steps / iterations: the wall-clock speed-up if a window evaluation cost as
        much as one sequential step (enough devices)."""
        return self.num_steps / max(self.iterations, 1)


# chunk="auto" on CPU: window positions per call x batch. Tiny SD UNet, DDPM-1000, window
# 100, guidance (2 samples per position), warm medians: 8 samples per call 19.4 s, 12 20.0,
# 16 21.1, 24 22.9, 32 23.1, 50 22.1, 100 22.1, the whole window 25.9 (2026-12-04)
CPU_SAMPLES_PER_CALL = 8


class NonFiniteError(FloatingPointError):
    """The model returned NaN/inf inside a Picard window (never treated as converged)."""


class LoopState(NamedTuple):
    """The Picard loop's carry."""

    begin: jax.Array          # the window's first step (steps before it are accepted)
    round: jax.Array
    evaluations: jax.Array    # window positions evaluated so far
    latents: jax.Array        # [n + W + 1, ...] the latents entering steps 0 .. n (+ pad)
    preds: jax.Array          # [n + W, ...] data predictions (multistep solvers) or ()
    begins: jax.Array         # [n] the window start of each round
    errors: jax.Array         # [n, parallel] each round's change / tolerance^2
    bad: jax.Array            # the step whose model output was NaN/inf, or -1
    method: Any               # the method's own state (a NamedTuple)


def _check_solver(solver):
    """Does the solver declare a Picard split?"""
    if getattr(solver, "picard", None) not in ("single", "multistep"):
        why = getattr(solver, "picard_unsupported", None)
        raise ValueError(f"ParaDiGMS supports DDPM, DDIM, Euler, Euler ancestral, DEIS order 1 "
                         f"and DPM-Solver++; {type(solver).__name__} has no Picard split"
                         + (f" ({why})" if why else ""))


@functools.partial(jax.jit, static_argnames=("spec", "window", "parallel", "mode", "mesh",
                                             "progress", "chunk", "leaf_specs", "warmup",
                                             "start", "trajectory", "every"))
def _run(dynamic, x_T, rand, tolerance, prior, token, *, spec, window, parallel, mode, mesh,
         progress, chunk, leaf_specs, warmup, start, trajectory, every):
    model_fn, solver, method = combine(dynamic, spec)
    n, W, p = solver.num_steps, window, parallel
    dtype = x_T.dtype
    per_sample = math.prod(x_T.shape[1:])
    x0 = (x_T * solver.init_noise_sigma).astype(dtype)
    buf = jnp.broadcast_to(x0, (n + W + 1,) + x0.shape)          # latents x_0 .. x_n (+ pad)
    warm = prior is not None       # a previous trajectory: every latent starts from it
    if warm:
        buf = buf.at[:n + 1].set(prior.astype(dtype))
    noise = prelude.all_noise(mode, rand, n, x0.shape, dtype)
    noise = jnp.concatenate([noise, jnp.zeros((W,) + x0.shape, dtype)])
    loop = Loop(solver, n, W, x0, mode, noise)
    multistep, hist_len, bcast, pos = loop.multistep, loop.hist_len, loop.bcast, loop.pos
    var = jnp.asarray(solver.picard_variance(), jnp.float32)
    inv_norm = jnp.concatenate([method.inverse_norm(loop, var, per_sample),
                                jnp.zeros((W,), jnp.float32)])
    timesteps = jnp.asarray(solver.timesteps, jnp.float32)
    tol2 = jnp.square(jnp.asarray(tolerance, jnp.float32))
    # only the model function's array leaves cross the shard_map boundary
    m_dynamic, m_spec = partition(model_fn)
    evaluate = par.window_evaluator(lambda leaves, x, t: combine(leaves, m_spec)(x, t), mesh,
                                    chunk=chunk, leaf_specs=leaf_specs)
    preds0 = jnp.zeros((n + W,) + x0.shape, jnp.float32) if multistep else \
        jnp.zeros((), jnp.float32)
    bsz = x0.shape[0]

    def width(begin):   # the window: one step at a time during the warm-up
        return jnp.where(begin < warmup, 1, p)

    def body(c: LoopState) -> LoopState:
        begin, buf, preds = c.begin, c.latents, c.preds
        pe = width(begin)
        idx = begin + pos
        valid = (idx < n) & (pos < pe)
        idc = jnp.minimum(idx, n - 1)
        xw = jax.lax.dynamic_slice_in_dim(buf, begin, W)                  # [W, B, ...]
        t = jnp.broadcast_to(timesteps[idc][:, None], (W, bsz))
        xin = jax.vmap(solver.scale_model_input)(xw, idc)
        out = evaluate(m_dynamic, xin, t, valid)
        hist = d = None
        if multistep:
            d = jax.vmap(solver.data_prediction)(idc, xw, out).astype(jnp.float32)
            old_d = jax.lax.dynamic_slice_in_dim(preds, begin, W)
            preds = jax.lax.dynamic_update_slice_in_dim(
                preds, jnp.where(bcast(valid, d), d, old_d), begin, 0)
            lag = jnp.arange(hist_len - 1, -1, -1, dtype=jnp.int32)       # oldest first
            src = idc[:, None] - lag[None, :]                               # [W, hist_len]
            hist = preds[jnp.maximum(src, 0)]                             # [W, hist_len, B, ...]
            hist = jnp.where((src >= 0).reshape(src.shape + (1,) * x0.ndim), hist, 0.0)
        z = jax.lax.dynamic_slice_in_dim(noise, begin, W)
        old = jax.lax.dynamic_slice_in_dim(buf, begin + 1, W)
        r = Round(begin, valid, idc, xw, out, hist, d, z, old, buf)
        new, diff, mstate = method.update(loop, c.method, r)
        err = jnp.sum(jnp.square(diff).reshape(W, bsz, -1), axis=-1)       # [W, B]
        ratio = err * jax.lax.dynamic_slice_in_dim(inv_norm, begin, W)[:, None]
        # NaN/inf: at the window's first position (one exact step from an accepted latent)
        # it is the model's failure and stops the loop; further on it is a guess that blew
        # up (stiff low-noise steps amplify far-ahead errors), never accepted: from the first
        # such position on, the window restarts from the last finite latent
        finite = jnp.all(jnp.isfinite(jnp.where(bcast(valid, new), new, 0.0)).reshape(W, -1),
                         axis=1) & jnp.all(jnp.isfinite(jnp.where(
                             bcast(valid, out), out, 0.0)).reshape(W, -1), axis=1)
        first_bad = jnp.argmin(jnp.concatenate([finite | ~valid, jnp.zeros((1,), bool)]))
        bad = jnp.where(valid[0] & ~finite[0], begin, -1).astype(jnp.int32)
        blown = pos >= first_bad
        keep = jnp.where(first_bad > 0, jnp.take(new, jnp.maximum(first_bad - 1, 0), axis=0),
                         buf[begin])
        new = jnp.where(bcast(blown, new), keep[None].astype(new.dtype), new)
        over = jnp.where(valid & ~blown, jnp.any(ratio > tol2, axis=1), True)
        ind = jnp.argmax(jnp.concatenate([over, jnp.ones((1,), bool)]))
        new_begin = begin + jnp.minimum(ind + 1, pe)
        buf = jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(bcast(valid, new), new, old), begin + 1, 0)
        # latents the next window sees for the first time
        end = jnp.minimum(begin + pe, n)
        new_end = jnp.minimum(new_begin + width(new_begin), n)
        seg = jax.lax.dynamic_slice_in_dim(buf, end, W + 1)
        fill = jnp.arange(W + 1) <= new_end - end
        if not warm:    # (a warm start keeps the previous trajectory's latents as guesses)
            seg = jnp.where(bcast(fill, seg), method.guess(loop, r, buf, end), seg)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, seg, end, 0)
        prog.report(progress, jnp.minimum(new_begin, n), n)
        accepted = jnp.minimum(new_begin, n)
        prog.notify(every, token, begin, accepted, n, timesteps, buf[accepted])
        return LoopState(
            begin=new_begin, round=c.round + 1,
            evaluations=c.evaluations + jnp.sum(valid.astype(jnp.int32)), latents=buf,
            preds=preds, begins=c.begins.at[c.round].set(begin),
            errors=c.errors.at[c.round].set(
                jnp.where(valid, jnp.max(ratio, axis=1) / tol2, jnp.nan)[:p]),
            bad=bad, method=method.fresh(loop, mstate, begin, end, blown, fill))

    if warm and multistep and start > 0:
        # the steps kept from the previous trajectory feed the first re-solved multistep
        # updates: their data predictions, one model call each
        model = combine(m_dynamic, m_spec)
        for q in range(max(start - hist_len + 1, 0), start):
            xq = solver.scale_model_input(buf[q], q)
            out_q = model(xq, jnp.full((bsz,), timesteps[q]))
            preds0 = preds0.at[q].set(solver.data_prediction(q, buf[q], out_q)
                                      .astype(jnp.float32))
    init = LoopState(begin=jnp.int32(start), round=jnp.int32(0), evaluations=jnp.int32(0),
                     latents=buf, preds=preds0, begins=jnp.full((n,), -1, jnp.int32),
                     errors=jnp.full((n, p), jnp.nan, jnp.float32), bad=jnp.int32(-1),
                     method=method.init(loop))
    final = jax.lax.while_loop(lambda c: (c.begin < n) & (c.bad < 0), body, init)
    buf = final.latents
    x_final = buf[n]
    if mesh is not None:   # every process can read the result, whatever the batch layout
        x_final = jax.lax.with_sharding_constraint(
            x_final, jax.sharding.NamedSharding(mesh, par.P()))
    traj = buf[:n + 1] if trajectory else None
    return x_final, (final.round, final.evaluations, final.begins, final.errors, final.bad,
                     traj)


def paradigms(model_fn: Callable, solver, x_T, *, parallel: int, tolerance: float,
              key: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
              mesh=None, progress: Union[bool, Callable] = False,
              chunk: Union[int, str, None] = "auto",
              method: Union[str, PicardMethod] = "paradigms",
              warmup: Optional[int] = None, order: Optional[int] = None,
              history: Optional[int] = None, lam: Optional[float] = None,
              hold: Optional[str] = None, accept: Optional[str] = None,
              init: Optional[jax.Array] = None,
              resolve: Optional[int] = None, trajectory: bool = False,
              callback: Optional[prog.StepCallback] = None, callback_steps: int = 1):
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
    past the end of the trajectory are skipped); "auto" (default) is None on GPUs/TPUs and on
    CPU devices about 32 network samples per call (``32 // batch`` positions; guidance
    doubles the batch), where the per-sample
    cost is flat beyond that and chunks skip the positions past the end.
    ``progress``: True for a tqdm bar of accepted steps, or a host callable
    ``f(done, num_steps)`` called after every iteration with the number of steps accepted.
    ``callback(step, timestep, latents)``: as for ``sample``, with the steps as they are
    accepted: after a round that accepts a step that is a multiple of ``callback_steps``,
    it gets the newest accepted step and its latents (and always the last step).
    ``method``: a Picard method value (``Paradigms()``, ``ParaSolver()``, ``ParaTAA(order,
    history, lam, hold, accept)``, ``jaxdiff.sampling.picard_methods``) or its name with the
    ParaTAA options as keywords (the forms are the same method). By name:
    how positions entering the window for the first time are initialised:
    "paradigms" (a copy of the window's last latent, Shih et al. 2023) or "parasolver" (Lu et
    al. 2025: the solver's own steps from that latent with the data prediction of the
    window's last evaluated position held fixed; for DDIM the DDIM jump). The fixed point,
    and so the result at a tight tolerance, is the sequential trajectory either way.
    "taa" (Tang et al. 2024, ParaTAA): ParaSolver's initialisation, the order-``order``
    residual (``order`` steps from the latent ``order`` below, each with its model output
    frozen at the current iterate; None: the whole window) and triangular Anderson
    acceleration over the last ``history`` iterates of every step (``history`` 1: none;
    ``lam``: the regularisation of its least squares, relative to the mean squared residual
    difference). ``hold``: how each step depends on x away from the current iterate:
    "data" (default: the data prediction frozen, ParaSolver's extrapolation, anchored to the
    exact step at the iterate; the one that converges when the data prediction is clipped
    or thresholded, and 2-3 rounds fewer on the trained digits model without clipping) or
    "output" (ParaTAA's: the model output frozen; for DDIM the exact linear DDIM map; half
    the rounds on issue 25's random SD UNet, ``benchmarks/parataa.py``); multistep solvers
    hold their data-prediction history. ``accept``: "trajectory" (default) slides the window on the order-k residual
    compared with the tolerance times each step's noise std, as ParaDiGMS's change;
    "residual" is ParaTAA's rule: the 1-step residual ``step_k(x_k) - x_{k+1}``, RMS over each
    sample, below ``tolerance`` in latent units (the authors' default 1e-3; the final latent
    included).
    ``warmup``: the first ``warmup`` steps run one at a time before the window opens
    (default 0 for "paradigms", 1 for "parasolver" and "taa", whose first extrapolation then starts
    from a real data prediction).
    Warm start (prompt variations, ParaTAA's initialisation from a previous trajectory):
    ``init`` [num_steps + 1, *x_T.shape], the latents entering steps 0 .. num_steps of an
    earlier run (``trajectory=True`` returns them as ``stats.trajectory``; entry 0 is x_T
    times the solver's ``init_noise_sigma``). The first ``num_steps - resolve`` steps are
    kept as they are and the last ``resolve`` steps (default: all) are re-solved starting
    from the old latents as guesses instead of the method's initialisation; for multistep
    solvers the kept steps' data predictions are recomputed first (``order - 1`` model
    calls).
    A NaN/inf from the model stops the loop and raises ``NonFiniteError`` naming the round
    and the step.
    """
    return drive(model_fn, solver, x_T, parallel=parallel, tolerance=tolerance, key=key,
                 noise=noise, mesh=mesh, progress=progress, chunk=chunk,
                 method=picard_method(method, order=order, history=history, lam=lam,
                                      hold=hold, accept=accept),
                 warmup=warmup, init=init, resolve=resolve, trajectory=trajectory,
                 callback=callback, callback_steps=callback_steps)


def _positive_int(value, message):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{message}, got {value!r}")
    return int(value)


def _warm_start(init, resolve, n, x_T):
    """-> (the first step re-solved, the trajectory as an array or None)."""
    if init is None:
        if resolve is not None:
            raise ValueError("resolve needs init= (the trajectory whose last steps are "
                             "re-solved)")
        return 0, None
    init = jnp.asarray(init)
    want = (n + 1,) + tuple(x_T.shape)
    if tuple(init.shape) != want:
        raise ValueError(f"init must be a trajectory of shape {want} (num_steps + 1 latents "
                         f"of x_T's shape), got {tuple(init.shape)}")
    resolve = n if resolve is None else resolve
    if isinstance(resolve, bool) or not isinstance(resolve, (int, np.integer)) or \
            not 1 <= resolve <= n:
        raise ValueError(f"resolve must be an int in [1, {n}] (the number of final steps "
                         f"to re-solve), got {resolve!r}")
    start = n - int(resolve)
    if not isinstance(init, jax.core.Tracer) and \
            not bool(jnp.all(jnp.isfinite(init[:start + 1]))):
        raise ValueError("init holds NaN/inf in the steps it keeps")
    return start, init


def _chunk(chunk, mesh, model_fn, x_T):
    """The window's layout: positions per model call (None: the whole window at once)."""
    if isinstance(chunk, str) and chunk == "auto":
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        # CPU: small calls (CPU_SAMPLES_PER_CALL's sweep), and chunks let positions past
        # the end be skipped
        local = x_T.shape[0] // max(par.prompt_shards(mesh), 1)
        if isinstance(model_fn, ModelFn) and model_fn.uncond is not None:
            local *= 2             # guidance: the network sees both halves
        return max(1, CPU_SAMPLES_PER_CALL // max(local, 1)) if platform == "cpu" else None
    if chunk is None:
        return None
    return _positive_int(chunk, "chunk must be a positive int (window positions per model "
                                "call), None or 'auto'")


def _layout(model_fn, solver, method, x_T, rand, mode, init, mesh):
    """The loop's arguments placed on the mesh: the model function's per-sample leaves (and
    x_T, the noise, the warm start) split over its prompts axis, the rest replicated ->
    (dynamic leaves, static spec, the model leaves' specs, x_T, rand, init)."""
    shards = par.prompt_shards(mesh)
    if shards > 1:
        if x_T.shape[0] % shards:
            raise ValueError(f"the batch of {x_T.shape[0]} does not split over the mesh's "
                             f"{par.PROMPTS!r} axis of {shards}")
        model_fn = _shard_model_fn(model_fn, mesh)
    if isinstance(method, ParaTAA):     # traced: a new lam does not recompile
        method = dataclasses.replace(method, lam=jnp.float32(method.lam))
    dynamic, spec = partition((model_fn, solver, method))
    if mesh is None:
        return dynamic, spec, None, x_T, rand, init
    m_dynamic, _ = partition(model_fn)
    specs = iter(par.batch_leaf_specs([d for d in m_dynamic if d is not None], mesh))
    leaf_specs = tuple(None if d is None else next(specs) for d in m_dynamic)
    split = par.P(par.PROMPTS)
    nm = len(leaf_specs)       # the model function's leaves come first
    dynamic = [d if (i < nm and leaf_specs[i] == split) else par.replicate(d, mesh)
               for i, d in enumerate(dynamic)]
    if shards > 1:
        x_T = par.place(x_T, mesh, split)
        rand = par.place(rand, mesh, par.P(None, par.PROMPTS)) if mode == "noise" else \
            par.replicate(rand, mesh)
        init = None if init is None else par.place(init, mesh, par.P(None, par.PROMPTS))
    else:
        x_T, rand = par.replicate((x_T, rand), mesh)
        init = None if init is None else par.replicate(init, mesh)
    return dynamic, spec, leaf_specs, x_T, rand, init


def drive(model_fn, solver, x_T, *, parallel, tolerance, method: PicardMethod, key=None,
          noise=None, mesh=None, progress=False, chunk="auto", warmup=None, init=None,
          resolve=None, trajectory=False, callback=None, callback_steps=1):
    """The Picard driver behind ``Picard.run`` and ``paradigms`` (their documentation):
    validation, layout, the jitted loop, the stats."""
    x_T, rand = prelude.prepare(model_fn, solver, x_T, key=key, noise=noise,
                                driver="jaxdiff.paradigms")
    _check_solver(solver)
    n = int(solver.num_steps)
    p = min(_positive_int(parallel, "parallel must be a positive int (the window size)"), n)
    tol = float(tolerance)
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    method.check(solver)
    warmup = method.default_warmup if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int (sequential steps before the "
                         f"window opens), got {warmup!r}")
    start, init = _warm_start(init, resolve, n, x_T)
    mode, rand = rand.mode, rand.value
    devices = 1 if mesh is None else par.check_mesh(mesh)
    chunk = _chunk(chunk, mesh, model_fn, x_T)
    window = -(-p // devices) * devices
    progress = prog.resolve(progress, "paradigms (steps accepted)")
    dynamic, spec, leaf_specs, x_T, rand, init = _layout(model_fn, solver, method, x_T, rand,
                                                         mode, init, mesh)
    with prog.listening(callback, callback_steps, "jaxdiff.paradigms", x_T) as (every, token):
        x0, (it, evals, begins, errors, bad, traj) = _run(
            dynamic, x_T, rand, jnp.float32(tol), init, token, spec=spec, window=window,
            start=start, trajectory=bool(trajectory), parallel=p, mode=mode, mesh=mesh,
            progress=progress, chunk=chunk, leaf_specs=leaf_specs,
            warmup=min(int(warmup), n), every=every)
    if not isinstance(bad, jax.core.Tracer) and int(bad) >= 0:
        raise NonFiniteError(f"jaxdiff.paradigms ({method.name}): NaN/inf in the model output "
                             f"or the window update at step {int(bad)} (model time "
                             f"{float(solver.timesteps[int(bad)]):g}) in round {int(it)}; the "
                             f"loop stopped there (check the model; for 'taa' raise lam or "
                             f"lower history)")
    if isinstance(it, jax.core.Tracer):     # paradigms itself under an outer jit
        return x0, ParadigmsStats(iterations=it, model_evaluations=evals, num_steps=n,
                                  parallel=p, begins=begins, errors=errors, trajectory=traj)
    it = int(it)
    return x0, ParadigmsStats(iterations=it, model_evaluations=int(evals), num_steps=n,
                              parallel=p, begins=np.asarray(begins)[:it],
                              errors=np.asarray(errors)[:it], trajectory=traj)


def _shard_model_fn(model_fn, mesh):
    """A guidance model function with its per-sample conditioning split over the mesh's
    prompts axis; other model functions are returned as they are (their owner lays them out)."""
    if not isinstance(model_fn, ModelFn):
        return model_fn
    return model_fn.map_batch(lambda leaf: par.shard_batch(leaf, mesh))


__all__ = ["LoopState", "METHODS", "NonFiniteError", "ParaSolver", "ParaTAA", "Paradigms",
           "ParadigmsStats", "PicardMethod", "paradigms"]
