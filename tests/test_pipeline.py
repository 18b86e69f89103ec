"""Pipeline: a tiny random diffusers StableDiffusionPipeline saved to disk gives the same images
through cxr_ldm.Pipeline from the same latents; save_pretrained round-trips through diffusers."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import cxr_ldm  # noqa: E402
from cxr_ldm.data.tokenizer import load_tokenizer  # noqa: E402
from cxr_ldm.io.run_folder import write_folder_atomically  # noqa: E402

PROMPTS = ["moderate left pleural effusion.", "no acute cardiopulmonary process."]
SCHEDULERS = {
    # SD 1.x as published: PNDM config (read as DDIM / DPM-Solver by both sides).
    "sd1_pndm": ("PNDMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)),
    "v_trailing": ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         prediction_type="v_prediction", timestep_spacing="trailing",
                                         clip_sample=False, rescale_betas_zero_snr=True)),
}
SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # diffusers zero-initialises some layers; make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _torch_pipeline(scheduler_name: str, channels: int):
    torch.manual_seed(0)
    unet = _perturbed(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 1)
    vae = _perturbed(diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(32, 32),
        layers_per_block=1, norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), 2)
    text_encoder = _perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32)), 3)
    class_name, scheduler_config = SCHEDULERS[scheduler_name]
    scheduler = getattr(diffusers, class_name).from_config(scheduler_config)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module", params=[("sd1_pndm", 1), ("v_trailing", 3)], ids=["sd1_gray", "vpred_rgb"])
def pipelines(request, tmp_path_factory):
    scheduler_name, channels = request.param
    reference = _torch_pipeline(scheduler_name, channels)
    folder = tmp_path_factory.mktemp("pipe")
    reference.save_pretrained(folder)
    return reference, cxr_ldm.Pipeline.from_pretrained(folder), folder


def _diffusers_images(reference, folder, sampler, latents, steps, guidance, negative=None, rescale=0.0):
    scheduler_class = getattr(diffusers, SAMPLER_CLASSES[sampler])
    reference.scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        out = reference(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=rescale,
                        negative_prompt=None if negative is None else [negative] * len(PROMPTS),
                        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="np")
    return out.images


@pytest.mark.parametrize("sampler,steps,guidance,negative,rescale", [
    ("ddim", 10, 4.0, None, 0.0), ("dpmpp_2m", 8, 1.0, None, 0.0), ("dpmpp_2m", 8, 3.0, "pneumothorax", 0.0),
    ("ddim", 10, 7.0, None, 0.7)])
def test_same_images_as_diffusers(pipelines, sampler, steps, guidance, negative, rescale):
    reference, pipe, folder = pipelines
    latents = pipe.initial_latents([0, 1], 16, 16)
    expected = _diffusers_images(reference, folder, sampler, latents, steps, guidance, negative, rescale)
    got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=rescale,
               negative_prompt=None if negative is None else [negative] * len(PROMPTS),
               sampler=sampler, latents=latents)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 2e-3
    assert np.abs(got[0] - got[1]).max() > 1e-2  # the prompts matter: the check is not vacuous


def test_save_pretrained_round_trip(pipelines, tmp_path):
    _, pipe, folder = pipelines
    pipe.save_pretrained(tmp_path / "export")
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    original = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert dict(reloaded.scheduler.config) == dict(original.scheduler.config)
    again = cxr_ldm.Pipeline.from_pretrained(tmp_path / "export")
    # Same (batch, steps, sampler) as the parity test: equal pipelines share its compiled function.
    a = pipe(PROMPTS, num_inference_steps=10, seed=5)
    b = again(PROMPTS, num_inference_steps=10, seed=5)
    np.testing.assert_array_equal(a, b)


def test_export_files_get_the_umask_mode(pipelines, tmp_path):
    """As train.py's LDM stage exports: save_pretrained into a folder replaced atomically. Every file (weights,
    configs, tokenizer) gets the mode open() gives a new file, so a shared model folder is readable by others."""
    _, pipe, _ = pipelines
    previous = os.umask(0o027)
    try:
        write_folder_atomically(str(tmp_path / "pipeline"), pipe.save_pretrained)
    finally:
        os.umask(previous)
    modes = {str(f.relative_to(tmp_path / "pipeline")): f.stat().st_mode & 0o777
             for f in (tmp_path / "pipeline").rglob("*") if f.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in modes and "model_index.json" in modes
    assert modes == dict.fromkeys(modes, 0o640)


def test_seeds_are_per_image_and_guidance_values_do_not_recompile(pipelines):
    _, pipe, _ = pipelines
    both = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=4.0)
    alone = pipe(PROMPTS[1:], num_inference_steps=10, seed=9, guidance_scale=4.0)
    np.testing.assert_allclose(both[1], alone[0], atol=5e-4)  # batch size changes float rounding only
    # DDPM's per-step noise is the image's own too: swapping batch positions swaps the images.
    ddpm = pipe(PROMPTS[::-1], num_inference_steps=10, seed=[7, 9], sampler="ddpm")
    swapped = pipe(PROMPTS, num_inference_steps=10, seed=[9, 7], sampler="ddpm")
    np.testing.assert_allclose(ddpm[::-1], swapped, atol=5e-4)
    from cxr_ldm.pipeline import _generate
    compiled = _generate._cache_size()
    stronger = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=7.0)
    assert _generate._cache_size() == compiled
    assert np.abs(stronger - both).max() > 1e-3
    # The rescale is traced too: one compilation serves every value above 0, and the value matters.
    half = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=7.0, guidance_rescale=0.5)
    compiled = _generate._cache_size()
    full = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=7.0, guidance_rescale=1.0)
    assert _generate._cache_size() == compiled
    assert np.abs(half - stronger).max() > 1e-3 and np.abs(full - half).max() > 1e-3


def test_projected_guidance_is_plain_guidance_at_eta_1_and_its_values_are_traced(pipelines):
    _, pipe, _ = pipelines
    from cxr_ldm.pipeline import _generate
    plain = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=7.0)
    # eta 1 without a cap is classifier-free guidance, here through the x0 estimates and back.
    full = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=7.0, apg_eta=1.0)
    np.testing.assert_allclose(full, plain, atol=1e-3)
    compiled = _generate._cache_size()
    capped = pipe(PROMPTS, num_inference_steps=10, seed=[7, 9], guidance_scale=7.0, apg_eta=1.0,
                  apg_norm_threshold=0.01)
    assert _generate._cache_size() == compiled
    assert np.abs(capped - plain).max() > 1e-3
    with pytest.raises(ValueError, match="apg_eta must be None or in"):
        pipe(PROMPTS, apg_eta=1.5)
    with pytest.raises(ValueError, match="apg_norm_threshold must be >= 0"):
        pipe(PROMPTS, apg_eta=0.0, apg_norm_threshold=-1.0)


def test_missing_folder_and_bad_arguments_are_named(pipelines, tmp_path):
    _, pipe, _ = pipelines
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cxr_ldm.Pipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        cxr_ldm.Pipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sampler"):
        pipe(PROMPTS, sampler="euler")
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        pipe(PROMPTS, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(PROMPTS, latents=np.zeros((2, 4, 4, 4), np.float32))


def test_a_prompt_longer_than_the_window_is_cut_without_a_transformers_warning(capfd):
    from cxr_ldm.data.tokenizer import set_prompt_length, truncation
    from cxr_ldm.pipeline import _expand_multi_vector_tokens
    tokenizer = load_tokenizer()
    set_prompt_length(tokenizer, 8)
    prompt = "Large left pleural effusion with compressive atelectasis of the left lower lobe."
    assert _expand_multi_vector_tokens(tokenizer, prompt) == prompt
    assert truncation(tokenizer, prompt)[1] > 8
    assert "Token indices sequence length" not in capfd.readouterr().err
