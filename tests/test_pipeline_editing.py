"""Pipeline editing: img2img equals diffusers' StableDiffusionImg2ImgPipeline on a tiny random folder
given the same image, prompt, strength and noise."""
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
