"""LD3-style learned time grids (after Tong et al., ICLR 2025): backpropagate through the
whole K-step jaxdiff solve to match a teacher's output from the same x_T.

Parameters (2K numbers):
  logits [K]   the grid: step gaps g = softmax(logits) * (t_start - t_end), t = t_start -
               cumsum(g); monotone and with both ends fixed by construction.
  offsets [K]  decoupled network times: step i asks the network at
               t_i + rate * m_i * tanh(offsets_i), m_i the smaller gap next to t_i (held
               fixed in the gradient), so a network time never crosses a neighbouring grid
               point; step 0 stays at t_start (there is no room above the prior).
Soft teacher forcing: each training pair's x_T may move by delta_p inside a ball of
radius ``forcing * d / K^2`` (d = pixels per sample), learned jointly by projected gradient
steps, so a few-step student is not asked to match what it cannot reach from x_T exactly.
Evaluation (held-out pairs, early stopping, the final report) always starts from x_T itself.

Training: optax Adam on the grid parameters over minibatches of the training pairs, one
jitted step (the model function is a pytree argument, so every batch reuses the program);
after each epoch the held-out RMSE decides early stopping and the best parameters win.
Runs are resumable from orbax checkpoints (``checkpoint_dir``); a NaN/inf loss stops with
the epoch and iteration named, the last good checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.sampling import sample
from jaxdiff.sampling.pytree import combine, partition
from jaxdiff.schedule_files import check_time_grid
from jaxdiff.schedules import NoiseScheduleVP
from jaxdiff.time_grids import make_grid
from tuning.checkpoint import RunCheckpoints
from tuning.teacher import check_family, student_solver
from tuning.tuner import NonFiniteLossError


class GridParams(NamedTuple):
    logits: jax.Array    # [K]
    offsets: jax.Array   # [K]


@dataclasses.dataclass(frozen=True)
class LD3Config:
    solver: str = "ddim"
    order: int = 2               # DPM-Solver++ order
    init: Union[str, tuple] = "time_uniform"   # the grid to start from: a zero-cost grid's
    #                                name (jaxdiff.time_grids) or K + 1 times (e.g. GITS's grid)
    rate: float = 0.5            # network-time window, as a fraction of the smaller gap
    learn_network_times: bool = True
    forcing: float = 0.001       # soft teacher forcing radius = forcing * d / K^2 (0: off)
    forcing_lr: float = 0.1
    lr: float = 0.02
    batch: int = 25
    epochs: int = 40
    patience: int = 8
    seed: int = 0


def initial_grid(init, ns, k: int, t_start=None, t_end=None) -> np.ndarray:
    """The starting grid: a zero-cost grid by name, or given times (K + 1, decreasing)."""
    if isinstance(init, str):
        return make_grid(init, ns, k, t_start=t_start, t_end=t_end)
    if t_start is not None or t_end is not None:
        raise ValueError("t_start / t_end apply to a named starting grid; an explicit grid "
                         "brings its own ends")
    t, _ = check_time_grid(init, t_max=float(ns.T), t_min=0.0, where="LD3 starting grid")
    if t.shape[0] != k + 1:
        raise ValueError(f"LD3 starting grid has {t.shape[0] - 1} steps, not num_steps={k}")
    return t


def grid_from_logits(logits, t_start: float, t_end: float):
    """[K] logits -> t [K + 1] strictly decreasing from t_start to t_end (exact ends)."""
    gaps = jax.nn.softmax(logits)
    inner = t_start - (t_start - t_end) * jnp.cumsum(gaps)[:-1]
    return jnp.concatenate([jnp.asarray([t_start], inner.dtype), inner,
                            jnp.asarray([t_end], inner.dtype)])


def logits_for_grid(t) -> np.ndarray:
    """The logits whose grid is ``t`` [K + 1] (the inverse of ``grid_from_logits``)."""
    gaps = -np.diff(np.asarray(t, np.float64))
    if np.any(gaps <= 0):
        raise ValueError(f"the grid must be strictly decreasing, got {np.asarray(t).tolist()}")
    z = np.log(gaps / gaps.sum())
    return (z - z.mean()).astype(np.float32)


def network_times(t, offsets, rate: float):
    """t [K + 1], offsets [K] -> network times [K] inside each point's window."""
    gaps = jax.lax.stop_gradient(t[:-1] - t[1:])                 # [K]
    room = jnp.minimum(gaps, jnp.concatenate([gaps[:1], gaps[:-1]]))
    shift = rate * room * jnp.tanh(offsets)
    return t[:-1] + shift.at[0].set(0.0)


def unpack(params: GridParams, t_start: float, t_end: float, rate: float):
    t = grid_from_logits(params.logits, t_start, t_end)
    return t, network_times(t, params.offsets, rate)


def per_sample_rmse(x, ref):
    d = (x - ref).reshape(x.shape[0], -1)
    return jnp.sqrt(jnp.mean(jnp.square(d), axis=1))


def forcing_radius(cfg: LD3Config, sample_shape, num_steps: int) -> float:
    d = int(np.prod(sample_shape))
    return float(cfg.forcing) * d / num_steps ** 2


@dataclasses.dataclass
class LD3Result:
    t: np.ndarray               # [K + 1] learned grid
    network_t: np.ndarray       # [K]
    init_t: np.ndarray          # [K + 1] the grid it started from
    valid_rmse: float           # held-out mean per-sample RMSE at the best epoch
    init_valid_rmse: float      # ... of the starting grid
    history: dict               # per-epoch train loss / held-out RMSE
    seconds: float
    epochs_run: int
    config: LD3Config


def learn(model_fn_for: Callable, ns: NoiseScheduleVP, num_steps: int, train, valid, *,
          config: LD3Config = LD3Config(), checkpoint_dir=None, progress: bool = True,
          t_start=None, t_end=None) -> LD3Result:
    """Learn a K-step time grid. ``train`` / ``valid``: (x_T [P, ...], teacher x_0 [P, ...],
    cond [P, ...]) with ``model_fn_for(cond_batch)`` the model function of that batch."""
    cfg = config
    check_family(cfg.solver)
    k = int(num_steps)
    if k < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    for name, value in (("lr", cfg.lr), ("rate", cfg.rate), ("forcing", cfg.forcing)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if not 0 <= cfg.rate < 1:
        raise ValueError(f"rate must be in [0, 1) (a network time may not reach a neighbouring "
                         f"grid point), got {cfg.rate}")
    xs, ys, cs = (np.asarray(a) for a in train)
    vx, vy, vc = (np.asarray(a) for a in valid)
    if xs.shape != ys.shape or vx.shape != vy.shape or xs.shape[1:] != vx.shape[1:]:
        raise ValueError(f"x_T and teacher outputs must have equal shapes, got train "
                         f"{xs.shape} / {ys.shape}, valid {vx.shape} / {vy.shape}")
    batch = min(int(cfg.batch), xs.shape[0])
    if batch < 1 or vx.shape[0] < 1:
        raise ValueError("need at least one training and one held-out pair")
    # the ends are fixed: by default those of the starting grid (diffusers' leading and
    # trailing spacings start below T, and that start is part of what makes them good)
    init_t = initial_grid(cfg.init, ns, k, t_start, t_end)
    init_name = cfg.init if isinstance(cfg.init, str) else "the given grid"
    t0, t1 = float(init_t[0]), float(init_t[-1])
    params = GridParams(jnp.asarray(logits_for_grid(init_t)), jnp.zeros((k,), jnp.float32))
    opt = optax.adam(cfg.lr)
    opt_state = opt.init(params)
    delta = np.zeros_like(xs, np.float32)
    radius = forcing_radius(cfg, xs.shape[1:], k)
    learn_offsets = bool(cfg.learn_network_times) and cfg.rate > 0

    def solve(p, model_fn, x_T):
        t, net = unpack(p, t0, t1, cfg.rate)
        return sample(model_fn, student_solver(ns, cfg.solver, t, net, order=cfg.order), x_T)

    def loss(p, d, model_fn, x_T, ref):
        err = per_sample_rmse(solve(p, model_fn, x_T + d), ref)
        return jnp.mean(err)

    @functools.partial(jax.jit, static_argnames=("spec",))
    def train_step(p, s, d, dyn, x_T, ref, *, spec):
        model_fn = combine(dyn, spec)
        value, (gp, gd) = jax.value_and_grad(loss, argnums=(0, 1))(p, d, model_fn, x_T, ref)
        if not learn_offsets:
            gp = gp._replace(offsets=jnp.zeros_like(gp.offsets))
        updates, s = opt.update(gp, s, p)
        p = optax.apply_updates(p, updates)
        # soft teacher forcing: a gradient step on each pair's delta, projected on its ball
        d = d - cfg.forcing_lr * gd * d.shape[0]
        norm = jnp.sqrt(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1))
        scale = jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))
        d = d * scale.reshape((-1,) + (1,) * (d.ndim - 1))
        return p, s, d, value

    @functools.partial(jax.jit, static_argnames=("spec",))
    def eval_rmse(p, dyn, x_T, ref, *, spec):
        return per_sample_rmse(solve(p, combine(dyn, spec), x_T), ref)

    def split(cond):
        dyn, spec = partition(model_fn_for(jnp.asarray(cond)))
        return dict(dyn=dyn, spec=spec)

    def held_out(p):
        errs = []
        for s in range(0, vx.shape[0], batch):
            idx = np.arange(s, s + batch) % vx.shape[0]
            e = eval_rmse(p, x_T=jnp.asarray(vx[idx]), ref=jnp.asarray(vy[idx]),
                          **split(vc[idx]))
            errs.append(np.asarray(e)[: min(batch, vx.shape[0] - s)])
        return float(np.concatenate(errs).mean())

    ckpt, start_epoch = None, 0
    history = {"train": [], "valid": []}
    init_valid = held_out(params)
    if not math.isfinite(init_valid):
        raise NonFiniteLossError(f"LD3: the held-out RMSE of the starting grid ({init_name}, "
                                 f"K={k}) is {init_valid}: the model returns NaN/inf there")
    best = (init_valid, params)        # the starting grid competes too
    if checkpoint_dir is not None:
        fingerprint = dict(dataclasses.asdict(cfg), num_steps=k, t_start=t0, t_end=t1,
                           train=int(xs.shape[0]), valid=int(vx.shape[0]), method="ld3")
        ckpt = RunCheckpoints(checkpoint_dir, fingerprint)
        last = ckpt.latest_step()
        if last is not None:
            like = dict(params=params, opt_state=opt_state, delta=delta, best=best[1],
                        best_value=np.zeros(()), train=np.zeros(last), valid=np.zeros(last))
            st = ckpt.restore(last, like)
            params, opt_state = st["params"], st["opt_state"]
            delta, best = np.asarray(st["delta"]), (float(st["best_value"]), st["best"])
            history = {"train": list(map(float, st["train"])),
                       "valid": list(map(float, st["valid"]))}
            start_epoch = last
    rng = np.random.default_rng(cfg.seed)
    orders = [rng.permutation(xs.shape[0]) for _ in range(cfg.epochs)]
    epochs = range(start_epoch, cfg.epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(epochs, desc=f"ld3 {cfg.solver} K={k}", leave=False)
        epochs = bar
    t_begin = time.perf_counter()
    stale = 0
    if history["valid"]:
        stale = len(history["valid"]) - 1 - int(np.argmin(history["valid"]))
    epoch = start_epoch
    for epoch in epochs:
        if stale >= cfg.patience:
            break
        perm, losses = orders[epoch], []
        for it, s in enumerate(range(0, xs.shape[0] - batch + 1, batch)):
            idx = perm[s:s + batch]
            new = train_step(params, opt_state, jnp.asarray(delta[idx]),
                             x_T=jnp.asarray(xs[idx]), ref=jnp.asarray(ys[idx]),
                             **split(cs[idx]))
            value = float(new[3])
            if not math.isfinite(value) or not all(
                    np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(new[0])):
                raise NonFiniteLossError(
                    f"LD3 loss became {value} at epoch {epoch}, iteration {it} ({cfg.solver}, "
                    f"K={k}); the last good state is the checkpoint of epoch {epoch}"
                    + ("" if ckpt is None else f" in {ckpt.directory}"))
            params, opt_state = new[0], new[1]
            delta[idx] = np.asarray(new[2])
            losses.append(value)
        v = held_out(params)
        if not math.isfinite(v):
            raise NonFiniteLossError(f"LD3 held-out RMSE became {v} after epoch {epoch} "
                                     f"({cfg.solver}, K={k})")
        history["train"].append(float(np.mean(losses)))
        history["valid"].append(v)
        if v < best[0]:
            best, stale = (v, params), 0
        else:
            stale += 1
        if bar is not None:
            bar.set_postfix(valid=f"{v:.4f}", best=f"{best[0]:.4f}")
        if ckpt is not None:
            ckpt.save(epoch + 1, dict(params=params, opt_state=opt_state, delta=delta,
                                      best=best[1], best_value=np.asarray(best[0]),
                                      train=np.asarray(history["train"]),
                                      valid=np.asarray(history["valid"])))
    if ckpt is not None:
        ckpt.close()
    t, net = unpack(best[1], t0, t1, cfg.rate)
    return LD3Result(t=np.asarray(t, np.float64), network_t=np.asarray(net, np.float64),
                     init_t=init_t, valid_rmse=float(best[0]), init_valid_rmse=init_valid,
                     history=history,
                     seconds=time.perf_counter() - t_begin, epochs_run=len(history["valid"]),
                     config=cfg)


__all__ = ["GridParams", "LD3Config", "LD3Result", "forcing_radius", "grid_from_logits",
           "learn", "logits_for_grid", "network_times", "per_sample_rmse", "unpack"]
