"""PNDM / PLMS (Liu et al. 2022), Stable Diffusion's original default (``skip_prk_steps``).

diffusers drives PNDM with a step counter and Python lists; here the counter logic is run
once on the host and compiled into per-step tables: which model outputs enter the linear
multistep combination and with what weights, whether the step restarts from a saved sample,
and the two alphas of the transfer ``_get_prev_sample``. The step itself is branch-free.
PRK warm-up (``skip_prk_steps=False``) is supported with the same tables.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.solvers.base import (Solver, at, check_prediction_type, choose, f32, push,
                                  schedule_from, solver_dataclass, static_field)

DIFFUSERS_CLASS = "PNDMScheduler"
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, skip_prk_steps=False,
                set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
                steps_offset=0)
STEP_OPTIONS = {}
HISTORY = 4


class PNDMState(NamedTuple):
    ets: jax.Array          # [4, ...] past model outputs, newest last
    cur_sample: jax.Array   # [...] sample a multi-evaluation step restarts from
    acc: jax.Array          # [...] Runge-Kutta accumulator (PRK warm-up)


@solver_dataclass
class PNDM(Solver):
    timesteps: jax.Array     # [M]
    push: jax.Array          # [M] bool: model output enters the history
    save: jax.Array          # [M] bool: remember x as cur_sample (before use)
    use_cur: jax.Array       # [M] bool: step from cur_sample instead of x
    w_mo: jax.Array          # [M] weight of this model output
    w_acc: jax.Array         # [M] weight of the accumulator
    w_ets: jax.Array         # [M, 4] weights of the (post-push) history
    acc_keep: jax.Array      # [M]
    acc_add: jax.Array       # [M]
    sample_coef: jax.Array   # [M] sqrt(abar_prev / abar_t)
    diff: jax.Array          # [M] abar_prev - abar_t
    denom: jax.Array         # [M] abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev)
    sqrt_abar: jax.Array     # [M] for v-prediction
    sqrt_1m_abar: jax.Array  # [M]
    num_steps: int = static_field()
    prediction_type: str = static_field(default="epsilon")

    init_noise_sigma = 1.0

    def init(self, x):
        z = jnp.zeros_like(x)
        return PNDMState(ets=jnp.zeros((HISTORY,) + x.shape, x.dtype), cur_sample=z, acc=z)

    def step(self, state, i, x, model_output, noise):
        mo = model_output.astype(x.dtype)
        ets = jnp.where(at(self.push, i), push(state.ets, mo), state.ets)
        cur = jnp.where(at(self.save, i), x, state.cur_sample)
        sample = jnp.where(at(self.use_cur, i), cur, x)
        w = at(self.w_ets, i)
        e = at(self.w_mo, i) * mo + at(self.w_acc, i) * state.acc
        for j in range(HISTORY):
            e = e + w[j] * ets[j]
        acc = at(self.acc_keep, i) * state.acc + at(self.acc_add, i) * mo
        if self.prediction_type == "v_prediction":
            e = at(self.sqrt_abar, i) * e + at(self.sqrt_1m_abar, i) * sample
        x_next = at(self.sample_coef, i) * sample - at(self.diff, i) * e / at(self.denom, i)
        return x_next.astype(x.dtype), PNDMState(ets=ets, cur_sample=cur, acc=acc)


_PLMS = {1: [1.0], 2: [-0.5, 1.5], 3: [5 / 12, -16 / 12, 23 / 12],
         4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}      # oldest .. newest


def _tables(T, n, spacing, steps_offset, skip_prk):
    """Replay diffusers' PNDM counter logic on the host: (model timesteps, rows)."""
    ratio = T // n
    if spacing == "linspace":
        base = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        base = (np.arange(0, n) * ratio).round() + steps_offset
    else:
        base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    if skip_prk:
        prk = np.array([])
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
    else:
        prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
        plms = base[:-3][::-1].copy()
    ts = np.concatenate([prk, plms]).astype(np.int64)

    rows, n_ets = [], 0
    for c, t in enumerate(ts.tolist()):
        r = dict(push=False, save=False, use_cur=False, w_mo=0.0, w_acc=0.0, w_ets=[0.0] * 4,
                 acc_keep=1.0, acc_add=0.0)
        if c < len(prk):                                   # Runge-Kutta warm-up
            t_from = int(prk[c // 4 * 4])
            t_to = t - (0 if c % 2 else ratio // 2)
            r["use_cur"] = True
            if c % 4 == 0:
                r.update(acc_add=1 / 6, push=True, save=True, w_mo=1.0)
                n_ets += 1
            elif c % 4 in (1, 2):
                r.update(acc_add=1 / 3, w_mo=1.0)
            else:
                r.update(w_acc=1.0, w_mo=1 / 6, acc_keep=0.0)
        else:                                              # linear multistep
            t_from, t_to = t, t - ratio
            if c != 1:
                r["push"] = True
                n_ets = min(n_ets + 1, 4)
            else:
                t_from, t_to = t + ratio, t
            if n_ets == 1 and c == 0:
                r.update(w_ets=[0, 0, 0, 1.0], save=True, use_cur=True)
            elif n_ets == 1 and c == 1:
                r.update(w_mo=0.5, w_ets=[0, 0, 0, 0.5], use_cur=True)
            else:
                r["w_ets"] = [0.0] * (4 - n_ets) + _PLMS[n_ets]
        r["t_from"], r["t_to"] = t_from, t_to
        rows.append(r)
    return ts, rows


def build(cfg, num_inference_steps: int) -> PNDM:
    name = DIFFUSERS_CLASS
    pt = check_prediction_type(cfg, name, ("epsilon", "v_prediction"))
    spacing = choose(cfg, "timestep_spacing", schedules.TIMESTEP_SPACINGS, name)
    sched = schedule_from(cfg)
    T = sched.num_train_timesteps
    n = schedules.check_num_steps(num_inference_steps, T)
    skip_prk = bool(cfg["skip_prk_steps"])
    if not skip_prk and n < 4:
        raise ValueError(f"{name}: skip_prk_steps=False needs num_inference_steps >= 4, got {n}")
    ac = sched.alphas_cumprod
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    ts, rows = _tables(T, n, spacing, int(cfg["steps_offset"]), skip_prk)
    schedules.check_timesteps(ts, T, name, cfg["steps_offset"])

    one = np.float32(1.0)
    a_t = np.array([ac[r["t_from"]] for r in rows], np.float32)
    a_p = np.array([ac[r["t_to"]] if r["t_to"] >= 0 else final for r in rows], np.float32)
    b_t, b_p = one - a_t, one - a_p
    col = lambda k, dt=np.float32: np.array([r[k] for r in rows], dt)  # noqa: E731
    return PNDM(timesteps=f32(ts), push=jnp.asarray(col("push", bool)),
                save=jnp.asarray(col("save", bool)), use_cur=jnp.asarray(col("use_cur", bool)),
                w_mo=f32(col("w_mo", np.float64)), w_acc=f32(col("w_acc", np.float64)),
                w_ets=f32(np.array([r["w_ets"] for r in rows], np.float64)),
                acc_keep=f32(col("acc_keep", np.float64)), acc_add=f32(col("acc_add", np.float64)),
                sample_coef=f32(np.sqrt(a_p / a_t)), diff=f32(a_p - a_t),
                denom=f32(a_t * np.sqrt(b_p) + np.sqrt(a_t * b_t * a_p)),
                sqrt_abar=f32(np.sqrt(a_t)), sqrt_1m_abar=f32(np.sqrt(b_t)),
                num_steps=len(ts), prediction_type=pt)
