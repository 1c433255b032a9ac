"""The embedded digits model: class-conditional 16x16 handwritten digits.

    pipe = jaxdiff.zoo.digits.load()
    images = pipe(labels=[0, 1, 2], num_inference_steps=50, solver="ddim",
                  guidance_scale=2.0, seed=0)            # [3, 16, 16, 1] in [0, 1]

Trained by ``python -m jaxdiff.zoo.digits.train`` on scikit-learn's digits (training split
only); quality is measured by ``jaxdiff.zoo.digits.metrics`` on the held-out split.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import solvers
from jaxdiff.guidance import classifier_free
from jaxdiff.sampling import as_sampler, run
from jaxdiff.zoo.digits import model as _model
from jaxdiff.zoo.digits.model import NULL_LABEL, SCHEDULE, class_tokens

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_SHAPE = (16, 16, 1)
DEFAULT_GUIDANCE_SCALE = 1.0


def _check_labels(labels) -> np.ndarray:
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise ValueError(f"labels must be a list of ints 0-9, got {labels!r}")
    labels = list(np.asarray(labels).reshape(-1).tolist()) if isinstance(
        labels, (np.ndarray, jax.Array)) else list(labels)
    if not labels:
        raise ValueError("labels must be a non-empty list of ints 0-9")
    for v in labels:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 9:
            raise ValueError(f"every label must be an int 0-9, got {v!r} in {labels!r}")
    return np.asarray(labels, np.int32)


def _check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps,
                                                               numbers.Integral):
        raise ValueError(f"num_inference_steps must be a positive int, got "
                         f"{num_inference_steps!r}")
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
    return int(num_inference_steps)


@dataclasses.dataclass
class DigitsPipeline:
    """UNet + noise schedule. Sampling is one jitted ``jaxdiff.sample`` call.

    The model function is a pytree (``jaxdiff.guidance.classifier_free``) whose leaves are the
    weights, the class tokens/labels and the guidance scale, so new labels (same count), a new
    seed or a new guidance scale reuse the compiled program.
    """

    unet: Any
    schedule: dict

    def model_fn(self, labels, guidance_scale=DEFAULT_GUIDANCE_SCALE):
        labels = jnp.asarray(_check_labels(labels))
        if guidance_scale is None or float(guidance_scale) == 1.0:
            # Scale 1 is the conditional prediction: skip the unconditional half (2x faster).
            return classifier_free(self.unet, class_tokens(labels), class_labels=labels)
        null = jnp.full_like(labels, NULL_LABEL)
        return classifier_free(self.unet, class_tokens(labels), class_tokens(null),
                               jnp.asarray(guidance_scale, jnp.float32),
                               class_labels=labels, uncond_class_labels=null)

    def solver(self, solver: Union[str, Any] = "ddim", num_inference_steps: int = 50):
        steps = _check_steps(num_inference_steps)
        if isinstance(solver, str):
            return solvers.make(solver, self.schedule, steps)
        if not hasattr(solver, "step") or not hasattr(solver, "timesteps"):
            raise ValueError(f"solver must be a name ({sorted(solvers.SHORT_NAMES)}) or a "
                             f"jaxdiff solver, got {solver!r}")
        return solver

    def __call__(self, *args, **kwargs) -> np.ndarray:
        """-> float32 images [N, 16, 16, 1] in [0, 1]: ``generate(...)`` without the stats."""
        return self.generate(*args, **kwargs)[0]

    def generate(self, labels: Sequence[int], num_inference_steps: int = 50,
                 solver: Union[str, Any] = "ddim",
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, *,
                 noise: Optional[jax.Array] = None, progress: bool = False,
                 sampler="sequential", ratios=None, schedule=None,
                 sampler_options: Optional[dict] = None, callback=None, callback_steps: int = 1):
        """-> (float32 images [N, 16, 16, 1] in [0, 1], one per label; the sampler's stats).

        A Solver object overrides ``num_inference_steps`` (it carries its own step count).
        ``seed`` draws x_T and, for stochastic solvers, the per-step noise (the same draws
        for every sampler). ``sampler``: a sampler value (``jaxdiff.sampling.Picard(
        parallel=16, tolerance=0.1)``, ...) or a shorthand name ("sequential", "paradigms",
        "faster") whose fields come from ``sampler_options``. ``ratios``: TimeTuner ratios
        (array or ratios JSON path) applied to the solver (``Solver.with_ratios``);
        ``schedule``: a learned time grid (``Solver.with_schedule``). ``callback(step,
        timestep, latents)`` every ``callback_steps`` steps: as for ``jaxdiff.sample``.
        """
        sampler = as_sampler(sampler, **dict(sampler_options or {}))
        labels = _check_labels(labels)
        steps = _check_steps(num_inference_steps)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        gs = float(guidance_scale)
        if not np.isfinite(gs):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        sol = solvers.retimed(self.solver(solver, steps), ratios, schedule)
        model_fn = self.model_fn(labels, gs)
        k_x, k_step = jax.random.split(jax.random.PRNGKey(int(seed)))
        x_T = jax.random.normal(k_x, (len(labels), *IMAGE_SHAPE), jnp.float32)
        if noise is None and getattr(sol, "stochastic", False):
            noise = jax.random.normal(k_step, (sol.num_steps,) + x_T.shape, jnp.float32)
        x0, stats = run(sampler, model_fn, sol, x_T, noise=noise, progress=progress,
                        callback=callback, callback_steps=callback_steps)
        return np.clip((np.asarray(x0, np.float32) + 1.0) / 2.0, 0.0, 1.0), stats


def load(directory: Union[str, Path, None] = None) -> DigitsPipeline:
    """The committed model (or one exported by ``train`` into ``directory``)."""
    from jaxdiff.checkpoint import load_model
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    unet = load_model(directory / "unet")
    cfg_path = directory / "scheduler_config.json"
    schedule = json.loads(cfg_path.read_text()) if cfg_path.exists() else dict(SCHEDULE)
    schedule = {k: v for k, v in schedule.items() if not k.startswith("_")}
    return DigitsPipeline(unet, schedule)


__all__ = ["DigitsPipeline", "IMAGE_SHAPE", "NULL_LABEL", "SCHEDULE", "WEIGHTS_DIR", "load"]
