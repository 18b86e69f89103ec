"""Samplers against diffusers' schedulers run step by step on the same fixed random "model"."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import normalized_guidance
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers import scheduling_ddpm

from cxr_ldm.diffusion import samplers
from cxr_ldm.diffusion.schedules import SchedulerConfig, alpha_sigma_tables, compute_alphas_cumprod
from cxr_ldm.diffusion.targets import model_output_from_x0, predicted_x0_and_eps

SHAPE = (2, 4, 6, 6)  # elementwise model: the layout does not matter
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            set_alpha_to_one=False, clip_sample=False)
ZERO_SNR_V = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
ATOL = 1e-4

_rng = np.random.default_rng(0)
A = (0.8 + 0.1 * _rng.standard_normal(SHAPE)).astype(np.float32)
B = (0.3 * _rng.standard_normal(SHAPE)).astype(np.float32)
LATENTS = _rng.standard_normal(SHAPE).astype(np.float32)


def model_jax(x, t):
    return A * x + B * (t.astype(jnp.float32) / 1000.0)[:, None, None, None]


def model_torch(x, t):
    return torch.from_numpy(A) * x + torch.from_numpy(B) * (float(t) / 1000.0)


def reference(scheduler, n, noise=None, eta=0.0):
    """diffusers' denoising loop; `noise[i]` is the noise of step i (DDIM eta > 0 and DDPM)."""
    scheduler.set_timesteps(n)
    x = torch.from_numpy(LATENTS)
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {}
        if isinstance(scheduler, diffusers.DDIMScheduler):
            kwargs = dict(eta=eta, variance_noise=None if noise is None else torch.from_numpy(noise[i]))
        x = scheduler.step(model_torch(x, t), t, x, **kwargs).prev_sample
    return x.numpy()


def ours(config, n, sampler, **kwargs):
    return np.asarray(samplers.sample(model_jax, jnp.asarray(LATENTS), config, num_inference_steps=n,
                                      sampler=sampler, **kwargs))


def check(config_kwargs, reference_class, n, sampler, noise=None, **kwargs):
    expected = reference(reference_class(**config_kwargs), n, noise=noise, eta=kwargs.get("eta", 0.0))
    got = ours(SchedulerConfig(**config_kwargs), n, sampler, noise=noise, **kwargs)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


DDIM_CASES = {
    "sd15_leading_offset1": (SD15, 50),
    "sd15_7_steps": (SD15, 7),
    "trailing_zero_snr_v": (ZERO_SNR_V, 10),
    "linspace_clip_alpha_one": (dict(timestep_spacing="linspace", clip_sample=True), 10),
    "sample_prediction": (dict(prediction_type="sample", clip_sample=True, set_alpha_to_one=False), 20),
    "cosine_v": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), 12),
}


@pytest.mark.parametrize("case", DDIM_CASES)
def test_ddim_eta0_matches_diffusers(case):
    config, n = DDIM_CASES[case]
    check(config, diffusers.DDIMScheduler, n, "ddim")


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_diffusers_with_injected_noise(eta):
    n = 10
    noise = np.random.default_rng(1).standard_normal((n, *SHAPE)).astype(np.float32)
    check(SD15, diffusers.DDIMScheduler, n, "ddim", noise=noise, eta=eta)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [5, 10, 20, 25])
def test_dpmpp_2m_matches_diffusers(prediction_type, n):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  timestep_spacing="linspace", prediction_type=prediction_type)
    check(config, diffusers.DPMSolverMultistepScheduler, n, "dpmpp_2m")


@pytest.mark.parametrize("config", [dict(SD15, timestep_spacing="leading"), ZERO_SNR_V],
                         ids=["sd15_leading", "trailing_zero_snr_v"])
def test_dpmpp_2m_other_spacings_match_diffusers(config):
    config = {k: v for k, v in config.items() if k not in ("set_alpha_to_one", "clip_sample")}
    check(config, diffusers.DPMSolverMultistepScheduler, 14, "dpmpp_2m")


def test_dpmpp_2m_single_step_returns_the_x0_estimate():
    check(dict(prediction_type="v_prediction", timestep_spacing="linspace"), diffusers.DPMSolverMultistepScheduler,
          1, "dpmpp_2m")


DDPM_CASES = {
    "fixed_small_1000": (dict(), 1000),
    "fixed_large_sd15_leading": (dict(SD15, variance_type="fixed_large"), 25),
    "fixed_small_log_trailing_v": (dict(ZERO_SNR_V, variance_type="fixed_small_log", clip_sample=True), 20),
}


@pytest.mark.parametrize("case", DDPM_CASES)
def test_ddpm_matches_diffusers_with_injected_noise(case, monkeypatch):
    config, n = DDPM_CASES[case]
    config = {k: v for k, v in config.items() if k != "set_alpha_to_one"}
    noise = np.random.default_rng(2).standard_normal((n, *SHAPE)).astype(np.float32)
    step = {"index": 0}  # DDPMScheduler.step draws its noise with randn_tensor: hand it noise[index]
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *_, **__: torch.from_numpy(noise[step["index"]]))
    scheduler = diffusers.DDPMScheduler(**config)
    scheduler.set_timesteps(n)
    x = torch.from_numpy(LATENTS)
    for step["index"], t in enumerate(scheduler.timesteps):
        x = scheduler.step(model_torch(x, t), t, x).prev_sample
    expected = x.numpy()
    got = ours(SchedulerConfig(**config), n, "ddpm", noise=noise)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_jitted_sample_draws_normal_noise_from_fold_in():
    config = SchedulerConfig(**SD15)
    n = 8
    run = jax.jit(lambda key: samplers.sample(model_jax, jnp.asarray(LATENTS), config, num_inference_steps=n,
                                              sampler="ddpm", rng=key))
    key = jax.random.key(3)
    noise = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), SHAPE)))(jnp.arange(n))
    with_rng = np.asarray(run(key))
    np.testing.assert_allclose(with_rng, ours(config, n, "ddpm", noise=noise), atol=1e-6)
    assert np.abs(with_rng - np.asarray(run(jax.random.key(4)))).max() > 1e-2


@pytest.mark.parametrize("sampler, reference_class", [("ddim", diffusers.DDIMScheduler),
                                                       ("ddpm", diffusers.DDPMScheduler),
                                                       ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler)])
def test_sampling_timesteps_match_diffusers(sampler, reference_class):
    kwargs = dict(steps_offset=1, timestep_spacing="leading")
    scheduler = reference_class(**kwargs)
    scheduler.set_timesteps(20)
    np.testing.assert_array_equal(samplers.sampling_timesteps(SchedulerConfig(**kwargs), 20, sampler),
                                  scheduler.timesteps.numpy())


def test_sampler_errors_are_clear():
    config = SchedulerConfig()
    x = jnp.asarray(LATENTS)
    with pytest.raises(ValueError, match="sampler = 'euler'"):
        samplers.sample(model_jax, x, config, num_inference_steps=4, sampler="euler")
    with pytest.raises(ValueError, match="only the 'ddim' sampler takes eta"):
        samplers.sample(model_jax, x, config, num_inference_steps=4, sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="pass `rng`"):
        samplers.sample(model_jax, x, config, num_inference_steps=4, sampler="ddpm")
    with pytest.raises(ValueError, match="divide by alpha_t = 0 at timestep 999"):
        samplers.sample(model_jax, x, SchedulerConfig(**dict(ZERO_SNR_V, prediction_type="epsilon")),
                        num_inference_steps=4)
    with pytest.raises(ValueError, match="noise shape"):
        samplers.sample(model_jax, x, config, num_inference_steps=4, sampler="ddpm", noise=jnp.zeros((3, *SHAPE)))


def _context_model(x, t, context):
    """A model whose output depends on x, t and a (B, L, D) context; records its batch sizes."""
    _context_model.batches.append(x.shape[0])
    scale = jnp.tanh(context.mean(axis=(1, 2)))[:, None, None, None]
    return scale * x + (t.astype(jnp.float32) / 1000.0)[:, None, None, None] * context.std(axis=(1, 2))[:, None, None, None]


def test_classifier_free_guidance():
    rng = np.random.default_rng(5)
    cond = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
    x, t = jnp.asarray(LATENTS), jnp.array([999, 10], jnp.int32)
    _context_model.batches = []
    guided = samplers.guided_denoise_fn(_context_model, cond, uncond, 7.5)(x, t)
    assert _context_model.batches == [4]  # one doubled batch
    c, u = _context_model(x, t, cond), _context_model(x, t, uncond)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(u + 7.5 * (c - u)), atol=1e-5)
    plain = samplers.guided_denoise_fn(_context_model, cond, None, 7.5)(x, t)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(c))
    with pytest.raises(ValueError, match="uncond context shapes"):
        samplers.guided_denoise_fn(_context_model, cond, uncond[:1], 7.5)


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    rng = np.random.default_rng(6)
    cond = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
    x, t = jnp.asarray(LATENTS), jnp.array([999, 10], jnp.int32)
    c, u = _context_model(x, t, cond), _context_model(x, t, uncond)
    guided = u + 7.5 * (c - u)
    expected = rescale_noise_cfg(torch.from_numpy(np.asarray(guided)), torch.from_numpy(np.asarray(c)), phi)
    got = samplers.guided_denoise_fn(_context_model, cond, uncond, 7.5, jnp.float32(phi))(x, t)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-5, atol=1e-6)
    per_image_std = np.asarray(got).reshape(2, -1).std(axis=1)
    if phi == 1.0:  # fully rescaled: each image has the conditional prediction's spread, not the guided one's
        np.testing.assert_allclose(per_image_std, np.asarray(c).reshape(2, -1).std(axis=1), rtol=1e-5)
        assert not np.allclose(per_image_std, np.asarray(guided).reshape(2, -1).std(axis=1), rtol=1e-2)


@pytest.mark.parametrize("eta,norm_threshold", [(0.0, 0.0), (0.4, 0.0), (0.0, 2.0), (1.0, 0.0)])
def test_projected_guidance_matches_diffusers(eta, norm_threshold):
    rng = np.random.default_rng(7)
    cond = rng.standard_normal(SHAPE).astype(np.float32)
    uncond = (cond + 0.5 * rng.standard_normal(SHAPE)).astype(np.float32)
    expected = normalized_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), 5.0, None, eta, norm_threshold)
    got = samplers.projected_guidance(jnp.asarray(cond), jnp.asarray(uncond), 5.0, eta, norm_threshold)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-5, atol=1e-5)
    plain = uncond + 5.0 * (cond - uncond)
    if (eta, norm_threshold) == (1.0, 0.0):
        np.testing.assert_allclose(np.asarray(got), plain, rtol=1e-5, atol=1e-5)
    else:
        assert np.abs(np.asarray(got) - plain).max() > 0.1
    if eta == 0.0:  # the update (got - uncond) has no part along cond, image by image
        along = (np.asarray(got) - uncond).reshape(2, -1) @ cond.reshape(2, -1).T
        np.testing.assert_allclose(np.diag(along), 0.0, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_model_output_from_x0_inverts_the_x0_estimate(prediction_type):
    rng = np.random.default_rng(8)
    output, x = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
    alpha, sigma = (jnp.asarray(v, jnp.float32) for v in (0.6, 0.8))
    x0, _ = predicted_x0_and_eps(prediction_type, output, x, alpha, sigma)
    np.testing.assert_allclose(np.asarray(model_output_from_x0(prediction_type, x0, x, alpha, sigma)),
                               np.asarray(output), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_projected_guidance_in_the_denoiser_acts_on_the_x0_estimates(prediction_type):
    config = SchedulerConfig(**{**SD15, "prediction_type": prediction_type})
    rng = np.random.default_rng(9)
    cond = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32)
    x, t = jnp.asarray(LATENTS), jnp.array([901, 21], jnp.int32)
    projection = samplers.ProjectedGuidance(jnp.float32(0.0), jnp.float32(0.0), config)
    _context_model.batches = []
    got = samplers.guided_denoise_fn(_context_model, cond, uncond, 4.0, None, projection)(x, t)
    alphas, sigmas = alpha_sigma_tables(compute_alphas_cumprod(config))
    alpha, sigma = alphas[t][:, None, None, None], sigmas[t][:, None, None, None]
    x0_c, _ = predicted_x0_and_eps(prediction_type, _context_model(x, t, cond), x, alpha, sigma)
    x0_u, _ = predicted_x0_and_eps(prediction_type, _context_model(x, t, uncond), x, alpha, sigma)
    x0_got, _ = predicted_x0_and_eps(prediction_type, got, x, alpha, sigma)
    expected = normalized_guidance(torch.from_numpy(np.asarray(x0_c)), torch.from_numpy(np.asarray(x0_u)), 4.0,
                                   None, 0.0, 0.0)
    np.testing.assert_allclose(np.asarray(x0_got), expected.numpy(), rtol=1e-4, atol=1e-4)
    plain = samplers.guided_denoise_fn(_context_model, cond, uncond, 4.0)(x, t)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-2
