"""Text-to-image: tokenizer -> text encoder -> sampler -> VAE, each jit-compiled once per shape.

    pipe = conversion.load_pipeline("path/to/sd")
    images = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=30,
                  guidance_scale=7.5, seed=0, solver="dpm++")          # [N, H, W, 3] in [0, 1]

The sampling loop is one jitted program (``jaxdiff.sample``); prompts, guidance scale,
seeds and latents are traced arguments, so calling again with new values does not
recompile. Speed/memory options are the JAX forms of diffusers' guides: ``dtype`` at load
time (bf16/fp16), ``attention=`` kernel choice, ``fuse_qkv``, ``matmul_precision``,
``vae_slicing`` and ``vae_tiling``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import solvers
from jaxdiff.guidance import classifier_free
from jaxdiff.images import image_grid, to_pil
from jaxdiff.models.attention import set_attention
from jaxdiff.models.vae import tiled_decode
from jaxdiff.sampling import as_sampler, run

OUTPUT_TYPES = ("np", "pil", "latent")


@dataclasses.dataclass
class StableDiffusionPipeline:
    """The components of a Stable Diffusion model, as loaded by ``conversion.load_pipeline``."""

    COMPONENTS: ClassVar[tuple] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                   "text_encoder_2", "tokenizer_2")
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any = None
    scheduler: Optional[dict] = None   # the diffusers scheduler config dict
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    vae_slicing: bool = False          # decode one image at a time (lax.map): peak memory / N
    vae_tiling: bool = False           # decode overlapping latent tiles and blend the seams
    vae_tile_latent: int = 64          # tile size in latent pixels (diffusers: 512 px / 8)
    vae_tile_overlap: float = 0.25
    matmul_precision: Optional[str] = None  # jax.default_matmul_precision: "bfloat16",
    #                                         "tensorfloat32", "float32" (TF32 analogue)

    def __post_init__(self):
        self._jitted = {}

    # ----------------------------------------------------------------- properties
    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def set_attention(self, impl=None, *, fuse_qkv: bool = False) -> "StableDiffusionPipeline":
        for m in (self.unet, self.vae):
            set_attention(m, impl, fuse_qkv=fuse_qkv)
        self._jitted.clear()
        return self

    # ----------------------------------------------------------------- text
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer: pass prompt_embeds instead")
        ids = self.tokenizer(list(prompts), padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="np").input_ids
        return np.asarray(ids, np.int32)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """[B] strings -> [B, L, D] last hidden states of the text encoder (jitted)."""
        ids = self.tokenize(prompts)
        fn = self._jit("text", self.text_encoder,
                       lambda te, ids: te(ids).last_hidden_state)
        return fn(nnx.state(self.text_encoder), ids)

    # ----------------------------------------------------------------- VAE
    def decode_latents(self, latents) -> jax.Array:
        """Diffusion latents [N, h, w, C] -> images [N, H, W, 3] in [0, 1] (jitted)."""
        cfg = self.vae.config
        scale, shift = cfg.scaling_factor, cfg.shift_factor or 0.0

        def decode(vae, z):
            z = z / scale + shift
            if self.vae_tiling:
                img = tiled_decode(vae, z, self.vae_tile_latent, self.vae_tile_overlap)
            elif self.vae_slicing:
                img = jax.lax.map(lambda zi: vae.decode(zi[None])[0], z)
            else:
                img = vae.decode(z)
            return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        key = ("vae", self.vae_tiling, self.vae_slicing, self.vae_tile_latent,
               self.vae_tile_overlap)
        fn = self._jit(key, self.vae, decode)
        return fn(nnx.state(self.vae), jnp.asarray(latents))

    def _jit(self, key, module, f):
        if key not in self._jitted:
            graphdef = nnx.graphdef(module)

            @jax.jit
            def run(state, *args):
                with self._precision():
                    return f(nnx.merge(graphdef, state), *args)

            self._jitted[key] = run
        return self._jitted[key]

    def _precision(self):
        return jax.default_matmul_precision(self.matmul_precision or "default")

    # ----------------------------------------------------------------- sampling
    def make_solver(self, solver, num_inference_steps: int):
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got "
                             f"{num_inference_steps!r}")
        if solver is None:
            if self.scheduler is None:
                raise ValueError("this pipeline has no scheduler config: pass solver=")
            return solvers.from_diffusers(self.scheduler, int(num_inference_steps))
        if isinstance(solver, str):
            return solvers.make(solver, self.scheduler, int(num_inference_steps))
        return solver

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> jax.Array:
        f = self.vae_scale_factor
        shape = (height // f, width // f, self.latent_channels)
        return jnp.stack([jax.random.normal(jax.random.key(int(s)), shape) for s in seeds])

    def __call__(self, *args, **kwargs):
        """Generate images: ``generate(...)``'s output without the sampler's stats."""
        return self.generate(*args, **kwargs)[0]

    def generate(self, prompt=None, negative_prompt=None, *, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 num_images_per_prompt: int = 1, seed=0, latents=None, noise=None,
                 solver=None, prompt_embeds=None, negative_prompt_embeds=None,
                 output_type: str = "np", progress: bool = False, sampler="sequential",
                 ratios=None, schedule=None, sampler_options: Optional[dict] = None):
        """Generate images -> (images or latents, the sampler's stats).
        ``seed``: an int (image j uses seed + j) or one int per image.
        ``latents``: standard-normal x_T [N, h, w, C] (NHWC) instead of seeds.
        ``sampler``: a sampler value (``jaxdiff.sampling.Sequential()``, ``Picard(parallel=16,
        tolerance=0.1, mesh=...)``, ``EncoderPropagation(key_steps="paper")``) or a shorthand
        name ("sequential", "paradigms", "faster") whose fields come from
        ``sampler_options``. ``ratios``: TimeTuner ratios (array or ratios JSON path) applied
        to the solver (``Solver.with_ratios``); ``schedule``: a learned time grid (schedule
        file or dict, ``Solver.with_schedule``)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        sampler = as_sampler(sampler, **dict(sampler_options or {}))
        f = self.vae_scale_factor
        default = (self.unet.config.sample_size or 64) * f
        height = default if height is None else int(height)
        width = default if width is None else int(width)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got "
                             f"{height}x{width}")

        cond = self._embeddings(prompt, prompt_embeds, "prompt")
        do_cfg = guidance_scale is not None and float(guidance_scale) != 1.0
        uncond = None
        if do_cfg and negative_prompt_embeds is not None:
            uncond = jnp.asarray(negative_prompt_embeds)
        elif do_cfg:
            neg = "" if negative_prompt is None else negative_prompt
            neg = [neg] * cond.shape[0] if isinstance(neg, str) else list(neg)
            if len(neg) != cond.shape[0]:
                raise ValueError(f"{len(neg)} negative prompts for {cond.shape[0]} prompts")
            uncond = self.encode_prompt(neg)
        if num_images_per_prompt > 1:
            cond = jnp.repeat(cond, num_images_per_prompt, axis=0)
            uncond = None if uncond is None else jnp.repeat(uncond, num_images_per_prompt, 0)
        n = cond.shape[0]

        seeds = [seed + j for j in range(n)] if np.isscalar(seed) else list(seed)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        if latents is None:
            latents = self.initial_latents(seeds, height, width)
        else:
            latents = jnp.asarray(latents)
            want = (n, height // f, width // f, self.latent_channels)
            if latents.shape != want:
                raise ValueError(f"latents must have shape {want} (NHWC), got "
                                 f"{tuple(latents.shape)}")

        solver = solvers.retimed(self.make_solver(solver, num_inference_steps), ratios, schedule)
        if noise is None:
            # per-image noise streams, so an image does not depend on its batch-mates
            keys = [jax.random.fold_in(jax.random.key(int(s)), 1) for s in seeds]
            noise = jnp.stack([jax.random.normal(k, (solver.num_steps,) + latents.shape[1:])
                               for k in keys], axis=1)
        model_fn = classifier_free(self.unet, cond, uncond, guidance_scale if do_cfg else 1.0,
                                   guidance_rescale=guidance_rescale)
        with self._precision():
            x0, stats = run(sampler, model_fn, solver, latents, noise=noise, progress=progress)
        if output_type == "latent":
            return x0, stats
        images = self.decode_latents(x0)
        if output_type == "pil":
            return to_pil(images), stats
        return np.asarray(images), stats

    def _embeddings(self, prompt, embeds, what):
        if embeds is not None:
            if prompt is not None:
                raise ValueError(f"pass either {what} or {what}_embeds, not both")
            embeds = jnp.asarray(embeds)
            if embeds.ndim != 3:
                raise ValueError(f"{what}_embeds must be [B, L, D], got {tuple(embeds.shape)}")
            return embeds
        if prompt is None:
            raise ValueError(f"pass {what} (str or list of str) or {what}_embeds")
        return self.encode_prompt([prompt] if isinstance(prompt, str) else list(prompt))


__all__ = ["OUTPUT_TYPES", "StableDiffusionPipeline", "image_grid", "to_pil"]
