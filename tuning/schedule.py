"""The continuous-time VP noise schedule TimeTuner works in (it lives in ``jaxdiff.schedules``)."""

from jaxdiff.schedules import (CONTINUOUS_EPS, COSINE_LOG_ALPHA_0, COSINE_S, COSINE_T_END,
                               NoiseScheduleVP, interpolate)
from jaxdiff.schedules import VP_SCHEDULES as SCHEDULES

__all__ = ["CONTINUOUS_EPS", "COSINE_LOG_ALPHA_0", "COSINE_S", "COSINE_T_END", "NoiseScheduleVP",
           "SCHEDULES", "interpolate"]
