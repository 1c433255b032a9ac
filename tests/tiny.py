"""Tiny configs of every supported architecture family, and helpers shared by tests."""

import numpy as np

UNET_CONFIGS = {
    "sd1": dict(
        block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=24, attention_head_dim=4, in_channels=4, out_channels=4),
    "sd2": dict(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True,
        upcast_attention=True, in_channels=4, out_channels=4),
    "sdxl": dict(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=24, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, in_channels=4, out_channels=4),
    "classcond": dict(
        block_out_channels=[32, 48], layers_per_block=1, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=16, attention_head_dim=2, num_class_embeds=11,
        resnet_time_scale_shift="scale_shift", in_channels=3, out_channels=3,
        only_cross_attention=[True, False]),
    "timestep_class": dict(
        block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], freq_shift=1,
        flip_sin_to_cos=False, cross_attention_dim=16, attention_head_dim=2,
        class_embed_type="timestep", class_embeddings_concat=True, in_channels=1,
        out_channels=1, downsample_padding=0, time_embedding_dim=40),
}

# the SD 1.x pipeline folders' UNet (write_tiny_pipeline): the same blocks in two levels of
# one layer each; its sampling loop compiles in 2.6 s where "sd1"'s takes 4.0 s, and the
# pipelines' code does not depend on the depth ("sd1" stays for model parity)
SD_PIPE_UNET = dict(
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=24, attention_head_dim=4, in_channels=4, out_channels=4)

VAE_CONFIG = dict(block_out_channels=[16, 32], norm_num_groups=8, latent_channels=4,
                  in_channels=3, out_channels=3, layers_per_block=1,
                  down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2)

CLIP_CONFIGS = {
    "quick_gelu": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=16, projection_dim=12,
                       hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1),
    "gelu": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, projection_dim=12,
                 hidden_act="gelu", eos_token_id=98, bos_token_id=0, pad_token_id=1),
}


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def nchw(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def torch_unet(cfg, seed=0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(**cfg).eval()
    # diffusers zero-initialises nothing here, but randomise norms too so they are tested.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


# issue 25's ParaTAA problem: a random SD-like UNet (every weight perturbed by 0.02 randn so
# the network is not near-linear in x), SD's DDIM (scaled_linear, leading, steps_offset 1, no
# clipping), guidance 4, one random prompt of 77 tokens; shared by tests/test_paradigms.py,
# benchmarks/parataa.py and the harness that runs the authors' code on it
PARATAA_UNET = dict(
    sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=16,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=48, attention_head_dim=[4, 8, 8], in_channels=4, out_channels=4)
PARATAA_DDIM = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                    beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                    prediction_type="epsilon")
PARATAA_GUIDANCE = 4.0


def parataa_problem(seed=0):
    """-> (torch UNet, DDIM config, cond [1, 77, 48], uncond [1, 77, 48]) as torch tensors."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(**PARATAA_UNET).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    cond = torch.randn(1, 77, 48, generator=g)
    uncond = torch.randn(1, 77, 48, generator=g)
    return m, dict(PARATAA_DDIM), cond, uncond


def parataa_noise(steps):
    """The authors' harness draws: torch seed 0, float64 [steps + 1, 4, 16, 16]; x_T is the
    last (``parataa_x_T``)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(steps + 1, 4, 16, 16, generator=g, dtype=torch.float64)


def parataa_x_T(steps):
    """-> x_T [1, 16, 16, 4] float32 (NHWC) as the authors' harness starts."""
    return parataa_noise(steps)[-1].float().numpy().transpose(1, 2, 0)[None].copy()


def torch_vae(cfg=VAE_CONFIG, seed=0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    m = AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def torch_clip(cfg, projection=False, seed=0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    m = cls(CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def unet_inputs(cfg, rng, batch=2, size=16, seq=7):
    x = rng.standard_normal((batch, size, size, cfg.get("in_channels", 4))).astype(np.float32)
    t = np.array([10.5, 999.0][:batch] + [500.0] * max(0, batch - 2), np.float32)
    ctx = rng.standard_normal((batch, seq, cfg["cross_attention_dim"])).astype(np.float32)
    kw = {}
    if cfg.get("num_class_embeds"):
        kw["class_labels"] = np.arange(batch) % cfg["num_class_embeds"]
    if cfg.get("class_embed_type") == "timestep":
        kw["class_labels"] = np.linspace(3.0, 700.0, batch).astype(np.float32)
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond"] = {
            "text_embeds": rng.standard_normal((batch, 16)).astype(np.float32),
            "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))}
    return x, t, ctx, kw


def torch_unet_forward(m, x, t, ctx, kw):
    import torch

    targs = {}
    if "class_labels" in kw:
        targs["class_labels"] = torch.from_numpy(np.asarray(kw["class_labels"]))
    if "added_cond" in kw:
        targs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in kw["added_cond"].items()}
    with torch.no_grad():
        out = m(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx),
                **targs).sample
    return nhwc(out.numpy())


def write_tiny_tokenizer(folder, max_length=16):
    """A CLIP BPE tokenizer over a small local vocabulary (no hub): every byte symbol, its
    word-final form, a few merges, and the start/end tokens."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted
    # past 255 so that every byte has a visible symbol
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"),
              ("d", "o"), ("do", "g</w>")]
    vocab = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
                                       + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return len(vocab)


def write_tiny_pipeline(folder, seed=0, in_channels=4, unet="pipe"):
    """A complete diffusers StableDiffusionPipeline folder with tiny random components
    (``in_channels=9``: an inpainting UNet, latents + mask + masked-image latents; ``unet``:
    "pipe" for SD_PIPE_UNET or a key of UNET_CONFIGS)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pathlib import Path

    folder = Path(folder)
    vocab = write_tiny_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**({"pipe": SD_PIPE_UNET} | UNET_CONFIGS)[unet], "sample_size": 16,
                                   "in_channels": in_channels}).eval()
    vae = AutoencoderKL(**{**VAE_CONFIG, "sample_size": 32}).eval()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=12,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


# ------------------------------------------------------------------------------ toy model functions
# Shared by the driver contract (tests/test_drivers.py) and the solver suite.
import collections  # noqa: E402
import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

TRACES = collections.Counter()    # model calls while tracing, per kind: "does not recompile"


def toy_jax(x, t):
    """A smooth model function for the driver checks (any magnitude will do there)."""
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(0.7 * x) * jnp.cos(t / 250.0) + 0.1 * jnp.sin(x + t / 400.0)


class ToyFeatures(collections.namedtuple("ToyFeatures", "skips mid emb")):
    """What ``ToyModel.encode`` hands its decoder (the UNet's ``Encoded`` layout)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ToyModel:
    """A model function as a pytree (its weight is a traced jit argument) that can also run
    as an encoder and a decoder, like ``jaxdiff.guidance.ModelFn``: the "encoder" features
    are w * x at the key step, the "decoder" applies ``toy_jax`` at its own time. So
    ``decode_many(encode(x, t), [t])[0] == model(x, t)`` and every driver can use it."""

    w: jax.Array

    def __call__(self, x, t):          # x [N, H, W, C], t [N]
        TRACES["call"] += 1            # runs only while tracing
        return toy_jax(self.w * x, t)

    def encode(self, x, t):
        TRACES["encode"] += 1
        return ToyFeatures((self.w * x,), self.w * x, t)

    def decode_many(self, features, ts):   # ts [g] -> [g, N, ...]
        TRACES["decode"] += 1
        x = features.mid
        return jax.vmap(lambda t: toy_jax(x, jnp.broadcast_to(t, (x.shape[0],))))(ts)


def _tiny_clip(vocab, hidden, projection=False, seed=0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         projection_dim=16, hidden_act="gelu", bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def write_tiny_sdxl(folder, seed=0):
    """Tiny random SDXL base and refiner folders (``folder/base``, ``folder/refiner``):
    text encoders of width 8 and 16 (the UNet's cross-attention takes their concatenation,
    24), a pooled projection of 16, 6 time ids (base) / 5 with the aesthetic score
    (refiner, second encoder only) of 8 features each. -> (diffusers base, refiner)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer

    from pathlib import Path

    folder = Path(folder)
    vocab = write_tiny_tokenizer(folder / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    te1, te2 = _tiny_clip(vocab, 8, seed=seed), _tiny_clip(vocab, 16, True, seed=seed + 1)
    torch.manual_seed(seed)
    base_unet = UNet2DConditionModel(**{**UNET_CONFIGS["sdxl"], "sample_size": 16}).eval()
    refiner_unet = UNet2DConditionModel(**{
        **UNET_CONFIGS["sdxl"], "sample_size": 16, "cross_attention_dim": 16,
        "projection_class_embeddings_input_dim": 16 + 5 * 8}).eval()
    for m in (base_unet, refiner_unet):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    vae = AutoencoderKL(**{**VAE_CONFIG, "sample_size": 32}).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=base_unet, scheduler=sched,
                                     add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok,
        unet=refiner_unet, scheduler=sched, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    base.save_pretrained(folder / "base")
    refiner.save_pretrained(folder / "refiner")
    return base, refiner


def latents_and_images_error(ref, pipe, want, got):
    """diffusers latents ``want`` (NCHW torch) vs jaxdiff latents ``got`` (NHWC) ->
    (relative L2 of the latents, max abs difference of the images each library decodes,
    fraction of image values strictly inside (0, 1): a check on saturated tiny VAEs)."""
    import torch

    with torch.no_grad():
        img = ref.vae.decode(want / ref.vae.config.scaling_factor).sample
    want_img = nhwc((img / 2 + 0.5).clamp(0, 1).numpy())
    got_img = np.asarray(pipe.decode_latents(got))
    inside = float(np.mean((want_img > 0) & (want_img < 1)))
    return (rel_l2(got, nhwc(want.numpy())), float(np.abs(got_img - want_img).max()), inside)


def torch_controlnet(unet_config, seed=0, **kw):
    """A diffusers ControlNetModel fitting a tiny UNet config, every weight perturbed (its
    zero convolutions would otherwise give zero residuals)."""
    import torch
    from diffusers import ControlNetModel

    cfg = {k: v for k, v in unet_config.items()
           if k not in ("up_block_types", "out_channels", "sample_size")}
    torch.manual_seed(seed)
    m = ControlNetModel(**{**cfg, "conditioning_embedding_out_channels": (8, 16), **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m
