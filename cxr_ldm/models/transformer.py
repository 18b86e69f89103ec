"""Spatial transformer of the Stable Diffusion UNet (diffusers `Transformer2DModel` and its parts).

Flax attribute names follow the PyTorch module names, so parameters map to diffusers state-dict keys:
"attentions.0.transformer_blocks.0.attn1.to_q.weight" <-> ("attentions_0", "transformer_blocks_0",
"attn1", "to_q", "kernel"). Feature maps are NHWC; token sequences are (batch, length, channels).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_ldm.models.layers import dot_product_attention, group_norm, remat


class Attention(nn.Module):
    """Multi-head attention with diffusers' `Attention` parameter names (to_q/to_k/to_v/to_out.0).

    Self-attention when `context` is None, cross-attention otherwise. The attention logits and softmax
    are computed in float32 whatever the compute dtype (`jax.nn.dot_product_attention` does so), which
    is what diffusers' `upcast_attention=True` asks for.

    Attributes:
      query_dim: channels of the input tokens (and of the output).
      heads: number of heads.
      head_dim: channels per head.
      attention_impl: `layers.dot_product_attention`'s implementation (None: XLA; "auto": chosen by backend).
    """

    query_dim: int
    heads: int
    head_dim: int
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        inner = self.heads * self.head_dim
        dense = lambda features, bias: nn.Dense(features, use_bias=bias, dtype=self.dtype,
                                                param_dtype=self.param_dtype)
        self.to_q, self.to_k, self.to_v = dense(inner, False), dense(inner, False), dense(inner, False)
        self.to_out_0 = dense(self.query_dim, True)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (B, L, query_dim); context: (B, S, context_dim) or None -> (B, L, query_dim)."""
        context = x if context is None else context
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.to_out_0(out.reshape(out.shape[0], out.shape[1], self.heads * self.head_dim))


class GEGLU(nn.Module):
    """Gated GELU projection: proj(x) = [h, gate]; returns h * gelu(gate) with the exact (erf) GELU."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                                          name="proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu", mult=4)`: net.0 = GEGLU, net.1 = dropout, net.2 = Dense."""

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.net_0 = GEGLU(self.dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype)
        self.net_2 = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual.

    Attributes:
      dim: token channels (heads * head_dim).
      heads / head_dim: attention shape.
    """

    dim: int
    heads: int
    head_dim: int
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        norm = lambda: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)
        attention = lambda: Attention(self.dim, self.heads, self.head_dim, self.attention_impl,
                                      dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1, self.norm2, self.norm3 = norm(), norm(), norm()
        self.attn1, self.attn2 = attention(), attention()
        self.ff = FeedForward(self.dim, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B, L, dim); context: (B, S, cross_attention_dim) -> (B, L, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input (the SD UNet's attention blocks).

    GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or Dense with `use_linear_projection`) -> tokens ->
    `num_layers` BasicTransformerBlocks -> proj_out -> + input.

    Attributes:
      channels: input and output channels.
      heads / head_dim: attention shape; heads * head_dim is the token width.
      num_layers: number of BasicTransformerBlocks.
      norm_num_groups: groups of the input GroupNorm.
      use_linear_projection: Dense proj_in/proj_out (SD 2.x) instead of 1x1 convolutions (SD 1.x).
      remat: rematerialise each BasicTransformerBlock in the backward pass.
      remat_policy: what the rematerialised blocks keep (a key of `layers.REMAT_POLICIES`).
      attention_impl: `layers.dot_product_attention`'s implementation ("auto": chosen by backend).
    """

    channels: int
    heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str | None = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        inner = self.heads * self.head_dim
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = group_norm(self.norm_num_groups, 1e-6, name=None, **kwargs)
        if self.use_linear_projection:
            self.proj_in, self.proj_out = nn.Dense(inner, **kwargs), nn.Dense(self.channels, **kwargs)
        else:
            self.proj_in = nn.Conv(inner, (1, 1), **kwargs)
            self.proj_out = nn.Conv(self.channels, (1, 1), **kwargs)
        block = remat(BasicTransformerBlock, self.remat_policy) if self.remat else BasicTransformerBlock
        self.transformer_blocks = [block(inner, self.heads, self.head_dim, self.attention_impl, **kwargs)
                                   for _ in range(self.num_layers)]

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B, H, W, channels); context: (B, S, cross_attention_dim) -> (B, H, W, channels)."""
        batch, height, width, _ = x.shape
        # A 1x1 conv and a Dense act alike on NHWC, so proj_in/proj_out run on the feature map.
        hidden = self.proj_in(self.norm(x))
        hidden = hidden.reshape(batch, height * width, hidden.shape[-1])
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        hidden = hidden.reshape(batch, height, width, hidden.shape[-1])
        return self.proj_out(hidden) + x
