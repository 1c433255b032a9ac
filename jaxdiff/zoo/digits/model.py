"""The digits model's architecture, noise schedule and conditioning tokens.

Class labels enter the UNet through both of Stable Diffusion's conditioning paths: a class
embedding added to the time embedding (``num_class_embeds=11``) and cross-attention over two
tokens, ``[class, bias]``, given as one-hot vectors (the attention's key/value projections then
act as learned per-class token embeddings, so no extra module needs saving). Label 10 is the
null label used for classifier-free guidance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import UNet2DConditionModel, UNetConfig

NULL_LABEL = 10
TOKEN_DIM = 16
BIAS_TOKEN = 11

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=TOKEN_DIM, attention_head_dim=4, num_class_embeds=NULL_LABEL + 1,
)

# A diffusers scheduler config: every jaxdiff solver reads the fields it understands.
SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
    prediction_type="epsilon", clip_sample=True, timestep_spacing="trailing",
)


def build(seed: int = 0, dtype=jnp.float32) -> UNet2DConditionModel:
    return UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIG), dtype=dtype,
                                rngs=nnx.Rngs(seed))


def class_tokens(labels) -> jax.Array:  # [B] int -> [B, 2, TOKEN_DIM]
    labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    bias = jnp.full_like(labels, BIAS_TOKEN)
    return jax.nn.one_hot(jnp.stack([labels, bias], 1), TOKEN_DIM, dtype=jnp.float32)


def alphas_cumprod(schedule: dict = SCHEDULE):  # [T] float32, as the solvers compute it
    from jaxdiff import schedules
    betas = schedules.make_betas(schedule["num_train_timesteps"], schedule["beta_start"],
                                 schedule["beta_end"], schedule["beta_schedule"])
    return schedules.alphas_cumprod(betas)
