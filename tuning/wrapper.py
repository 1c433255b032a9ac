"""Turn any diffusion network into the noise predictor eps(x, t) that TimeTuner needs.

TimeTuner queries the network at continuous times r * t that are not training timesteps,
and its DDIM update is written in terms of the predicted noise. ``model_wrapper`` therefore
(1) maps continuous time to the network's own time input, (2) converts whatever the network
predicts (noise, clean data, velocity or score) into noise, and (3) applies classifier or
classifier-free guidance.

The result is a pytree (``NoiseModel``): the network (if it is a pytree), the schedule,
the conditions and the guidance scale are leaves, so jitted samplers take it as an
argument instead of baking weights and embeddings into the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxdiff.guidance import guide
from jaxdiff.sampling.pytree import combine, partition
from jaxdiff.schedules import NoiseScheduleVP, model_input_time

MODEL_TYPES = ("noise", "x_start", "v", "score")
GUIDANCE_TYPES = ("uncond", "classifier", "classifier-free")

__all__ = ["GUIDANCE_TYPES", "MODEL_TYPES", "NoiseModel", "model_input_time", "model_wrapper"]


def _per_sample(v, ndim):  # [B] -> [B, 1, ..., 1] to scale a [B, ...] batch
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _is_python_number(v, value) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == value


def _stack_conditions(uncond, cond):
    """[uncond; cond] along the batch axis, leaf by leaf; an unconditional condition with
    a batch of 1 (or none) is broadcast to the condition's batch."""
    def cat(u, c):
        u, c = jnp.asarray(u), jnp.asarray(c)
        if u.shape != c.shape:
            try:
                u = jnp.broadcast_to(u, c.shape)
            except ValueError as err:
                raise ValueError(f"unconditional_condition of shape {u.shape} does not "
                                 f"match the condition's shape {c.shape}") from err
        return jnp.concatenate([u, c.astype(u.dtype)], axis=0)
    return jax.tree.map(cat, uncond, cond)


# Fields that hold user callables (or their kwargs): split into traced arrays and a static
# rest, so that a plain function stays static while a pytree network's weights are traced.
_CALLABLE_FIELDS = ("model", "model_kwargs", "classifier_fn", "classifier_kwargs",
                    "cond_process_fn")
_DATA_FIELDS = ("noise_schedule", "condition", "unconditional_condition", "guidance_scale")


@dataclasses.dataclass(frozen=True, eq=False)   # hashed by identity (its leaves may not be)
class NoiseModel:
    """eps(x [B, ...], t_continuous [B] or scalar) -> [B, ...]; see ``model_wrapper``.

    A pytree: the schedule, conditions and guidance scale are leaves, and so are the array
    leaves of the network (when it is a pytree) and of the keyword arguments; plain
    functions and other non-array values are static.
    """

    model: Any
    noise_schedule: NoiseScheduleVP
    condition: Any = None
    unconditional_condition: Any = None
    guidance_scale: Any = 1.0
    model_kwargs: Any = None
    classifier_fn: Any = None
    classifier_kwargs: Any = None
    cond_process_fn: Any = None
    model_type: str = "noise"
    guidance_type: str = "uncond"

    def input_time(self, t_continuous):
        return model_input_time(self.noise_schedule, t_continuous)

    def noise(self, x, t_continuous, cond=None):
        """The network's output at continuous time t, expressed as predicted noise."""
        ns = self.noise_schedule
        t_input = self.input_time(t_continuous)
        kwargs = self.model_kwargs or {}
        if cond is None:
            out = self.model(x, t_input, **kwargs)
        else:
            out = self.model(x, t_input, cond, **kwargs)
        if self.model_type == "noise":
            return out
        sigma = _per_sample(ns.marginal_std(t_continuous), x.ndim)
        if self.model_type == "score":
            # score = -eps / sigma_t
            return -sigma * out
        alpha = _per_sample(ns.marginal_alpha(t_continuous), x.ndim)
        if self.model_type == "x_start":
            # x = alpha x0 + sigma eps
            return (x - alpha * out) / sigma
        # v = alpha eps - sigma x0  =>  alpha v + sigma x = (alpha^2 + sigma^2) eps = eps
        return alpha * out + sigma * x

    def __call__(self, x, t_continuous, condition=None, unconditional_condition=None):
        """Call-time conditions override the ones given to ``model_wrapper`` (TimeTuner
        passes each batch's labels this way)."""
        t = jnp.broadcast_to(jnp.asarray(t_continuous), (x.shape[0],))
        cond = self.condition if condition is None else condition
        uncond = (self.unconditional_condition if unconditional_condition is None
                  else unconditional_condition)
        if self.guidance_type == "uncond":
            return self.noise(x, t)
        if cond is None:
            raise ValueError(f"guidance_type={self.guidance_type!r} needs a condition: pass "
                             f"condition= to model_wrapper or to the call")
        if self.cond_process_fn is not None:
            cond = self.cond_process_fn(cond)
            if uncond is not None:
                uncond = self.cond_process_fn(uncond)
        scale = self.guidance_scale
        if self.guidance_type == "classifier":
            eps = self.noise(x, t, cond)
            if _is_python_number(scale, 0):
                return eps
            t_input = self.input_time(t)
            ckw = self.classifier_kwargs or {}

            def log_prob(x_in):
                return jnp.sum(self.classifier_fn(x_in, t_input, cond, **ckw))

            # Exact gradient of log p(c | x_t); unlike the PyTorch reference it stays
            # differentiable, so the tuning loss sees how guidance changes with r.
            grad = jax.grad(log_prob)(x)
            sigma = _per_sample(self.noise_schedule.marginal_std(t), x.ndim)
            return eps - scale * sigma * grad
        # classifier-free
        if uncond is None or _is_python_number(scale, 1):
            return self.noise(x, t, cond)
        both = self.noise(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                          _stack_conditions(uncond, cond))
        eps_uncond, eps_cond = jnp.split(both, 2, axis=0)
        return guide(eps_uncond, eps_cond, scale)


def _flatten(nm: NoiseModel):
    parts = [partition(getattr(nm, f)) for f in _CALLABLE_FIELDS]
    children = tuple(getattr(nm, f) for f in _DATA_FIELDS) + tuple(p[0] for p in parts)
    aux = tuple(p[1] for p in parts) + (nm.model_type, nm.guidance_type)
    return children, aux


def _unflatten(aux, children):
    n = len(_DATA_FIELDS)
    fields = dict(zip(_DATA_FIELDS, children[:n]))
    for name, dyn, spec in zip(_CALLABLE_FIELDS, children[n:], aux):
        fields[name] = combine(dyn, spec)
    return NoiseModel(**fields, model_type=aux[-2], guidance_type=aux[-1])


jax.tree_util.register_pytree_node(NoiseModel, _flatten, _unflatten)


def model_wrapper(model: Callable, noise_schedule: NoiseScheduleVP, model_type: str = "noise",
                  model_kwargs: Optional[dict] = None, guidance_type: str = "uncond",
                  condition=None, unconditional_condition=None, guidance_scale=1.0,
                  classifier_fn: Optional[Callable] = None,
                  classifier_kwargs: Optional[dict] = None,
                  cond_process_fn: Optional[Callable] = None) -> NoiseModel:
    """Wrap ``model`` into a noise predictor ``fn(x, t_continuous, condition=None,
    unconditional_condition=None) -> eps``.

    ``model(x, t_input, **model_kwargs)`` (unconditional) or
    ``model(x, t_input, cond, **model_kwargs)`` (both guidance types; for classifier
    guidance the model also receives the condition, as in TimeTuner where the guided
    models are class-conditional) returns noise, x_start (clean data), v (velocity) or
    score, as ``model_type`` says. ``classifier_fn(x, t_input, cond, **classifier_kwargs)``
    returns log p(cond | x_t) per sample. ``cond_process_fn`` maps a raw condition (e.g.
    labels or token ids) to what the network takes, applied at every call.

    ``guidance_scale``: a Python 1.0 (classifier-free) or 0.0 (classifier) skips the extra
    network or classifier pass, as the reference does; any other value, e.g. a jnp scalar
    that should stay traced under jit, uses the full formula.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; choose one of "
                         f"{list(MODEL_TYPES)}")
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"unsupported guidance_type {guidance_type!r}; choose one of "
                         f"{list(GUIDANCE_TYPES)}")
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(noise_schedule, NoiseScheduleVP):
        raise ValueError(f"noise_schedule must be a NoiseScheduleVP, got "
                         f"{type(noise_schedule).__name__}")
    if guidance_type == "classifier" and not callable(classifier_fn):
        raise ValueError("guidance_type='classifier' needs a callable classifier_fn")
    return NoiseModel(model=model, noise_schedule=noise_schedule, condition=condition,
                      unconditional_condition=unconditional_condition,
                      guidance_scale=guidance_scale, model_kwargs=dict(model_kwargs or {}),
                      classifier_fn=classifier_fn,
                      classifier_kwargs=dict(classifier_kwargs or {}),
                      cond_process_fn=cond_process_fn, model_type=model_type,
                      guidance_type=guidance_type)
