"""Picard methods as values: how a window round moves its latents, and how positions entering
the window for the first time are guessed.

The loop itself (``jaxdiff.sampling.picard``) is the same for every method: it evaluates the
model at the window's positions in one batched call, asks the method for the new latents
and the change it measures them by, accepts the converged prefix, and asks the method to
guess the latents the next window sees first. A method is a frozen dataclass with its own
state (a NamedTuple carried through the ``lax.while_loop``) and these hooks:

- ``check(solver)``: host-side validation before tracing (a clear ``ValueError``);
- ``inverse_norm(loop, variance)``: [num_steps] weights of the squared change compared with
  tolerance^2;
- ``init(loop) -> state`` and ``fresh(loop, state, begin, end, blown, fill) -> state`` (the
  state of positions restarted or seen for the first time);
- ``update(loop, state, r) -> (new latents [W], change [W], state)``;
- ``guess(loop, r, buf, end) -> [W + 1]`` latents from ``buf[end]`` on.

``Paradigms()`` (Shih et al. 2023), ``ParaSolver()`` (Lu et al. 2025) and
``ParaTAA(order, history, lam, hold, accept)`` (Tang et al. 2024) are the three; a new one is
another value with these hooks, not another loop. Array fields (ParaTAA's ``lam``) are traced:
changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

HOLDS = ("data", "output")           # ParaTAA: what each step's model holds at the iterate
ACCEPTS = ("trajectory", "residual")    # ParaTAA: which residual the tolerance is compared with


class Round(NamedTuple):
    """One round's window, as the loop evaluated it (W positions from ``begin``)."""

    begin: jax.Array
    valid: jax.Array          # [W] position inside the trajectory and the window's width
    idc: jax.Array            # [W] step indices (clamped to the last step)
    xw: jax.Array             # [W] latents entering the window's steps
    out: jax.Array            # [W] model outputs
    hist: Any                 # [W, history] data predictions (multistep solvers) or None
    d: Any                    # [W] data predictions (multistep solvers) or None
    z: jax.Array              # [W] the steps' noise draws
    old: jax.Array            # [W] latents leaving the window's steps, before this round
    buf: jax.Array            # the whole trajectory buffer


class Loop:
    """What a method sees of the loop: the solver, the sizes, the noise mode and the step
    helpers every method shares (built inside the jitted loop, holds no state)."""

    def __init__(self, solver, num_steps: int, window: int, x0, mode: str, noise):
        self.solver, self.n, self.W, self.mode = solver, num_steps, window, mode
        self.noise = noise        # [n + W] the steps' standard-normal draws (zero past the end)
        self.dtype, self.ndim, self.x0_shape = x0.dtype, x0.ndim, tuple(x0.shape)
        self.multistep = solver.picard == "multistep"
        self.hist_len = int(solver.picard_history) if self.multistep else 0
        self.pos = jnp.arange(window, dtype=jnp.int32)

    def bcast(self, v, like):
        """[W] -> [W, 1, ...] against ``like``."""
        return v.reshape(v.shape + (1,) * (like.ndim - 1))

    def dot(self, a, b):
        """Per-sample inner products over the trailing axes: [..., B, ...] -> [..., B]."""
        lead = a.ndim - self.ndim + 1
        return jnp.sum((a * b).reshape(a.shape[:lead] + (-1,)), axis=-1)

    def increment(self, drift, scale, z):
        """A Picard split's move drift + noise_scale * z, in float32 (no noise without
        randomness)."""
        inc = drift.astype(jnp.float32)
        if self.mode != "none":
            scale = jnp.asarray(scale, jnp.float32)
            inc = inc + scale.reshape(scale.shape + (1,) * (z.ndim - scale.ndim)) * \
                z.astype(jnp.float32)
        return inc

    def frozen_step(self, q, x, out_q, hist_q, z_q):
        """Step q from x with the model output (multistep: the history) frozen."""
        s = self.solver
        if self.multistep:
            return s.picard_step(q, x.astype(self.dtype), hist_q, z_q).astype(jnp.float32)
        return s.step(s.init(x), q, x.astype(self.dtype), out_q, z_q)[0].astype(jnp.float32)

    def extrapolate(self, q, x, x0_hat, z):
        """The latent after step q from x with the data prediction held at x0_hat (the
        solver's own step, fed the model output that predicts x0_hat)."""
        s = self.solver
        if self.multistep:
            hist = jnp.broadcast_to(x0_hat, (self.hist_len,) + x0_hat.shape)
            drift, scale = s.picard_multistep(q, x, hist)
        else:
            drift, scale = s.picard_terms(q, x, s.output_for_x0(q, x, x0_hat))
        return (x.astype(jnp.float32) + self.increment(drift, scale, z)).astype(self.dtype)

    def variance_norm(self, variance, per_sample: int):
        """ParaDiGMS's weights: the latent leaving step k enters step k + 1, so its squared
        change is scaled by that step's noise variance (the final latent: 0, never
        converged early)."""
        var = jnp.concatenate([variance[1:], jnp.zeros((1,), jnp.float32)])
        return (1.0 / var) / per_sample


class NoState(NamedTuple):
    """The state of methods that carry none between rounds."""


@dataclasses.dataclass(frozen=True)
class PicardMethod:
    """The hooks' defaults: ParaDiGMS's acceptance, no state."""

    name: ClassVar[str] = ""
    default_warmup: ClassVar[int] = 0

    def check(self, solver) -> None:
        return None

    def inverse_norm(self, loop: Loop, variance, per_sample: int):
        return loop.variance_norm(variance, per_sample)

    def init(self, loop: Loop):
        return NoState()

    def fresh(self, loop: Loop, state, begin, end, blown, fill):
        return state

    def update(self, loop: Loop, state, r: Round):
        raise NotImplementedError

    def guess(self, loop: Loop, r: Round, buf, end):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Paradigms(PicardMethod):
    """ParaDiGMS (Shih et al. 2023): the frozen increments summed from the window's start;
    new positions start as a copy of the window's last latent."""

    name: ClassVar[str] = "paradigms"
    default_warmup: ClassVar[int] = 0

    def update(self, loop, state, r):
        if loop.multistep:
            drift, scale = jax.vmap(loop.solver.picard_multistep)(r.idc, r.xw, r.hist)
        else:
            drift, scale = jax.vmap(loop.solver.picard_terms)(r.idc, r.xw, r.out)
        inc = loop.increment(drift, scale, r.z)
        inc = jnp.where(loop.bcast(r.valid & (loop.pos > 0), inc), inc, 0.0)
        # The window's first step starts from an accepted latent: take it with the solver's
        # own step (bit-identical to sequential sampling), then add the later increments.
        first = loop.frozen_step(r.idc[0], r.xw[0], r.out[0],
                                 r.hist[0] if loop.multistep else None, r.z[0])
        new = (first[None] + jnp.cumsum(inc, axis=0)).astype(loop.dtype)
        return new, (new - r.old).astype(jnp.float32), state

    def guess(self, loop, r, buf, end):
        return jnp.broadcast_to(buf[end][None], (loop.W + 1,) + buf.shape[1:])


@dataclasses.dataclass(frozen=True)
class ParaSolver(Paradigms):
    """ParaSolver (Lu et al. 2025): ParaDiGMS's update; new positions by the solver's own
    steps from the window's last latent with the data prediction of the window's last
    evaluated position held fixed (for DDIM the DDIM jump)."""

    name: ClassVar[str] = "parasolver"
    default_warmup: ClassVar[int] = 1

    def guess(self, loop, r, buf, end):
        last = jnp.clip(end - r.begin - 1, 0, loop.W - 1)
        x0_hat = (r.d[last] if loop.multistep else
                  loop.solver.data_prediction(r.idc[last], r.xw[last], r.out[last])
                  ).astype(loop.dtype)
        zs = jax.lax.dynamic_slice_in_dim(loop.noise, end, loop.W)

        def chain(x, j):
            q = jnp.minimum(end + j, loop.n - 1)
            x_next = loop.extrapolate(q, x, x0_hat, zs[j])
            return x_next, x_next

        _, xs = jax.lax.scan(chain, buf[end], jnp.arange(loop.W, dtype=jnp.int32))
        return jnp.concatenate([buf[end][None], xs])


class TAAState(NamedTuple):
    """ParaTAA's per-step history: the last iterates and residuals (newest last) and how many
    of them each step has."""

    x: jax.Array          # [n + W + 1, history - 1, ...]
    r: jax.Array
    count: jax.Array      # [n + W + 1]


def _positive_int_or_none(value, what):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise ValueError(f"{what} must be None (the whole window) or a positive int, got "
                         f"{value!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ParaTAA(ParaSolver):
    """ParaTAA (Tang et al. 2024): ParaSolver's initialisation, the order-``order`` residual
    (``order`` steps from the latent ``order`` below, each frozen at the current iterate;
    None: the whole window) and triangular Anderson acceleration over the last ``history``
    iterates of every step (1: none; ``lam``: the least squares' regularisation, relative to
    the mean squared residual difference). ``hold``: "data" (the data prediction frozen,
    anchored to the exact step) or "output" (the model output frozen, ParaTAA's model);
    ``accept``: "trajectory" (the order-k residual against each step's noise std) or
    "residual" (ParaTAA's rule: the 1-step residual's RMS in latent units)."""

    name: ClassVar[str] = "taa"
    default_warmup: ClassVar[int] = 1
    order: Optional[int] = dataclasses.field(default=None, metadata={"static": True})
    history: int = dataclasses.field(default=2, metadata={"static": True})
    lam: Any = 1e-3
    hold: str = dataclasses.field(default="data", metadata={"static": True})
    accept: str = dataclasses.field(default="trajectory", metadata={"static": True})

    def check(self, solver) -> None:
        _positive_int_or_none(self.order, "order")
        if isinstance(self.history, bool) or self.history not in (1, 2):
            # history >= 3 (two or more residual differences) was unstable on the digits
            # model in float32 (NaN at the last low-noise steps): not offered until robust
            raise ValueError(f"history must be 1 (no Anderson acceleration) or 2 (ParaTAA's "
                             f"m = 2: one scalar Gamma per step), got {self.history!r}")
        lam = float(self.lam)
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.hold not in HOLDS:
            raise ValueError(f"hold must be one of {list(HOLDS)}, got {self.hold!r}")
        if self.accept not in ACCEPTS:
            raise ValueError(f"accept must be one of {list(ACCEPTS)}, got {self.accept!r}")
        if self.hold == "output" and solver.picard == "multistep":
            raise ValueError(f"hold='output' needs a single-step solver; "
                             f"{type(solver).__name__} is multistep and holds its "
                             f"data-prediction history")

    @property
    def stored(self) -> int:
        """Past iterates kept per step (a ring, newest last)."""
        return max(self.history - 1, 1)

    def inverse_norm(self, loop, variance, per_sample):
        if self.accept == "residual":  # the 1-step residual's RMS, every step alike
            return jnp.full((loop.n,), 1.0 / per_sample, jnp.float32)
        return loop.variance_norm(variance, per_sample)

    def init(self, loop):
        h = jnp.zeros((loop.n + loop.W + 1, self.stored) + loop.x0_shape, jnp.float32)
        return TAAState(h, h, jnp.zeros((loop.n + loop.W + 1,), jnp.int32))

    def fresh(self, loop, state, begin, end, blown, fill):
        """Positions seen for the first time (or restarted) start a fresh history."""
        W, cnt = loop.W, state.count
        c_w = jax.lax.dynamic_slice_in_dim(cnt, begin + 1, W)
        cnt = jax.lax.dynamic_update_slice_in_dim(cnt, jnp.where(blown, 0, c_w), begin + 1, 0)
        c_seg = jax.lax.dynamic_slice_in_dim(cnt, end + 1, W)
        cnt = jax.lax.dynamic_update_slice_in_dim(cnt, jnp.where(fill[1:], 0, c_seg), end + 1, 0)
        return state._replace(count=cnt)

    def _step_model(self, loop, r, X, hq, g0):
        """How each step depends on x away from the iterate (the fixed point is the same
        either way; only the speed of convergence differs). hold "output": the model output
        frozen at the iterate, ParaTAA's model: for DDIM an exact linear map with DDIM's own
        coefficients. hold "data": the data prediction frozen (ParaSolver's extrapolation),
        anchored at the iterate to the solver's exact step; needed where the data prediction
        is clipped or thresholded: there the frozen-output step has no x-dependence left,
        while the true step carries x nearly one to one (digits DDIM-50, clip_sample, window
        16, tolerance 0.01: 48 rounds frozen output with the 1-step acceptance, 13 frozen data
        with the order-k acceptance). Multistep solvers freeze their data-prediction
        history."""
        if loop.multistep or self.hold == "output":
            return lambda Zs: jax.vmap(loop.frozen_step)(r.idc, Zs, r.out, hq, r.z)
        d_w = jax.vmap(loop.solver.data_prediction)(r.idc, r.xw, r.out).astype(loop.dtype)
        held = jax.vmap(lambda q, x, d, zq: loop.extrapolate(q, x, d, zq).astype(jnp.float32))
        base = held(r.idc, X[:-1], d_w, r.z)
        return lambda Zs: g0 + held(r.idc, Zs, d_w, r.z) - base

    def update(self, loop, state, r):
        """The order-k residual (k steps from the latent k below, each frozen at the current
        iterate), then triangular Anderson acceleration over the last ``history`` iterates of
        every step: Gamma_j from the residual differences of the window's positions up to j."""
        W, mh, bcast = loop.W, self.stored, loop.bcast
        k_res = min(W if self.order is None else self.order, W)
        X = jnp.concatenate([r.xw, jax.lax.dynamic_slice_in_dim(r.buf, r.begin + W, 1)]
                            ).astype(jnp.float32)                              # [W + 1]
        j = jnp.arange(1, W + 1)
        hq = r.hist if loop.multistep else jnp.zeros((W,))
        g0 = jax.vmap(loop.frozen_step)(r.idc, X[:-1], r.out, hq, r.z)        # exact steps
        move = self._step_model(loop, r, X, hq, g0)

        def stage(s, Z):    # Z[j] <- step_{j-1}(Z[j-1]) while the composition reaches j - s
            moved = move(Z[:-1])
            return Z.at[1:].set(jnp.where(bcast(j >= s, moved), moved, Z[1:]))

        Z1 = X.at[1:].set(g0)
        ok = r.valid                                 # the latent leaving window position w exists
        Zk = jax.lax.fori_loop(2, k_res + 1, stage, Z1) if k_res > 1 else Z1
        R = jnp.where(bcast(ok, X[1:]), Zk[1:] - X[1:], 0.0)
        Xn = X[1:]
        hx_w = jax.lax.dynamic_slice_in_dim(state.x, r.begin + 1, W)          # [W, mh, ...]
        hr_w = jax.lax.dynamic_slice_in_dim(state.r, r.begin + 1, W)
        c_w = jax.lax.dynamic_slice_in_dim(state.count, r.begin + 1, W)
        # differences between consecutive iterates: (stored..., current), newest last
        xs = jnp.concatenate([hx_w, Xn[:, None]], axis=1)                      # [W, mh + 1]
        rs = jnp.concatenate([hr_w, R[:, None]], axis=1)
        dX, dR = xs[:, 1:] - xs[:, :-1], rs[:, 1:] - rs[:, :-1]                 # [W, mh, ...]
        have = jnp.minimum(c_w, mh)                                            # usable diffs
        use = (jnp.arange(mh)[None, :] >= mh - have[:, None]) & ok[:, None]    # [W, mh]
        if self.history < 2:
            use = jnp.zeros_like(use)
        um = use.reshape(use.shape + (1,) * loop.ndim)
        dR, dX = jnp.where(um, dR, 0.0), jnp.where(um, dX, 0.0)
        B = loop.dot(dR[:, :, None], dR[:, None, :])                           # [W, mh, mh, B]
        dv = loop.dot(dR, R[:, None])                                          # [W, mh, B]
        B, dv = jnp.cumsum(B, axis=0), jnp.cumsum(dv, axis=0)   # triangular: positions <= j
        u2 = (use[:, :, None] & use[:, None, :])[..., None]
        eye = jnp.eye(mh)[None, :, :, None]
        Bm = jnp.where(u2, B, 0.0)
        scale_b = jnp.maximum(jnp.trace(Bm, axis1=1, axis2=2)[:, None, None, :] / mh, 1e-20)
        A = Bm + self.lam * scale_b * eye + jnp.where(u2, 0.0, eye)   # lam relative to |dR|^2
        rhs = jnp.where(use[..., None], dv, 0.0)
        gamma = jnp.linalg.solve(jnp.moveaxis(A, -1, 1),
                                 jnp.moveaxis(rhs, -1, 1)[..., None])[..., 0]  # [W, B, mh]
        gamma = jnp.where(use[:, None, :], gamma, 0.0)
        g = jnp.moveaxis(gamma, 1, -1)                                         # [W, mh, B]
        corr = jnp.sum((dX + dR) * g.reshape(g.shape + (1,) * (loop.ndim - 1)), axis=1)
        new = (Xn + R - corr).at[0].set(Z1[1])  # the first step: exact from the accepted one

        def push(h, v):
            return jnp.where(bcast(ok, h), jnp.concatenate([h[:, 1:], v[:, None]], 1), h)

        state = TAAState(
            jax.lax.dynamic_update_slice_in_dim(state.x, push(hx_w, Xn), r.begin + 1, 0),
            jax.lax.dynamic_update_slice_in_dim(state.r, push(hr_w, R), r.begin + 1, 0),
            jax.lax.dynamic_update_slice_in_dim(state.count, c_w + ok.astype(jnp.int32),
                                                r.begin + 1, 0))
        # accept "trajectory": the order-k residual against each step's noise std; for k = the
        # window it estimates each latent's error given the accepted start, as ParaDiGMS's
        # cumulative change does (the 1-step residual accepted ~5x larger errors at the same
        # relative tolerance). accept "residual": ParaTAA's rule, the 1-step residual.
        if self.accept == "residual":
            return new.astype(loop.dtype), jnp.where(bcast(ok, X[1:]), Z1[1:] - X[1:], 0.0), \
                state
        return new.astype(loop.dtype), R, state


METHODS = {"paradigms": Paradigms, "parasolver": ParaSolver, "taa": ParaTAA}


def picard_method(method="paradigms", *, order=None, history=None, lam=None, hold=None,
                  accept=None) -> PicardMethod:
    """A method value from a name and ParaTAA's options (the keyword form of
    ``jaxdiff.paradigms``); a method value is returned as it is."""
    options = {k: v for k, v in dict(order=order, history=history, lam=lam, hold=hold,
                                      accept=accept).items() if v is not None}
    if isinstance(method, PicardMethod):
        if options:
            raise ValueError(f"options {sorted(options)} go into the method value itself, not "
                             f"beside {method!r}")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown Picard method {method!r}; jaxdiff implements "
                         f"{list(METHODS)} (or a PicardMethod value)")
    if method != "taa":
        if options:
            raise ValueError(f"{', '.join(k + '=' for k in sorted(options))} are options of "
                             f"method='taa' (ParaTAA's residual order, Anderson history, step "
                             f"model and acceptance rule), not of {method!r}")
        return METHODS[method]()
    return ParaTAA(**options)


__all__ = ["ACCEPTS", "HOLDS", "Loop", "METHODS", "NoState", "ParaSolver", "ParaTAA",
           "Paradigms", "PicardMethod", "Round", "TAAState", "picard_method"]
