"""A tiny random diffusers StableDiffusionPipeline (PyTorch, SD 1.x- or 2.x-like), the reference that pipeline,
CLI and training tests save in the layouts a download can have, and a check of loaded params against its tensors."""
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


def tiny_sd_pipeline(resolution: int = 16, sd2: bool = False) -> diffusers.StableDiffusionPipeline:
    """A random pipeline with a DDIM scheduler; every weight is perturbed (diffusers zero-initialises output
    layers), so that the prompt and the noise matter.

    resolution: the image side, 16 (a VAE of 2 blocks: latents 8x8x4) or 64 (3 blocks: latents 16x16x4, the
      smallest side of the MIMIC-CXR-JPG and Open-i builders).
    sd2: SD 2.x's choices, else SD 1.x's: a v-prediction scheduler, linear projections in the UNet's
      transformers, GELU in the text encoder and a 3-channel VAE (SD 1.x here: epsilon, 1 channel).
    """
    if resolution not in (16, 64):
        raise ValueError(f"tiny_sd_pipeline: resolution {resolution}; expected 16 or 64")
    vae_blocks = 2 if resolution == 16 else 3
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=resolution // 2 ** (vae_blocks - 1), in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
        use_linear_projection=sd2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    channels = 3 if sd2 else 1
    vae = diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(16,) * vae_blocks,
        layers_per_block=1, norm_num_groups=8, sample_size=resolution,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, hidden_act="gelu" if sd2 else "quick_gelu"))
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                        prediction_type="v_prediction" if sd2 else "epsilon")
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


def save_downloads(root: Path, resolution: int = 16) -> Downloads:
    """Saves `tiny_sd_pipeline(resolution)` under `root` in the layouts of `Downloads`."""
    reference = tiny_sd_pipeline(resolution)
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
