"""KL autoencoder (the Stable Diffusion VAE) in Flax linen, NHWC, parameter-compatible with diffusers.

Images (B, H, W, C_in) in [-1, 1] encode to a diagonal Gaussian over latents (B, H/f, W/f, latent_channels),
f = 2 ** (len(block_out_channels) - 1); latents decode back to (B, H, W, C_out). Latents are "unscaled":
the diffusion model works on `latents * config.scaling_factor` (after subtracting `shift_factor` if set).
Any channel count works: 1 for grayscale chest X-rays, 3 for the pretrained RGB VAEs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cxr_ldm.json_config import JsonConfig
from cxr_ldm.models.layers import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D, conv, group_norm

Dtype = Any

ENCODER_BLOCK = "DownEncoderBlock2D"
DECODER_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")  # the same function in diffusers
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
EPS = 1e-6  # group-norm epsilon of every VAE layer in diffusers
# config.json keys that carry no model setting.
METADATA_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
SEQUENCE_FIELDS = ("down_block_types", "up_block_types", "block_out_channels", "sample_size", "latents_mean",
                   "latents_std")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(JsonConfig):
    """diffusers `AutoencoderKL` config; field names, meanings and defaults as diffusers has them.

    Attributes:
      in_channels / out_channels: image channels read by the encoder / written by the decoder.
      down_block_types / up_block_types: one entry per resolution; only "DownEncoderBlock2D" /
        "UpDecoderBlock2D" exist in the KL autoencoders this package reads.
      block_out_channels: channels per resolution, highest resolution first.
      layers_per_block: resnets per encoder block (decoder blocks have one more).
      act_fn: "silu" (alias "swish").
      latent_channels: channels of the latent.
      norm_num_groups: groups of every group norm.
      sample_size: training image size (int or (H, W)); metadata only.
      scaling_factor / shift_factor: the diffusion model sees (latents - shift_factor) * scaling_factor.
      latents_mean / latents_std: per-channel latent statistics some checkpoints record; metadata only.
      force_upcast: diffusers pipelines run this VAE in float32; metadata only.
      use_quant_conv / use_post_quant_conv: 1x1 convs after the encoder / before the decoder.
      mid_block_add_attention: self-attention between the two mid-block resnets.

    `from_dict` reads a diffusers config.json dict: missing keys take diffusers' defaults, unknown keys
    draw a warning, values this module cannot reproduce raise ValueError naming the key and `source`.
    `to_dict` writes all fields with diffusers' names; `AutoencoderKL.from_config` accepts it.
    """

    _source = "AutoencoderKL config"
    _ignored_keys = METADATA_KEYS

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (ENCODER_BLOCK,)
    up_block_types: tuple[str, ...] = (DECODER_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for key in SEQUENCE_FIELDS:  # lists (as JSON has them) -> tuples, so that configs hash and compare
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        _validate(self)

    @property
    def downsampling_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.block_out_channels) - 1)


def _validate(c: AutoencoderConfig) -> None:
    """Raises ValueError naming the first field whose value is not supported."""
    def check(ok: bool, key: str, expected: str):
        if not ok:
            raise ValueError(f"'{key}' = {getattr(c, key)!r}: expected {expected}")

    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        check(positive_int(getattr(c, key)), key, "a positive integer")
    check(isinstance(c.block_out_channels, tuple) and len(c.block_out_channels) > 0
          and all(positive_int(ch) and ch % c.norm_num_groups == 0 for ch in c.block_out_channels),
          "block_out_channels", f"a non-empty list of positive multiples of norm_num_groups={c.norm_num_groups}")
    levels = len(c.block_out_channels)
    check(c.down_block_types == (ENCODER_BLOCK,) * levels, "down_block_types",
          f"{levels} x {ENCODER_BLOCK!r} (one per block_out_channels entry)")
    check(c.up_block_types == (DECODER_BLOCK,) * levels, "up_block_types",
          f"{levels} x {DECODER_BLOCK!r} (one per block_out_channels entry)")
    check(c.act_fn in ACTIVATIONS, "act_fn", f"one of {ACTIVATIONS}")
    check(number(c.scaling_factor) and c.scaling_factor > 0, "scaling_factor", "a positive number")
    check(c.shift_factor is None or number(c.shift_factor), "shift_factor", "a number or null")
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        check(isinstance(getattr(c, key), bool), key, "true or false")


def _resnet_class(remat: bool):
    return nn.remat(ResnetBlock2D) if remat else ResnetBlock2D


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets to `out_channels`, then (optionally) a stride-2 conv with (0, 1) padding."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, h, w, C) -> (B, h/2, w/2, out_channels), or (B, h, w, out_channels) without downsampling."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = _resnet_class(self.remat)(self.out_channels, self.groups, EPS, use_time_embedding=False,
                                          name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets to `out_channels`, then (optionally) nearest x2 upsampling and a 3x3 conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, h, w, C) -> (B, 2h, 2w, out_channels), or (B, h, w, out_channels) without upsampling."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = _resnet_class(self.remat)(self.out_channels, self.groups, EPS, use_time_embedding=False,
                                          name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class MidBlock2D(nn.Module):
    """resnets_0 -> attentions_0 (optional) -> resnets_1, all at the input width."""

    groups: int
    add_attention: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, h, w, C) -> (B, h, w, C)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = _resnet_class(self.remat)
        channels = x.shape[-1]
        x = resnet(channels, self.groups, EPS, use_time_embedding=False, name="resnets_0", **kw)(x)
        if self.add_attention:
            attention = nn.remat(SpatialSelfAttention) if self.remat else SpatialSelfAttention
            x = attention(self.groups, EPS, name="attentions_0", **kw)(x)
        return resnet(channels, self.groups, EPS, use_time_embedding=False, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """Image (B, H, W, C_in) -> concatenated moments [mean, logvar] (B, H/f, W/f, 2 * latent_channels)."""

    config: AutoencoderConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(c.block_out_channels[0], 3, name="conv_in", **kw)(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            x = DownEncoderBlock2D(channels, c.layers_per_block, c.norm_num_groups, add_downsample=i < last,
                                   remat=self.remat, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock2D(c.norm_num_groups, c.mid_block_add_attention, self.remat, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(c.norm_num_groups, EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * c.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, C_out)."""

    config: AutoencoderConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(c.block_out_channels[-1], 3, name="conv_in", **kw)(z)
        x = MidBlock2D(c.norm_num_groups, c.mid_block_add_attention, self.remat, name="mid_block", **kw)(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(reversed(c.block_out_channels)):
            x = UpDecoderBlock2D(channels, c.layers_per_block + 1, c.norm_num_groups, add_upsample=i < last,
                                 remat=self.remat, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(c.norm_num_groups, EPS, name="conv_norm_out", **kw)(x))
        return conv(c.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion; params map 1:1 to diffusers' AutoencoderKL.

    Attributes:
      config: the architecture.
      remat: rematerialise resnets and attention in the backward pass (less memory, more compute).
      dtype: computation dtype (group-norm statistics and attention softmax stay float32); `encode`
        and `decode` return float32.
      param_dtype: dtype of the params `init` creates.
    """

    config: AutoencoderConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(c, self.remat, **kw)
        self.decoder = Decoder(c, self.remat, **kw)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, 1, name="quant_conv", **kw)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, 1, name="post_quant_conv", **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each float32 (B, H/f, W/f, latent_channels).

        logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> float32 images (B, h*f, w*f, out_channels), ~[-1, 1]."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images: jax.Array, sample_posterior: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstructs `images` through the posterior mean, or a sample of it (rng stream "gaussian").

        Returns:
          (reconstruction (B, H, W, out_channels), mean, logvar) as in `encode` / `decode`.
        """
        mean, logvar = self.encode(images)
        latents = mean
        if sample_posterior:
            noise = jax.random.normal(self.make_rng("gaussian"), mean.shape, mean.dtype)
            latents = mean + jnp.exp(0.5 * logvar) * noise
        return self.decode(latents), mean, logvar


def dummy_inputs(config: AutoencoderConfig) -> tuple[jax.Array]:
    """Positional args for `AutoencoderKL(config).init(rng, *args)`: one small all-zero image batch."""
    size = 2 * config.downsampling_factor
    return (jnp.zeros((1, size, size, config.in_channels), jnp.float32),)
