"""DDIM inversion against diffusers' DDIMInverseScheduler, run step by step on the same fixed random "model"."""
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cxr_ldm.diffusion import samplers
from cxr_ldm.diffusion.schedules import SchedulerConfig, compute_alphas_cumprod

SHAPE = (2, 6, 6, 4)  # elementwise model: the layout does not matter
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            set_alpha_to_one=False, clip_sample=False)
ZERO_SNR_V = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
CLIPPED = dict(beta_schedule="linear", set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0)

_rng = np.random.default_rng(1)
A = (0.2 + 0.1 * _rng.standard_normal(SHAPE)).astype(np.float32)
B = (0.3 * _rng.standard_normal(SHAPE)).astype(np.float32)
CLEAN = (0.8 * _rng.standard_normal(SHAPE)).astype(np.float32)


def model_jax(x, t):
    return A * x + B * (t.astype(jnp.float32) / 1000.0)[:, None, None, None]


def model_torch(x, t):
    return torch.from_numpy(A) * x + torch.from_numpy(B) * (float(t) / 1000.0)


@pytest.mark.parametrize("config", [SD15, ZERO_SNR_V, CLIPPED], ids=["sd15", "zero_snr_v", "clipped"])
@pytest.mark.parametrize("n", [10, 7])
def test_ddim_inversion_equals_diffusers_inverse_scheduler(config, n):
    scheduler = diffusers.DDIMInverseScheduler.from_config(diffusers.DDIMScheduler(**config).config)
    scheduler.set_timesteps(n)
    x = torch.from_numpy(CLEAN)
    for t in scheduler.timesteps:
        x = scheduler.step(model_torch(x, t), t, x).prev_sample
    got = samplers.ddim_inversion(model_jax, jnp.asarray(CLEAN), SchedulerConfig(**config), num_inference_steps=n)
    np.testing.assert_allclose(np.asarray(got), x.numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(x.numpy() - CLEAN).max() > 0.5  # the latents moved: the check is not vacuous


def _gaussian_denoiser(config: SchedulerConfig, scale: float):
    """The exact model output for data x0 ~ N(0, scale^2) (the minimum-MSE estimate of eps or v), a smooth
    stand-in for a trained UNet whose probability-flow ODE DDIM sampling and inversion both follow."""
    ac = jnp.asarray(compute_alphas_cumprod(config), jnp.float32)

    def denoise(x, t):
        a = ac[t][:, None, None, None]
        x0 = jnp.sqrt(a) * scale**2 * x / (a * scale**2 + 1 - a)
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return eps if config.prediction_type == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

    return denoise


# |CLEAN| reaches 2.5; the zero-SNR schedule's last step (to alpha = 0) is the coarsest of the 50.
@pytest.mark.parametrize("config,atol", [(SD15, 0.05), (ZERO_SNR_V, 0.25)], ids=["sd15", "zero_snr_v"])
def test_ddim_inversion_then_ddim_sampling_returns_to_the_latents(config, atol):
    config = SchedulerConfig(**config)
    denoise = _gaussian_denoiser(config, scale=0.8)
    inverted = samplers.ddim_inversion(denoise, jnp.asarray(CLEAN), config, num_inference_steps=50)
    back = samplers.sample(denoise, inverted, config, num_inference_steps=50, sampler="ddim")
    np.testing.assert_allclose(np.asarray(back), CLEAN, atol=atol)
    assert np.abs(np.asarray(inverted) - CLEAN).max() > 0.5  # the latents moved: the check is not vacuous
