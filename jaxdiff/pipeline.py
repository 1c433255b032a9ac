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
from jaxdiff.images import as_array, image_grid, to_pil
from jaxdiff.models.attention import set_attention
from jaxdiff.models.vae import tiled_decode
from jaxdiff.sampling import as_sampler, run
from jaxdiff.solvers.masked import inpainting

OUTPUT_TYPES = ("np", "pil", "latent")


@dataclasses.dataclass
class StableDiffusionPipeline:
    """The components of a Stable Diffusion model, as loaded by ``conversion.load_pipeline``."""

    COMPONENTS: ClassVar[tuple] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                   "text_encoder_2", "tokenizer_2", "controlnet")
    DEFAULT_STRENGTH: ClassVar[float] = 0.8   # image-to-image (diffusers' default)
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any = None
    scheduler: Optional[dict] = None   # the diffusers scheduler config dict
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    controlnet: Any = None             # a ControlNetModel, or a list of them (summed)
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
        return self.vae.config.latent_channels

    def set_attention(self, impl=None, *, fuse_qkv: bool = False) -> "StableDiffusionPipeline":
        lora = getattr(self, "_lora", None)
        for m in (self.unet, self.vae, *(lora.base.values() if lora else ())):
            set_attention(m, impl, fuse_qkv=fuse_qkv)
        self._jitted.clear()
        return self

    # ----------------------------------------------------------------- text
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer: pass prompt_embeds instead")
        ids = self.tokenizer(self._expand_tokens(prompts, self.tokenizer), padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="np").input_ids
        return np.asarray(ids, np.int32)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """[B] strings -> [B, L, D] last hidden states of the text encoder (jitted)."""
        ids = self.tokenize(prompts)
        fn = self._jit("text", self.text_encoder,
                       lambda te, ids: te(ids).last_hidden_state)
        return fn(nnx.state(self.lora_module("text_encoder")), ids)

    # ----------------------------------------------------------------- VAE
    def decode_latents(self, latents) -> jax.Array:
        """Diffusion latents [N, h, w, C] -> images [N, H, W, 3] in [0, 1] (jitted)."""
        scale, shift = self._latent_scaling()

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

    def _latent_scaling(self):
        """(scale, shift): diffusion latents are (z - shift) * scale of the VAE's z."""
        cfg = self.vae.config
        return cfg.scaling_factor, cfg.shift_factor or 0.0

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

    # ----------------------------------------------------------------- LoRA and embeddings
    def load_lora_weights(self, path_or_state, adapter_name: Optional[str] = None,
                          scale: float = 1.0, *, fuse: Optional[bool] = None):
        """Load a LoRA (diffusers/PEFT or kohya file, folder or state dict; see
        ``conversion.read_lora``) into the UNet and text encoder(s) as adapter ``adapter_name``
        (default ``"default_<k>"``), active at ``scale`` beside the adapters already active.

        Fused (the default mode): the active adapters are merged into the weights on the
        host, so sampling runs the plain compiled program. Unfused (``fuse=False`` or
        ``unfuse_lora()``): the weights stay the base ones and the pipeline's own calls merge
        the factors on device in one jitted function of the traced scales, so
        ``set_adapters`` changes scales without host work or recompiling. Keys without a
        component prefix go to the UNet; keys for a component this pipeline lacks, or that
        match no layer, raise ``ValueError`` (nothing is changed then)."""
        from jaxdiff import lora as L

        lora = L.read(path_or_state)
        st = self._lora_state()
        name = adapter_name or f"default_{len(st.adapters)}"
        if name in st.adapters:
            raise ValueError(f"adapter {name!r} is already loaded: pick another adapter_name "
                             f"or delete_adapters({name!r})")
        present = {c for c in lora.components() if c is not None}
        missing = sorted(c for c in present if getattr(self, c, None) is None)
        if missing:
            raise ValueError(f"{lora.source} has LoRA weights for {missing}, which this "
                             f"{type(self).__name__} does not have")
        resolved = {}
        for c in L.COMPONENTS:
            module = getattr(self, c, None)
            if module is None or (c not in present and not (c == "unet" and None in present)):
                continue
            resolved[c] = L.resolve(st.base.get(c, module), lora, c, unprefixed=c == "unet")
        resolved = {c: r for c, r in resolved.items() if r}
        if not resolved:
            raise ValueError(f"{lora.source}: no LoRA weights for this pipeline's components")
        for c in resolved:
            self._check_lora_module(c)
            st.base.setdefault(c, getattr(self, c))
        st.adapters[name] = resolved
        st.scales[name] = float(scale)
        st.active.append(name)
        if fuse is not None:
            st.fused = bool(fuse)
        self._apply_lora()
        return self

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate ``adapter_names`` (a name or a list) with ``adapter_weights`` (a scale or
        one per name; default each adapter's current scale); the others are inactive."""
        st = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in st.adapters]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {sorted(st.adapters)}")
        if adapter_weights is None:
            weights = [st.scales[n] for n in names]
        elif isinstance(adapter_weights, (list, tuple)):
            weights = list(adapter_weights)
        else:
            weights = [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
        for n, w in zip(names, weights):
            st.scales[n] = float(w)
        st.active = names
        self._apply_lora()
        return self

    @property
    def lora_adapters(self) -> dict:
        """The active adapters and their scales."""
        st = getattr(self, "_lora", None)
        return {} if st is None else {n: st.scales[n] for n in st.active}

    def fuse_lora(self):
        """Merge the active adapters into the weights (the default mode)."""
        self._lora_state().fused = True
        self._apply_lora()
        return self

    def unfuse_lora(self):
        """Keep the base weights and merge the adapters on device at call time (traced
        scales: ``set_adapters`` then needs no host work and no recompilation)."""
        self._lora_state().fused = False
        self._apply_lora()
        return self

    def delete_adapters(self, adapter_names):
        st = self._lora_state()
        for n in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            if n not in st.adapters:
                raise ValueError(f"unknown adapter {n!r}; loaded: {sorted(st.adapters)}")
            del st.adapters[n], st.scales[n]
            st.devices.pop(n, None)
            st.active = [a for a in st.active if a != n]
        self._apply_lora()
        return self

    def unload_lora_weights(self):
        """Remove every adapter: the components get their base weights back."""
        st = getattr(self, "_lora", None)
        if st is not None:
            for c in st.base:
                self._check_lora_module(c)
                setattr(self, c, st.base[c])
        self._lora = None
        return self

    def lora_module(self, name: str):
        """Component ``name`` as the pipeline runs it: with the active adapters merged (in the
        unfused mode, by the jitted merge of the current scales)."""
        module = getattr(self, name)
        st = getattr(self, "_lora", None)
        if st is None or st.fused or name not in st.base:
            return module
        self._check_lora_module(name)
        names = [n for n in st.active if name in st.adapters[n]]
        if not names:
            return module
        from jaxdiff import lora as L

        factors = []
        for n in names:
            dev = st.devices.setdefault(n, {})
            if name not in dev:
                dev[name] = L.device_factors(st.adapters[n][name])
            factors.append(dev[name])
        return L.apply_lora(module, factors, [st.scales[n] for n in names])

    def _lora_state(self) -> "_LoraState":
        if getattr(self, "_lora", None) is None:
            self._lora = _LoraState()
        return self._lora

    def _check_lora_module(self, name: str) -> None:
        st = self._lora
        if name in st.current and getattr(self, name) is not st.current[name]:
            raise ValueError(f"pipe.{name} was replaced after LoRA weights were loaded into "
                             f"it: call unload_lora_weights() first")

    def _apply_lora(self) -> None:
        """Set each adapted component to its base (unfused) or merged (fused) weights."""
        from jaxdiff import lora as L

        st = self._lora
        for c, base in st.base.items():
            self._check_lora_module(c)
            names = [n for n in st.active if c in st.adapters[n]]
            module = base
            if st.fused and names:
                module = L.merge_resolved(base, [st.adapters[n][c] for n in names],
                                          [st.scales[n] for n in names])
            setattr(self, c, module)
            st.current[c] = module

    def _set_base(self, name: str, module) -> None:
        """Replace component ``name``'s base weights (LoRA re-applied on top)."""
        st = getattr(self, "_lora", None)
        if st is not None and name in st.base:
            self._check_lora_module(name)
            st.base[name] = module
            self._apply_lora()
        else:
            setattr(self, name, module)

    def load_textual_inversion(self, path_or_state, token: Optional[str] = None):
        """Add a textual-inversion embedding: diffusers ``learned_embeds.safetensors``
        ({token: vector}), A1111 files (``.pt`` with ``string_to_param``, which needs torch;
        ``.safetensors`` with ``emb_params``, named after the file), or SDXL files
        (``clip_l`` -> text_encoder, ``clip_g`` -> text_encoder_2). ``token`` overrides the
        file's name. An embedding of n vectors adds the tokens ``token, token_1, ...,
        token_{n-1}`` (as diffusers) and a prompt's ``token`` stands for all of them.
        Raises if a token is already in a tokenizer or a width does not match its encoder."""
        from jaxdiff import lora as L

        token, tables = L.read_embedding(path_or_state, token)
        if not token:
            raise ValueError("this embedding names no token: pass token=")
        names = ("text_encoder", "text_encoder_2")
        if None in tables:
            first = next((n for n in names if getattr(self, n, None) is not None), None)
            tables = {first: tables[None]}
        plan = []
        for enc, rows in tables.items():
            te = getattr(self, enc or "", None)
            tok = getattr(self, "tokenizer" + enc[len("text_encoder"):], None) if enc else None
            if te is None or tok is None:
                raise ValueError(f"this pipeline has no {enc} and tokenizer for the embedding")
            dim = te.config.hidden_size
            if rows.shape[1] != dim:
                raise ValueError(f"the embedding for {enc} has width {rows.shape[1]}, but its "
                                 f"hidden size is {dim}"
                                 + (" (an SDXL file has clip_l and clip_g)" if
                                    self.text_encoder_2 is not None else ""))
            plan.append((enc, tok, rows))
        tokens_of = lambda n: [token] + [f"{token}_{i}" for i in range(1, n)]  # noqa: E731
        checked = []
        for enc, tok, rows in plan:                  # check everything before any change
            if any(tok is t for t in checked):
                continue                             # one tokenizer shared by both encoders
            checked.append(tok)
            vocab = tok.get_vocab()
            taken = sorted({t for t in tokens_of(rows.shape[0]) + [f"{token}_1"] if t in vocab})
            if taken:
                raise ValueError(f"token(s) {taken} already in the tokenizer of {enc}: choose "
                                 f"another token= (or remove them first)")
        for enc, tok, rows in plan:
            tokens = tokens_of(rows.shape[0])
            if tokens[0] not in tok.get_vocab():
                tok.add_tokens(tokens)
            ids = [int(tok.convert_tokens_to_ids(t)) for t in tokens]
            self._set_base(enc, L.add_token_embeddings(
                self._lora.base[enc] if getattr(self, "_lora", None) and enc in self._lora.base
                else getattr(self, enc), ids, rows))
        self._jitted.clear()
        return self

    @staticmethod
    def _expand_tokens(prompts, tokenizer) -> list:
        """Each multi-vector textual-inversion token t in a prompt -> ``t t_1 ... t_{n-1}``
        (diffusers' ``maybe_convert_prompt``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        added = getattr(tokenizer, "added_tokens_encoder", None)
        if not added or not any(f"{t}_1" in added for t in added):
            return prompts
        out = []
        for p in prompts:
            for t in set(tokenizer.tokenize(p)):
                if t in added and f"{t}_1" in added:
                    i, more = 1, [t]
                    while f"{t}_{i}" in added:
                        more.append(f"{t}_{i}")
                        i += 1
                    p = p.replace(t, " ".join(more))
            out.append(p)
        return out

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

    def _check_size(self, height: int, width: int) -> None:
        """Refuse sizes the VAE or the UNet cannot take: the VAE halves the image
        ``vae_scale_factor`` times over, the UNet's down blocks halve the latents again and its
        up blocks add the skips back at the same sizes, so the latents must divide by
        2 ** (down blocks - 1). (diffusers checks a fixed multiple of 8 and lets the UNet
        interpolate odd skip sizes; a latent that does not divide shifts its skips by up to
        a pixel at every level.)"""
        f = self.vae_scale_factor
        step = f * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % step or width % step or height <= 0 or width <= 0:
            near = lambda v: sorted({max(step, v // step * step), max(step, -(-v // step) * step)})
            raise ValueError(
                f"height and width must be positive multiples of {step} (the VAE's factor {f} "
                f"x the UNet's {step // f}), got {height}x{width}; the nearest are "
                f"{' or '.join(map(str, near(height)))} x {' or '.join(map(str, near(width)))}")

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
                 ratios=None, schedule=None, sampler_options: Optional[dict] = None,
                 image=None, strength: Optional[float] = None, mask_image=None,
                 control_image=None, controlnet_conditioning_scale=1.0,
                 guess_mode: bool = False, controlnet=None, denoising_start: Optional[float] = None,
                 denoising_end: Optional[float] = None, callback=None,
                 callback_steps: int = 1, **conditioning):
        """Generate images -> (images or latents, the sampler's stats).
        ``seed``: an int (image j uses seed + j) or one int per image.
        ``latents``: standard-normal x_T [N, h, w, C] (NHWC) instead of seeds (with
        ``image``: the noise added to the image's latents).
        ``sampler``: a sampler value (``jaxdiff.sampling.Sequential()``, ``Picard(parallel=16,
        tolerance=0.1, mesh=...)``, ``EncoderPropagation(key_steps="paper")``) or a shorthand
        name ("sequential", "paradigms", "faster") whose fields come from
        ``sampler_options``. ``ratios``: TimeTuner ratios (array or ratios JSON path) applied
        to the solver (``Solver.with_ratios``); ``schedule``: a learned time grid (schedule
        file or dict, ``Solver.with_schedule``).
        Image-to-image: ``image`` (PIL, or [N, H, W, 3] in [0, 1]; or latents [N, h, w, C])
        is VAE-encoded (the posterior mean), noised by the solver's own rule to the step
        where ``strength`` (in (0, 1]) starts, and the remaining steps run under any
        sampler. ``denoising_end`` / ``denoising_start`` (fractions of the training
        timesteps) cut the schedule as diffusers' base + refiner hand-over: the base stops
        early (``output_type="latent"``), the refiner takes those latents as ``image``
        and continues without adding noise.
        Inpainting: ``mask_image`` (PIL, or [N, H, W(, 1)] in [0, 1]; >= 0.5 = repaint) with
        ``image``. A UNet with mask inputs (9 channels) gets the mask and the masked image's
        latents beside its latent input; any other UNet inpaints by latent blending
        (``jaxdiff.solvers.masked``). At strength 1 the start is pure noise, as diffusers.
        ControlNet: ``control_image`` (PIL or [N, H, W, 3] in [0, 1] at height x width; a
        list with several ControlNets) for the pipeline's ``controlnet`` (or ``controlnet=``
        here), ``controlnet_conditioning_scale`` (one per net) and ``guess_mode``.
        ``callback(step, timestep, latents)``: a host function called from the jitted loop
        after every ``callback_steps``-th step and the last (numpy latents, e.g. for
        previews: ``pipe.decode_latents`` them afterwards); a new callback reuses the
        compiled program (``jaxdiff.sampling.progress.listening``)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        sampler = as_sampler(sampler, **dict(sampler_options or {}))
        strength = self.DEFAULT_STRENGTH if strength is None else strength
        f = self.vae_scale_factor
        given = None if image is None else self._image_input(image)
        if given is not None and height is None and width is None:
            scale = f if given.shape[-1] == self.latent_channels else 1
            height, width = given.shape[1] * scale, given.shape[2] * scale
        default = (self.unet.config.sample_size or 64) * f
        height = default if height is None else int(height)
        width = default if width is None else int(width)
        self._check_size(height, width)

        do_cfg = guidance_scale is not None and float(guidance_scale) != 1.0
        cond_kw = self._conditioning(prompt, negative_prompt, prompt_embeds,
                                     negative_prompt_embeds, do_cfg, height, width,
                                     conditioning)
        if num_images_per_prompt > 1:
            rep = lambda a: None if a is None else jax.tree.map(  # noqa: E731
                lambda v: jnp.repeat(v, num_images_per_prompt, axis=0), a)
            cond_kw = {k: rep(v) for k, v in cond_kw.items()}
        n = cond_kw["cond"].shape[0]

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

        full = solvers.retimed(self.make_solver(solver, num_inference_steps), ratios, schedule)
        start, stop = self.step_range(full, int(num_inference_steps), strength,
                                      image is not None, denoising_start, denoising_end)
        solver = full.segment(start, stop)
        x_T = latents
        if given is not None:
            z0 = self._broadcast(self._image_latents(given, height, width), n,
                                 num_images_per_prompt, "image")
            x_start = z0 if denoising_start is not None else full.add_noise(z0, latents, start)
            x_T = x_start / solver.init_noise_sigma     # the drivers multiply it back
        extra = None
        mask_inputs = self.unet.config.in_channels != self.latent_channels
        if mask_image is not None:
            if given is None or given.shape[-1] != 3:
                raise ValueError("mask_image needs image= given as pixels ([N, H, W, 3] or PIL)")
            mask = self._broadcast(self._mask_input(mask_image, height, width), n,
                                   num_images_per_prompt, "mask_image")
            mask_latent = mask[:, ::f, ::f]          # nearest, as diffusers' interpolate
            if start == 0 and float(strength) == 1.0:
                x_T = latents                        # diffusers: pure noise at full strength
            if mask_inputs:
                pixels = self._broadcast(jnp.asarray(given), n, num_images_per_prompt, "image")
                masked = jnp.where(mask >= 0.5, 0.5, pixels)  # 0 in the VAE's [-1, 1]
                extra = jnp.concatenate([mask_latent, self.encode_images(masked)], axis=-1)
            else:
                solver = inpainting(solver, z0, mask_latent, latents)
        elif mask_inputs:
            raise ValueError(f"this UNet takes {self.unet.config.in_channels} input channels "
                             f"(an inpainting UNet): pass image= and mask_image=")
        if noise is None:
            # per-image noise streams, so an image does not depend on its batch-mates
            keys = [jax.random.fold_in(jax.random.key(int(s)), 1) for s in seeds]
            noise = jnp.stack([jax.random.normal(k, (solver.num_steps,) + latents.shape[1:])
                               for k in keys], axis=1)
        nets = self._controlnets(controlnet, control_image, controlnet_conditioning_scale,
                                 n, num_images_per_prompt, height, width)
        guess_mode = bool(guess_mode) or any(c[0].config.global_pool_conditions
                                             for c in nets or ())
        model_fn = classifier_free(self.lora_module("unet"),
                                   guidance_scale=guidance_scale if do_cfg else 1.0,
                                   guidance_rescale=guidance_rescale, extra_channels=extra,
                                   controlnets=nets, guess_mode=guess_mode, **cond_kw)
        with self._precision():
            x0, stats = run(sampler, model_fn, solver, x_T, noise=noise, progress=progress,
                            callback=callback, callback_steps=callback_steps)
        if output_type == "latent":
            return x0, stats
        images = self.decode_latents(x0)
        if output_type == "pil":
            return to_pil(images), stats
        return np.asarray(images), stats

    # ----------------------------------------------------------------- conditioning
    def _conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                      do_cfg, height, width, options) -> dict:
        """-> keyword arguments of ``classifier_free`` (cond, uncond, added conditioning)."""
        if options:
            raise TypeError(f"{type(self).__name__}.generate got unexpected keyword "
                            f"arguments {sorted(options)}")
        cond = self._embeddings(prompt, prompt_embeds, "prompt")
        uncond = None
        if do_cfg and negative_prompt_embeds is not None:
            uncond = jnp.asarray(negative_prompt_embeds)
        elif do_cfg:
            uncond = self.encode_prompt(self._negatives(negative_prompt, cond.shape[0]))
        return dict(cond=cond, uncond=uncond)

    @staticmethod
    def _negatives(negative_prompt, n: int) -> list:
        neg = "" if negative_prompt is None else negative_prompt
        neg = [neg] * n if isinstance(neg, str) else list(neg)
        if len(neg) != n:
            raise ValueError(f"{len(neg)} negative prompts for {n} prompts")
        return neg

    # ----------------------------------------------------------------- image inputs
    def step_range(self, solver, num_inference_steps: int, strength, has_image: bool,
                   denoising_start=None, denoising_end=None):
        """(start, stop) of the steps to run, as diffusers' img2img ``get_timesteps`` (strength,
        or ``denoising_start``) and SDXL's ``denoising_end`` cut."""
        n = solver.num_steps
        start, stop = 0, n
        for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if v is not None and not 0.0 < float(v) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if denoising_start is not None and not has_image:
            raise ValueError("denoising_start needs image= (the latents the base pipeline "
                             "returned with denoising_end and output_type='latent')")
        train = int((self.scheduler or {}).get("num_train_timesteps", 1000))
        ts = np.asarray(solver.timesteps, np.float64)
        if denoising_start is not None:
            cutoff = int(round(train - float(denoising_start) * train))
            start = n - int(np.sum(ts < cutoff))
        elif has_image:
            s = float(strength)
            if not 0.0 < s <= 1.0:
                raise ValueError(f"strength must be in (0, 1], got {strength!r}")
            start = max(num_inference_steps - min(int(num_inference_steps * s),
                                                  num_inference_steps), 0)
        if denoising_end is not None:
            cutoff = int(round(train - float(denoising_end) * train))
            stop = int(np.sum(ts >= cutoff))
        if not start < stop:
            raise ValueError(f"no step left to run: steps {start}..{stop} of {n} (strength="
                             f"{strength}, denoising_start={denoising_start}, denoising_end="
                             f"{denoising_end}); use more steps or a larger strength")
        return start, stop

    def _image_input(self, image) -> np.ndarray:
        """An image batch [N, H, W, 3] in [0, 1], or latents [N, h, w, C] given as image."""
        arr = np.asarray(image) if isinstance(image, (np.ndarray, jax.Array)) else None
        if arr is not None and arr.ndim == 4 and arr.shape[-1] == self.latent_channels \
                and arr.shape[-1] != 3:
            return arr.astype(np.float32)
        return as_array(image, "image", (3,))

    def _controlnets(self, controlnet, control_image, scales, n, per_prompt, height, width):
        """-> [(ControlNetModel, conditioning images [n, H, W, c], scale)] or None."""
        nets = self.controlnet if controlnet is None else controlnet
        if nets is None:
            if control_image is not None:
                raise ValueError("control_image given, but this pipeline has no controlnet "
                                 "(load one with conversion.load_controlnet and pass "
                                 "controlnet=)")
            return None
        nets = list(nets) if isinstance(nets, (list, tuple)) else [nets]
        if control_image is None:
            raise ValueError(f"this pipeline has {len(nets)} ControlNet(s): pass control_image=")
        images = (list(control_image) if len(nets) > 1 and isinstance(control_image, (list, tuple))
                  else [control_image])
        scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(nets)
        if len(images) != len(nets) or len(scales) != len(nets):
            raise ValueError(f"{len(nets)} ControlNets need as many control images and "
                             f"scales, got {len(images)} and {len(scales)}")
        out = []
        for j, (net, img, sc) in enumerate(zip(nets, images, scales)):
            self.check_controlnet(net)
            arr = as_array(img, "control_image", (net.config.conditioning_channels,))
            if arr.shape[1:3] != (height, width):
                raise ValueError(f"control_image {j} is {arr.shape[1]}x{arr.shape[2]} pixels, "
                                 f"but height x width is {height}x{width}")
            out.append((net, self._broadcast(jnp.asarray(arr), n, per_prompt, "control_image"),
                        float(sc)))
        return out

    def check_controlnet(self, net) -> None:
        """Raise if a ControlNet's residuals cannot fit this pipeline's UNet."""
        c, u = net.config, self.unet.config
        fields = ("block_out_channels", "down_block_types", "layers_per_block",
                  "cross_attention_dim", "addition_embed_type")
        bad = [f for f in fields if getattr(c, f) != getattr(u, f)]
        if c.in_channels != self.latent_channels:
            bad.append("in_channels")
        if bad:
            raise ValueError("this ControlNet does not fit the UNet: " + ", ".join(
                f"{f}={getattr(c, f)!r} vs the UNet's "
                f"{(self.latent_channels if f == 'in_channels' else getattr(u, f))!r}"
                for f in bad))

    def _mask_input(self, mask_image, height: int, width: int) -> jax.Array:
        """-> [N, H, W, 1] in {0, 1} (diffusers' mask processor binarises at 0.5)."""
        arr = mask_image
        if isinstance(arr, (np.ndarray, jax.Array)):
            arr = np.asarray(arr)
            if arr.ndim == 3 and arr.shape[-1] != 1:
                arr = arr[..., None]                 # [N, H, W]
        m = as_array(arr, "mask_image", (1,))
        if m.shape[1:3] != (height, width):
            raise ValueError(f"mask_image is {m.shape[1]}x{m.shape[2]} pixels, but height x "
                             f"width is {height}x{width}")
        return jnp.asarray((m >= 0.5).astype(np.float32))

    def _image_latents(self, given, height: int, width: int) -> jax.Array:
        f = self.vae_scale_factor
        if given.shape[-1] == self.latent_channels and given.shape[-1] != 3:
            want = (height // f, width // f)
            if given.shape[1:3] != want:
                raise ValueError(f"image latents are {given.shape[1]}x{given.shape[2]}, but "
                                 f"height x width {height}x{width} needs {want[0]}x{want[1]}")
            return jnp.asarray(given)
        if given.shape[1:3] != (height, width):
            raise ValueError(f"image is {given.shape[1]}x{given.shape[2]} pixels, but height x "
                             f"width is {height}x{width}")
        return self.encode_images(given)

    def encode_images(self, images) -> jax.Array:
        """Images [N, H, W, 3] in [0, 1] -> diffusion latents (the VAE posterior mean, scaled
        as the pipeline samples them; jitted)."""
        scale, shift = self._latent_scaling()
        fn = self._jit("vae_encode", self.vae,
                       lambda vae, x: (vae.encode(x * 2.0 - 1.0).mean.astype(jnp.float32)
                                       - shift) * scale)
        return fn(nnx.state(self.vae), jnp.asarray(images, jnp.float32))

    @staticmethod
    def _broadcast(a, n: int, per_prompt: int, what: str):
        b = a.shape[0]
        if b == n:
            return a
        if b == 1:
            return jnp.repeat(a, n, axis=0)
        if b * per_prompt == n:
            return jnp.repeat(a, per_prompt, axis=0)
        raise ValueError(f"{b} {what}s for {n} images (give one, one per prompt, or one per "
                         f"image)")

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


@dataclasses.dataclass
class _LoraState:
    """A pipeline's LoRA adapters: the components' base modules, each adapter's resolved
    factors per component, scales, the active names and the mode."""

    base: dict = dataclasses.field(default_factory=dict)       # component -> base module
    current: dict = dataclasses.field(default_factory=dict)    # component -> module set
    adapters: dict = dataclasses.field(default_factory=dict)   # name -> {component: factors}
    scales: dict = dataclasses.field(default_factory=dict)
    active: list = dataclasses.field(default_factory=list)
    devices: dict = dataclasses.field(default_factory=dict)    # name -> {component: on device}
    fused: bool = True


@dataclasses.dataclass
class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base or refiner: two CLIP text encoders (the refiner has only the second), their
    penultimate hidden states concatenated, the second's pooled projection and the micro-
    conditioning ``time_ids`` as the UNet's added conditioning (diffusers'
    ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``).

    Extra ``generate`` options: ``prompt_2`` / ``negative_prompt_2`` (the second encoder's
    prompts; default the first ones), ``pooled_prompt_embeds`` /
    ``negative_pooled_prompt_embeds``, ``original_size``, ``crops_coords_top_left``,
    ``target_size`` and their ``negative_`` forms, ``aesthetic_score`` /
    ``negative_aesthetic_score`` (refiner), ``clip_skip``. With no negative prompt and
    ``force_zeros_for_empty_prompt`` (the base's setting), the negative conditioning is zeros.
    """

    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False
    DEFAULT_STRENGTH: ClassVar[float] = 0.3
    OPTIONS: ClassVar[tuple] = (
        "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
        "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
        "negative_aesthetic_score", "clip_skip")


    def _latent_scaling(self):
        cfg = self.vae.config
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            std = np.asarray(cfg.latents_std, np.float32)
            return cfg.scaling_factor / std, np.asarray(cfg.latents_mean, np.float32)
        return super()._latent_scaling()

    def _encoders(self):
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(i, tok, te) for i, (tok, te) in enumerate(pairs) if te is not None]

    def encode_prompt_xl(self, prompts, prompts_2=None, clip_skip=None, max_length=None):
        """[B] prompts (and the second encoder's) -> ([B, L, D1 + D2] penultimate hidden
        states concatenated, [B, P] pooled projection of text_encoder_2)."""
        if self.text_encoder_2 is None:
            raise ValueError("this SDXL pipeline has no text_encoder_2 (the pooled projection "
                             "comes from it): pass prompt_embeds and pooled_prompt_embeds")
        prompts_2 = prompts if prompts_2 is None else prompts_2
        layer = -2 if clip_skip is None else -(int(clip_skip) + 2)
        states, pooled = [], None
        for i, tok, te in self._encoders():
            if tok is None:
                raise ValueError(f"this pipeline has no tokenizer{'_2' if i else ''}: pass "
                                 "prompt_embeds and pooled_prompt_embeds instead")
            ids = tok(self._expand_tokens(prompts_2 if i else prompts, tok), padding="max_length",
                      max_length=max_length or tok.model_max_length, truncation=True,
                      return_tensors="np").input_ids
            def encode(m, ids, layer=layer):
                out = m(ids)
                return out.hidden_states[layer], out.text_embeds

            fn = self._jit(("text_xl", i, layer), te, encode)
            te = self.lora_module(("text_encoder", "text_encoder_2")[i])
            h, emb = fn(nnx.state(te), np.asarray(ids, np.int32))
            states.append(h)
            pooled = emb if emb is not None else pooled
        return jnp.concatenate(states, axis=-1), pooled

    def _conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                      do_cfg, height, width, options) -> dict:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__}.generate got unexpected keyword arguments "
                            f"{unknown}")
        o = dict(options)
        clip_skip = o.get("clip_skip")
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            if o.get("pooled_prompt_embeds") is None:
                raise ValueError("SDXL: prompt_embeds needs pooled_prompt_embeds too")
            cond, pooled = jnp.asarray(prompt_embeds), jnp.asarray(o["pooled_prompt_embeds"])
        else:
            if prompt is None:
                raise ValueError("pass prompt (str or list of str) or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            p2 = o.get("prompt_2")
            p2 = prompts if p2 is None else ([p2] * len(prompts) if isinstance(p2, str)
                                            else list(p2))
            cond, pooled = self.encode_prompt_xl(prompts, p2, clip_skip)
        n = cond.shape[0]
        uncond = uncond_pooled = None
        if do_cfg:
            if negative_prompt_embeds is not None:
                if o.get("negative_pooled_prompt_embeds") is None:
                    raise ValueError("SDXL: negative_prompt_embeds needs "
                                     "negative_pooled_prompt_embeds too")
                uncond = jnp.asarray(negative_prompt_embeds)
                uncond_pooled = jnp.asarray(o["negative_pooled_prompt_embeds"])
            elif negative_prompt is None and self.force_zeros_for_empty_prompt:
                uncond, uncond_pooled = jnp.zeros_like(cond), jnp.zeros_like(pooled)
            else:
                neg = self._negatives(negative_prompt, n)
                neg2 = o.get("negative_prompt_2")
                neg2 = neg if neg2 is None else self._negatives(neg2, n)
                # diffusers encodes negatives at the penultimate layer whatever clip_skip
                uncond, uncond_pooled = self.encode_prompt_xl(neg, neg2, None, cond.shape[1])
        size = (int(height), int(width))
        original = tuple(o.get("original_size") or size)
        target = tuple(o.get("target_size") or size)
        crops = tuple(o.get("crops_coords_top_left") or (0, 0))
        neg_original = tuple(o.get("negative_original_size") or original)
        neg_target = tuple(o.get("negative_target_size") or target)
        neg_crops = tuple(o.get("negative_crops_coords_top_left") or crops)
        if self.requires_aesthetics_score:
            ids = original + crops + (float(o.get("aesthetic_score", 6.0)),)
            neg_ids = neg_original + neg_crops + (float(o.get("negative_aesthetic_score", 2.5)),)
        else:
            ids = original + crops + target
            neg_ids = (neg_original + neg_crops + neg_target
                       if o.get("negative_original_size") is not None
                       and o.get("negative_target_size") is not None else ids)
        ucfg = self.unet.config
        want = ucfg.projection_class_embeddings_input_dim
        got = (ucfg.addition_time_embed_dim or 0) * len(ids) + int(pooled.shape[-1])
        if want is not None and got != want:
            raise ValueError(
                f"SDXL: the UNet's added embedding takes {want} features, but "
                f"{len(ids)} time ids x {ucfg.addition_time_embed_dim} + pooled "
                f"{int(pooled.shape[-1])} = {got} (a refiner needs requires_aesthetics_score="
                f"True, a base False)")
        time_ids = lambda v: jnp.tile(jnp.asarray([v], jnp.float32), (n, 1))  # noqa: E731
        added = {"text_embeds": pooled, "time_ids": time_ids(ids)}
        uncond_added = None if uncond is None else {"text_embeds": uncond_pooled,
                                                   "time_ids": time_ids(neg_ids)}
        return dict(cond=cond, uncond=uncond, added_cond=added, uncond_added_cond=uncond_added)


__all__ = ["OUTPUT_TYPES", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "image_grid",
           "to_pil"]
