"""Solvers: immutable pytrees built from a noise schedule and a number of steps.

``from_diffusers(config, num_inference_steps)`` builds the solver that reproduces a diffusers
scheduler config (a ``scheduler_config.json`` dict with ``_class_name``);
``make(name, schedule_config, num_inference_steps, **options)`` builds one by short name,
taking from ``schedule_config`` (any diffusers scheduler config, or None) only the fields the
chosen solver understands, as diffusers' ``SchedulerClass.from_config`` does.

Config fields are checked: a value jaxdiff does not implement raises ``ValueError`` naming
the field; fields of other diffusers schedulers are ignored (as diffusers ignores them);
fields no diffusers scheduler has raise.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from jaxdiff.solvers import (ddim, ddpm, deis, dpm_singlestep, dpm_solver, euler,
                             euler_ancestral, heun, kdpm2, kdpm2_ancestral, lms, pndm, unipc)
from jaxdiff.solvers.base import METADATA_KEYS, EmptyState, Solver, schedule_from
from jaxdiff.solvers.ddim import DDIM
from jaxdiff.solvers.ddpm import DDPM
from jaxdiff.solvers.deis import DEIS, DEISState
from jaxdiff.solvers.dpm_singlestep import DPMSolverSinglestep, SinglestepState
from jaxdiff.solvers.dpm_solver import DPMSolverPP, MultistepState
from jaxdiff.solvers.euler import Euler
from jaxdiff.solvers.euler_ancestral import EulerAncestral
from jaxdiff.solvers.heun import Heun, HeunState
from jaxdiff.solvers.kdpm2 import KDPM2, KDPM2State
from jaxdiff.solvers.kdpm2_ancestral import KDPM2Ancestral
from jaxdiff.solvers.lms import LMS, LMSState
from jaxdiff.solvers.pndm import PNDM, PNDMState
from jaxdiff.solvers.unipc import UniPC, UniPCState

_MODULES = (ddpm, ddim, pndm, euler, euler_ancestral, heun, lms, dpm_solver, unipc,
            dpm_singlestep, kdpm2, kdpm2_ancestral, deis)
SOLVERS = {m.DIFFUSERS_CLASS: m for m in _MODULES}        # diffusers class name -> module
SHORT_NAMES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
               "plms": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
               "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
               "lms": "LMSDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
               "unipc": "UniPCMultistepScheduler", "dpm_single": "DPMSolverSinglestepScheduler",
               "kdpm2": "KDPM2DiscreteScheduler", "kdpm2_a": "KDPM2AncestralDiscreteScheduler",
               "deis": "DEISMultistepScheduler"}

# Fields of diffusers schedulers jaxdiff has no solver for, seen in published model configs;
# like diffusers' from_config we ignore them when building another scheduler.
_FOREIGN_KEYS = frozenset({"clip_sample_range", "s_noise", "s_churn", "s_tmin", "s_tmax",
                           "rho", "sigma_data", "use_lu_lambdas", "shift", "base_shift",
                           "max_shift", "base_image_seq_len", "max_image_seq_len",
                           "invert_sigmas", "noise_sampler_seed", "set_alpha_to_zero",
                           "skip_prk_steps", "algorithm_type", "solver_order", "timestep_type",
                           "lambda_min_clipped", "variance_type", "num_train_timesteps"})
_KNOWN_KEYS = frozenset().union(*(m.DEFAULTS for m in _MODULES)) | _FOREIGN_KEYS


def _resolve(config: Mapping[str, Any], module, options: Mapping[str, Any]):
    name = module.DIFFUSERS_CLASS
    cfg = dict(module.DEFAULTS)
    # as diffusers' from_config: fields the source class only had at their defaults
    # (listed in _use_default_values) do not carry over to another class
    defaulted = (set(config.get("_use_default_values") or ())
                 if config.get("_class_name") not in (None, name) else set())
    for key, value in config.items():
        if key in METADATA_KEYS or key in defaulted:
            continue
        if key in module.DEFAULTS:
            cfg[key] = value
        elif key not in _KNOWN_KEYS:
            raise ValueError(f"{name}: unknown scheduler config field {key!r} (value {value!r})")
    step_opts = dict(module.STEP_OPTIONS)
    for key, value in options.items():
        if key in module.STEP_OPTIONS:
            step_opts[key] = value
        elif key in module.DEFAULTS:
            cfg[key] = value
        else:
            raise ValueError(f"{name}: unknown option {key!r} (value {value!r}); options are "
                             f"{sorted(set(module.DEFAULTS) | set(module.STEP_OPTIONS))}")
    return cfg, step_opts


def from_diffusers(config: Mapping[str, Any], num_inference_steps: int, **options) -> Solver:
    """Solver matching a diffusers scheduler config dict (with ``_class_name``).

    ``options`` override config fields or set what diffusers passes to ``step()`` (DDIM's
    ``eta`` and ``use_clipped_model_output``, LMS's ``order``); ``ratios=`` (an array or a
    ratios JSON path) applies TimeTuner ratios (``Solver.with_ratios``); ``schedule=`` a
    learned time grid (a schedule file or its dict, ``Solver.with_schedule``)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls not in SOLVERS:
        raise ValueError(f"unsupported _class_name={cls!r}; jaxdiff implements "
                         f"{sorted(SOLVERS)}")
    module = SOLVERS[cls]
    ratios, schedule = options.pop("ratios", None), options.pop("schedule", None)
    cfg, step_opts = _resolve(config, module, options)
    return retimed(module.build(cfg, num_inference_steps, **step_opts), ratios, schedule)


def make(name: str, schedule_config: Optional[Mapping[str, Any]] = None,
         num_inference_steps: int = 50, **options) -> Solver:
    """Solver by short name: ddpm, ddim, pndm (plms), euler, euler_a, heun, lms, dpm++, unipc,
    dpm_single, kdpm2, kdpm2_a, deis.

    ``schedule_config``: a diffusers scheduler config of any class (e.g. the model's
    ``scheduler/scheduler_config.json``) or None for the chosen solver's defaults.
    ``ratios=`` / ``schedule=`` as for ``from_diffusers``."""
    key = name.lower() if isinstance(name, str) and name.lower() in SHORT_NAMES else name
    if key not in SHORT_NAMES and key not in SOLVERS:     # (or a diffusers class name)
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SHORT_NAMES)}")
    module = SOLVERS[SHORT_NAMES.get(key, key)]
    ratios, schedule = options.pop("ratios", None), options.pop("schedule", None)
    cfg, step_opts = _resolve(dict(schedule_config or {}), module, options)
    return retimed(module.build(cfg, num_inference_steps, **step_opts), ratios, schedule)


# the step count ``compatibles`` builds each candidate with
_PROBE_STEPS = 10


def compatibles(config: Mapping[str, Any]) -> list:
    """Diffusers class names of the jaxdiff solvers that can replace the scheduler ``config``
    describes (a folder's ``scheduler_config.json`` dict), sorted: those that build from it
    as ``make(name, config)`` would (fields of other schedulers ignored, as diffusers'
    ``from_config``), like diffusers' ``scheduler.compatibles``. A solver that cannot take
    one of the config's field values is left out."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    out = []
    for cls, module in SOLVERS.items():
        try:
            cfg, step_opts = _resolve(dict(config), module, {})
            module.build(cfg, min(_PROBE_STEPS, int(cfg["num_train_timesteps"])), **step_opts)
        except (ValueError, TypeError):
            continue
        out.append(cls)
    return sorted(out)


def alphas_cumprod(schedule_config: Optional[Mapping[str, Any]] = None):
    """[num_train_timesteps] float32 alpha_bar of a diffusers scheduler config (what a
    schedule file records, ``jaxdiff.schedule_files.save_schedule(alphas_cumprod=...)``)."""
    cfg, _ = _resolve(dict(schedule_config or {}), ddim, {})
    return schedule_from(cfg).alphas_cumprod


def retimed(solver: Solver, ratios=None, schedule=None) -> Solver:
    """``solver`` with TimeTuner ratios or a learned time grid applied (either, not both)."""
    if ratios is not None and schedule is not None:
        raise ValueError("pass ratios= or schedule=, not both (a schedule file carries "
                         "its own network times)")
    if schedule is not None:
        return solver.with_schedule(schedule)
    return solver if ratios is None else solver.with_ratios(ratios)


__all__ = ["DDIM", "DDPM", "DEIS", "DEISState", "DPMSolverPP", "DPMSolverSinglestep",
           "EmptyState", "Euler", "EulerAncestral", "Heun", "HeunState", "KDPM2",
           "KDPM2Ancestral", "KDPM2State", "LMS", "LMSState", "MultistepState", "PNDM",
           "PNDMState", "SHORT_NAMES", "SOLVERS", "SinglestepState", "Solver", "UniPC",
           "UniPCState", "alphas_cumprod", "compatibles", "from_diffusers", "make", "retimed"]
