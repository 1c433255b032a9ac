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
    trajectory: Optional[jax.Array] = None   # [num_steps + 1, *x_T.shape] with trajectory=True

    @property
    def speedup_bound(self) -> float:
        """num_steps / iterations: the wall-clock speed-up if a window evaluation cost as
        much as one sequential step (enough devices)."""
        return self.num_steps / max(self.iterations, 1)


METHODS = ("paradigms", "parasolver", "taa")
HOLDS = ("data", "output")           # taa: what each step's model holds at the iterate
ACCEPTS = ("trajectory", "residual")    # taa: which residual the tolerance is compared with
# chunk="auto" on CPU: window positions per call x batch. Tiny SD UNet, DDPM-1000, window
# 100, guidance (2 samples per position), warm medians: 8 samples per call 19.4 s, 12 20.0,
# 16 21.1, 24 22.9, 32 23.1, 50 22.1, 100 22.1, the whole window 25.9 (2026-12-04)
CPU_SAMPLES_PER_CALL = 8


class NonFiniteError(FloatingPointError):
    """The model returned NaN/inf inside a Picard window (never treated as converged)."""


def _multistep(solver) -> bool:
    """Multistep solvers carry a data-prediction history through the window."""
    return hasattr(solver, "picard_multistep")


def _check_solver(solver):
    """Does the solver (already checked by the prelude) have a Picard split?"""
    multistep = _multistep(solver)
    try:
        if not hasattr(solver, "picard_variance"):
            raise NotImplementedError
        solver.picard_variance()
        if not multistep:
            solver.picard_terms(0, jnp.zeros((1, 1)), jnp.zeros((1, 1)))
    except NotImplementedError:
        raise ValueError(f"ParaDiGMS supports DDPM, DDIM, Euler, Euler ancestral and "
                         f"DPM-Solver++; {type(solver).__name__} has no Picard split") from None


@functools.partial(jax.jit, static_argnames=("spec", "window", "parallel", "mode", "mesh",
                                             "progress", "chunk", "leaf_specs", "method",
                                             "warmup", "order", "history", "start",
                                             "trajectory", "every", "hold", "accept"))
def _run(dynamic, x_T, rand, tolerance, lam, prior, token, *, spec, window, parallel, mode,
         mesh, progress, chunk, leaf_specs, method, warmup, order, history, start, trajectory,
         every, hold, accept):
    model_fn, solver = combine(dynamic, spec)
    n, W, p = solver.num_steps, window, parallel
    dtype = x_T.dtype
    per_sample = math.prod(x_T.shape[1:])
    multistep = _multistep(solver)
    x0 = (x_T * solver.init_noise_sigma).astype(dtype)
    buf = jnp.broadcast_to(x0, (n + W + 1,) + x0.shape)          # latents x_0 .. x_n (+ pad)
    warm = prior is not None       # a previous trajectory: every latent starts from it
    if warm:
        buf = buf.at[:n + 1].set(prior.astype(dtype))
    noise = prelude.all_noise(mode, rand, n, x0.shape, dtype)
    noise = jnp.concatenate([noise, jnp.zeros((W,) + x0.shape, dtype)])
    var = jnp.asarray(solver.picard_variance(), jnp.float32)
    if accept == "residual":    # ParaTAA's rule: the 1-step residual's RMS, every step alike
        inv_norm = jnp.full((n,), 1.0 / per_sample, jnp.float32)
    else:   # the latent leaving step k enters step k + 1: scale by its variance (0 at the end)
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

    k_res = min(order, W)          # ParaTAA's residual order (steps carried exactly)
    if multistep:                  # data predictions each multistep update reads
        hist_len = int(solver.picard_history)
        preds0 = jnp.zeros((n + W,) + x0.shape, jnp.float32)
    else:
        hist_len, preds0 = 0, jnp.zeros((), jnp.float32)
    taa = method == "taa"
    mh = max(history - 1, 1)       # stored past iterates per step (ring, newest last)
    hist_x0 = jnp.zeros((n + W + 1, mh) + x0.shape, jnp.float32) if taa else jnp.zeros(())
    count0 = jnp.zeros((n + W + 1,), jnp.int32)
    bsz = x0.shape[0]

    def dot(a, b):  # per-sample inner products over the trailing axes: [..., B, ...] -> [..., B]
        lead = a.ndim - x0.ndim + 1
        return jnp.sum((a * b).reshape(a.shape[:lead] + (-1,)), axis=-1)

    def increment(drift, scale, z):
        """A Picard split's move drift + noise_scale * z, in float32 (no noise without
        randomness)."""
        inc = drift.astype(jnp.float32)
        if mode != "none":
            scale = jnp.asarray(scale, jnp.float32)
            inc = inc + scale.reshape(scale.shape + (1,) * (z.ndim - scale.ndim)) * \
                z.astype(jnp.float32)
        return inc

    def frozen_step(q, x, out_q, hist_q, z_q):
        """Step q from x with the model output (multistep: the history) frozen."""
        if multistep:
            return solver.picard_step(q, x.astype(dtype), hist_q, z_q).astype(jnp.float32)
        return solver.step(solver.init(x), q, x.astype(dtype), out_q, z_q)[0].astype(jnp.float32)

    def taa_update(buf, begin, valid, idc, xw, out, hist, z, hx, hr, cnt):
        """ParaTAA (Tang et al. 2024): the order-k residual (k steps from the latent k below,
        each frozen at the current iterate as below), then triangular Anderson acceleration
        over the last ``history`` iterates of every step: Gamma_j from the residual
        differences of the window's positions up to j.
        -> (new latents [W], order-k residuals [W], history)."""
        X = jnp.concatenate([xw, jax.lax.dynamic_slice_in_dim(buf, begin + W, 1)]
                            ).astype(jnp.float32)                              # [W + 1]
        j = jnp.arange(1, W + 1)
        hq = hist if multistep else jnp.zeros((W,))
        # How each step depends on x away from the iterate (the fixed point is the same either
        # way; only the speed of convergence differs). hold "output": the model output frozen
        # at the iterate, ParaTAA's model: for DDIM an exact linear map with DDIM's own
        # coefficients. hold "data": the data prediction frozen (ParaSolver's extrapolation),
        # anchored at the iterate to the solver's exact step; needed where the data
        # prediction is clipped or thresholded: there the frozen-output step has no
        # x-dependence left, while the true step carries x nearly one to one (digits DDIM-50,
        # clip_sample, window 16, tolerance 0.01: 48 rounds frozen output with the 1-step
        # acceptance, 13 frozen data with the order-k acceptance). Multistep solvers freeze
        # their data-prediction history.
        g0 = jax.vmap(frozen_step)(idc, X[:-1], out, hq, z)                  # exact steps
        if multistep or hold == "output":
            def move(Zs):
                return jax.vmap(frozen_step)(idc, Zs, out, hq, z)
        else:
            d_w = jax.vmap(solver.data_prediction)(idc, xw, out).astype(dtype)
            held = jax.vmap(lambda q, x, d, zq: extrapolate(q, x, d, zq).astype(jnp.float32))
            base = held(idc, X[:-1], d_w, z)

            def move(Zs):
                return g0 + held(idc, Zs, d_w, z) - base

        def stage(r, Z):    # Z[j] <- step_{j-1}(Z[j-1]) while the composition reaches j - r
            moved = move(Z[:-1])
            return Z.at[1:].set(jnp.where(bcast(j >= r, moved), moved, Z[1:]))

        Z1 = X.at[1:].set(g0)
        ok = valid                                   # the latent leaving window position w exists
        Zk = jax.lax.fori_loop(2, k_res + 1, stage, Z1) if k_res > 1 else Z1
        R = jnp.where(bcast(ok, X[1:]), Zk[1:] - X[1:], 0.0)
        Xn = X[1:]
        hx_w = jax.lax.dynamic_slice_in_dim(hx, begin + 1, W)                  # [W, mh, ...]
        hr_w = jax.lax.dynamic_slice_in_dim(hr, begin + 1, W)
        c_w = jax.lax.dynamic_slice_in_dim(cnt, begin + 1, W)
        # differences between consecutive iterates: (stored..., current), newest last
        xs = jnp.concatenate([hx_w, Xn[:, None]], axis=1)                      # [W, mh + 1]
        rs = jnp.concatenate([hr_w, R[:, None]], axis=1)
        dX, dR = xs[:, 1:] - xs[:, :-1], rs[:, 1:] - rs[:, :-1]                 # [W, mh, ...]
        have = jnp.minimum(c_w, mh)                                            # usable diffs
        use = (jnp.arange(mh)[None, :] >= mh - have[:, None]) & ok[:, None]    # [W, mh]
        if history < 2:
            use = jnp.zeros_like(use)
        um = use.reshape(use.shape + (1,) * x0.ndim)
        dR, dX = jnp.where(um, dR, 0.0), jnp.where(um, dX, 0.0)
        B = dot(dR[:, :, None], dR[:, None, :])                                # [W, mh, mh, B]
        dv = dot(dR, R[:, None])                                               # [W, mh, B]
        B, dv = jnp.cumsum(B, axis=0), jnp.cumsum(dv, axis=0)   # triangular: positions <= j
        u2 = (use[:, :, None] & use[:, None, :])[..., None]
        eye = jnp.eye(mh)[None, :, :, None]
        Bm = jnp.where(u2, B, 0.0)
        scale_b = jnp.maximum(jnp.trace(Bm, axis1=1, axis2=2)[:, None, None, :] / mh, 1e-20)
        A = Bm + lam * scale_b * eye + jnp.where(u2, 0.0, eye)   # lam relative to |dR|^2
        rhs = jnp.where(use[..., None], dv, 0.0)
        gamma = jnp.linalg.solve(jnp.moveaxis(A, -1, 1),
                                 jnp.moveaxis(rhs, -1, 1)[..., None])[..., 0]  # [W, B, mh]
        gamma = jnp.where(use[:, None, :], gamma, 0.0)
        g = jnp.moveaxis(gamma, 1, -1)                                         # [W, mh, B]
        corr = jnp.sum((dX + dR) * g.reshape(g.shape + (1,) * (x0.ndim - 1)), axis=1)
        new = (Xn + R - corr).at[0].set(Z1[1])  # the first step: exact from the accepted one
        push = lambda h, v: jnp.where(  # noqa: E731
            bcast(ok, h), jnp.concatenate([h[:, 1:], v[:, None]], 1), h)
        hx = jax.lax.dynamic_update_slice_in_dim(hx, push(hx_w, Xn), begin + 1, 0)
        hr = jax.lax.dynamic_update_slice_in_dim(hr, push(hr_w, R), begin + 1, 0)
        cnt = jax.lax.dynamic_update_slice_in_dim(cnt, c_w + ok.astype(jnp.int32), begin + 1, 0)
        # accept "trajectory": the order-k residual against each step's noise std; for k = the
        # window it estimates each latent's error given the accepted start, as ParaDiGMS's
        # cumulative change does (the 1-step residual accepted ~5x larger errors at the same
        # relative tolerance). accept "residual": ParaTAA's rule, the 1-step residual.
        if accept == "residual":
            return new.astype(dtype), jnp.where(bcast(ok, X[1:]), Z1[1:] - X[1:], 0.0), \
                hx, hr, cnt
        return new.astype(dtype), R, hx, hr, cnt

    def paradigms_update(idc, xw, out, valid, hist, z, old):
        """ParaDiGMS: the frozen increments summed from the window's start -> (new latents
        [W], their change since the last round)."""
        if multistep:
            drift, scale = jax.vmap(solver.picard_multistep)(idc, xw, hist)
        else:
            drift, scale = jax.vmap(solver.picard_terms)(idc, xw, out)
        inc = increment(drift, scale, z)
        inc = jnp.where(bcast(valid & (pos > 0), inc), inc, 0.0)
        # The window's first step starts from an accepted latent: take it with the solver's
        # own step (bit-identical to sequential sampling), then add the later increments.
        first = frozen_step(idc[0], xw[0], out[0], hist[0] if multistep else None, z[0])
        new = (first[None] + jnp.cumsum(inc, axis=0)).astype(dtype)
        return new, (new - old).astype(jnp.float32)

    def width(begin):   # the window: one step at a time during the warm-up
        return jnp.where(begin < warmup, 1, p)

    def extrapolate(q, x, x0_hat, z):
        """ParaSolver: the latent after step q from x with the data prediction held at x0_hat
        (the solver's own step, fed the model output that predicts x0_hat)."""
        if multistep:
            hist = jnp.broadcast_to(x0_hat, (hist_len,) + x0_hat.shape)
            drift, scale = solver.picard_multistep(q, x, hist)
        else:
            drift, scale = solver.picard_terms(q, x, solver.output_for_x0(q, x, x0_hat))
        return (x.astype(jnp.float32) + increment(drift, scale, z)).astype(dtype)

    def body(c):
        begin, it, evals, buf, preds, begins, errors, bad, hx, hr, cnt = c
        pe = width(begin)
        idx = begin + pos
        valid = (idx < n) & (pos < pe)
        idc = jnp.minimum(idx, n - 1)
        xw = jax.lax.dynamic_slice_in_dim(buf, begin, W)                  # [W, B, ...]
        t = jnp.broadcast_to(timesteps[idc][:, None], (W, x0.shape[0]))
        xin = jax.vmap(solver.scale_model_input)(xw, idc)
        out = evaluate(m_dynamic, xin, t, valid)
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
        if taa:
            new, diff, hx, hr, cnt = taa_update(buf, begin, valid, idc, xw, out,
                                                 hist if multistep else None, z, hx, hr, cnt)
        else:
            new, diff = paradigms_update(idc, xw, out, valid, hist if multistep else None, z,
                                         old)
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
        if method in ("parasolver", "taa"):
            # chain the solver's steps from x_end with the data prediction of the window's
            # last evaluated position held fixed (ParaSolver's DDIM/DDPM extrapolation)
            last = jnp.clip(end - begin - 1, 0, W - 1)
            x0_hat = (d[last] if multistep else
                      solver.data_prediction(idc[last], xw[last], out[last])).astype(dtype)
            zs = jax.lax.dynamic_slice_in_dim(noise, end, W)

            def chain(x, j):
                q = jnp.minimum(end + j, n - 1)
                x_next = extrapolate(q, x, x0_hat, zs[j])
                return x_next, x_next

            _, xs = jax.lax.scan(chain, buf[end], jnp.arange(W, dtype=jnp.int32))
            guess = jnp.concatenate([buf[end][None], xs])
        else:   # ParaDiGMS: a copy of the window's last latent
            guess = jnp.broadcast_to(buf[end][None], seg.shape)
        if not warm:    # (a warm start keeps the previous trajectory's latents as guesses)
            seg = jnp.where(bcast(fill, seg), guess, seg)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, seg, end, 0)
        begins = begins.at[it].set(begin)
        errors = errors.at[it].set(jnp.where(valid, jnp.max(ratio, axis=1) / tol2, jnp.nan)[:p])
        prog.report(progress, jnp.minimum(new_begin, n), n)
        accepted = jnp.minimum(new_begin, n)
        prog.notify(every, token, begin, accepted, n, timesteps, buf[accepted])
        if taa:   # positions seen for the first time (or restarted) start a fresh history
            c_w = jax.lax.dynamic_slice_in_dim(cnt, begin + 1, W)
            cnt = jax.lax.dynamic_update_slice_in_dim(cnt, jnp.where(blown, 0, c_w), begin + 1, 0)
            c_seg = jax.lax.dynamic_slice_in_dim(cnt, end + 1, W)
            cnt = jax.lax.dynamic_update_slice_in_dim(
                cnt, jnp.where(fill[1:], 0, c_seg), end + 1, 0)
        return (new_begin, it + 1, evals + jnp.sum(valid.astype(jnp.int32)), buf, preds,
                begins, errors, bad, hx, hr, cnt)

    if warm and multistep and start > 0:
        # the steps kept from the previous trajectory feed the first re-solved multistep
        # updates: their data predictions, one model call each
        model = combine(m_dynamic, m_spec)
        for q in range(max(start - hist_len + 1, 0), start):
            xq = solver.scale_model_input(buf[q], q)
            out_q = model(xq, jnp.full((bsz,), timesteps[q]))
            preds0 = preds0.at[q].set(solver.data_prediction(q, buf[q], out_q)
                                      .astype(jnp.float32))
    init = (jnp.int32(start), jnp.int32(0), jnp.int32(0), buf, preds0,
            jnp.full((n,), -1, jnp.int32), jnp.full((n, p), jnp.nan, jnp.float32),
            jnp.int32(-1), hist_x0, hist_x0, count0)
    begin, it, evals, buf, _, begins, errors, bad, *_ = jax.lax.while_loop(
        lambda c: (c[0] < n) & (c[7] < 0), body, init)
    x_final = buf[n]
    if mesh is not None:   # every process can read the result, whatever the batch layout
        x_final = jax.lax.with_sharding_constraint(
            x_final, jax.sharding.NamedSharding(mesh, par.P()))
    traj = buf[:n + 1] if trajectory else None
    return x_final, (it, evals, begins, errors, bad, traj)


def paradigms(model_fn: Callable, solver, x_T, *, parallel: int, tolerance: float,
              key: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
              mesh=None, progress: Union[bool, Callable] = False,
              chunk: Union[int, str, None] = "auto", method: str = "paradigms",
              warmup: Optional[int] = None, order: Optional[int] = None, history: int = 2,
              lam: float = 1e-3, hold: str = "data", accept: str = "trajectory",
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
    ``method``: how positions entering the window for the first time are initialised:
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
    if warmup is None:
        warmup = 0 if method == "paradigms" else 1
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int (sequential steps before the "
                         f"window opens), got {warmup!r}")
    warmup = min(int(warmup), n)
    if order is not None and (isinstance(order, bool) or not isinstance(order, (int, np.integer))
                              or order < 1):
        raise ValueError(f"order must be None (the whole window) or a positive int, got "
                         f"{order!r}")
    if isinstance(history, bool) or history not in (1, 2):
        # history >= 3 (two or more residual differences) was unstable on the digits model
        # in float32 (NaN at the last low-noise steps): not offered until it is made robust
        raise ValueError(f"history must be 1 (no Anderson acceleration) or 2 (ParaTAA's m = 2: "
                         f"one scalar Gamma per step), got {history!r}")
    if hold not in HOLDS:
        raise ValueError(f"hold must be one of {list(HOLDS)}, got {hold!r}")
    if accept not in ACCEPTS:
        raise ValueError(f"accept must be one of {list(ACCEPTS)}, got {accept!r}")
    if method != "taa" and (hold != "data" or accept != "trajectory"):
        raise ValueError(f"hold= and accept= are options of method='taa' (ParaTAA's step model "
                         f"and acceptance rule), not of {method!r}")
    if hold == "output" and _multistep(solver):
        raise ValueError(f"hold='output' needs a single-step solver; {type(solver).__name__} is "
                         f"multistep and holds its data-prediction history")
    lam_f = float(lam)
    if not (np.isfinite(lam_f) and lam_f >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    start = 0
    if init is not None:
        init = jnp.asarray(init)
        want = (n + 1,) + tuple(x_T.shape)
        if tuple(init.shape) != want:
            raise ValueError(f"init must be a trajectory of shape {want} (num_steps + 1 latents "
                             f"of x_T's shape), got {tuple(init.shape)}")
        if resolve is None:
            resolve = n
        if isinstance(resolve, bool) or not isinstance(resolve, (int, np.integer)) or \
                not 1 <= resolve <= n:
            raise ValueError(f"resolve must be an int in [1, {n}] (the number of final steps "
                             f"to re-solve), got {resolve!r}")
        start = n - int(resolve)
        if not isinstance(init, jax.core.Tracer) and \
                not bool(jnp.all(jnp.isfinite(init[:start + 1]))):
            raise ValueError("init holds NaN/inf in the steps it keeps")
    elif resolve is not None:
        raise ValueError("resolve needs init= (the trajectory whose last steps are re-solved)")
    mode, rand = rand.mode, rand.value
    if mesh is not None:
        par.check_mesh(mesh)
    if isinstance(chunk, str) and chunk == "auto":
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        # CPU: small calls (CPU_SAMPLES_PER_CALL's sweep), and chunks let positions past
        # the end be skipped
        local = x_T.shape[0] // max(par.prompt_shards(mesh), 1)
        if isinstance(model_fn, ModelFn) and model_fn.uncond is not None:
            local *= 2             # guidance: the network sees both halves
        chunk = max(1, CPU_SAMPLES_PER_CALL // max(local, 1)) if platform == "cpu" else None
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
    if init is not None and mesh is not None:
        init = par.place(init, mesh, par.P(None, par.PROMPTS)) if shards > 1 else \
            par.replicate(init, mesh)
    with prog.listening(callback, callback_steps, "jaxdiff.paradigms", x_T) as (every, token):
        x0, (it, evals, begins, errors, bad, traj) = _run(
            dynamic, x_T, rand, jnp.float32(tol), jnp.float32(lam_f), init, token, spec=spec,
            window=window, start=start, trajectory=bool(trajectory), parallel=p, mode=mode,
            mesh=mesh, progress=progress, chunk=chunk, leaf_specs=leaf_specs, method=method,
            warmup=warmup, order=window if order is None else int(order),
            history=int(history) if method == "taa" else 1, every=every, hold=hold,
            accept=accept)
    if not isinstance(bad, jax.core.Tracer) and int(bad) >= 0:
        raise NonFiniteError(f"jaxdiff.paradigms ({method}): NaN/inf in the model output or the "
                             f"window update at step {int(bad)} (model time "
                             f"{float(solver.timesteps[int(bad)]):g}) in round {int(it)}; the "
                             f"loop stopped there (check the model; for 'taa' raise lam or "
                             f"lower history)")
    if isinstance(it, jax.core.Tracer):     # paradigms itself under an outer jit
        stats = ParadigmsStats(iterations=it, model_evaluations=evals, num_steps=n,
                               parallel=p, begins=begins, errors=errors, trajectory=traj)
    else:
        it = int(it)
        stats = ParadigmsStats(iterations=it, model_evaluations=int(evals), num_steps=n,
                               parallel=p, begins=np.asarray(begins)[:it],
                               errors=np.asarray(errors)[:it], trajectory=traj)
    return x0, stats


def _shard_model_fn(model_fn, mesh):
    """A guidance model function with its per-sample conditioning split over the mesh's
    prompts axis; other model functions are returned as they are (their owner lays them out)."""
    if not isinstance(model_fn, ModelFn):
        return model_fn
    return model_fn.map_batch(lambda leaf: par.shard_batch(leaf, mesh))


__all__ = ["METHODS", "NonFiniteError", "ParadigmsStats", "paradigms"]
