"""Building blocks shared by the UNet and the autoencoder (Flax linen, NHWC).

Submodule names follow diffusers' PyTorch modules, so `cxr_ldm.io.convert` maps state-dict keys to
Flax params mechanically (e.g. "resnets.0.conv1.weight" <-> ("resnets_0", "conv1", "kernel")).
Every module has a compute `dtype` and a `param_dtype`; group norms reduce in float32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm(affine=True) over the channel axis; statistics in float32, two-pass variance."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, *, stride: int = 1,
         padding: Any = "SAME") -> nn.Conv:
    """torch.nn.Conv2d with "same" zero padding (kernel // 2 on every side) unless `padding` says otherwise."""
    if padding == "SAME":
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def save_dots_and_convs(prim, *_, **__) -> bool:
    """jax.checkpoint policy: keep the outputs of matmuls and convolutions."""
    return prim in (jax.lax.dot_general_p, jax.lax.conv_general_dilated_p)


# What a rematerialised block's backward pass keeps of its forward pass rather than recomputing it.
REMAT_POLICIES = {
    "full": None,  # nothing: the whole block is recomputed (least memory)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # matmul outputs (attention, Dense layers)
    "dots_and_convs_saveable": save_dots_and_convs,
}


def remat(module_class: type[nn.Module], policy: str = "full") -> type[nn.Module]:
    """`nn.remat(module_class)` keeping the activations `REMAT_POLICIES[policy]` names."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {list(REMAT_POLICIES)}")
    return nn.remat(module_class, policy=REMAT_POLICIES[policy])


def select_attention(dtype: Dtype, head_dim: int, q_len: int, kv_len: int, *, masked: bool = False,
                     backend: str | None = None, compute_capability: float | None = None) -> str:
    """The attention kernel "auto" runs on `backend` (default: jax.default_backend()).

    "cudnn" (cuDNN flash attention, forward and backward) on NVIDIA GPUs from compute capability 8.0
    (Ampere; default: the first device's) for float16/bfloat16 without a mask, head_dim a multiple of 8 and
    at most 128 (256 from 9.0, Hopper); "pallas" (the flash-attention kernel of
    `jax.experimental.pallas.ops.tpu`) on TPU without a mask when q_len and kv_len are multiples of its
    128-row blocks; "xla" otherwise (CPU, ROCm, float32, other shapes).
    """
    backend = backend or jax.default_backend()
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend in ("gpu", "cuda") and low_precision and not masked and head_dim % 8 == 0:
        capability = _cuda_capability() if compute_capability is None else compute_capability
        if capability >= 8.0 and head_dim <= (256 if capability >= 9.0 else 128):
            return "cudnn"
    if backend == "tpu" and not masked and q_len % 128 == 0 and kv_len % 128 == 0:
        return "pallas"
    return "xla"


def _cuda_capability() -> float:
    """The first device's CUDA compute capability (e.g. 9.0), 0 where it has none (ROCm, CPU)."""
    try:
        return float(jax.devices()[0].compute_capability)
    except (AttributeError, TypeError, ValueError):
        return 0.0


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = False, implementation: str | None = None) -> jax.Array:
    """Softmax(q k^T / sqrt(head_dim)) v, with logits and softmax in float32.

    Args:
      q: (B, Lq, heads, head_dim); k, v: (B, Lk, heads, head_dim), all of one dtype.
      mask: boolean, broadcastable to (B, heads, Lq, Lk); True = attend.
      is_causal: mask out keys after the query position.
      implementation: None or "xla" (XLA's attention), "cudnn" (GPU, fp16/bf16 only), "pallas" (TPU flash
        attention, no mask) or "auto" (`select_attention` picks by backend, dtype and shapes).
    Returns:
      (B, Lq, heads, head_dim) in the dtype of q.
    """
    if implementation == "auto":
        implementation = select_attention(q.dtype, q.shape[-1], q.shape[1], k.shape[1], masked=mask is not None)
    if implementation == "pallas":
        if mask is not None:
            raise ValueError("attention implementation 'pallas' (TPU flash attention) takes no mask")
        from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
        return heads_first_attention(flash_attention, q, k, v, is_causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


def heads_first_attention(kernel, q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
    """Runs a (B, heads, L, head_dim) attention kernel, kernel(q, k, v, causal=, sm_scale=), on (B, L, heads,
    head_dim) arrays."""
    to_kernel = lambda t: jnp.swapaxes(t, 1, 2)
    out = kernel(to_kernel(q), to_kernel(k), to_kernel(v), causal=is_causal, sm_scale=q.shape[-1] ** -0.5)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (pre-norm, "default" time embedding, no up/down sampling).

    out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))) / output_scale_factor
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    use_time_embedding: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: (B, H, W, C_in); temb: (B, D) or None. Returns (B, H, W, out_channels)."""
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **dtypes)(x))
        h = conv(self.out_channels, 3, name="conv1", **dtypes)(h)
        if self.use_time_embedding:
            if temb is None:
                raise ValueError(f"{self.name}: built with use_time_embedding=True but called without temb")
            t = nn.Dense(self.out_channels, name="time_emb_proj", **dtypes)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **dtypes)(h))
        h = conv(self.out_channels, 3, name="conv2", **dtypes)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **dtypes)(x)
        out = x.astype(h.dtype) + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Strided 3x3 conv halving H and W.

    padding=1: symmetric zero padding (UNet). padding=0: pad one row/column at the bottom/right, then a
    VALID conv (diffusers' VAE encoder).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_channels) (for even H, W: H/2, W/2)."""
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad = "VALID"
        else:
            pad = ((self.padding, self.padding),) * 2
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=pad)(x)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """torch F.interpolate(mode="nearest") on NHWC: x2 by default, else to `output_size` (H, W)."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    for axis, size in zip((1, 2), output_size):
        # torch's "nearest": source index floor(i * in / out).
        index = np.minimum(np.floor(np.arange(size) * (x.shape[axis] / size)).astype(np.int32), x.shape[axis] - 1)
        x = jnp.take(x, index, axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv named "conv"."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """x: (B, H, W, C) -> (B, 2H, 2W, out_channels), or spatial `output_size` when given."""
        x = upsample_nearest(x, output_size)
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)


class SpatialSelfAttention(nn.Module):
    """diffusers' VAE mid-block Attention: group norm, one head of width C over all H*W positions, residual.

    Param names (group_norm, to_q, to_k, to_v, to_out_0) map to diffusers' "attentions.0.to_out.0.weight" etc.
    """

    groups: int = 32
    eps: float = 1e-6
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.groups, self.eps, name="group_norm", **dtypes)(x)
        h = h.reshape(batch, height * width, 1, channels)
        q, k, v = (nn.Dense(channels, name=n, **dtypes)(h) for n in ("to_q", "to_k", "to_v"))
        h = dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = nn.Dense(channels, name="to_out_0", **dtypes)(h.reshape(batch, height, width, channels))
        return x.astype(h.dtype) + h
