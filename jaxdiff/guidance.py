"""Model functions: a network plus its conditioning, as ``model_fn(x [N,H,W,C], t [N])``.

A model function is a pytree (the module's parameters, the embeddings and the guidance
scale are leaves; the module's graph definition is static), so drivers take it as a jit
argument: changing the prompt or the guidance scale does not recompile, and weights never
become constants of the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx


def _static(**kw):
    return dataclasses.field(metadata={"static": True}, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ControlNets:
    """One or more ControlNets (their residuals are summed), as model-function leaves."""

    graphdefs: tuple = _static(default=())
    states: tuple = ()
    scales: jax.Array = None                 # [k] controlnet_conditioning_scale, traced
    guess_mode: bool = _static(default=False)

    def residuals(self, x, t, context, images, halves: int, added=None):
        """Summed (down residuals, mid residual) for the network batch x [m * B, ...]
        (uncond half first); ``images`` one [B, H, W, c] conditioning image per net. In
        guess mode with guidance only the conditional half is controlled (zeros for the
        unconditional one), as diffusers."""
        total = None
        b = x.shape[0] // halves
        cond_half = self.guess_mode and halves == 2
        part = lambda a: None if a is None else jax.tree.map(lambda v: v[b:], a)  # noqa: E731
        for j, (g, st, img) in enumerate(zip(self.graphdefs, self.states, images)):
            net = nnx.merge(g, st)
            lat = x[..., :net.config.in_channels]
            if cond_half:
                down, mid = net(lat[b:], t[b:], context[b:], img,
                                conditioning_scale=self.scales[j], guess_mode=True,
                                added_cond=part(added) if net.add_embedding is not None
                                else None)
                pad = lambda r: jnp.concatenate([jnp.zeros_like(r), r], 0)  # noqa: E731
                down, mid = tuple(pad(d) for d in down), pad(mid)
            else:
                down, mid = net(lat, t, context, _tile(img, halves),
                                conditioning_scale=self.scales[j], guess_mode=self.guess_mode,
                                added_cond=added if net.add_embedding is not None else None)
            total = (down, mid) if total is None else (
                tuple(a + d for a, d in zip(total[0], down)), total[1] + mid)
        return total


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelFn:
    """UNet + conditioning, with classifier-free guidance when ``uncond`` is given.

    The unconditional and conditional halves run as one batch, unconditional first (as
    diffusers does). ``guidance_rescale`` is the zero-terminal-SNR fix of Lin et al. (2023):
    the guided prediction's per-sample std is pulled back towards the conditional one.
    """

    graphdef: Any = _static()
    state: Any = None
    cond: jax.Array = None                 # [B, S, D] text embeddings (or [B, S, D] tokens)
    uncond: Optional[jax.Array] = None     # [B, S, D] or None: no guidance
    guidance_scale: jax.Array = None       # scalar, traced
    guidance_rescale: jax.Array = None     # scalar, traced
    class_labels: Optional[jax.Array] = None       # [B] (class-conditional UNets)
    uncond_class_labels: Optional[jax.Array] = None
    added_cond: Optional[dict] = None      # SDXL: {'text_embeds', 'time_ids'}, cond half
    uncond_added_cond: Optional[dict] = None
    extra_channels: Optional[jax.Array] = None   # [B, h, w, c] appended to the latent input
    #                                              (an inpainting UNet's mask + masked image)
    control: Optional[ControlNets] = None         # ControlNet residuals for the UNet
    control_images: Optional[tuple] = None        # one [B, H, W, c] image per ControlNet

    # the per-sample conditioning: what a mesh's "prompts" axis splits
    BATCH_FIELDS = ("cond", "uncond", "class_labels", "uncond_class_labels", "added_cond",
                    "uncond_added_cond", "extra_channels", "control_images")

    @property
    def unet(self):
        return nnx.merge(self.graphdef, self.state)

    def map_batch(self, f) -> "ModelFn":
        """This model function with ``f`` applied to every per-sample conditioning field."""
        return dataclasses.replace(self, **{k: f(getattr(self, k)) for k in self.BATCH_FIELDS
                                            if getattr(self, k) is not None})

    def check_batch(self, batch: int) -> None:
        """Raise if the conditioning's batch is not x_T's (before anything is traced)."""
        for k in self.BATCH_FIELDS:
            for leaf in jax.tree.leaves(getattr(self, k)):
                if getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] != batch:
                    raise ValueError(f"the model function's {k} has batch {leaf.shape[0]}, "
                                     f"x_T has batch {batch}")

    def _network_inputs(self, copies: int = 1):
        """Conditioning of the network batch (uncond half first with guidance), repeated
        ``copies`` times step-major -> (context, class_labels, added_cond)."""
        cat = lambda a, b: None if a is None else jax.tree.map(  # noqa: E731
            lambda u, v: jnp.concatenate([u, v], 0), a, b)
        if self.uncond is None:
            ctx, labels, added = self.cond, self.class_labels, self.added_cond
        else:
            ctx = cat(self.uncond, self.cond)
            labels = cat(self.uncond_class_labels, self.class_labels)
            added = cat(self.uncond_added_cond, self.added_cond)
        return _tile(ctx, copies), _tile(labels, copies), _tile(added, copies)

    def _network_batch(self, x, t):
        """x [B, ...], t [B] -> the network's batch (both guidance halves):
        (x, t, context, class_labels, added_cond)."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
        m = self.halves
        xb = _tile(x, m)
        if self.extra_channels is not None:
            xb = jnp.concatenate([xb, _tile(self.extra_channels.astype(x.dtype), m)], axis=-1)
        return (xb, _tile(t, m)) + self._network_inputs()

    @property
    def halves(self) -> int:
        return 1 if self.uncond is None else 2

    def _guided(self, out, dtype):  # [m * B, ...] network outputs -> [B, ...] prediction
        if self.uncond is None:
            return out.astype(dtype)
        uncond_out, cond_out = jnp.split(out.astype(jnp.float32), 2, axis=0)
        return guide(uncond_out, cond_out, self.guidance_scale,
                     self.guidance_rescale).astype(dtype)

    def encode(self, x, t):
        """The UNet encoder at x [B, ...], t [B] (both guidance halves in one batch) ->
        ``Encoded`` features of the network batch, for ``decode_many``."""
        return self._encoded(*self._network_batch(x, t))

    def _encoded(self, xb, tb, ctx, labels, added):
        """The UNet encoder's features, with the ControlNets' residuals added (computed
        where the encoder runs, so encoder propagation reuses them with the features)."""
        enc = self.unet.encode(xb, tb, ctx, class_labels=labels, added_cond=added)
        if self.control is None:
            return enc
        down, mid = self.control.residuals(xb, tb, ctx, self.control_images, self.halves,
                                           added)
        return enc._replace(skips=tuple(s + r.astype(s.dtype) for s, r in zip(enc.skips, down)),
                            mid=enc.mid + mid.astype(enc.mid.dtype))

    def decode_many(self, features, ts, dtype=jnp.float32):
        """Decode ``features`` (from ``encode``) at each of the times ts [g] in one batched
        decoder call -> [g, B, ...] guided predictions (FasterDiffusion's parallel decoding:
        the skips and mid output are reused, the time embedding is step i's own)."""
        unet = self.unet
        g = ts.shape[0]
        nb = features.mid.shape[0]                       # m * B
        ctx, labels, added = self._network_inputs(g)
        emb = unet.time_embedding_of(jnp.repeat(jnp.asarray(ts, jnp.float32), nb), g * nb,
                                     labels, added)
        out = unet.decode(_tile(tuple(features.skips), g), _tile(features.mid, g), emb, ctx)
        out = out.reshape((g, nb) + out.shape[1:])
        return jax.vmap(lambda o: self._guided(o, dtype))(out)

    def __call__(self, x, t):  # x [N, H, W, C], t [N] -> [N, H, W, C]
        xb, tb, ctx, labels, added = self._network_batch(x, t)
        if self.control is None:
            out = self.unet(xb, tb, ctx, class_labels=labels, added_cond=added)
        else:
            enc = self._encoded(xb, tb, ctx, labels, added)
            out = self.unet.decode(enc.skips, enc.mid, enc.emb, ctx)
        return self._guided(out, x.dtype)


def _tile(tree, copies: int):
    """Every array of ``tree`` (None passes) repeated ``copies`` times along the batch axis."""
    if tree is None or copies == 1:
        return tree
    return jax.tree.map(lambda a: jnp.concatenate([a] * copies, 0), tree)


def guide(uncond_out, cond_out, guidance_scale, guidance_rescale=None):
    """Classifier-free guidance of two [B, ...] predictions: u + s (c - u), then, with
    ``guidance_rescale`` r > 0 (traced, may be None), the zero-terminal-SNR fix of Lin et
    al. (2023) that pulls the guided per-sample std back towards the conditional one.
    The only copy of the formula: every driver and the tuner's wrapper call it."""
    guided = uncond_out + guidance_scale * (cond_out - uncond_out)
    if guidance_rescale is None:
        return guided
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_out, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    r = guidance_rescale
    return jnp.where(r > 0, r * rescaled + (1 - r) * guided, guided)


def classifier_free(unet: nnx.Module, cond, uncond=None, guidance_scale=7.5, *,
                    guidance_rescale=0.0, class_labels=None, uncond_class_labels=None,
                    added_cond=None, uncond_added_cond=None, extra_channels=None,
                    controlnets=None, guess_mode: bool = False) -> ModelFn:
    """A model function for ``unet`` conditioned on ``cond`` ([B, S, D] encoder states).

    With ``uncond`` (same shape), classifier-free guidance at ``guidance_scale``; without,
    the plain conditional prediction. ``controlnets``: (ControlNetModel, conditioning image
    [B, H, W, c] in [0, 1], conditioning scale) triples whose residuals are summed into the
    UNet's skip and mid features (``guess_mode``: diffusers' guess mode).
    """
    graphdef, state = nnx.split(unet)
    cond = jnp.asarray(cond)
    control = images = None
    if controlnets:
        nets = [nnx.split(c[0]) for c in controlnets]
        control = ControlNets(tuple(g for g, _ in nets), tuple(st for _, st in nets),
                              jnp.asarray([float(c[2]) for c in controlnets], jnp.float32),
                              bool(guess_mode))
        images = tuple(jnp.asarray(c[1]) for c in controlnets)
    if uncond is not None:
        uncond = jnp.asarray(uncond)
        if uncond.shape != cond.shape:
            raise ValueError(f"uncond embeddings {tuple(uncond.shape)} must match cond "
                             f"embeddings {tuple(cond.shape)}")
        if (added_cond is None) != (uncond_added_cond is None):
            raise ValueError("pass both added_cond and uncond_added_cond, or neither")
        if (class_labels is None) != (uncond_class_labels is None):
            raise ValueError("pass both class_labels and uncond_class_labels, or neither")
    return ModelFn(graphdef, state, cond, uncond, jnp.asarray(guidance_scale, jnp.float32),
                   jnp.asarray(guidance_rescale, jnp.float32),
                   None if class_labels is None else jnp.asarray(class_labels),
                   None if uncond_class_labels is None else jnp.asarray(uncond_class_labels),
                   added_cond, uncond_added_cond,
                   None if extra_channels is None else jnp.asarray(extra_channels),
                   control, images)
