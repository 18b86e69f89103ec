"""Original single-file Stable Diffusion 1.x checkpoints -> diffusers-layout state dicts.

A single file (e.g. `v1-5-pruned-emaonly.safetensors`) holds three models under the key prefixes of the
original latent-diffusion code:

    model.diffusion_model.*          UNet            (input_blocks / middle_block / output_blocks)
    first_stage_model.*              VAE             (encoder.down.i.block.j / decoder.up.i ...)
    cond_stage_model.transformer.*   CLIP text model (already in transformers' layout)

The UNet and VAE keys are renamed block by block, using the diffusers config of each model to number the
blocks. Keys that fit no block of that config are reported, never dropped. SD 2.x files (OpenCLIP text
encoder under `cond_stage_model.model.*`) are refused with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np

from cxr_ldm.io import weights

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# Module renames inside one block: LDM sub-module path -> diffusers sub-module path.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# A block table maps an LDM key prefix (ending in ".") to (diffusers key prefix, sub-module renames).
BlockTable = dict[str, tuple[str, Mapping[str, str]]]


class SingleFileError(ValueError):
    """The checkpoint does not fit the expected Stable Diffusion 1.x layout or the given configs."""


def _per_block(value, n: int, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise SingleFileError(f"UNet config: {name}={value!r} does not give one value per block ({n} blocks)")
    return values


def unet_block_table(config: Mapping) -> BlockTable:
    """LDM -> diffusers block prefixes of a diffusers `UNet2DConditionModel` config (SD 1.x / 2.x layout)."""
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    n = len(down_types)
    layers = _per_block(config.get("layers_per_block", 2), n, "layers_per_block")
    table: BlockTable = {
        "time_embed.0.": ("time_embedding.linear_1.", {}), "time_embed.2.": ("time_embedding.linear_2.", {}),
        "input_blocks.0.0.": ("conv_in.", {}), "out.0.": ("conv_norm_out.", {}), "out.2.": ("conv_out.", {}),
    }
    ldm = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            table[f"input_blocks.{ldm}.0."] = (f"down_blocks.{i}.resnets.{j}.", UNET_RESNET)
            if block_type.startswith("CrossAttn"):
                table[f"input_blocks.{ldm}.1."] = (f"down_blocks.{i}.attentions.{j}.", {})
            ldm += 1
        if i < n - 1:
            table[f"input_blocks.{ldm}.0."] = (f"down_blocks.{i}.downsamplers.0.", {"op": "conv"})
            ldm += 1
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise SingleFileError(f"UNet config: mid_block_type={mid_type!r} is not supported; "
                              "expected 'UNetMidBlock2DCrossAttn'")
    table["middle_block.0."] = ("mid_block.resnets.0.", UNET_RESNET)
    table["middle_block.1."] = ("mid_block.attentions.0.", {})
    table["middle_block.2."] = ("mid_block.resnets.1.", UNET_RESNET)
    ldm = 0
    for i, (block_type, count) in enumerate(zip(up_types, reversed(layers))):
        attention = block_type.startswith("CrossAttn")
        for j in range(count + 1):
            table[f"output_blocks.{ldm}.0."] = (f"up_blocks.{i}.resnets.{j}.", UNET_RESNET)
            if attention:
                table[f"output_blocks.{ldm}.1."] = (f"up_blocks.{i}.attentions.{j}.", {})
            if i < n - 1 and j == count:
                table[f"output_blocks.{ldm}.{2 if attention else 1}."] = (f"up_blocks.{i}.upsamplers.0.", {})
            ldm += 1
    return table


def vae_block_table(config: Mapping) -> BlockTable:
    """LDM -> diffusers block prefixes of a diffusers `AutoencoderKL` config (decoder blocks run in reverse)."""
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    table: BlockTable = {"quant_conv.": ("quant_conv.", {}), "post_quant_conv.": ("post_quant_conv.", {})}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        table[f"{part}.norm_out."] = (f"{part}.conv_norm_out.", {})
        table[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        table[f"{part}.mid.block_1."] = (f"{part}.mid_block.resnets.0.", VAE_RESNET)
        table[f"{part}.mid.attn_1."] = (f"{part}.mid_block.attentions.0.", VAE_ATTENTION)
        table[f"{part}.mid.block_2."] = (f"{part}.mid_block.resnets.1.", VAE_RESNET)
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}."] = (f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down.{i}.downsample."] = (f"encoder.down_blocks.{i}.downsamplers.0.", {})
    for i in range(n):
        ldm = n - 1 - i
        for j in range(layers + 1):
            table[f"decoder.up.{ldm}.block.{j}."] = (f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET)
        if i < n - 1:
            table[f"decoder.up.{ldm}.upsample."] = (f"decoder.up_blocks.{i}.upsamplers.0.", {})
    return table


def _rename_blocks(state: Mapping[str, np.ndarray], table: BlockTable, what: str) -> dict[str, np.ndarray]:
    """Renames every key by its longest block prefix in `table`; raises listing keys that fit no block."""
    out, unmatched = {}, []
    for key, value in state.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n]) + "."
            if prefix in table:
                new_prefix, renames = table[prefix]
                module, _, leaf = key[len(prefix):].rpartition(".")
                module = renames.get(module, module)
                out[f"{new_prefix}{module}.{leaf}" if module else f"{new_prefix}{leaf}"] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise SingleFileError(f"{what}: {len(unmatched)} key(s) fit no block of the given config: "
                              f"{sorted(unmatched)[:20]}")
    return out


def _with_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_unet(state: Mapping[str, np.ndarray], config: Mapping, *, extract_ema: bool = False) -> dict:
    """UNet weights of a single-file checkpoint, in diffusers' `UNet2DConditionModel` layout.

    Args:
      state: the whole single-file state dict.
      config: the diffusers UNet config.json dict.
      extract_ema: take the EMA copy (`model_ema.*`, in full training checkpoints) instead of the raw weights.
    """
    unet = _with_prefix(state, UNET_PREFIX)
    if not unet:
        raise SingleFileError(f"no UNet weights: no key starts with {UNET_PREFIX!r}")
    if extract_ema:
        # The EMA copy names each tensor by its key with the dots after "model." removed.
        ema_keys = {k: "model_ema." + "".join((UNET_PREFIX + k).split(".")[1:]) for k in unet}
        missing = [e for e in ema_keys.values() if e not in state]
        if missing:
            raise SingleFileError(f"extract_ema=True but {len(missing)} EMA tensor(s) are missing, e.g. {missing[0]}")
        unet = {k: state[e] for k, e in ema_keys.items()}
    return _rename_blocks(unet, unet_block_table(config), "UNet")


def convert_vae(state: Mapping[str, np.ndarray], config: Mapping) -> dict:
    """VAE weights in diffusers' `AutoencoderKL` layout (1x1-conv attention projections become Linear)."""
    vae = {k: v for k, v in _with_prefix(state, VAE_PREFIX).items() if not k.startswith("loss.")}
    if not vae:
        raise SingleFileError(f"no VAE weights: no key starts with {VAE_PREFIX!r}")
    out = _rename_blocks(vae, vae_block_table(config), "VAE")
    for key, value in out.items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 4:
            out[key] = value[:, :, 0, 0]
    return out


def convert_text_encoder(state: Mapping[str, np.ndarray]) -> dict:
    """CLIP text-encoder weights in transformers' `CLIPTextModel` layout ("text_model." keys)."""
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        raise SingleFileError("this checkpoint has an OpenCLIP text encoder (cond_stage_model.model.*, "
                              "Stable Diffusion 2.x); only SD 1.x single files (CLIP ViT-L/14) are supported. "
                              "Convert it with diffusers first, or use a diffusers folder.")
    clip = _with_prefix(state, CLIP_PREFIX)
    if not clip:
        raise SingleFileError(f"no text encoder weights: no key starts with {CLIP_PREFIX!r}")
    # Files saved with old transformers versions lack the "text_model." level and keep the position_ids buffer.
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.items()
            if not k.endswith("embeddings.position_ids")}


def read_single_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` single file (a `.ckpt` pickle only with `allow_pickle=True`, for trusted files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return weights.read_safetensors(path)
    if not allow_pickle:
        raise ValueError(f"{path} is not a .safetensors file; pickles can run code when loaded. Pass "
                         "allow_pickle=True only for a file you trust, or convert it to safetensors.")
    return weights.read_pickle(path)


def convert_single_file(checkpoint: str | os.PathLike, config_dir: str | os.PathLike,
                        out_dir: str | os.PathLike, *, extract_ema: bool = False,
                        allow_pickle: bool = False) -> Path:
    """Writes a diffusers pipeline folder from a single-file SD 1.x checkpoint.

    Args:
      checkpoint: the single file.
      config_dir: a diffusers pipeline folder giving the configs: `unet/config.json`, `vae/config.json`,
        `text_encoder/config.json`; `model_index.json`, `scheduler/` and `tokenizer/` are copied when present.
        Weights in it are not read.
      out_dir: the folder to write (created; must not exist yet).
    Returns:
      out_dir, loadable with `load_component(out_dir / "unet")` etc. and diffusers' `from_pretrained`.
    """
    config_dir, out_dir = Path(config_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output folder")
    configs = {}
    for name in ("unet", "vae", "text_encoder"):
        file = config_dir / name / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{config_dir} lacks {name}/config.json, needed to convert the {name}")
        configs[name] = json.loads(file.read_text())
    state = read_single_file(checkpoint, allow_pickle=allow_pickle)
    converted = {"unet": convert_unet(state, configs["unet"], extract_ema=extract_ema),
                 "vae": convert_vae(state, configs["vae"]),
                 "text_encoder": convert_text_encoder(state)}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("scheduler", "tokenizer", "feature_extractor"):
        if (config_dir / name).is_dir():
            shutil.copytree(config_dir / name, tmp / name)
    if (config_dir / "model_index.json").is_file():
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copy(config_dir / "model_index.json", tmp / "model_index.json")
    for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        weights.write_safetensors(tmp / name / f"{stem}.safetensors", converted[name])
        weights.write_json(tmp / name / "config.json", configs[name])
    os.replace(tmp, out_dir)
    return out_dir
