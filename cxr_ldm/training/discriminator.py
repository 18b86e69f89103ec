"""PatchGAN discriminator for autoencoder training (the NLayerDiscriminator of pix2pix / taming-transformers).

Batch normalisation is replaced by group normalisation so that the loss of an example does not depend on
the other examples of its batch (and so not on how the batch is split over devices).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchDiscriminator(nn.Module):
    """images (B, H, W, C) in [-1, 1] -> real/fake logits (B, H', W', 1), one per overlapping patch.

    Attributes:
      base_channels: channels of the first conv (ndf); doubled per layer up to 8x.
      num_layers: strided 4x4 conv layers after the first (receptive field 70 px for 3).
      norm_groups: group-norm groups (capped by the channel count).
    """

    base_channels: int = 64
    num_layers: int = 3
    norm_groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        conv = lambda ch, stride, bias, name: nn.Conv(
            ch, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
            kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = nn.leaky_relu(conv(self.base_channels, 2, True, "conv_0")(images.astype(self.dtype)), 0.2)
        for i in range(1, self.num_layers + 1):
            channels = self.base_channels * min(2 ** i, 8)
            stride = 2 if i < self.num_layers else 1
            x = conv(channels, stride, False, f"conv_{i}")(x)
            x = nn.GroupNorm(min(self.norm_groups, channels), dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return conv(1, 1, True, f"conv_{self.num_layers + 1}")(x).astype(jnp.float32)
