"""FasterDiffusion encoder propagation (Li et al., NeurIPS 2024).

The UNet encoder (conv_in, down blocks, mid block) changes little from one denoising step
to the next, the decoder a lot. So the encoder runs only at *key steps*; the decoder of the
non-key steps that follow a key step reuses its skip features and mid output. Those decoder
calls no longer depend on each other's latents, so a whole group (the key step and its
non-key followers) is decoded in one batched call, each step with its own time embedding,
and the solver then applies the group's steps in order (multistep solvers keep their
history). Optional prior noise injection adds ``noise_injection * x_T`` to the latent before
every step whose model time is below ``injection_threshold`` (the paper's 0.003 and 500 of
1000), which restores high-frequency detail lost by the reuse. x_T is the standard-normal
draw and the addition happens in the model-input (variance-preserving) scale, so for
sigma-scaled solvers (Euler, Heun, LMS) the latent receives alpha x_T sqrt(sigma_t^2 + 1),
the same perturbation as for DDIM.

With every step a key step and injection off this is exactly sequential sampling. The whole
sample is one ``jax.jit`` program: a ``lax.scan`` over the groups whose body runs the encoder
once and then the decoder: with ``decode_chunk=None`` one branch per distinct group size
(``lax.switch``), with ``decode_chunk=k`` calls of k steps and single-step calls for the
remainder (two decoders). The program holds the encoder once and the decoder once per
distinct decoder batch, however many groups there are.

The model function is a ``jaxdiff.guidance`` model function (or anything with the same
``encode(x, t)`` and ``decode_many(features, ts)``): guidance, guidance_rescale and the
conditioning live there, as for every other driver.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxdiff.guidance import classifier_free
from jaxdiff.sampling import prelude
from jaxdiff.sampling import progress as prog
from jaxdiff.sampling.pytree import combine, partition

# The paper's key steps (step indices) for DDIM-50 and DPM-Solver-20.
PAPER_KEY_STEPS = {50: (0, 1, 2, 3, 5, 10, 15, 25, 35), 20: (0, 1, 2, 3, 5, 10, 15)}


def key_step_schedule(spec, num_steps: int) -> tuple:
    """Key step indices for ``num_steps`` steps from ``spec``:
    "paper" (the paper's list for 50 or 20 steps), "all" (every step), an int k or
    "every:k" (every k-th step from 0), or an explicit increasing list starting at 0."""
    n = int(num_steps)
    if isinstance(spec, str):
        if spec == "paper":
            if n not in PAPER_KEY_STEPS:
                raise ValueError(f"the paper lists key steps for {sorted(PAPER_KEY_STEPS)} "
                                 f"steps, not {n}: pass an explicit list or 'every:k'")
            return PAPER_KEY_STEPS[n]
        if spec == "all":
            return tuple(range(n))
        if spec.startswith("every:"):
            try:
                spec = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"key_steps 'every:k' needs an integer k, got {spec!r}") from None
        else:
            raise ValueError(f"unknown key_steps {spec!r}: use 'paper', 'all', 'every:k', an "
                             "int k or a list of step indices")
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"key_steps every k steps needs k >= 1, got {spec}")
        return tuple(range(0, n, int(spec)))
    try:
        steps = [int(s) for s in spec]
    except TypeError:
        raise ValueError(f"key_steps must be a name, an int or a list of ints, got "
                         f"{spec!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in spec):
        raise ValueError(f"key_steps must be integers, got {list(spec)!r}")
    if not steps or steps[0] != 0:
        raise ValueError(f"key_steps must start at step 0 (the first step needs the encoder), "
                         f"got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"key_steps must be strictly increasing (sorted, no duplicates), got "
                         f"{steps}")
    if steps[-1] >= n:
        raise ValueError(f"key_steps {steps} out of range for {n} steps (indices 0..{n - 1})")
    return tuple(steps)


@dataclasses.dataclass(frozen=True)
class PropagationStats:
    """``encoder_calls``: encoder evaluations (one per key step, CFG halves batched);
    ``decoder_evaluations``: decoder evaluations (one per step); ``key_steps``; ``groups``:
    the size of each batched decoder call."""

    encoder_calls: int
    decoder_evaluations: int
    num_steps: int
    key_steps: tuple
    groups: tuple


def _groups(key_steps, n: int, chunk):
    """-> (groups [(start, size, branch)], decoder batches). ``chunk`` None: each group is one
    decoder call, one branch per distinct group size (``branch`` indexes ``batches``).
    ``chunk`` k: every group runs size // k calls of k steps and size % k calls of one step,
    so the program holds at most two decoders whatever the schedule."""
    bounds = list(key_steps) + [n]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if chunk is None:
        batches = tuple(sorted(set(sizes)))
        return tuple((a, g, batches.index(g)) for a, g in zip(bounds, sizes)), batches
    return tuple((a, g, 0) for a, g in zip(bounds, sizes)), (int(chunk),)


@functools.partial(jax.jit, static_argnames=("spec", "batches", "chunked", "mode", "inject",
                                             "progress", "every"))
def _run(dynamic, x_T, rand, starts, sizes, branch_ids, alpha, threshold, token, *, spec,
         batches, chunked, mode, inject, progress, every):
    model_fn, solver = combine(dynamic, spec)
    n = solver.num_steps
    dtype = x_T.dtype
    x = (x_T * solver.init_noise_sigma).astype(dtype)
    ones = jnp.ones_like(x)
    timesteps = jnp.asarray(solver.timesteps, jnp.float32)

    def injected(x, i):   # alpha * x_T in the model-input (VP) scale, mapped to the solver's
        if not inject:
            return x
        new = (x + alpha * x_T / solver.scale_model_input(ones, i)).astype(dtype)
        return jnp.where(timesteps[i] < threshold, new, x)

    def decode_and_step(k):
        """-> f(features, x, state, start, first, count): ``count`` decoder calls of k steps
        each, from the group's step ``first`` on, each followed by its k solver steps."""
        def run_calls(features, x, state, start, first, count):
            def call(c, carry):
                x, state = carry
                rel0 = first + c * k
                outs = model_fn.decode_many(
                    features, timesteps[start + rel0 + jnp.arange(k, dtype=jnp.int32)])

                def one(carry, j):
                    x, state = carry
                    rel = rel0 + j
                    i = start + rel
                    xi = jnp.where(rel > 0, injected(x, i), x)
                    eps = prelude.step_noise(mode, rand, i, x.shape, dtype)
                    return solver.step(state, i, xi, outs[j].astype(dtype), eps), None

                return jax.lax.scan(one, (x, state), jnp.arange(k, dtype=jnp.int32))[0]

            return jax.lax.fori_loop(0, count, call, (x, state))
        return run_calls

    def group(carry, inputs):
        x, state = carry
        start, size, b = inputs
        x = injected(x, start)
        xin = solver.scale_model_input(x, start)
        features = model_fn.encode(xin, jnp.broadcast_to(timesteps[start], (x.shape[0],)))
        if chunked:        # size // k calls of k steps, then size % k single steps
            k = batches[0]
            x, state = decode_and_step(k)(features, x, state, start, 0, size // k)
            if k > 1:
                x, state = decode_and_step(1)(features, x, state, start, (size // k) * k,
                                              size % k)
        else:              # the whole group in one call: one branch per distinct size
            table = [lambda f, x, st, s0, g=g: decode_and_step(g)(f, x, st, s0, 0, 1)
                     for g in batches]
            if len(table) == 1:
                x, state = table[0](features, x, state, start)
            else:
                x, state = jax.lax.switch(b, table, features, x, state, start)
        prog.report(progress, start + size, n)
        prog.notify(every, token, start, start + size, n, timesteps, x)
        return (x, state), None

    (x, _), _ = jax.lax.scan(group, (x, solver.init(x)), (starts, sizes, branch_ids))
    return x


def encoder_propagation(model_fn, solver, x_T, *, key_steps, noise_injection: float = 0.003,
                        injection_threshold: float = 500, key: Optional[jax.Array] = None,
                        noise: Optional[jax.Array] = None, decode_chunk: Optional[int] = None,
                        progress=False, cond=None, uncond=None, guidance_scale=None,
                        callback=None, callback_steps: int = 1):
    """Sample with FasterDiffusion encoder propagation -> (x_0, PropagationStats).

    ``model_fn``: a ``jaxdiff.guidance`` model function (``classifier_free(unet, ...)``; its
    guidance scale, guidance_rescale and conditioning apply), or anything with its
    ``encode(x, t)`` / ``decode_many(features, ts)``. For convenience a bare jaxdiff UNet
    with ``cond`` / ``uncond`` (encoder hidden states [B, S, D], or dicts with
    ``encoder_hidden_states``, ``class_labels``, ``added_cond``) and ``guidance_scale`` is
    turned into one. ``key_steps``: see ``key_step_schedule``. ``noise_injection``: alpha of
    the prior noise injection (0 turns it off), applied before steps whose model time is
    below ``injection_threshold``. ``key`` / ``noise``: randomness for stochastic solvers,
    the same rule as every driver (``jaxdiff.sampling.prelude``). ``progress``: as for
    ``jaxdiff.sample`` (reported after every group). ``callback(step, timestep, latents)``:
    as for ``jaxdiff.sample``, after each group of steps that contains a multiple of
    ``callback_steps`` (with the group's last step) and after the last step.
    ``decode_chunk``: None decodes each group in one batched call (the paper's layout; the
    program holds one decoder per distinct group size); an int k decodes k of the group's
    steps per call and the remainder one step per call (at most two decoders in the program:
    compile time near the sequential sampler's; k = 1 is also the faster layout for small
    models on a CPU). Same result either way.
    """
    if decode_chunk is not None and (isinstance(decode_chunk, bool) or not isinstance(
            decode_chunk, numbers.Integral) or decode_chunk < 1):
        raise ValueError(f"decode_chunk must be None or a positive integer, got "
                         f"{decode_chunk!r}")
    if cond is not None or uncond is not None or guidance_scale is not None:
        model_fn = _model_fn_from_unet(model_fn, cond, uncond, guidance_scale)
    for attr in ("encode", "decode_many"):
        if not hasattr(model_fn, attr):
            raise ValueError(f"encoder propagation needs a model function that can run the "
                             f"UNet's encoder and decoder (jaxdiff.guidance.classifier_free), "
                             f"got {type(model_fn).__name__} without {attr!r}")
    x_T, rand = prelude.prepare(model_fn, solver, x_T, key=key, noise=noise,
                                driver="encoder_propagation", ndim=4)
    n = int(solver.num_steps)
    ks = key_step_schedule(key_steps, n)
    alpha = float(noise_injection)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"noise_injection must be >= 0, got {noise_injection!r}")
    chunk = None if decode_chunk is None else int(decode_chunk)
    groups, batches = _groups(ks, n, chunk)
    cols = [jnp.asarray([g[c] for g in groups], jnp.int32) for c in range(3)]
    dynamic, spec = partition((model_fn, solver))
    with prog.listening(callback, callback_steps, "encoder_propagation", x_T) as (every, token):
        x0 = _run(dynamic, x_T, rand.value, *cols, jnp.float32(alpha),
                  jnp.float32(injection_threshold), token, spec=spec, batches=batches,
                  chunked=chunk is not None, mode=rand.mode, inject=alpha > 0,
                  progress=prog.resolve(progress, "encoder propagation"), every=every)
    stats = PropagationStats(encoder_calls=len(ks), decoder_evaluations=n, num_steps=n,
                             key_steps=ks, groups=tuple(g for _, g, _ in groups))
    return x0, stats


def _model_fn_from_unet(unet, cond, uncond, guidance_scale):
    """The older call form: a UNet plus conditioning -> a guidance model function."""
    if cond is None:
        raise ValueError("cond is required with a bare UNet")
    if not hasattr(unet, "encode") or not hasattr(unet, "time_embedding_of"):
        raise ValueError(f"unet must be a jaxdiff UNet2DConditionModel, got "
                         f"{type(unet).__name__}")

    def parts(c, name):
        if c is None:
            return None
        if isinstance(c, Mapping):
            unknown = set(c) - {"encoder_hidden_states", "class_labels", "added_cond"}
            if unknown:
                raise ValueError(f"{name}: unknown conditioning keys {sorted(unknown)}; use "
                                 "encoder_hidden_states, class_labels, added_cond")
            if "encoder_hidden_states" not in c:
                raise ValueError(f"{name} needs 'encoder_hidden_states'")
            return c
        return {"encoder_hidden_states": c}

    c, u = parts(cond, "cond"), parts(uncond, "uncond")
    u = u or {}
    if uncond is not None and {k for k, v in u.items() if v is not None} != {
            k for k, v in c.items() if v is not None}:
        raise ValueError("cond and uncond must carry the same keys")
    return classifier_free(unet, c["encoder_hidden_states"], u.get("encoder_hidden_states"),
                           1.0 if guidance_scale is None else guidance_scale,
                           class_labels=c.get("class_labels"),
                           uncond_class_labels=u.get("class_labels"),
                           added_cond=c.get("added_cond"),
                           uncond_added_cond=u.get("added_cond"))


__all__ = ["PAPER_KEY_STEPS", "PropagationStats", "encoder_propagation", "key_step_schedule"]
