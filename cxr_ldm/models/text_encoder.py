"""CLIP text transformer (transformers' `CLIPTextModel`): the prompt encoder of Stable Diffusion.

token + position embeddings -> N pre-LayerNorm causal self-attention layers -> final LayerNorm.
Parameter names follow the PyTorch state dict (see `cxr_ldm.io.convert`), e.g.
("encoder", "layers_0", "self_attn", "q_proj", "kernel") <-> "encoder.layers.0.self_attn.q_proj.weight".
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_ldm.json_config import HOOK_STACKLEVEL, JsonConfig
from cxr_ldm.models.layers import dot_product_attention

Dtype = Any

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# config.json keys with no effect on this model's forward pass (bookkeeping, initialisation, training-only).
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
    "initializer_range", "initializer_factor", "attention_dropout", "dropout", "output_attentions",
    "output_hidden_states", "return_dict", "_attn_implementation_autoset", "tie_word_embeddings",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(JsonConfig):
    """transformers' CLIPTextConfig fields that shape the text transformer (defaults: SD 1.x, ViT-L/14).

    `from_dict` reads a transformers config.json dict: unknown keys warn, bad values raise naming `source`.
    """

    _source = "config"
    _ignored_keys = _IGNORED_KEYS
    _unknown_keys_message = "{source}: ignoring unknown CLIPTextConfig keys {keys}"

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def _read_key(cls, key: str, value: Any, source: str) -> bool:
        """Only a CLIP text encoder config is read (model_type "clip_text_model", the default)."""
        if key == "model_type" and value != "clip_text_model":
            raise ValueError(f"{source}: model_type={value!r}, expected 'clip_text_model' "
                             "(a CLIP text encoder config)")
        return False  # model_type is one of the ignored keys

    @classmethod
    def _prepare(cls, values: dict[str, Any], d: Mapping[str, Any], source: str) -> dict[str, Any]:
        if d.get("attention_dropout", 0.0):
            warnings.warn(f"{source}: attention_dropout={d['attention_dropout']} is not applied",
                          stacklevel=HOOK_STACKLEVEL)
        return {k: v for k, v in values.items() if v is not None}  # null: the default

    def to_dict(self) -> dict:
        """transformers' config.json keys (without "architectures")."""
        return {"model_type": "clip_text_model", "attention_dropout": 0.0, **super().to_dict()}


class CLIPAttention(nn.Module):
    """Multi-head self-attention, (B, L, D) -> (B, L, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        heads = self.config.num_attention_heads
        dense = lambda name: nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                      name=name)
        split = lambda t: t.reshape(*t.shape[:2], heads, -1)
        q, k, v = (split(dense(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=self.attention_impl)
        return dense("out_proj")(out.reshape(x.shape[:2] + (-1,)))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2, (B, L, D) -> (B, L, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.config.intermediate_size, name="fc1", **dtypes)(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, name="fc2", **dtypes)(h)


class CLIPEncoderLayer(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(.)); (B, L, D) -> (B, L, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=self.config.layer_norm_eps, name=name, **dtypes)
        attn = CLIPAttention(self.config, attention_impl=self.attention_impl, name="self_attn", **dtypes)
        x = x + attn(norm("layer_norm1")(x), mask)
        return x + CLIPMLP(self.config, name="mlp", **dtypes)(norm("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0..L-1): int (B, L) -> (B, L, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        length = input_ids.shape[-1]
        positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(length))
        return embed(cfg.vocab_size, "token_embedding")(input_ids) + positions


class CLIPEncoder(nn.Module):
    """The stack of `num_hidden_layers` encoder layers."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        self.layers = [CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                        attention_impl=self.attention_impl)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """Returns (x, output of layer 1, ..., output of layer N)."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return tuple(states)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel: prompt token ids -> per-token features.

    Attributes:
      config: the model hyperparameters.
      dtype: computation dtype; param_dtype: parameter dtype.
      attention_impl: `implementation=` of `jax.nn.dot_product_attention` (None: XLA picks).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False, *,
                 attention_mask: jax.Array | None = None):
        """Encodes token ids.

        Args:
          input_ids: int (B, L), L <= max_position_embeddings.
          output_hidden_states: also return every layer's input/output, as transformers does.
          attention_mask: optional int/bool (B, L), 0 = padding key that no token attends to. Stable Diffusion
            passes none (padding tokens are attended, causally).
        Returns:
          last_hidden_state (B, L, D) after the final LayerNorm; with `output_hidden_states`, the pair
          (last_hidden_state, hidden_states) where hidden_states = (embeddings, layer 1, ..., layer N) outputs,
          N + 1 arrays (B, L, D), the last one before the final LayerNorm.
        """
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = CLIPTextEmbeddings(self.config, name="embeddings", **dtypes)(input_ids)
        hidden_states = CLIPEncoder(self.config, attention_impl=self.attention_impl, name="encoder",
                                    **dtypes)(x, mask)
        last = nn.LayerNorm(epsilon=self.config.layer_norm_eps, name="final_layer_norm",
                            **dtypes)(hidden_states[-1])
        return (last, hidden_states) if output_hidden_states else last


def dummy_inputs(config: CLIPTextConfig) -> tuple:
    """Positional arguments for `CLIPTextModel.init`: one full-length prompt of zeros."""
    return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)
