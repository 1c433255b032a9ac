"""TimeTuner on the digits zoo model: the tuner ``jaxdiff tune --model digits``, notebook 04
and the TimeTuner benchmark share (labels as the condition)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tuning.schedule import NoiseScheduleVP
from tuning.tuner import TimeTuner
from tuning.wrapper import model_wrapper


def _with_labels(model_fn, x, t, labels):
    """The digits model function with this batch's labels as its condition."""
    from jaxdiff.zoo.digits.model import class_tokens
    labels = labels.astype(jnp.int32)
    return dataclasses.replace(model_fn, cond=class_tokens(labels), class_labels=labels)(x, t)


def build_tuner():
    import jaxdiff.zoo.digits as digits
    from jaxdiff.guidance import classifier_free
    from jaxdiff.zoo.digits.model import SCHEDULE, alphas_cumprod, class_tokens

    pipe = digits.load()
    ns = NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod(SCHEDULE))
    one = jnp.zeros((1,), jnp.int32)
    # a pytree (weights are leaves), so the tuning step takes them as arguments
    net = jax.tree_util.Partial(_with_labels,
                                classifier_free(pipe.unet, class_tokens(one), class_labels=one))
    return TimeTuner(model_wrapper(net, ns, guidance_type="classifier-free"), ns)
