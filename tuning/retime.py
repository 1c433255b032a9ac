"""Use tuned ratios with jaxdiff's own solvers and drivers.

A ratio only changes the time the network is asked at; the solver's update is untouched.
So tuned sampling needs no new solver: wrap the model function so that, when a driver
asks for the network at solver timestep t_i, it evaluates it at the tuned time instead.
With jaxdiff's DDIM on TimeTuner's grid (leading spacing, steps_offset=1,
set_alpha_to_one=False) ``jaxdiff.sample(retimed_model_fn(...), solver, x_T)`` is exactly
``TimeTuner.ddim_sample(x_T, t_ratios=...)``; with other solvers the ratios still apply,
though they were tuned for DDIM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling.pytree import combine, partition
from tuning.schedule import NoiseScheduleVP
from tuning.wrapper import model_input_time


@dataclasses.dataclass(frozen=True, eq=False)
class RetimedModelFn:
    """model_fn(x, t) with t [N] in the network's units, redirected from the solver's
    timesteps [K] to the tuned times [K] of the same step (nearest solver timestep)."""

    model_fn: Any
    timesteps: jax.Array        # [K] what the solver passes, network units
    tuned: jax.Array            # [K] what the network receives instead

    def __call__(self, x, t, *args, **kwargs):
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        step = jnp.argmin(jnp.abs(self.timesteps[None, :] - t[:, None].astype(
            self.timesteps.dtype)), axis=1)                       # [N]
        return self.model_fn(x, self.tuned[step].astype(t.dtype), *args, **kwargs)


def _flatten(m: RetimedModelFn):
    dyn, spec = partition(m.model_fn)
    return (dyn, m.timesteps, m.tuned), spec


def _unflatten(spec, children):
    dyn, timesteps, tuned = children
    return RetimedModelFn(combine(dyn, spec), timesteps, tuned)


jax.tree_util.register_pytree_node(RetimedModelFn, _flatten, _unflatten)


def retimed_model_fn(model_fn, noise_schedule: NoiseScheduleVP, timesteps, ratios):
    """Wrap a jaxdiff model function for tuned sampling with any jaxdiff driver.

    ``timesteps`` [K]: the solver's timesteps (``solver.timesteps``, network units);
    ``ratios`` [K]: tuned ratios for those steps, in order. Step i's network time becomes
    the network time of ratios[i] * t_i, t_i being the continuous time of timesteps[i].
    """
    ts = np.asarray(timesteps, np.float64)
    r = np.asarray(ratios, np.float64)
    if ts.ndim != 1 or r.shape != ts.shape:
        raise ValueError(f"timesteps and ratios must be 1-D of the same length, got shapes "
                         f"{ts.shape} and {r.shape}")
    if np.unique(ts).shape[0] != ts.shape[0]:
        raise ValueError("timesteps must be distinct: each one identifies its step")
    if noise_schedule.schedule == "discrete":
        t_cont = ts / 1000.0 + 1.0 / noise_schedule.total_N     # inverse of model_input_time
    else:
        t_cont = ts
    tuned = np.asarray(model_input_time(noise_schedule, r * t_cont))
    return RetimedModelFn(model_fn, jnp.asarray(ts, jnp.float32),
                          jnp.asarray(tuned, jnp.float32))
