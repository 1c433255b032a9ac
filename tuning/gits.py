"""GITS-style time grids (after Chen et al., ICML 2024): dynamic programming over a fine grid.

The teacher's trajectories from a few hundred x_T give the exact latent x_m at every point of
a fine grid t_0 > ... > t_M. One network call per fine point gives each trajectory's
prediction there, so the error of a single DDIM step from any t_m to any later t_n,
  c[m, n] = mean over trajectories of RMSE(alpha_n x0_m + sigma_n eps_m, x_n),
costs M network calls in all. The K-step grid is the path 0 -> M through exactly K edges
with the least summed cost (dynamic programming, O(K M^2)). No data, no gradients: a
minute on this CPU. The costs are DDIM's; DPM-Solver++ reuses the DDIM-optimal grid (a
multistep step's error depends on the path behind it, which the DP cannot see).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling import sample
from jaxdiff.sampling.pytree import combine, partition
from jaxdiff.schedules import NoiseScheduleVP, model_input_time
from jaxdiff.solvers.base import vp_eps, vp_x0
from jaxdiff.time_grids import make_grid
from tuning.teacher import TEACHER_STEPS, check_teacher_steps, teacher_solver


def fine_trajectories(model_fn, ns: NoiseScheduleVP, x_T, *, fine: int,
                      teacher_steps: int = TEACHER_STEPS):
    """-> (t [fine + 1], x [fine + 1, N, ...]): the teacher's latents at every fine point
    (x[0] = x_T); the teacher takes ``teacher_steps`` (a multiple of ``fine``) steps."""
    if teacher_steps % fine:
        raise ValueError(f"teacher_steps ({teacher_steps}) must be a multiple of fine ({fine})")
    solver = teacher_solver(ns, teacher_steps)
    _, traj = sample(model_fn, solver, x_T, return_trajectory=True)   # x after each step
    sub = teacher_steps // fine
    t = make_grid("logsnr_uniform", ns, teacher_steps)[::sub]          # the teacher's grid
    x = jnp.concatenate([jnp.asarray(x_T)[None], traj[sub - 1::sub]], axis=0)
    return t, x


@functools.partial(jax.jit, static_argnames=("spec", "prediction_type"))
def _fine_predictions(dyn, x, t_model, alpha, sigma, *, spec, prediction_type):
    """(x0, eps) [M, N, ...] at the fine points x [M, N, ...]: one network call per point,
    the M calls one jitted ``lax.map`` (eager calls would dispatch, and compile, the network
    op by op)."""
    model_fn = combine(dyn, spec)

    def one(args):
        xm, tm, a, s = args
        out = model_fn(xm, jnp.full((xm.shape[0],), tm))
        return vp_x0(prediction_type, out, xm, a, s), vp_eps(prediction_type, out, xm, a, s)

    return jax.lax.map(one, (x, t_model, alpha, sigma))


def step_costs(model_fn, ns: NoiseScheduleVP, t, x, prediction_type: str = "epsilon"):
    """c [M + 1, M + 1]: the mean RMSE of one DDIM step from fine point m to n (> m)."""
    m_total = t.shape[0] - 1
    tt = jnp.asarray(t, jnp.float32)
    alpha, sigma = ns.marginal_alpha(tt), ns.marginal_std(tt)
    dyn, spec = partition(model_fn)
    x0, eps = _fine_predictions(dyn, jnp.asarray(x[:m_total]), model_input_time(ns, tt[:m_total]),
                                alpha[:m_total], sigma[:m_total], spec=spec,
                                prediction_type=prediction_type)
    alpha, sigma = np.asarray(alpha), np.asarray(sigma)
    cost = np.full((m_total + 1, m_total + 1), np.inf)
    n_samples = x.shape[1]
    flat = np.asarray(x).reshape(m_total + 1, n_samples, -1)
    x0 = np.asarray(x0).reshape(m_total, n_samples, -1)
    eps = np.asarray(eps).reshape(m_total, n_samples, -1)
    for m in range(m_total):
        for n in range(m + 1, m_total + 1):
            guess = alpha[n] * x0[m] + sigma[n] * eps[m]
            cost[m, n] = np.mean(np.sqrt(np.mean(np.square(guess - flat[n]), axis=1)))
    return cost


def shortest_path(cost: np.ndarray, num_steps: int, start_cost=None) -> np.ndarray:
    """The node indices i_0 < ... < i_K = M minimising start_cost[i_0] + sum cost[i_j, i_{j+1}].
    ``start_cost`` [M + 1] (default: 0 at node 0, inf elsewhere, i.e. i_0 = 0) prices
    starting the K steps at a later node."""
    m_total = cost.shape[0] - 1
    k = int(num_steps)
    if not 1 <= k <= m_total:
        raise ValueError(f"num_steps must be in [1, {m_total}] for a fine grid of "
                         f"{m_total} steps, got {num_steps}")
    best = np.full((k + 1, m_total + 1), np.inf)
    back = np.zeros((k + 1, m_total + 1), np.int64)
    if start_cost is None:
        best[0, 0] = 0.0
    else:
        best[0] = np.asarray(start_cost, np.float64)
    for j in range(1, k + 1):
        total = best[j - 1][:, None] + cost          # [from, to]
        back[j] = np.argmin(total, axis=0)
        best[j] = total[back[j], np.arange(m_total + 1)]
    path = [m_total]
    for j in range(k, 0, -1):
        path.append(int(back[j, path[-1]]))
    return np.asarray(path[::-1])


def fine_costs(model_fn_for: Callable, ns: NoiseScheduleVP, x_T, cond, *, fine: int = 100,
               teacher_steps: int = TEACHER_STEPS, prediction_type: str = "epsilon"):
    """-> (fine_t [fine + 1], cost [fine + 1, fine + 1], start_cost [fine + 1]) from the
    teacher trajectories of x_T [N, ...] (one batch, conditioned on ``cond``); one cost
    matrix serves every K. ``start_cost[m]`` is the mean RMSE between x_T and the teacher's
    x_m: the error of a grid that starts at t_m and takes x_T for the latent there (as
    diffusers' leading/trailing spacings do below T)."""
    model_fn = model_fn_for(jnp.asarray(cond))
    t, x = fine_trajectories(model_fn, ns, jnp.asarray(x_T), fine=int(fine),
                             teacher_steps=int(teacher_steps))
    flat = np.asarray(x).reshape(x.shape[0], x.shape[1], -1)
    start = np.sqrt(np.mean(np.square(flat - flat[:1]), axis=2)).mean(axis=1)
    start[-1] = np.inf                       # K >= 1 steps must remain
    return t, step_costs(model_fn, ns, t, x, prediction_type), start


def grid_from_costs(fine_t, cost, num_steps: int, start_cost=None) -> dict:
    """The K-step grid through the fine points; ``start_cost`` given: the start may move
    below t_0 (priced by it), else the grid starts at t_0."""
    path = shortest_path(cost, num_steps, start_cost)
    grid = np.asarray(fine_t, np.float64)[path]
    total = sum(cost[a, b] for a, b in zip(path[:-1], path[1:]))
    if start_cost is not None:
        total += start_cost[path[0]]
    return {"t": grid, "path": path, "cost": float(total)}


def learn(model_fn_for: Callable, ns: NoiseScheduleVP, num_steps: int, x_T, cond, *,
          fine: int = 100, teacher_steps: int = TEACHER_STEPS,
          prediction_type: str = "epsilon", free_start: bool = True) -> dict:
    """-> {"t": [K + 1] grid, "cost": its summed step cost, "path", "fine_t", "seconds"}.
    ``free_start``: the grid may start below T where that is cheaper (priced by the
    distance of x_T to the teacher's latent there); False: GITS' fixed start at T."""
    check_teacher_steps(teacher_steps, num_steps)
    if not int(num_steps) <= int(fine):
        raise ValueError(f"the fine grid ({fine} steps) must have at least num_steps "
                         f"({num_steps}) steps")
    start = time.perf_counter()
    t, cost, start_cost = fine_costs(model_fn_for, ns, x_T, cond, fine=fine,
                                     teacher_steps=teacher_steps,
                                     prediction_type=prediction_type)
    out = grid_from_costs(t, cost, num_steps, start_cost if free_start else None)
    return dict(out, fine_t=t, seconds=time.perf_counter() - start)


__all__ = ["fine_costs", "fine_trajectories", "grid_from_costs", "learn", "shortest_path",
           "step_costs"]
