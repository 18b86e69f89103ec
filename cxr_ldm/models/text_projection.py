"""A BERT-family text encoder as the UNet's conditioning: its last hidden state, padding masked, through a
learned linear projection to the UNet's `cross_attention_dim` when the widths differ.

    encoder = ProjectedTextEncoder(bert, TextProjection(TextProjectionConfig(768, 1024)))
    states = encoder.apply({"params": {"bert": bert_params, "projection": projection_params}}, input_ids)

`TextProjection` is stored as a component folder of its own (config.json + diffusion_pytorch_model.safetensors
holding "linear.weight" (out, in) and "linear.bias" (out,), as a PyTorch `nn.Linear` named "linear").
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_ldm.json_config import JsonConfig

Dtype = Any
# Where the token table is in `ProjectedTextEncoder`'s params.
TOKEN_EMBEDDING_PATH = ("bert", "embeddings", "word_embeddings", "embedding")


@dataclasses.dataclass(frozen=True)
class TextProjectionConfig(JsonConfig):
    """in_features: the text encoder's hidden size; out_features: the UNet's cross_attention_dim."""

    _source = "TextProjection config"
    _ignored_keys = frozenset({"_class_name", "_diffusers_version"})

    in_features: int = 768
    out_features: int = 768

    def __post_init__(self):
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"TextProjectionConfig: in_features={self.in_features} and "
                             f"out_features={self.out_features} must be >= 1")


class TextProjection(nn.Module):
    """(B, L, in_features) -> (B, L, out_features): x @ W + b. W starts Xavier-uniform, b at zero."""

    config: TextProjectionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, states: jax.Array) -> jax.Array:
        return nn.Dense(self.config.out_features, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="linear")(states)


def dummy_inputs(config: TextProjectionConfig) -> tuple:
    """Positional arguments for `TextProjection.init`: one zero state."""
    return (jnp.zeros((1, 1, config.in_features), jnp.float32),)


class ProjectedTextEncoder(nn.Module):
    """Token ids (B, L) -> conditioning states (B, L, D): a `BertModel`'s last hidden state, with the
    attention mask `input_ids != pad_token_id` so that no token attends to padding, then `projection`
    (None: the hidden state as it is, for a UNet of the encoder's width). Params: {"bert": ..., ["projection": ...]}.

    `config` is the BERT config (its `max_position_embeddings` bounds the prompt length).
    """

    bert: nn.Module
    projection: TextProjection | None = None

    @property
    def config(self):
        return self.bert.config

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        states = self.bert(input_ids, attention_mask=input_ids != self.bert.config.pad_token_id)
        return states if self.projection is None else self.projection(states)
