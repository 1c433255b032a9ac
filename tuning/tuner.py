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
"""

from __future__ import annotations

import collections.abc
import functools
import math
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.sampling.pytree import combine, partition
from tuning.checkpoint import RunCheckpoints
from tuning.sampler import (TRACE_COUNTS, check_solver, data_prediction, ddim_loop, ddim_step,
                            dpm_orders, dpmpp_loop, dpmpp_step, predict_noise, time_grid)
from tuning.schedule import NoiseScheduleVP
from tuning.wrapper import model_input_time

TUNE_TYPES = ("sequential", "parallel")
ADAM_BETAS = (0.9, 0.999)      # the reference's torch.optim.Adam settings


class NonFiniteLossError(FloatingPointError):
    """The tuning loss (or a ratio) became NaN/inf; the message names step and iteration."""


# ------------------------------------------------------------------------------ the loss
def _flat_sq_mean(a):  # [B, ...] -> scalar: sum over a sample, mean over the batch
    return jnp.mean(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1))


def _solver_orders(solver, k, order, lower_order_final) -> np.ndarray:
    """[K] order of each step: DDIM is first order throughout."""
    return dpm_orders(k, order if solver != "ddim" else 1, lower_order_final)


def _solver_step(model_fn, ns, solver, x, t, s, ratio, x0_prev, t_prev, second, cond,
                 uncond):
    """One tuned step of ``solver`` (static) -> (x_s, x0_pred)."""
    if solver == "ddim":
        return ddim_step(model_fn, ns, x, t, s, ratio, condition=cond, uncond_condition=uncond)
    return dpmpp_step(model_fn, ns, x, t, s, ratio, x0_prev, t_prev, second, cond, uncond)


def _start_state(model_fn, ns, x0, noise, idx, ratios, t_cur, t_next, orders, cond, uncond,
                 sequential: bool, solver: str):
    """x at t_cur[idx], the multistep history entering step idx (DPM-Solver++: the data
    prediction of step idx - 1, else None) and the loss target eps(x, t_cur[idx]); all
    treated as constants.

    ``idx`` may be traced: the sequential prefix is a fori_loop with a traced trip count,
    which is why it must stay outside the differentiated function. In 'parallel' mode the
    DPM-Solver++ history is the network's data prediction at x_{t_{idx-1}} (the same data
    and noise), asked at that step's current ratio.
    """
    multistep = solver != "ddim"
    if sequential:
        big_t = jnp.asarray(ns.T, t_cur.dtype)
        x = ns.marginal_alpha(big_t) * x0 + ns.marginal_std(big_t) * noise

        def prefix_step(j, carry):
            x, x0_prev = carry
            x_next, x0_j = _solver_step(model_fn, ns, solver, x, t_cur[j], t_next[j],
                                        ratios[j], x0_prev, t_cur[jnp.maximum(j - 1, 0)],
                                        orders[j] == 2, cond, uncond)
            return x_next.astype(x.dtype), x0_j.astype(x.dtype)

        x, x0_prev = jax.lax.fori_loop(0, idx, prefix_step, (x, jnp.zeros_like(x)))
    else:
        t = t_cur[idx]
        x = ns.marginal_alpha(t) * x0 + ns.marginal_std(t) * noise
        x0_prev = None
        if multistep:
            j = jnp.maximum(idx - 1, 0)
            x_prev = ns.marginal_alpha(t_cur[j]) * x0 + ns.marginal_std(t_cur[j]) * noise
            eps_prev = predict_noise(model_fn, x_prev.astype(x0.dtype), ratios[j] * t_cur[j],
                                     cond, uncond)
            x0_prev = data_prediction(ns, x_prev, eps_prev, t_cur[j])
    x = jax.lax.stop_gradient(x.astype(x0.dtype))
    x0_prev = (jax.lax.stop_gradient(x0_prev.astype(x0.dtype)) if multistep else None)
    target = predict_noise(model_fn, x, t_cur[idx], cond, uncond)
    return x, x0_prev, jax.lax.stop_gradient(target)


def _step_loss(ratio, model_fn, ns, x_t, x0_prev, target, idx, t_cur, t_next, orders, cond,
               uncond, solver):
    t, s = t_cur[idx], t_next[idx]
    x_s, _ = _solver_step(model_fn, ns, solver, x_t, t, s, ratio, x0_prev,
                          t_cur[jnp.maximum(idx - 1, 0)], orders[idx] == 2, cond, uncond)
    eps_s = predict_noise(model_fn, x_s.astype(x_t.dtype), s, cond, uncond)
    return _flat_sq_mean(target - eps_s)


def _noise_for(key, idx, it, shape, dtype):
    """The noise of (step index, iteration): independent of how the run was interrupted
    or of the tune type, so resumed and parallel runs draw exactly the same numbers."""
    k = jax.random.fold_in(jax.random.fold_in(key, idx), it)
    return jax.random.normal(k, shape, dtype)


def _adam(lr):
    return optax.adam(lr, b1=ADAM_BETAS[0], b2=ADAM_BETAS[1])


def _one_update(model_fn, ns, x0, cond, uncond, idx, it, ratio, opt_state, ratios, t_cur,
                t_next, orders, lr, key, sequential, solver):
    noise = _noise_for(key, idx, it, x0.shape, x0.dtype)
    x_t, x0_prev, target = _start_state(model_fn, ns, x0, noise, idx, ratios, t_cur, t_next,
                                        orders, cond, uncond, sequential, solver)
    loss, grad = jax.value_and_grad(_step_loss)(ratio, model_fn, ns, x_t, x0_prev, target, idx,
                                                t_cur, t_next, orders, cond, uncond, solver)
    updates, opt_state = _adam(lr).update(grad, opt_state, ratio)
    return optax.apply_updates(ratio, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("spec", "solver"))
def _sequential_update(dynamic, x0, cond, idx, it, ratio, opt_state, ratios, t_cur, t_next,
                       orders, lr, key, *, spec, solver):
    """One Adam step on ratio ``idx`` (a traced int32: one program for every index)."""
    TRACE_COUNTS["sequential"] += 1
    model_fn, ns, uncond = combine(dynamic, spec)
    return _one_update(model_fn, ns, x0, cond, uncond, idx, it, ratio, opt_state, ratios,
                       t_cur, t_next, orders, lr, key, sequential=True, solver=solver)


@functools.partial(jax.jit, static_argnames=("spec", "solver"))
def _parallel_update(dynamic, x0, cond, it, ratios_m, opt_states, ratios, t_cur, t_next,
                     orders, lr, key, *, spec, solver):
    """One Adam step on every tuned ratio at once. ratios_m [M], opt_states stacked [M]."""
    TRACE_COUNTS["parallel"] += 1
    model_fn, ns, uncond = combine(dynamic, spec)
    m = ratios_m.shape[0]

    def one(idx, ratio, opt_state):
        return _one_update(model_fn, ns, x0, cond, uncond, idx, it, ratio, opt_state, ratios,
                           t_cur, t_next, orders, lr, key, sequential=False, solver=solver)

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


def _with_intermediates(x, out, traj):
    """(out, {'x_t', 'x0_pred'}: [K + 1, B, ...], entry 0 being the start x)."""
    xs, x0s = traj
    return out, {"x_t": jnp.concatenate([x[None], xs]),
                 "x0_pred": jnp.concatenate([x[None], x0s])}


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
        """One tuned DDIM step from t to s -> (x_s, x0_pred). ``noise`` None: eta = 0."""
        return ddim_step(self._model, self.noise_schedule, x, t, s, t_ratio, eta, noise,
                         condition, uncond_condition)

    def _ratios_for(self, t_ratios, k, dtype):
        if t_ratios is None:
            return jnp.ones((k,), dtype)
        r = jnp.asarray(t_ratios)
        if r.shape != (k,):
            raise ValueError(f"t_ratios must have shape [num_steps] = ({k},), got "
                             f"{tuple(r.shape)}")
        return r.astype(dtype)

    # -------------------------------------------------------------------- sampling
    def ddim_sample(self, x, num_steps=None, timesteps=None, t_ratios=None, eta=0.0,
                    condition=None, uncond_condition=None, key=None, grid="reference",
                    return_intermediates=False):
        """DDIM from x (= x at t[0], e.g. standard normal noise [B, ...]) to t = eps.

        One jitted lax.scan, differentiable in ``t_ratios`` [K] (and in x and the model
        function's arrays). ``eta`` > 0 needs ``key``. With ``return_intermediates``
        also returns {'x_t': [K + 1, B, ...], 'x0_pred': [K + 1, B, ...]} (entry 0 is x,
        as in the reference).
        """
        x = jnp.asarray(x)
        t, t_next = self.get_time_grid(num_steps, timesteps, grid)
        ratios = self._ratios_for(t_ratios, t.shape[0], t.dtype)
        out, traj = ddim_loop(self._model, self.noise_schedule, x, t, t_next, ratios, eta,
                              key, condition, uncond_condition,
                              intermediates=return_intermediates)
        return _with_intermediates(x, out, traj) if return_intermediates else out

    def dpm_solver_sample(self, x, num_steps=None, timesteps=None, t_ratios=None, order=2,
                          lower_order_final=True, condition=None, uncond_condition=None,
                          grid="reference", return_intermediates=False):
        """Multistep DPM-Solver++ (data prediction; order 2 = "2M") from x at t[0] to the
        grid's end, the network at ratio_i * t_i (the time grid as in ``ddim_sample``).

        Order per step: ``tuning.dpm_orders`` (first order at the first step, and at the
        last one when ``lower_order_final`` and K < 15, as diffusers and jaxdiff's
        DPMSolverPP do). One jitted lax.scan, differentiable in ``t_ratios``. With
        ``return_intermediates`` also returns {'x_t', 'x0_pred'} as ``ddim_sample`` does.
        With ``timesteps=solver.timesteps`` of a jaxdiff DPM-Solver++ whose last step ends
        at the first training time (final_sigmas_type="sigma_min") the two agree.
        """
        check_solver("dpmsolver++", order)
        x = jnp.asarray(x)
        t, t_next = self.get_time_grid(num_steps, timesteps, grid)
        ratios = self._ratios_for(t_ratios, t.shape[0], t.dtype)
        orders = dpm_orders(t.shape[0], order, lower_order_final)
        out, traj = dpmpp_loop(self._model, self.noise_schedule, x, t, t_next, ratios, orders,
                               condition, uncond_condition, intermediates=return_intermediates)
        return _with_intermediates(x, out, traj) if return_intermediates else out

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
        ``optimize_timesteps`` minimises exactly this function.
        """
        if tune_type not in TUNE_TYPES:
            raise ValueError(f"unsupported tune_type {tune_type!r}; choose one of "
                             f"{list(TUNE_TYPES)}")
        check_solver(solver, order)
        t, t_next = self.get_time_grid(num_steps, timesteps, grid)
        ratios = self._ratios_for(t_ratios, t.shape[0], t.dtype)
        orders = jnp.asarray(_solver_orders(solver, t.shape[0], order, lower_order_final))
        x0 = jnp.asarray(x0)
        x_t, x0_prev, target = _start_state(
            self._model, self.noise_schedule, x0, jnp.asarray(noise, x0.dtype), idx, ratios,
            t, t_next, orders, condition, uncond_condition, tune_type == "sequential", solver)
        return _step_loss(ratio, self._model, self.noise_schedule, x_t, x0_prev, target, idx,
                          t, t_next, orders, condition, uncond_condition, solver)

    # -------------------------------------------------------------------- training
    def optimize_timesteps(self, data, num_steps: Optional[int] = None, timesteps=None,
                           tune_type: str = "sequential", lr: float = 2e-3,
                           total_iters: int = 500, key=None, encode_fn=None,
                           uncond_condition=None, checkpoint_dir=None,
                           checkpoint_every: int = 50, grid: str = "reference",
                           verbose: bool = False,
                           callback: Optional[Callable[..., Any]] = None,
                           solver: str = "ddim", order: int = 2,
                           lower_order_final: bool = True):
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

        orders_np = _solver_orders(solver, k, order, lower_order_final)
        orders = jnp.asarray(orders_np)
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
            dynamic, spec = partition((self._model, ns, uncond))
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
                        state["opt_state"], state["ratios"], t_cur, t_next, orders, lr_arr,
                        key, spec=spec, solver=solver)
                else:
                    ratio, opt, loss = _parallel_update(
                        dynamic, x0, cond, jnp.int32(it), state["ratio"], state["opt_state"],
                        state["ratios"], t_cur, t_next, orders, lr_arr, key, spec=spec,
                        solver=solver)
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
