"""CLIP text encoder (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

The module tree mirrors transformers 5's (no ``text_model.`` level); the converter strips
that prefix from hub files. quick_gelu for OpenAI CLIP (SD 1.x), exact gelu for OpenCLIP
(SD 2.x, SDXL).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.config import Config
from jaxdiff.models.layers import Embedding, LayerNorm, Linear, activation

# Generic transformers PretrainedConfig keys: bookkeeping or training-only, no effect on the
# text encoder's forward pass.
_GENERIC = frozenset("""
architectures model_type torch_dtype dtype transformers_version name_or_path initializer_range
initializer_factor attention_dropout dropout return_dict output_hidden_states
output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads tie_word_embeddings
chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size
add_cross_attention tie_encoder_decoder max_length min_length do_sample early_stopping
num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
bad_words_ids num_return_sequences output_scores return_dict_in_generate
forced_bos_token_id forced_eos_token_id remove_invalid_values
exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task
id2label label2id tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params
problem_type gradient_checkpointing pad_token_id bos_token_id use_cache
""".split())


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(Config):
    IGNORED = _GENERIC
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        self._require("hidden_act", ("quick_gelu", "gelu"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible "
                             f"by num_attention_heads={self.num_attention_heads}")

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":  # openai/clip-vit-large-patch14
        return cls(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                   projection_dim=768)

    @classmethod
    def sd21(cls) -> "CLIPTextConfig":  # OpenCLIP ViT-H/14 (23 of 24 layers are used by SD 2)
        return cls(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                   num_hidden_layers=23, hidden_act="gelu", projection_dim=512)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array   # [B, L, D], after the final layer norm
    pooler_output: jax.Array       # [B, D], at the EOS token
    hidden_states: tuple           # num_layers + 1 of [B, L, D]; [-2] is the penultimate
    text_embeds: Optional[jax.Array] = None  # [B, P], WithProjection only


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                            dtype=dtype, rngs=rngs)

    def __call__(self, ids):
        return self.token_embedding(ids) + self.position_embedding.embedding[...][: ids.shape[1]]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        out = dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                    heads=self.heads, mask=mask, upcast=True, impl="xla")
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs):
        self.act = activation(cfg.hidden_act, "hidden_act")
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs):
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                          dtype=dtype)

    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        """input_ids [B, L] int; attention_mask [B, L] (1 = token, 0 = padding) or None."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this text encoder "
                             f"takes at most max_position_embeddings={cfg.max_position_embeddings}")
        L = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((L, L), bool))[None, None]  # causal
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask)[:, None, None, :] > 0)
        x = self.embeddings(input_ids)
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            hidden.append(x)
        last = self.final_layer_norm(x)
        if cfg.eos_token_id == 2:
            # Legacy configs: the EOS token has the largest id in the vocabulary.
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos]
        return CLIPTextOutput(last, pooled, tuple(hidden))


class CLIPTextModelWithProjection(CLIPTextModel):
    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False,
                                      dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        out = super().__call__(input_ids, attention_mask)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))
