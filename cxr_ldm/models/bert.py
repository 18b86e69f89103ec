"""BERT encoder (transformers' `BertModel`): the architecture of the domain text encoders CXR-BERT, PubMedBERT
and RadBERT.

word + absolute position + token type embeddings -> LayerNorm -> N post-LayerNorm bidirectional self-attention
layers (-> the pooler, on request). Parameter names follow the PyTorch state dict (see `cxr_ldm.io.convert`),
e.g. ("encoder", "layer_0", "attention", "self", "query", "kernel") <-> "encoder.layer.0.attention.self.query.weight".
Dropout is not applied.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_ldm.json_config import JsonConfig
from cxr_ldm.models.layers import dot_product_attention
from cxr_ldm.models.text_encoder import ACTIVATIONS

Dtype = Any

# config.json keys with no effect on the encoder's forward pass (bookkeeping, initialisation, training-only, heads).
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
    "initializer_range", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "use_cache",
    "gradient_checkpointing", "output_attentions", "output_hidden_states", "return_dict", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "_attn_implementation_autoset",
})


@dataclasses.dataclass(frozen=True)
class BertConfig(JsonConfig):
    """transformers' BertConfig fields that shape the encoder (defaults: bert-base-uncased, PubMedBERT-base).

    `from_dict` reads a transformers config.json dict: unknown keys warn; a decoder, cross-attention or a
    relative position embedding raise naming `source`.
    """

    _source = "config"
    _ignored_keys = _IGNORED_KEYS
    _unknown_keys_message = "{source}: ignoring unknown BertConfig keys {keys}"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def _read_key(cls, key: str, value: Any, source: str) -> bool:
        """Only a bidirectional encoder with absolute positions is read (model_type "bert")."""
        if key == "model_type" and value != "bert":
            raise ValueError(f"{source}: model_type={value!r}, expected 'bert' (a BertModel config)")
        if key == "position_embedding_type":
            if value != "absolute":
                raise ValueError(f"{source}: position_embedding_type={value!r} is not supported; expected 'absolute'")
            return True
        if key in ("is_decoder", "add_cross_attention"):
            if value:
                raise ValueError(f"{source}: {key}=true is not supported; expected an encoder (false)")
            return True
        return False

    def to_dict(self) -> dict:
        """transformers' config.json keys (without "architectures")."""
        return {"model_type": "bert", "position_embedding_type": "absolute", **super().to_dict()}


def _layer_norm(config: BertConfig, **dtypes) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name="LayerNorm", **dtypes)


class BertEmbeddings(nn.Module):
    """LayerNorm(word(ids) + position(0..T-1) + token_type(type ids)): int (B, T), (B, T) -> (B, T, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), name=name,
                                         **dtypes)
        x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(input_ids.shape[-1])))
        return _layer_norm(cfg, **dtypes)(x)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention without its output projection: (B, T, D) -> (B, T, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        dense = lambda name: nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                      name=name)
        split = lambda t: t.reshape(*t.shape[:2], self.config.num_attention_heads, -1)
        q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        return out.reshape(x.shape)


class BertResidualOutput(nn.Module):
    """LayerNorm(dense(h) + residual), transformers' BertSelfOutput and BertOutput: h (B, T, *) -> (B, T, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return _layer_norm(self.config, **dtypes)(nn.Dense(self.config.hidden_size, name="dense", **dtypes)(h)
                                                  + residual)


class BertAttention(nn.Module):
    """Self-attention, then its output projection, residual and LayerNorm: (B, T, D) -> (B, T, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = BertSelfAttention(self.config, attention_impl=self.attention_impl, name="self", **dtypes)(x, mask)
        return BertResidualOutput(self.config, name="output", **dtypes)(h, x)


class BertIntermediate(nn.Module):
    """activation(dense(x)): (B, T, D) -> (B, T, intermediate_size)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        return ACTIVATIONS[self.config.hidden_act](h)


class BertLayer(nn.Module):
    """attention, then LayerNorm(x + mlp(x)): (B, T, D) -> (B, T, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(self.config, attention_impl=self.attention_impl, name="attention", **dtypes)(x, mask)
        h = BertIntermediate(self.config, name="intermediate", **dtypes)(x)
        return BertResidualOutput(self.config, name="output", **dtypes)(h, x)


class BertEncoder(nn.Module):
    """The stack of `num_hidden_layers` layers: (B, T, D) -> (B, T, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        self.layer = [BertLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                attention_impl=self.attention_impl)
                      for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(first token)): (B, T, D) -> (B, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")
        return jnp.tanh(dense(x[:, 0]))


class BertModel(nn.Module):
    """transformers' BertModel: token ids -> per-token features (and the pooled first token on request).

    Attributes:
      config: the model hyperparameters.
      dtype: computation dtype; param_dtype: parameter dtype.
      attention_impl: `implementation=` of `jax.nn.dot_product_attention` (None: XLA picks).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, output_pooled: bool = False):
        """Encodes token ids.

        Args:
          input_ids: int (B, T), T <= max_position_embeddings.
          attention_mask: optional int/bool (B, T), 0 = padding key that no token attends to (default: all ones).
          token_type_ids: optional int (B, T) segment ids < type_vocab_size (default: all zeros).
          output_pooled: also return the pooler's tanh(dense(first token)).
        Returns:
          last_hidden_state (B, T, D); with `output_pooled`, the pair (last_hidden_state, pooled (B, D)).
        """
        cfg, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(f"BertModel: sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = BertEmbeddings(cfg, name="embeddings", **dtypes)(input_ids, token_type_ids)
        last = BertEncoder(cfg, attention_impl=self.attention_impl, name="encoder", **dtypes)(x, mask)
        if not (output_pooled or self.is_initializing()):  # init creates the pooler's params all the same
            return last
        pooled = BertPooler(cfg, name="pooler", **dtypes)(last)
        return (last, pooled) if output_pooled else last


def dummy_inputs(config: BertConfig) -> tuple:
    """Positional arguments for `BertModel.init`: one token id of zero."""
    return (jnp.zeros((1, 1), jnp.int32),)
