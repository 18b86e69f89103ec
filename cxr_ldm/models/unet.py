"""Stable Diffusion's conditional UNet (diffusers `UNet2DConditionModel`, SD 1.x / 2.x configs) in Flax.

`UNetConfig` reads diffusers' unet/config.json; `UNet2DConditionModel` computes what diffusers computes
for that config, on NHWC tensors, with parameters named after the PyTorch modules so that
`cxr_ldm.io.convert` maps them to state-dict keys ("down_blocks.0.attentions.0.proj_in.weight" <->
("down_blocks_0", "attentions_0", "proj_in", "kernel")).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_ldm.json_config import JsonConfig
from cxr_ldm.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    dot_product_attention,
    group_norm,
    remat,
)
from cxr_ldm.models.transformer import Transformer2DModel

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# config.json keys diffusers writes for its own bookkeeping.
_BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
# diffusers options this module implements only at these values (diffusers' defaults).
_FIXED_VALUES = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "dropout": 0.0, "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "reverse_transformer_layers_per_block": None,
}
# diffusers options that only affect block or embedding types rejected above, so any value is harmless.
_INERT_KEYS = frozenset({"resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
                         "mid_block_only_cross_attention", "addition_time_embed_dim",
                         "projection_class_embeddings_input_dim"})
ADDITION_EMBED_TYPES = (None, "text")


def _tuple(value: Any) -> Any:
    """JSON lists -> tuples (hashable, as Flax module fields must be); other values unchanged."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _same(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torch Conv2d(padding=(kernel - 1) // 2) as a Flax padding spec."""
    pad = (kernel - 1) // 2
    return ((pad, pad), (pad, pad))


@dataclasses.dataclass(frozen=True)
class UNetConfig(JsonConfig):
    """The diffusers `UNet2DConditionModel` options this module implements (names and defaults as diffusers').

    Per-block options (`layers_per_block`, `transformer_layers_per_block`, `attention_head_dim`,
    `num_attention_heads`) are an int for all blocks or a tuple with one entry per down block.

    Heads: diffusers builds every attention block with `num_attention_heads or attention_head_dim` heads
    of width `channels // heads` (the key `attention_head_dim` of SD configs holds a head *count*).
    `heads_per_block` gives that count; `to_dict` writes it under `attention_head_dim`, the only
    spelling diffusers' `from_pretrained` accepts.

    `from_dict` reads a diffusers config.json dict: an option this module implements only at one value
    raises ValueError naming `source` and the key when it has another; unknown keys draw a warning.
    """

    _source = "UNet config"
    _ignored_keys = _BOOKKEEPING_KEYS | _INERT_KEYS
    _unknown_keys_message = "{source}: ignoring unknown UNet2DConditionModel config keys {keys}"

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: int | None = None
    # "text": the text states, attention-pooled (`TextTimeEmbedding`), are added to the timestep embedding,
    # so every resnet, including those of blocks without attention, sees the prompt.
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _tuple(getattr(self, field.name)))
        self._validate()

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def per_block(self, name: str) -> tuple:
        """The per-block option `name` as a tuple with one entry per down block."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.num_blocks

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads of each down block (diffusers: `num_attention_heads or attention_head_dim`)."""
        return self.per_block("num_attention_heads" if self.num_attention_heads is not None
                              else "attention_head_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def _validate(self) -> None:
        n = self.num_blocks
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; block_out_channels has {n}")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"{name}: unsupported block type(s) {bad}; expected {allowed}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (len(value) != n or not all(isinstance(v, int) for v in value)):
                raise ValueError(f"{name}={value}: expected an int or {n} ints (one per block)")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; expected 'silu'")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim={self.cross_attention_dim}: expected one int for all blocks")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"norm_num_groups={self.norm_num_groups}: expected an int (None is not supported)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        alone = sorted({c for c in self.block_out_channels if c == self.norm_num_groups})
        if alone:
            warnings.warn(f"UNet block_out_channels {alone} equal norm_num_groups={self.norm_num_groups}: each "
                          "GroupNorm group holds one channel, so norm2 of those blocks' ResnetBlock2D removes the "
                          "timestep embedding added just before it (they denoise blind to the noise level); use "
                          "fewer groups", stacklevel=4)
        for heads, channels in zip(self.heads_per_block, self.block_out_channels):
            if heads < 1 or channels // heads < 1:
                raise ValueError(f"{heads} attention heads do not fit {channels} channels")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported; expected one "
                             f"of {ADDITION_EMBED_TYPES}")
        if self.addition_embed_type and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ValueError(f"addition_embed_type_num_heads={self.addition_embed_type_num_heads} does not divide "
                             f"cross_attention_dim={self.cross_attention_dim}")

    @classmethod
    def _read_key(cls, key: str, value: Any, source: str) -> bool:
        """Options implemented at one value only: another value raises ValueError."""
        if key not in _FIXED_VALUES:
            return False
        expected = _FIXED_VALUES[key]
        ok = value == expected or (key == "only_cross_attention" and isinstance(value, list) and not any(value))
        if not ok:
            raise ValueError(f"{source}: {key}={value!r} is not supported by cxr_ldm's "
                             f"UNet2DConditionModel (only {expected!r})")
        return True

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers writes it (keys of `UNet2DConditionModel.__init__`, JSON types)."""
        out = super().to_dict()
        if out["num_attention_heads"] is not None:
            out.update(attention_head_dim=out["num_attention_heads"], num_attention_heads=None)
        return out


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding`: (B,) timesteps -> (B, dim) float32 sinusoidal features.

    Frequencies exp(-ln(max_period) * i / (dim / 2 - freq_shift)), i < dim / 2; [sin, cos] halves
    ([cos, sin] with `flip_sin_to_cos`); zero-padded to `dim` when odd.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: (B, C_in) sinusoidal features -> (B, features)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.linear_1 = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype)
        self.linear_2 = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class AttentionPooling(nn.Module):
    """diffusers `AttentionPooling`: (B, L, D) states -> (B, D). One query, the mean state plus a learned
    offset, attends with `heads` heads over itself and the L states."""

    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, width = x.shape
        offset = self.param("positional_embedding", nn.initializers.normal(width ** -0.5), (1, width),
                            self.param_dtype)
        query_state = x.mean(axis=1, keepdims=True) + offset.astype(x.dtype)
        x = jnp.concatenate([query_state, x], axis=1)
        dense = lambda name: nn.Dense(width, name=name, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, width // self.heads)
        q, k, v = split(dense("q_proj")(query_state)), split(dense("k_proj")(x)), split(dense("v_proj")(x))
        return dot_product_attention(q, k, v).reshape(batch, width)


class TextTimeEmbedding(nn.Module):
    """diffusers `TextTimeEmbedding`: (B, L, D) text states -> (B, features), added to the timestep embedding.
    LayerNorm, attention pooling, linear map, LayerNorm."""

    features: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1 = nn.LayerNorm(epsilon=1e-5, **dtypes)
        self.pool = AttentionPooling(self.heads, **dtypes)
        self.proj = nn.Dense(self.features, **dtypes)
        self.norm2 = nn.LayerNorm(epsilon=1e-5, **dtypes)

    def __call__(self, states: jax.Array) -> jax.Array:
        return self.norm2(self.proj(self.pool(self.norm1(states))))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one down/mid/up block needs from the UNet config.

    heads == 0 means no attention (DownBlock2D / UpBlock2D).
    """

    out_channels: int
    num_layers: int
    heads: int = 0
    transformer_layers: int = 1


class _UNetBlock(nn.Module):
    """Shared fields and sub-module factories of the down, mid and up blocks."""

    spec: BlockSpec
    config: UNetConfig
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str | None = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def resnet(self, scale: float = 1.0) -> nn.Module:
        block = remat(ResnetBlock2D, self.remat_policy) if self.remat else ResnetBlock2D
        return block(self.spec.out_channels, groups=self.config.norm_num_groups, eps=self.config.norm_eps,
                     output_scale_factor=scale, dtype=self.dtype, param_dtype=self.param_dtype)

    def transformer(self) -> nn.Module:
        channels, heads = self.spec.out_channels, self.spec.heads
        return Transformer2DModel(channels, heads, channels // heads, self.spec.transformer_layers,
                                  self.config.norm_num_groups, self.config.use_linear_projection, self.remat,
                                  self.remat_policy, self.attention_impl, dtype=self.dtype,
                                  param_dtype=self.param_dtype)


class DownBlock(_UNetBlock):
    """diffusers `CrossAttnDownBlock2D` (spec.heads > 0) or `DownBlock2D`, with optional downsampler."""

    add_downsample: bool = True

    def setup(self):
        self.resnets = [self.resnet() for _ in range(self.spec.num_layers)]
        if self.spec.heads:
            self.attentions = [self.transformer() for _ in range(self.spec.num_layers)]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.spec.out_channels, self.config.downsample_padding,
                                              dtype=self.dtype, param_dtype=self.param_dtype)]

    def __call__(self, x, temb, context):
        """x: (B, H, W, C_in) -> (x_out, skips): the output and every intermediate the up path consumes."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.spec.heads:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_UNetBlock):
    """diffusers `UNetMidBlock2DCrossAttn`: resnet, then `num_layers` x (transformer, resnet)."""

    def setup(self):
        scale = self.config.mid_block_scale_factor
        self.resnets = [self.resnet(scale) for _ in range(self.spec.num_layers + 1)]
        self.attentions = [self.transformer() for _ in range(self.spec.num_layers)]

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UpBlock(_UNetBlock):
    """diffusers `CrossAttnUpBlock2D` (spec.heads > 0) or `UpBlock2D`, with optional upsampler."""

    add_upsample: bool = True

    def setup(self):
        self.resnets = [self.resnet() for _ in range(self.spec.num_layers)]
        if self.spec.heads:
            self.attentions = [self.transformer() for _ in range(self.spec.num_layers)]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.spec.out_channels, dtype=self.dtype, param_dtype=self.param_dtype)]

    def __call__(self, x, skips, temb, context, upsample_size=None):
        """Consumes `skips` last-first (one per resnet), concatenated on channels before each resnet."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1), temb)
            if self.spec.heads:
                x = self.attentions[i](x, context)
        if self.add_upsample:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """Noise-prediction UNet conditioned on timesteps and text states (diffusers `UNet2DConditionModel`).

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. bfloat16 on accelerators); param_dtype: parameter dtype.
      remat: rematerialise every ResnetBlock2D and BasicTransformerBlock in the backward pass
        (same values and gradients, less activation memory).
      remat_policy: what the rematerialised blocks keep, a key of `layers.REMAT_POLICIES` ("full": nothing).
      attention_impl: `layers.dot_product_attention`'s implementation ("auto": cuDNN on GPU in bf16/fp16,
        the Pallas flash kernel on TPU, XLA otherwise; None or "xla": XLA; "cudnn"; "pallas").
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "full"
    attention_impl: str | None = "auto"

    def setup(self):
        cfg = self.config
        common = dict(config=cfg, remat=self.remat, remat_policy=self.remat_policy,
                      attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels, n = cfg.block_out_channels, cfg.num_blocks
        layers, depth = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")
        heads = [h if t.startswith("CrossAttn") else 0 for h, t in zip(cfg.heads_per_block, cfg.down_block_types)]
        up_heads = [h if t.startswith("CrossAttn") else 0
                    for h, t in zip(cfg.heads_per_block[::-1], cfg.up_block_types)]

        self.conv_in = conv(channels[0], cfg.conv_in_kernel, name=None, padding=_same(cfg.conv_in_kernel), **dtypes)
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, **dtypes)
        if cfg.addition_embed_type == "text":
            self.add_embedding = TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads, **dtypes)
        self.down_blocks = [
            DownBlock(BlockSpec(channels[i], layers[i], heads[i], depth[i]), add_downsample=i < n - 1, **common)
            for i in range(n)]
        self.mid_block = MidBlock(BlockSpec(channels[-1], 1, cfg.heads_per_block[-1], depth[-1]), **common)
        self.up_blocks = [
            UpBlock(BlockSpec(channels[::-1][i], layers[::-1][i] + 1, up_heads[i], depth[::-1][i]),
                    add_upsample=i < n - 1, **common)
            for i in range(n)]
        self.conv_norm_out = group_norm(cfg.norm_num_groups, cfg.norm_eps, name=None, **dtypes)
        self.conv_out = conv(cfg.out_channels, cfg.conv_out_kernel, name=None, padding=_same(cfg.conv_out_kernel),
                             **dtypes)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | int, encoder_hidden_states: jax.Array,
                 train: bool = False) -> jax.Array:
        """Predicts the diffusion model output (noise, v or x0, as trained).

        Args:
          sample: (B, h, w, in_channels) noisy latents.
          timesteps: int or float, scalar or (B,).
          encoder_hidden_states: (B, L, cross_attention_dim) text-encoder states.
          train: accepted for a uniform model interface; the network has no dropout (config dropout is 0).
        Returns:
          (B, h, w, out_channels) in the compute dtype.
        """
        del train
        cfg = self.config
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states {encoder_hidden_states.shape} are "
                             f"{encoder_hidden_states.shape[-1]} wide; this UNet's cross_attention_dim is "
                             f"{cfg.cross_attention_dim} (its text encoder must output that width)")
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.addition_embed_type == "text":
            temb = temb + self.add_embedding(context)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)

        # diffusers passes explicit upsample sizes when h or w is not a multiple of the total down factor.
        factor = 2 ** (cfg.num_blocks - 1)
        forward_size = any(d % factor for d in sample.shape[1:3])
        for block in self.up_blocks:
            count = block.spec.num_layers
            block_skips, skips = skips[-count:], skips[:-count]
            size = tuple(skips[-1].shape[1:3]) if forward_size and block.add_upsample else None
            x = block(x, tuple(block_skips), temb, context, size)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


def dummy_inputs(config: UNetConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Smallest valid (sample, timesteps, encoder_hidden_states) for `module.init(rng, *inputs)`."""
    size = 2 ** (config.num_blocks - 1)
    return (jnp.zeros((1, size, size, config.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32))
