"""TimeTuner (Xia et al., CVPR 2024): learn one time ratio per sampler step.

At step i the DDIM sampler asks the network for its noise at r_i * t_i instead of t_i.
The ratios are learned by gradient descent on a self-consistency loss: starting from an
x_{t_i} (data noised to t_i, or the sampler's own state there), take one tuned step to
t_{i+1} and ask that the network's noise there match its (fixed) noise at x_{t_i}:

    loss_i(r) = mean_batch sum_pixels ( eps(x_{t_i}, t_i) - eps(x_{t_{i+1}}(r), t_{i+1}) )^2
    x_{t_{i+1}}(r) = DDIM(x_{t_i}, eps(x_{t_i}, r t_i); t_i -> t_{i+1})

Where x_{t_i} comes from is the tune type:
  'parallel'   x_{t_i} = alpha_{t_i} x_0 + sigma_{t_i} noise; the indices are independent,
               so all ratios train at once (one jitted step, vmapped over the index);
  'sequential' x_{t_i} is what the sampler reaches after the already tuned steps 0..i-1,
               starting from alpha_T x_0 + sigma_T noise; indices are trained one after the
               other, by one compiled step in which the index is a traced argument.
The last step's ratio is not tuned (it stays 1), as in the reference.

Beyond the reference (its README lists it as future work), the tuned step can be a
multistep DPM-Solver++ step (``solver='dpmsolver++'``): the same loss, with x_{t_{i+1}}(r)
the DPM-Solver++(2M) update that also uses the previous step's data prediction.

There is one DDIM and one DPM-Solver++: jaxdiff's (``jaxdiff.solvers.ddim.on_vp_grid``,
``jaxdiff.solvers.dpm_solver.on_vp_grid``, built on the tuner's time grid). A ratio only
changes the network's time (``Solver.with_network_times``), sampling is ``jaxdiff.sample``,
and the loss takes its tuned step (and the sequential prefix) with ``solver.step``.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.sampling import progress as progress_mod
from jaxdiff.sampling import sample
from jaxdiff.sampling.pytree import combine, partition
from jaxdiff.schedules import NoiseScheduleVP, continuous_time, model_input_time
from jaxdiff.solvers import ddim as ddim_solver
from jaxdiff.solvers import dpm_solver
from jaxdiff.solvers.base import push, vp_x0
from jaxdiff.solvers.ddim import DDIM
from jaxdiff.solvers.dpm_solver import MultistepState
from tuning.checkpoint import RunCheckpoints

TUNE_TYPES = ("sequential", "parallel")
GRIDS = ("reference", "uniform")
SOLVERS = ("ddim", "dpmsolver++")
ADAM_BETAS = (0.9, 0.999)      # the reference's torch.optim.Adam settings

# How often each jitted function (and the bound model inside jaxdiff.sample, by sampler
# name) has been traced, for "does not recompile" tests.
TRACE_COUNTS: collections.Counter = collections.Counter()


class NonFiniteLossError(FloatingPointError):
    """The tuning loss (or a ratio) became NaN/inf; the message names step and iteration."""


# ------------------------------------------------------------------------------ the grid
def _check_num_steps(num_steps, total_n: int) -> int:
    if (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
            or not 1 <= int(num_steps) <= total_n):
        raise ValueError(f"num_steps must be an integer in [1, {total_n}], got {num_steps!r}")
    return int(num_steps)


def time_grid(noise_schedule: NoiseScheduleVP, num_steps: Optional[int] = None,
              timesteps=None, grid: str = "reference"):
    """-> (t [K], t_next [K]) as float64 numpy: step i goes from t[i] to t_next[i].

    ``grid='reference'`` is the grid of TimeTuner's DDIM: K training steps
    n_i = (K - 1 - i) * (N // K) + 1 (DDIM's "leading" spacing with offset 1), placed at
    their training times t = (n + 1) / N, and a final step to t = 1 / N (= eps). For
    continuous schedules the same grid is used with N = 1000. ``grid='uniform'``:
    K + 1 times evenly spaced from T down to eps (DPM-Solver's 'time_uniform').

    ``timesteps`` [K] overrides both: decreasing times in the network's own units (what
    ``model_wrapper`` passes to the network: 0..999 for 1000-step discrete models,
    continuous t otherwise), followed by the final step to eps.
    """
    ns = noise_schedule
    n_total = ns.total_N
    if timesteps is not None:
        ts = np.asarray(timesteps, np.float64)
        if ts.ndim != 1 or ts.shape[0] < 1:
            raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {ts.shape}")
        if num_steps is not None and int(num_steps) != ts.shape[0]:
            raise ValueError(f"num_steps={num_steps} disagrees with len(timesteps)="
                             f"{ts.shape[0]}")
        t = np.asarray(continuous_time(ns, ts), np.float64)
        t_next = np.concatenate([t[1:], [ns.eps]])
    elif grid in GRIDS:
        if num_steps is None:
            raise ValueError("pass num_steps or timesteps")
        k = _check_num_steps(num_steps, n_total)
        if grid == "reference":
            n = np.arange(k)[::-1] * (n_total // k) + 1
            t = (n + 1.0) / n_total
            t_next = np.concatenate([t[1:], [ns.eps]])
        else:
            ts = np.linspace(ns.T, ns.eps, k + 1)
            t, t_next = ts[:-1], ts[1:]
    else:
        raise ValueError(f"unsupported grid {grid!r}; choose one of {list(GRIDS)}")
    if not np.all(np.isfinite(t)) or np.any(t_next >= t):
        raise ValueError(f"timesteps must be finite and strictly decreasing to eps="
                         f"{ns.eps}; got times {t.tolist()}")
    return t, t_next


def check_solver(solver: str, order: int = 2) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unsupported solver {solver!r}; choose one of {list(SOLVERS)}")
    if solver == "dpmsolver++" and (isinstance(order, bool) or order not in (1, 2)):
        raise ValueError(f"DPM-Solver++ order must be 1 or 2 (multistep 2M), got {order!r}")


def dpm_orders(num_steps: int, order: int = 2, lower_order_final: bool = True) -> np.ndarray:
    """[K] order of each multistep DPM-Solver++ step (jaxdiff's ``step_orders``, diffusers'
    rule): first order at step 0, ``order`` after, and first order at the last step when
    ``lower_order_final`` and K < 15."""
    return np.asarray(dpm_solver.step_orders(int(num_steps), int(order),
                                             bool(lower_order_final), False, False), np.int32)


def grid_solver(noise_schedule: NoiseScheduleVP, t, t_next, solver: str = "ddim", order=2,
                lower_order_final=True, eta=0.0):
    """jaxdiff's DDIM or DPM-Solver++ on the grid t -> t_next (may be traced); its
    ``timesteps`` are the continuous times t (the tuner's model function takes those)."""
    check_solver(solver, order)
    if solver == "ddim":
        return ddim_solver.on_vp_grid(noise_schedule, t, t_next, eta=eta)
    return dpm_solver.on_vp_grid(noise_schedule, t, t_next, order=order,
                                 lower_order_final=lower_order_final)


# ------------------------------------------------------------------------------ the model
def predict_noise(model_fn, x, t, condition=None, uncond_condition=None):
    """model_fn at the scalar (or [B]) continuous time t for the batch x [B, ...]. The
    conditions are passed only when given, so plain ``fn(x, t)`` models work too."""
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if condition is None and uncond_condition is None:
        return model_fn(x, t)
    return model_fn(x, t, condition, uncond_condition)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["model_fn", "condition", "uncond_condition"],
                   meta_fields=["name"])
@dataclasses.dataclass(frozen=True, eq=False)
class BoundModel:
    """The tuner's noise predictor with one call's conditions bound: a 2-argument
    ``model_fn(x, t_continuous)`` for jaxdiff's drivers. A pytree (the model's and the
    conditions' arrays are traced leaves); ``name`` keys TRACE_COUNTS, counted each time
    a driver traces it."""

    model_fn: Any
    condition: Any = None
    uncond_condition: Any = None
    name: str = "sample"

    def __call__(self, x, t):
        TRACE_COUNTS[self.name] += 1
        return predict_noise(self.model_fn, x, t, self.condition, self.uncond_condition)


@functools.partial(jax.jit, static_argnames=("spec",))
def _model_predictions(dynamic, xs, *, spec):
    """Data predictions at every trajectory point xs [K, B, ...] (one vmapped call)."""
    model, solver = combine(dynamic, spec)

    def one(i, x):
        out = model(x, jnp.broadcast_to(solver.timesteps[i], (x.shape[0],)))
        return solver.data_prediction(i, x, out).astype(x.dtype)

    return jax.vmap(one)(jnp.arange(solver.num_steps), xs)


def _intermediates(model, solver, x, xs):
    """{'x_t', 'x0_pred'}: [K + 1, B, ...], entry 0 being the start x. For deterministic
    DDIM x0_pred solves x_i = a_t x0 + s_t eps, x_{i+1} = a_s x0 + s_s eps (no model
    call); otherwise the model is asked again at the trajectory points."""
    x_t = jnp.concatenate([x[None], xs])
    if isinstance(solver, DDIM) and not solver.stochastic and solver.prediction_type == "epsilon":
        shape = (-1,) + (1,) * x.ndim
        a, s = solver.sqrt_abar.reshape(shape), solver.sqrt_1m_abar.reshape(shape)
        c, d = solver.sqrt_abar_prev.reshape(shape), solver.dir_coef.reshape(shape)
        x0s = ((d * x_t[:-1] - s * x_t[1:]) / (a * d - s * c)).astype(x.dtype)
    else:
        dynamic, spec = partition((dataclasses.replace(model, name="intermediates"), solver))
        x0s = _model_predictions(dynamic, x_t[:-1], spec=spec)
    return {"x_t": x_t, "x0_pred": jnp.concatenate([x[None], x0s])}


# ------------------------------------------------------------------------------ the loss
def _flat_sq_mean(a):  # [B, ...] -> scalar: sum over a sample, mean over the batch
    return jnp.mean(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1))


def _tuned_step(model_fn, solver, state, i, x, ratio, cond, uncond):
    """Step i of the grid solver with the network at ratio * t_i -> (x_next, state)."""
    eps = predict_noise(model_fn, x, ratio * solver.timesteps[i], cond, uncond)
    x_next, state = solver.step(state, i, x, eps, jnp.zeros_like(x))
    return x_next.astype(x.dtype), state


def _start_state(model_fn, ns, solver, x0, noise, idx, ratios, t_cur, cond, uncond,
                 sequential: bool):
    """x at t_cur[idx], the solver state entering step idx (DPM-Solver++: its history
    holds the data prediction of step idx - 1) and the loss target eps(x, t_cur[idx]);
    all treated as constants.

    ``idx`` may be traced: the sequential prefix is a fori_loop (of ``solver.step``) with
    a traced trip count, which is why it must stay outside the differentiated function.
    In 'parallel' mode the DPM-Solver++ history is the network's data prediction at
    x_{t_{idx-1}} (the same data and noise), asked at that step's current ratio.
    """
    if sequential:
        big_t = jnp.asarray(ns.T, t_cur.dtype)
        x = (ns.marginal_alpha(big_t) * x0 + ns.marginal_std(big_t) * noise).astype(x0.dtype)

        def prefix_step(j, carry):
            x, state = carry
            return _tuned_step(model_fn, solver, state, j, x, ratios[j], cond, uncond)

        x, state = jax.lax.fori_loop(0, idx, prefix_step, (x, solver.init(x)))
    else:
        t = t_cur[idx]
        x = (ns.marginal_alpha(t) * x0 + ns.marginal_std(t) * noise).astype(x0.dtype)
        state = solver.init(x)
        if isinstance(state, MultistepState):
            j = jnp.maximum(idx - 1, 0)
            x_prev = (ns.marginal_alpha(t_cur[j]) * x0
                      + ns.marginal_std(t_cur[j]) * noise).astype(x0.dtype)
            eps_prev = predict_noise(model_fn, x_prev, ratios[j] * t_cur[j], cond, uncond)
            x0_prev = solver.data_prediction(j, x_prev, eps_prev)
            state = MultistepState(history=push(state.history, x0_prev))
    x, state = jax.lax.stop_gradient((x, state))
    target = predict_noise(model_fn, x, t_cur[idx], cond, uncond)
    return x, state, jax.lax.stop_gradient(target)


def _step_loss(ratio, model_fn, solver, x_t, state, target, idx, t_next, cond, uncond):
    x_s, _ = _tuned_step(model_fn, solver, state, idx, x_t, ratio, cond, uncond)
    eps_s = predict_noise(model_fn, x_s, t_next[idx], cond, uncond)
    return _flat_sq_mean(target - eps_s)


def _noise_for(key, idx, it, shape, dtype):
    """The noise of (step index, iteration): independent of how the run was interrupted
    or of the tune type, so resumed and parallel runs draw exactly the same numbers."""
    k = jax.random.fold_in(jax.random.fold_in(key, idx), it)
    return jax.random.normal(k, shape, dtype)


def _adam(lr):
    return optax.adam(lr, b1=ADAM_BETAS[0], b2=ADAM_BETAS[1])


def _one_update(model_fn, ns, solver, x0, cond, uncond, idx, it, ratio, opt_state, ratios,
                t_cur, t_next, lr, key, sequential):
    noise = _noise_for(key, idx, it, x0.shape, x0.dtype)
    x_t, state, target = _start_state(model_fn, ns, solver, x0, noise, idx, ratios, t_cur,
                                      cond, uncond, sequential)
    loss, grad = jax.value_and_grad(_step_loss)(ratio, model_fn, solver, x_t, state, target,
                                                idx, t_next, cond, uncond)
    updates, opt_state = _adam(lr).update(grad, opt_state, ratio)
    return optax.apply_updates(ratio, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("spec",))
def _sequential_update(dynamic, x0, cond, idx, it, ratio, opt_state, ratios, t_cur, t_next,
                       lr, key, *, spec):
    """One Adam step on ratio ``idx`` (a traced int32: one program for every index).
    ``dynamic``/``spec``: the partitioned (model_fn, schedule, uncond, grid solver)."""
    TRACE_COUNTS["sequential"] += 1
    model_fn, ns, uncond, solver = combine(dynamic, spec)
    return _one_update(model_fn, ns, solver, x0, cond, uncond, idx, it, ratio, opt_state,
                       ratios, t_cur, t_next, lr, key, sequential=True)


@functools.partial(jax.jit, static_argnames=("spec",))
def _parallel_update(dynamic, x0, cond, it, ratios_m, opt_states, ratios, t_cur, t_next, lr,
                     key, *, spec):
    """One Adam step on every tuned ratio at once. ratios_m [M], opt_states stacked [M]."""
    TRACE_COUNTS["parallel"] += 1
    model_fn, ns, uncond, solver = combine(dynamic, spec)
    m = ratios_m.shape[0]

    def one(idx, ratio, opt_state):
        return _one_update(model_fn, ns, solver, x0, cond, uncond, idx, it, ratio, opt_state,
                           ratios, t_cur, t_next, lr, key, sequential=False)

    return jax.vmap(one)(jnp.arange(m, dtype=jnp.int32), ratios_m, opt_states)


# ------------------------------------------------------------------------------ data
def _check_data(data):
    if isinstance(data, (np.ndarray, jax.Array)):
        raise ValueError("data must be an iterable of batches (e.g. [images] or a loader), "
                         "not a single array: iterating an array would yield single images")
    if isinstance(data, collections.abc.Iterator) or not isinstance(data,
                                                                   collections.abc.Iterable):
        raise ValueError(f"data must be a re-iterable collection of batches (a list, or a "
                         f"loader object whose iter() restarts), got {type(data).__name__}: "
                         f"each tuned index re-reads the data from the start, and resuming "
                         f"replays it")


def _cycle(data, skip: int):
    """Batches from the start of ``data``, over and over, after dropping ``skip``."""
    seen = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if seen >= skip:
                yield batch
            seen += 1
        if empty:
            raise ValueError("data yielded no batches")


def _split_batch(batch, encode_fn):
    """batch -> (x0 [B, ...] floating, labels or None). Accepts images, (images,),
    (images, labels) or {'image': ..., 'label': ...} (the reference's data_dict)."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"a dict batch needs an 'image' entry, got keys {sorted(batch)}")
        images, labels = batch["image"], batch.get("label")
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise ValueError(f"a tuple batch must be (images,) or (images, labels), got "
                             f"{len(batch)} items")
        images, labels = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        images, labels = batch, None
    if encode_fn is not None:
        images = encode_fn(images)
    x0 = jnp.asarray(images)
    if x0.ndim < 1:
        raise ValueError("a batch of images must have a leading batch dimension")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.float32)
    return x0, (None if labels is None else jnp.asarray(labels))


def _non_finite_message(tune_type, idx, it, bad, loss, ratio, t, ckpt, last_saved) -> str:
    where = (f"step index {idx} (t={t[idx]:.6g})" if idx is not None else
             f"step indices {np.flatnonzero(bad).tolist()}")
    if ckpt is None:
        kept = "no checkpoint_dir was given"
    elif last_saved is None:
        kept = f"no checkpoint was written yet in {ckpt.directory}"
    else:
        kept = f"the last good checkpoint (iteration {last_saved}) is kept in {ckpt.directory}"
    return (f"TimeTuner ({tune_type}): non-finite loss {loss.tolist()} or ratio "
            f"{ratio.tolist()} at {where}, iteration {it}; {kept}. Try a smaller lr, or "
            f"check the model and the data for NaN/inf.")


def _key_data(key) -> list:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).ravel().tolist()


# ------------------------------------------------------------------------------ the class
class TimeTuner:
    """Sample with DDIM at tuned times, and learn the tuning ratios.

    ``model_fn(x [B, ...], t_continuous [B], condition=None, unconditional_condition=None)
    -> eps`` is a noise predictor in continuous time, usually ``model_wrapper(...)``; a
    plain ``fn(x, t)`` works when no conditions are used. It may be a pytree (then its
    arrays are traced jit arguments, not constants).
    """

    def __init__(self, model_fn: Callable, noise_schedule: NoiseScheduleVP):
        if not callable(model_fn):
            raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")
        if not isinstance(noise_schedule, NoiseScheduleVP):
            raise ValueError(f"noise_schedule must be a NoiseScheduleVP, got "
                             f"{type(noise_schedule).__name__}")
        self._model = model_fn
        self._noise_schedule = noise_schedule

    @property
    def model_fn(self):
        return self._model

    @property
    def noise_schedule(self) -> NoiseScheduleVP:
        return self._noise_schedule

    # -------------------------------------------------------------------- pieces
    def get_time_grid(self, num_steps=None, timesteps=None, grid="reference"):
        """-> (t [K], t_next [K]) in the schedule's dtype; see ``tuning.time_grid``."""
        t, t_next = time_grid(self.noise_schedule, num_steps, timesteps, grid)
        dt = self.noise_schedule.dtype
        return jnp.asarray(t, dt), jnp.asarray(t_next, dt)

    def noise_prediction_fn(self, x, t, condition=None, uncond_condition=None):
        return predict_noise(self._model, x, t, condition, uncond_condition)

    def ddim_step_fn(self, x, t, s, t_ratio=1.0, eta=0.0, noise=None, condition=None,
                     uncond_condition=None):
        """One tuned DDIM step from (scalar) t to s -> (x_s, x0_pred): jaxdiff's DDIM on the
        one-step grid [t] -> [s]. ``noise`` None: eta = 0."""
        dt = self.noise_schedule.dtype
        solver = ddim_solver.on_vp_grid(self.noise_schedule, jnp.reshape(jnp.asarray(t, dt), (1,)),
                                        jnp.reshape(jnp.asarray(s, dt), (1,)),
                                        eta=0.0 if noise is None else eta)
        eps = predict_noise(self._model, x, t_ratio * solver.timesteps[0], condition,
                            uncond_condition)
        x_s, _ = solver.step(solver.init(x), 0, x, eps,
                             jnp.zeros_like(x) if noise is None else noise)
        return x_s, vp_x0("epsilon", eps, x, solver.sqrt_abar[0], solver.sqrt_1m_abar[0])

    def _ratios_for(self, t_ratios, k, dtype):
        if t_ratios is None:
            return jnp.ones((k,), dtype)
        r = jnp.asarray(t_ratios)
        if r.shape != (k,):
            raise ValueError(f"t_ratios must have shape [num_steps] = ({k},), got "
                             f"{tuple(r.shape)}")
        return r.astype(dtype)

    def tuned_solver(self, num_steps=None, timesteps=None, t_ratios=None, solver="ddim",
                     order=2, lower_order_final=True, eta=0.0, grid="reference"):
        """jaxdiff's DDIM / DPM-Solver++ on this tuner's grid with the network asked at
        ratio_i * t_i (continuous time: what the tuner's model function takes), i.e.
        ``on_vp_grid(...).with_network_times(ratios * t)``; differentiable in t_ratios."""
        t, t_next = self.get_time_grid(num_steps, timesteps, grid)
        ratios = self._ratios_for(t_ratios, t.shape[0], t.dtype)
        base = grid_solver(self.noise_schedule, t, t_next, solver, order, lower_order_final,
                           eta)
        return base.with_network_times(ratios * t)

    def _sample(self, solver, x, key, condition, uncond_condition, name, intermediates):
        model = BoundModel(self._model, condition, uncond_condition, name)
        kwargs = {"key": key} if solver.stochastic else {}
        if not intermediates:
            return sample(model, solver, x, **kwargs)
        out, xs = sample(model, solver, x, return_trajectory=True, **kwargs)
        return out, _intermediates(model, solver, x, xs)

    # -------------------------------------------------------------------- sampling
    def ddim_sample(self, x, num_steps=None, timesteps=None, t_ratios=None, eta=0.0,
                    condition=None, uncond_condition=None, key=None, grid="reference",
                    return_intermediates=False):
        """DDIM from x (= x at t[0], e.g. standard normal noise [B, ...]) to t = eps.

        ``jaxdiff.sample`` with jaxdiff's DDIM on the grid (``tuned_solver``): one jitted
        lax.scan, differentiable in ``t_ratios`` [K] (and in x and the model function's
        arrays); new ratios, eta or conditions reuse the compiled program. ``eta`` > 0
        needs ``key``. With ``return_intermediates`` also returns {'x_t': [K + 1, B, ...],
        'x0_pred': [K + 1, B, ...]} (entry 0 is x, as in the reference).
        """
        if key is None and not (isinstance(eta, numbers.Real) and float(eta) == 0.0):
            raise ValueError("eta > 0 draws noise: pass key=")
        if isinstance(eta, numbers.Real) and not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        x = jnp.asarray(x)
        solver = self.tuned_solver(num_steps, timesteps, t_ratios, "ddim", eta=eta, grid=grid)
        return self._sample(solver, x, key, condition, uncond_condition, "ddim_sample",
                            return_intermediates)

    def dpm_solver_sample(self, x, num_steps=None, timesteps=None, t_ratios=None, order=2,
                          lower_order_final=True, condition=None, uncond_condition=None,
                          grid="reference", return_intermediates=False):
        """Multistep DPM-Solver++ (data prediction; order 2 = "2M") from x at t[0] to the
        grid's end, the network at ratio_i * t_i (the time grid as in ``ddim_sample``).

        ``jaxdiff.sample`` with jaxdiff's DPMSolverPP on the grid (``tuned_solver``).
        Order per step: ``tuning.dpm_orders`` (first order at the first step, and at the
        last one when ``lower_order_final`` and K < 15, as diffusers does).
        Differentiable in ``t_ratios``. With ``return_intermediates`` also returns
        {'x_t', 'x0_pred'} as ``ddim_sample`` does. With ``timesteps=solver.timesteps`` of
        a jaxdiff DPM-Solver++ whose last step ends at the first training time
        (final_sigmas_type="sigma_min") the two agree.
        """
        check_solver("dpmsolver++", order)
        x = jnp.asarray(x)
        solver = self.tuned_solver(num_steps, timesteps, t_ratios, "dpmsolver++", order,
                                   lower_order_final, grid=grid)
        return self._sample(solver, x, None, condition, uncond_condition,
                            "dpm_solver_sample", return_intermediates)

    def sample(self, x, num_steps=None, timesteps=None, t_ratios=None, solver="ddim",
               order=2, lower_order_final=True, **kwargs):
        """``ddim_sample`` or ``dpm_solver_sample`` by name (``solver`` in
        ``tuning.SOLVERS``); the other keywords are passed on."""
        check_solver(solver, order)
        if solver == "ddim":
            return self.ddim_sample(x, num_steps, timesteps, t_ratios, **kwargs)
        return self.dpm_solver_sample(x, num_steps, timesteps, t_ratios, order,
                                      lower_order_final, **kwargs)

    # -------------------------------------------------------------------- the loss
    def loss(self, x0, noise, idx: int, ratio, num_steps=None, timesteps=None,
             tune_type="parallel", t_ratios=None, condition=None, uncond_condition=None,
             grid="reference", solver="ddim", order=2, lower_order_final=True):
        """The tuning loss of step ``idx`` at ``ratio`` for data x0 and noise [B, ...].

        ``t_ratios`` [K]: the ratios of the earlier steps (sequential), or of step idx - 1
        (the DPM-Solver++ history in parallel mode). Differentiable in ``ratio``;
        ``optimize_timesteps`` minimises exactly this function. The tuned step is
        ``solver.step`` of jaxdiff's grid solver (``grid_solver``).
        """
        if tune_type not in TUNE_TYPES:
            raise ValueError(f"unsupported tune_type {tune_type!r}; choose one of "
                             f"{list(TUNE_TYPES)}")
        check_solver(solver, order)
        t, t_next = self.get_time_grid(num_steps, timesteps, grid)
        ratios = self._ratios_for(t_ratios, t.shape[0], t.dtype)
        grid_sol = grid_solver(self.noise_schedule, t, t_next, solver, order, lower_order_final)
        x0 = jnp.asarray(x0)
        x_t, state, target = _start_state(
            self._model, self.noise_schedule, grid_sol, x0, jnp.asarray(noise, x0.dtype), idx,
            ratios, t, condition, uncond_condition, tune_type == "sequential")
        return _step_loss(ratio, self._model, grid_sol, x_t, state, target, idx, t_next,
                          condition, uncond_condition)

    # -------------------------------------------------------------------- training
    def optimize_timesteps(self, data, num_steps: Optional[int] = None, timesteps=None,
                           tune_type: str = "sequential", lr: float = 2e-3,
                           total_iters: int = 500, key=None, encode_fn=None,
                           uncond_condition=None, checkpoint_dir=None,
                           checkpoint_every: int = 50, grid: str = "reference",
                           verbose: bool = False,
                           callback: Optional[Callable[..., Any]] = None,
                           solver: str = "ddim", order: int = 2,
                           lower_order_final: bool = True, progress=None):
        """Learn the ratios of steps 0..K-2 with Adam(lr, betas=(0.9, 0.999)).

        The K steps: ``num_steps`` on the ``grid`` (default 10), or ``timesteps`` [K] in the
        network's units (e.g. a jaxdiff solver's ``timesteps``, to tune for its grid).

        ``solver``: 'ddim' (the reference) or 'dpmsolver++' (multistep DPM-Solver++ of
        ``order`` 1 or 2, see ``dpm_solver_sample``): the tuned step in the loss is that
        solver's step, with its multistep history (in 'sequential' mode the history the
        tuned sampler itself produces; in 'parallel' mode the network's data prediction at
        the previous time on the same noised data).

        ``data``: a re-iterable collection of batches: images [B, ...], (images,),
        (images, labels) or {'image', 'label'} dicts (numpy or jax). Each index trains
        ``total_iters`` iterations on the data from its start, cycling if it runs out.
        Labels are passed to the model as its condition; ``uncond_condition`` is passed
        along for classifier-free guidance; ``encode_fn`` maps images to the diffusion's
        space (e.g. a VAE encoder), batch by batch. ``key``: PRNG key (or int seed) of
        all the noise, default 0.

        ``checkpoint_dir``: orbax checkpoints every ``checkpoint_every`` iterations (and
        at the end of each index and of the run); calling again with the same arguments
        resumes from the newest one and gives the same result as an uninterrupted run
        (provided ``data`` yields the same batches in the same order).
        ``callback(idx, iteration, loss, ratio)`` runs on the host after every iteration
        (in 'parallel' mode idx is None and loss, ratio are [K-1] arrays).

        ``progress``: None/False, True (a tqdm bar) or a callable ``f(done, total)``
        (``jaxdiff.sampling.progress``) told after every iteration how many of the run's
        (index, iteration) updates are done, and once at the start of a resumed run.

        A non-finite loss or ratio raises ``NonFiniteLossError`` naming the step index
        and iteration; the checkpoints written before it are kept.

        -> (ratios [K] numpy, with ratios[-1] = 1, log) where log has 'loss' and 'ratio'
        [K-1, total_iters] histories, 't', 't_next' [K], 'meta' (a dict for
        ``save_ratios``) and 'resumed_from' (the checkpoint iteration, or None).
        """
        if tune_type not in TUNE_TYPES:
            raise ValueError(f"unsupported tune_type {tune_type!r}; choose one of "
                             f"{list(TUNE_TYPES)}")
        if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        for name, value in (("total_iters", total_iters),
                            ("checkpoint_every", checkpoint_every)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_solver(solver, order)
        _check_data(data)
        ns = self.noise_schedule
        if num_steps is None and timesteps is None:
            num_steps = 10
        t_np, t_next_np = time_grid(ns, num_steps, timesteps, grid)
        k = t_np.shape[0]
        m = k - 1
        if m < 1:
            raise ValueError("tuning needs num_steps >= 2: the last step's ratio is not tuned")
        if key is None:
            key = jax.random.key(0)
        elif isinstance(key, numbers.Integral):
            key = jax.random.key(int(key))
        dt = ns.dtype
        t_cur, t_next = jnp.asarray(t_np, dt), jnp.asarray(t_next_np, dt)
        lr_arr = jnp.asarray(lr, jnp.float32)
        sequential = tune_type == "sequential"
        total = m * total_iters if sequential else total_iters

        orders_np = dpm_orders(k, order if solver != "ddim" else 1, lower_order_final)
        grid_sol = grid_solver(ns, t_cur, t_next, solver, order, lower_order_final)
        bar = progress_mod.resolve(progress, "TimeTuner")
        meta = {"method": "TimeTuner " + ("DDIM" if solver == "ddim" else
                                          f"DPM-Solver++ (order {order})"),
                "solver": solver, "tune_type": tune_type, "num_steps": k,
                "grid": grid if timesteps is None else "timesteps",
                "t": t_np.tolist(), "t_next": t_next_np.tolist(),
                # the network-unit times of the steps: what a jaxdiff solver's
                # ``timesteps`` must equal for these ratios (Solver.with_ratios checks)
                "timesteps": np.round(np.asarray(model_input_time(ns, t_np)), 9).tolist(),
                "schedule": ns.schedule, "total_N": ns.total_N, "lr": float(lr),
                "total_iters": int(total_iters)}
        if solver != "ddim":
            meta.update(order=int(order), orders=orders_np.tolist(),
                        lower_order_final=bool(lower_order_final))
        fingerprint = dict(meta, key=_key_data(key))

        # the run's state, in one pytree so that checkpoints are a flat list of arrays
        adam_init = _adam(lr_arr).init(jnp.ones((), dt))
        if sequential:
            opt_state = jax.tree.map(np.asarray, adam_init)
            cur_ratio = np.ones((), dt)
        else:
            opt_state = jax.tree.map(lambda a: np.stack([np.asarray(a)] * m), adam_init)
            cur_ratio = np.ones((m,), dt)
        state = {"ratios": np.ones((k,), dt), "ratio": cur_ratio, "opt_state": opt_state,
                 "loss": np.full((m, total_iters), np.nan, np.float32),
                 "ratio_hist": np.full((m, total_iters), np.nan, np.float32)}

        ckpt = None if checkpoint_dir is None else RunCheckpoints(checkpoint_dir, fingerprint)
        start = 0
        resumed_from = None
        try:
            if ckpt is not None:
                latest = ckpt.latest_step()
                if latest is not None:
                    state = ckpt.restore(latest, state)
                    start = resumed_from = int(latest)
                    if verbose:
                        print(f"TimeTuner: resuming from iteration {latest} in "
                              f"{ckpt.directory}")
            last_saved = resumed_from
            uncond = uncond_condition
            dynamic, spec = partition((self._model, ns, uncond, grid_sol))
            if bar is not None and start > 0:
                bar(start, total)
            batches = None
            for g in range(start, total):
                idx, it = divmod(g, total_iters) if sequential else (None, g)
                if batches is None or (sequential and it == 0):
                    batches = _cycle(data, skip=it)
                    if sequential and it == 0:
                        state["ratio"] = np.ones((), dt)
                        state["opt_state"] = jax.tree.map(np.asarray, adam_init)
                x0, cond = _split_batch(next(batches), encode_fn)
                if sequential:
                    ratio, opt, loss = _sequential_update(
                        dynamic, x0, cond, jnp.int32(idx), jnp.int32(it), state["ratio"],
                        state["opt_state"], state["ratios"], t_cur, t_next, lr_arr, key,
                        spec=spec)
                else:
                    ratio, opt, loss = _parallel_update(
                        dynamic, x0, cond, jnp.int32(it), state["ratio"], state["opt_state"],
                        state["ratios"], t_cur, t_next, lr_arr, key, spec=spec)
                loss_np, ratio_np = np.asarray(loss), np.asarray(ratio)
                bad = ~(np.isfinite(loss_np) & np.isfinite(ratio_np))
                if np.any(bad):
                    raise NonFiniteLossError(_non_finite_message(
                        tune_type, idx, it, bad, loss_np, ratio_np, t_np, ckpt, last_saved))
                state["ratio"] = ratio_np
                state["opt_state"] = jax.tree.map(np.asarray, opt)
                if sequential:
                    state["loss"][idx, it] = loss_np
                    state["ratio_hist"][idx, it] = ratio_np
                    if it == total_iters - 1:
                        state["ratios"][idx] = ratio_np
                else:
                    state["loss"][:, it] = loss_np
                    state["ratio_hist"][:, it] = ratio_np
                    state["ratios"][:m] = ratio_np
                if verbose:
                    where = f"idx {idx} / {m}, " if sequential else ""
                    print(f"TimeTuner: {where}iter {it} / {total_iters}, loss "
                          f"{np.round(loss_np, 4).tolist()}, ratio "
                          f"{np.round(ratio_np, 4).tolist()}")
                if callback is not None:
                    callback(idx, it, loss_np, ratio_np)
                if bar is not None:
                    bar(g + 1, total)
                if ckpt is not None and ((g + 1) % checkpoint_every == 0 or g + 1 == total
                                         or (sequential and it == total_iters - 1)):
                    ckpt.save(g + 1, state)
                    last_saved = g + 1
        finally:
            if ckpt is not None:
                ckpt.close()

        ratios = np.asarray(state["ratios"]).copy()
        ratios[-1] = 1.0
        log = {"loss": state["loss"], "ratio": state["ratio_hist"], "t": t_np,
               "t_next": t_next_np, "meta": meta, "resumed_from": resumed_from}
        return ratios, log
