"""Pipeline editing on a tiny random folder: img2img and inpainting (latent blending and a 9-channel
inpainting UNet) equal diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline given
the same image, mask, prompt, strength and noise; DDIM inversion equals diffusers' DDIMInverseScheduler loop."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers import pipelines  # noqa: E402

import cxr_ldm  # noqa: E402

PROMPTS = ["moderate left pleural effusion.", "no acute cardiopulmonary process."]
SCHEDULER_CLASSES = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(the diffusers reference, ours from its saved folder, the folder): 1-channel 16x16, latents 8x8x4."""
    reference = pipelines.tiny_sd_pipeline()
    folder = tmp_path_factory.mktemp("pipe")
    reference.save_pretrained(folder)
    return reference, cxr_ldm.Pipeline.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    """Two smooth 16x16 grayscale images (B, H, W, 1) in [0, 1]."""
    y, x = np.mgrid[0:16, 0:16] / 15.0
    return np.stack([0.5 + 0.4 * np.sin(3 * x + y), 0.3 + 0.6 * x * y])[..., None].astype(np.float32)


def _generator_draws(seed: int, shape: tuple, count: int) -> list[np.ndarray]:
    """The first `count` standard normal draws (NCHW `shape`) of a torch generator seeded `seed`, as NHWC."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).numpy().transpose(0, 2, 3, 1) for _ in range(count)]


@pytest.mark.parametrize("sampler,steps,strength,guidance", [
    ("ddim", 10, 0.6, 4.0), ("ddim", 8, 1.0, 1.0), ("dpmpp_2m", 10, 0.55, 3.0)])
def test_img2img_equals_diffusers(pipes, films, sampler, steps, strength, guidance):
    reference, pipe, folder = pipes
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = SCHEDULER_CLASSES[sampler].from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        expected = img2img(PROMPTS, image=torch.from_numpy(films.transpose(0, 3, 1, 2)), strength=strength,
                           num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                           generator=torch.Generator().manual_seed(3)).images
    # diffusers draws the VAE posterior sample first, then the start noise, from the one generator.
    encode_noise, noise = _generator_draws(3, (2, 4, 8, 8), 2)
    got = pipe.img2img(films, PROMPTS, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                       sampler=sampler, noise=noise, encode_noise=encode_noise)
    assert got.shape == expected.shape == (2, 16, 16, 1)
    assert np.abs(got - expected).max() < 2e-3
    other = pipe.img2img(films, PROMPTS, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                         sampler=sampler, noise=-noise, encode_noise=encode_noise)
    assert np.abs(other - expected).max() > 1e-2  # the noise matters: the check is not vacuous


@pytest.mark.parametrize("strength,steps,message", [
    (0.0, 10, r"strength = 0.0: expected a number in \(0, 1\]"), (1.5, 10, r"expected a number in \(0, 1\]"),
    (0.05, 10, "runs no step"),
])
def test_img2img_refuses_a_strength_that_runs_nothing(pipes, films, strength, steps, message):
    _, pipe, _ = pipes
    with pytest.raises(ValueError, match=message):
        pipe.img2img(films, PROMPTS, strength=strength, num_inference_steps=steps)


@pytest.fixture(scope="module")
def masks() -> np.ndarray:
    """Repaint a rectangle (rows 4-11, columns 6-13) of the first image and the left half of the second."""
    masks = np.zeros((2, 16, 16, 1), np.float32)
    masks[0, 4:12, 6:14] = 1.0
    masks[1, :, :8] = 1.0
    return masks


def _diffusers_inpaint(reference, folder, sampler, films, masks, steps, guidance, strength, latents=None):
    inpaint = diffusers.StableDiffusionInpaintPipeline(**reference.components)
    inpaint.scheduler = SCHEDULER_CLASSES[sampler].from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        return inpaint(PROMPTS, image=torch.from_numpy(films.transpose(0, 3, 1, 2)),
                       mask_image=torch.from_numpy(masks.transpose(0, 3, 1, 2)), height=16, width=16,
                       strength=strength, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                       latents=None if latents is None else torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                       generator=torch.Generator().manual_seed(5)).images


@pytest.mark.parametrize("sampler,steps,strength,guidance", [
    ("ddim", 10, 1.0, 4.0), ("dpmpp_2m", 8, 1.0, 3.0), ("ddim", 10, 0.7, 4.0)])
def test_inpaint_by_latent_blending_equals_diffusers(pipes, films, masks, sampler, steps, strength, guidance):
    reference, pipe, folder = pipes
    # diffusers draws the image's posterior sample, then (without latents) the start noise, from one generator.
    encode_noise, drawn = _generator_draws(5, (2, 4, 8, 8), 2)
    latents = pipe.initial_latents([0, 1], 16, 16) if strength == 1.0 else None
    expected = _diffusers_inpaint(reference, folder, sampler, films, masks, steps, guidance, strength, latents)
    noise = drawn if latents is None else latents
    got = pipe.inpaint(films, masks, PROMPTS, strength=strength, num_inference_steps=steps,
                       guidance_scale=guidance, sampler=sampler, noise=noise, encode_noise=encode_noise)
    assert got.shape == expected.shape == (2, 16, 16, 1)
    assert np.abs(got - expected).max() < 2e-3
    plain = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, latents=noise) \
        if strength == 1.0 else pipe.img2img(films, PROMPTS, strength=strength, num_inference_steps=steps,
                                             guidance_scale=guidance, sampler=sampler, noise=noise,
                                             encode_noise=encode_noise)
    assert np.abs(plain - expected).max() > 1e-2  # the blending matters: the check is not vacuous


@pytest.fixture(scope="module")
def inpainting_pipes(tmp_path_factory):
    """A tiny SD inpainting checkpoint: the UNet reads 9 channels (latents, mask, masked-image latents)."""
    reference = pipelines.tiny_sd_pipeline()
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**{**reference.unet.config, "in_channels": 9})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inpaint = diffusers.StableDiffusionInpaintPipeline(**{**reference.components, "unet": unet.eval()})
    folder = tmp_path_factory.mktemp("inpaint_pipe")
    inpaint.save_pretrained(folder)
    return inpaint, cxr_ldm.Pipeline.from_pretrained(folder), folder


def test_inpainting_checkpoint_equals_diffusers(inpainting_pipes, films, masks):
    reference, pipe, folder = inpainting_pipes
    assert pipe.is_inpainting_model
    latents = pipe.initial_latents([0, 1], 16, 16)
    expected = _diffusers_inpaint(reference, folder, "ddim", films, masks, 10, 4.0, 1.0, latents)
    # Given latents at strength 1, diffusers encodes only the masked image: the generator's first draw.
    (masked_encode_noise,) = _generator_draws(5, (2, 4, 8, 8), 1)
    got = pipe.inpaint(films, masks, PROMPTS, num_inference_steps=10, guidance_scale=4.0, noise=latents,
                       masked_encode_noise=masked_encode_noise)
    assert np.abs(got - expected).max() < 2e-3
    other = pipe.inpaint(films, 1.0 - masks, PROMPTS, num_inference_steps=10, guidance_scale=4.0, noise=latents,
                         masked_encode_noise=masked_encode_noise)
    assert np.abs(other - expected).max() > 1e-2  # the mask matters: the check is not vacuous
    with pytest.raises(ValueError, match="an inpainting model\\): use inpaint\\(\\) with a mask"):
        pipe(PROMPTS, num_inference_steps=2)


def test_invert_equals_diffusers_inverse_scheduler_loop(pipes, films):
    """diffusers has no inversion pipeline for SD; its DDIMInverseScheduler loop (as DiffEdit runs it) on the
    reference UNet, text encoder and VAE posterior mean is the reference. The round trip (inversion, then DDIM
    sampling back) is tested in tests/diffusion/test_inversion.py on a model whose ODE it follows."""
    reference, pipe, folder = pipes
    steps = 10
    scheduler = diffusers.DDIMInverseScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        states = reference.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        images = torch.from_numpy(films.transpose(0, 3, 1, 2)) * 2 - 1
        x = reference.vae.encode(images).latent_dist.mean * reference.vae.config.scaling_factor
        for t in scheduler.timesteps:
            x = scheduler.step(reference.unet(x, t, encoder_hidden_states=states).sample, t, x).prev_sample
    expected = x.numpy().transpose(0, 2, 3, 1)
    got = pipe.invert(films, PROMPTS, num_inference_steps=steps, encode_noise=np.zeros_like(expected))
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    unconditioned = pipe.invert(films, num_inference_steps=steps, encode_noise=np.zeros_like(expected))
    assert np.abs(unconditioned - expected).max() > 1e-2 * np.abs(expected).max()  # the prompts matter
