"""TimeTuner for jaxdiff: learned per-step time ratios for DDIM and DPM-Solver++ (Xia et al.,
CVPR 2024).

The API mirrors the reference implementation (``NoiseScheduleVP``, ``model_wrapper``,
``TimeTuner``) so that its users feel at home. The schedule is jaxdiff's
(``jaxdiff.schedules.NoiseScheduleVP``), the samplers are jaxdiff's DDIM and DPM-Solver++
built on the tuner's time grid and run by ``jaxdiff.sample`` (differentiable in the
ratios), and tuning is jitted optax Adam with resumable orbax checkpoints.
"""

from tuning.artifacts import load_ratios, save_ratios
from tuning.schedule import SCHEDULES, NoiseScheduleVP
from tuning.tuner import (GRIDS, SOLVERS, TUNE_TYPES, BoundModel, NonFiniteLossError, TimeTuner,
                          dpm_orders, grid_solver, time_grid)
from tuning.wrapper import (GUIDANCE_TYPES, MODEL_TYPES, NoiseModel, model_input_time,
                            model_wrapper)

__all__ = ["BoundModel", "GRIDS", "GUIDANCE_TYPES", "MODEL_TYPES", "NoiseModel",
           "NoiseScheduleVP", "NonFiniteLossError", "SCHEDULES", "SOLVERS", "TUNE_TYPES",
           "TimeTuner", "dpm_orders", "grid_solver", "load_ratios", "model_input_time",
           "model_wrapper", "save_ratios", "time_grid"]
