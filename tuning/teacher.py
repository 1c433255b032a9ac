"""Teachers and students on continuous VP time grids, for learning and judging time grids.

The teacher of a time grid is the same-x_T solution of the probability-flow ODE, computed by
jaxdiff's multistep DPM-Solver++(2M) on a fine logSNR-uniform grid (500 steps by default:
``teacher_gap`` measures its distance to a 1000-step solve). Students are jaxdiff's DDIM or
DPM-Solver++ built on a (possibly traced) grid ``t`` [K + 1] with network times [K]
(``student_solver``), the same solvers ``Solver.with_schedule`` builds from a schedule file,
so a learned grid samples identically through every driver and pipeline.

Model functions take network time (``jaxdiff.schedules.model_input_time``) and are built
per batch by ``model_fn_for(cond)`` (cond: that batch's labels / embeddings), so a
conditional model is solved in fixed-size batches by one compiled program.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling import sample
from jaxdiff.schedules import NoiseScheduleVP, model_input_time
from jaxdiff.solvers import ddim as ddim_solver
from jaxdiff.solvers import dpm_solver
from jaxdiff.time_grids import make_grid

FAMILIES = ("ddim", "dpmsolver++")
TEACHER_STEPS = 500


def check_family(solver: str) -> str:
    if solver not in FAMILIES:
        raise ValueError(f"unsupported solver {solver!r} for a learned grid; choose one of "
                         f"{list(FAMILIES)}")
    return solver


def student_solver(ns: NoiseScheduleVP, solver: str, t, network_t=None, *, order: int = 2):
    """jaxdiff's DDIM / DPM-Solver++(order) stepping t[i] -> t[i+1] (t [K + 1], may be
    traced), the network asked at ``network_t`` [K] (continuous, default t[:-1])."""
    check_family(solver)
    t = jnp.asarray(t, ns.dtype)
    net = t[:-1] if network_t is None else jnp.asarray(network_t, ns.dtype)
    times = model_input_time(ns, net)
    if solver == "ddim":
        return ddim_solver.on_vp_grid(ns, t[:-1], t[1:], network_times=times)
    return dpm_solver.on_vp_grid(ns, t[:-1], t[1:], order=order, network_times=times)


def solve_batches(model_fn_for: Callable, cond, x_T, solver, *, batch: int = 500,
                  progress: Optional[str] = None) -> np.ndarray:
    """``jaxdiff.sample`` over x_T [N, ...] in batches of ``batch`` (the last one padded, so
    one program serves all) -> x_0 [N, ...] as float32 numpy. ``cond`` [N, ...] is sliced
    alongside and handed to ``model_fn_for``."""
    x_T = np.asarray(x_T, np.float32)
    cond = np.asarray(cond)
    n = x_T.shape[0]
    if cond.shape[0] != n:
        raise ValueError(f"{cond.shape[0]} conditions for {n} x_T")
    batch = max(1, min(int(batch), n))
    starts = range(0, n, batch)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=progress, leave=False)
    out = []
    for s in starts:
        idx = np.arange(s, s + batch) % n          # pad by wrapping: shapes stay fixed
        x0 = sample(model_fn_for(jnp.asarray(cond[idx])), solver, jnp.asarray(x_T[idx]))
        out.append(np.asarray(x0, np.float32)[: min(batch, n - s)])
    return np.concatenate(out, axis=0)


def teacher_solver(ns: NoiseScheduleVP, steps: int = TEACHER_STEPS, *, t_start=None,
                   t_end=None):
    """DPM-Solver++(2M) on ``steps`` logSNR-uniform steps: the reference solution."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"teacher steps must be an integer >= 2, got {steps!r}")
    t = make_grid("logsnr_uniform", ns, int(steps), t_start=t_start, t_end=t_end)
    return student_solver(ns, "dpmsolver++", t, order=2)


def teacher_gap(model_fn_for, cond, x_T, ns, steps: int = TEACHER_STEPS,
                check_steps: int = 2 * TEACHER_STEPS, batch: int = 500) -> dict:
    """How far the ``steps`` teacher is from a ``check_steps`` one on these x_T: per-sample
    RMSE (mean and max), to compare with the student errors it is used to measure."""
    a = solve_batches(model_fn_for, cond, x_T, teacher_solver(ns, steps), batch=batch)
    b = solve_batches(model_fn_for, cond, x_T, teacher_solver(ns, check_steps), batch=batch)
    err = np.sqrt(np.mean(np.square(a - b).reshape(len(a), -1), axis=1))
    return {"steps": int(steps), "check_steps": int(check_steps),
            "rmse_mean": float(err.mean()), "rmse_max": float(err.max())}


def check_teacher_steps(teacher_steps: int, student_steps: int) -> None:
    if teacher_steps <= student_steps:
        raise ValueError(f"the teacher must take more steps than the student: teacher "
                         f"{teacher_steps} <= student {student_steps}")


__all__ = ["FAMILIES", "TEACHER_STEPS", "check_family", "check_teacher_steps", "solve_batches",
           "student_solver", "teacher_gap", "teacher_solver"]
