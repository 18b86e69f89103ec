"""Analytic FLOP count of `UNet2DConditionModel`: the matmuls and convolutions, 2 FLOPs per multiply-add.

What it leaves out (norms, activations, softmax, residual adds, the sinusoidal timestep features) is a few
percent of XLA's count at SD sizes; more at tiny widths, where the elementwise work weighs relatively more.
`addition_embed_type="text"`'s pooled text embedding is not counted either.
"""
from __future__ import annotations

import math

from cxr_ldm.models.unet import UNetConfig

# A train step runs the forward pass once and the backward pass, which costs two forwards (gradients of
# the inputs and of the weights of every matmul and convolution).
TRAIN_STEP_FORWARDS = 3


def _conv(pixels: int, kernel: int, c_in: int, c_out: int) -> int:
    return 2 * pixels * kernel * kernel * c_in * c_out


def _resnet(pixels: int, c_in: int, c_out: int, temb: int) -> int:
    shortcut = _conv(pixels, 1, c_in, c_out) if c_in != c_out else 0
    return _conv(pixels, 3, c_in, c_out) + _conv(pixels, 3, c_out, c_out) + 2 * temb * c_out + shortcut


def _transformer(pixels: int, channels: int, depth: int, text_len: int, context: int) -> int:
    """Transformer2DModel of `channels` (= heads * head_dim) over `pixels` tokens, with `depth` blocks."""
    tokens, width = pixels, channels
    self_attention = 4 * 2 * tokens * width * width + 2 * 2 * tokens * tokens * width
    cross_attention = (2 * 2 * tokens * width * width + 2 * 2 * text_len * context * width
                       + 2 * 2 * tokens * text_len * width)
    feed_forward = 2 * tokens * width * 8 * width + 2 * tokens * 4 * width * width  # GEGLU: 2 x 4 x width
    return 2 * 2 * tokens * channels * width + depth * (self_attention + cross_attention + feed_forward)


def forward_flops(config: UNetConfig, batch: int, height: int, width: int, text_len: int) -> int:
    """FLOPs of one forward pass on (batch, height, width, in_channels) latents and text_len text states."""
    cfg, temb = config, config.time_embed_dim
    heads = [h if t.startswith("CrossAttn") else 0 for h, t in zip(cfg.heads_per_block, cfg.down_block_types)]
    up_attention = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    layers, depth = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")
    attend = lambda pixels, c, d: _transformer(pixels, c, d, text_len, cfg.cross_attention_dim)

    h, w = height, width
    flops = 2 * cfg.block_out_channels[0] * temb + 2 * temb * temb  # time embedding MLP
    channels = cfg.block_out_channels[0]
    flops += _conv(h * w, cfg.conv_in_kernel, cfg.in_channels, channels)
    skips = [(channels, h * w)]
    for i, c in enumerate(cfg.block_out_channels):
        for _ in range(layers[i]):
            flops += _resnet(h * w, channels, c, temb) + (attend(h * w, c, depth[i]) if heads[i] else 0)
            channels = c
            skips.append((c, h * w))
        if i < cfg.num_blocks - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            flops += _conv(h * w, 3, c, c)
            skips.append((c, h * w))
    flops += 2 * _resnet(h * w, channels, channels, temb) + attend(h * w, channels, depth[-1])  # mid block
    for i, c in enumerate(cfg.block_out_channels[::-1]):
        for _ in range(layers[::-1][i] + 1):
            skip_channels, pixels = skips.pop()
            flops += _resnet(pixels, channels + skip_channels, c, temb)
            flops += attend(pixels, c, depth[::-1][i]) if up_attention[i] else 0
            channels = c
        if i < cfg.num_blocks - 1:
            pixels = skips[-1][1]
            flops += _conv(pixels, 3, c, c)
    flops += _conv(height * width, cfg.conv_out_kernel, channels, cfg.out_channels)
    return batch * flops


def train_step_flops(config: UNetConfig, batch: int, height: int, width: int, text_len: int) -> int:
    """FLOPs of one UNet training step (forward and backward; the optimizer update is negligible)."""
    return TRAIN_STEP_FORWARDS * forward_flops(config, batch, height, width, text_len)
