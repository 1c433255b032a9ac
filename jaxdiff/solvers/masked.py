"""Inpainting by latent mask blending: any solver, with the known region pinned to the image.

After every step the latent is blended with the image's latents noised to the next step
(``x = m * x + (1 - m) * add_noise(known, noise, i + 1)``; the clean latents after the last
step), as diffusers' ``StableDiffusionInpaintPipeline`` does for UNets without mask inputs.
The blend is affine in the step's result, so it enters Picard's split of a step as
``drift' = blend(x + drift) - x`` and ``noise_scale' = m * noise_scale``: every sampler
(sequential, each Picard method, encoder propagation) runs an inpainting solver unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.solvers.base import Solver, solver_dataclass


@solver_dataclass
class Inpainting(Solver):
    inner: Any                # the solver whose steps are blended (a pytree)
    known: jax.Array          # [B, h, w, C] clean latents of the image
    mask: jax.Array           # [B, h, w, 1]: 1 = repaint, 0 = keep the image
    noise: jax.Array          # [B, h, w, C] standard normal: the noise x_T was made with

    @property
    def num_steps(self):
        return self.inner.num_steps

    @property
    def timesteps(self):
        return self.inner.timesteps

    @property
    def prediction_type(self):
        return self.inner.prediction_type

    @property
    def init_noise_sigma(self):
        return self.inner.init_noise_sigma

    @property
    def stochastic(self):
        return self.inner.stochastic

    def scale_model_input(self, x, i):
        return self.inner.scale_model_input(x, i)

    def init(self, x):
        return self.inner.init(x)

    def add_noise(self, x0, noise, i):
        return self.inner.add_noise(x0, noise, i)

    def data_prediction(self, i, x, model_output):
        return self.inner.data_prediction(i, x, model_output)

    def output_for_x0(self, i, x, x0):
        return self.inner.output_for_x0(i, x, x0)

    @property
    def picard(self):
        return self.inner.picard

    @property
    def picard_unsupported(self):
        return self.inner.picard_unsupported

    def picard_variance(self):
        return self.inner.picard_variance()

    def blend(self, i, x_next):
        """The latent leaving step i with the known region replaced."""
        n = self.num_steps
        nxt = jnp.minimum(i + 1, n - 1)
        target = jnp.where(i + 1 < n, self.inner.add_noise(self.known, self.noise, nxt),
                           self.known)
        m = self.mask.astype(jnp.float32)
        return (m * x_next.astype(jnp.float32) + (1.0 - m) * target).astype(x_next.dtype)

    def step(self, state, i, x, model_output, noise):
        x_next, state = self.inner.step(state, i, x, model_output, noise)
        return self.blend(i, x_next), state

    def _split(self, i, x, drift, scale):
        blended = self.blend(i, (x.astype(jnp.float32) + drift).astype(x.dtype))
        if self.stochastic:
            scale = scale * self.mask.astype(jnp.float32)
        return blended.astype(jnp.float32) - x.astype(jnp.float32), scale

    def picard_terms(self, i, x, model_output):
        drift, scale = self.inner.picard_terms(i, x, model_output)
        return self._split(i, x, drift, scale)


@solver_dataclass
class InpaintingMultistep(Inpainting):
    """The same for multistep solvers (their Picard hooks read a history)."""

    @property
    def picard_history(self):
        return self.inner.picard_history

    def picard_step(self, i, x, hist, noise):
        return self.blend(i, self.inner.picard_step(i, x, hist, noise))

    def picard_multistep(self, i, x, hist):
        drift, scale = self.inner.picard_multistep(i, x, hist)
        return self._split(i, x, drift, scale)


def inpainting(solver, known, mask, noise) -> Inpainting:
    """``solver`` with mask blending: ``known`` [B, h, w, C] image latents, ``mask``
    [B, h, w, 1] (1 = repaint), ``noise`` [B, h, w, C] the standard-normal draw of x_T."""
    known, mask, noise = (jnp.asarray(a) for a in (known, mask, noise))
    if known.shape != noise.shape or mask.shape != known.shape[:-1] + (1,):
        raise ValueError(f"inpainting: known latents {tuple(known.shape)}, noise "
                         f"{tuple(noise.shape)} and mask {tuple(mask.shape)} do not fit "
                         f"(mask must be [B, h, w, 1])")
    try:
        solver.add_noise(known[:1], noise[:1], 0)
    except NotImplementedError as e:
        raise ValueError(f"{type(solver).__name__} cannot inpaint by latent blending: "
                         f"it has no add_noise rule") from e
    cls = InpaintingMultistep if solver.picard == "multistep" else Inpainting
    return cls(inner=solver, known=known, mask=mask, noise=noise)
