"""TimeTuner for jaxdiff: learned per-step time ratios for DDIM and DPM-Solver++ (Xia et al.,
CVPR 2024).

The API mirrors the reference implementation (``NoiseScheduleVP``, ``model_wrapper``,
``TimeTuner``) so that its users feel at home; everything is JAX: the schedule and the
wrapped model are pytrees, sampling is one jitted ``lax.scan`` differentiable in the
ratios, and tuning is jitted optax Adam with resumable orbax checkpoints.
"""

from tuning.artifacts import load_ratios, save_ratios
from tuning.retime import RetimedModelFn, retimed_model_fn
from tuning.sampler import GRIDS, SOLVERS, ddim_update, dpm_orders, dpmpp_update, time_grid
from tuning.schedule import SCHEDULES, NoiseScheduleVP
from tuning.tuner import TUNE_TYPES, NonFiniteLossError, TimeTuner
from tuning.wrapper import (GUIDANCE_TYPES, MODEL_TYPES, NoiseModel, model_input_time,
                            model_wrapper)

__all__ = ["GRIDS", "GUIDANCE_TYPES", "MODEL_TYPES", "NoiseModel", "NoiseScheduleVP",
           "NonFiniteLossError", "RetimedModelFn", "SCHEDULES", "SOLVERS", "TUNE_TYPES", "TimeTuner",
           "ddim_update", "dpm_orders", "dpmpp_update",
           "load_ratios", "model_input_time", "model_wrapper", "retimed_model_fn", "save_ratios",
           "time_grid"]
