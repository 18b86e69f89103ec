"""A tiny random diffusers StableDiffusionPipeline (PyTorch), the reference that pipeline and CLI tests save
in the layouts a download can have, and a check of loaded params against its tensors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from flax import traverse_util

from cxr_ldm.data.tokenizer import load_tokenizer
from cxr_ldm.io import convert


def tiny_sd_pipeline() -> diffusers.StableDiffusionPipeline:
    """A random pipeline with a 1-channel VAE (16x16 px, latents 8x8x4) and a DDIM scheduler; every weight is
    perturbed (diffusers zero-initialises output layers), so that the prompt and the noise matter."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16))
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def state_dicts(reference: diffusers.StableDiffusionPipeline) -> dict[str, dict[str, np.ndarray]]:
    """{"unet", "vae", "text_encoder"} -> that component's tensors as float32 numpy, keys without the text
    encoder's "text_model." prefix."""
    return {name: {k.removeprefix("text_model."): v.float().numpy().copy()
                   for k, v in getattr(reference, name).state_dict().items()}
            for name in ("unet", "vae", "text_encoder")}


def assert_params_equal(params, state_dict: dict[str, np.ndarray]) -> None:
    """Every Flax param equals the tensor of the same PyTorch key, layout converted (buffers such as
    position_ids have no param and are skipped)."""
    for path, value in traverse_util.flatten_dict(params).items():
        key = convert.flax_path_to_torch_key(path)
        want = convert.torch_to_flax_layout(state_dict[key], path[-1])
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=key)


@dataclasses.dataclass(frozen=True)
class Downloads:
    """One tiny pipeline saved as a download can hold it, and the tensors each save holds.

    Attributes:
      safetensors: the plain diffusers save.
      pickle: every component as a PyTorch pickle only (`diffusion_pytorch_model.bin`, `pytorch_model.bin`).
      variants: float32 weights beside an fp16 variant (`*.fp16.safetensors`).
      fp32 / fp16: `state_dicts` of the float32 weights and of their fp16 rounding (as float32).
    """

    safetensors: Path
    pickle: Path
    variants: Path
    fp32: dict
    fp16: dict


def save_downloads(root: Path) -> Downloads:
    """Saves `tiny_sd_pipeline()` under `root` in the layouts of `Downloads`."""
    reference = tiny_sd_pipeline()
    reference.save_pretrained(root / "safetensors")
    reference.save_pretrained(root / "pickle", safe_serialization=False)
    # transformers 5 writes safetensors whatever it is asked; older SD downloads hold the text encoder as a
    # pickle with "text_model."-prefixed keys.
    text = root / "pickle" / "text_encoder"
    torch.save({f"text_model.{k}": v for k, v in reference.text_encoder.state_dict().items()},
               text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    reference.save_pretrained(root / "variants")
    fp32 = state_dicts(reference)
    reference.to(torch.float16).save_pretrained(root / "variants", variant="fp16")
    return Downloads(root / "safetensors", root / "pickle", root / "variants", fp32, state_dicts(reference))
