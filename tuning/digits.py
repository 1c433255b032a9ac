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


def grid_problem(guidance_scale: float = 1.0):
    """-> (pipeline, noise schedule, model_fn_for(labels)) for learning time grids on the
    digits model: the model function takes network time, as jaxdiff's drivers pass it."""
    import jaxdiff.zoo.digits as digits
    from jaxdiff.zoo.digits.model import SCHEDULE, alphas_cumprod

    pipe = digits.load()
    ns = NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod(SCHEDULE))

    def model_fn_for(labels):
        return pipe.model_fn(labels, guidance_scale)
    return pipe, ns, model_fn_for


def grid_pairs(n: int, seed: int):
    """n x_T [n, 16, 16, 1] and labels (0..9 in turn, shuffled by seed): seeds of one split."""
    import numpy as np

    from jaxdiff.zoo.digits import IMAGE_SHAPE
    x_T = jax.random.normal(jax.random.key(seed), (n, *IMAGE_SHAPE), jnp.float32)
    labels = np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.int32)
    return np.asarray(x_T), labels
