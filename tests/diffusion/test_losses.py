"""Training targets and losses against diffusers' add_noise / get_velocity / compute_snr and the
min-SNR weighting of diffusers' examples/text_to_image/train_text_to_image.py."""
import diffusers
import jax
import numpy as np
import pytest
import scipy
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from cxr_ldm.diffusion import losses, targets
from cxr_ldm.diffusion.schedules import SchedulerConfig, compute_alphas_cumprod

SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TIMESTEPS = np.array([0, 1, 17, 250, 500, 998, 999, 640])


@pytest.fixture(params=[False, True], ids=["plain", "zero_snr"])
def schedule(request):
    kwargs = dict(SCHEDULE, rescale_betas_zero_snr=request.param)
    return diffusers.DDPMScheduler(**kwargs), compute_alphas_cumprod(SchedulerConfig(**kwargs))


def _batch(seed=0, shape=(len(TIMESTEPS), 4, 6, 6)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def test_add_noise_and_velocity_match_diffusers(schedule):
    ref, ac = schedule
    x0, noise = _batch()
    t_torch = torch.from_numpy(TIMESTEPS)
    expected_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t_torch).numpy()
    expected_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), t_torch).numpy()
    np.testing.assert_allclose(np.asarray(targets.add_noise(x0, noise, TIMESTEPS, ac)), expected_xt, atol=2e-6)
    np.testing.assert_allclose(np.asarray(targets.training_target("v_prediction", x0, noise, TIMESTEPS, ac)),
                               expected_v, atol=2e-6)
    np.testing.assert_array_equal(targets.training_target("epsilon", x0, noise, TIMESTEPS, ac), noise)
    np.testing.assert_array_equal(targets.training_target("sample", x0, noise, TIMESTEPS, ac), x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_and_eps_invert_the_target(prediction_type):
    ac = compute_alphas_cumprod(SchedulerConfig(**SCHEDULE))
    x0, noise = _batch(1)
    t = TIMESTEPS[TIMESTEPS < 999]  # sample prediction divides by sigma; all t keep sigma > 0 here
    x0, noise = x0[: len(t)], noise[: len(t)]
    xt = targets.add_noise(x0, noise, t, ac)
    target = targets.training_target(prediction_type, x0, noise, t, ac)
    alpha, sigma = np.sqrt(ac[t])[:, None, None, None], np.sqrt(1 - ac[t])[:, None, None, None]
    x0_hat, eps_hat = targets.predicted_x0_and_eps(prediction_type, target, xt, alpha, sigma)
    tol = 2e-3 if prediction_type == "epsilon" else 2e-5  # epsilon divides by alpha_t (0.068 at t=998)
    np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=tol)
    np.testing.assert_allclose(np.asarray(eps_hat), noise, atol=2e-3 if prediction_type == "sample" else 2e-5)


def _reference_loss(ref, pred, target, t, snr_gamma, prediction_type, weights=None):
    """train_text_to_image.py's loss with --snr_gamma (plus a per-example weight)."""
    t = torch.from_numpy(t)
    snr = compute_snr(ref, t)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(torch.from_numpy(pred).float(), torch.from_numpy(target).float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    if weights is not None:
        loss = loss * torch.from_numpy(weights)
    return loss.mean().item(), mse_loss_weights.numpy()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [1.0, 5.0])
def test_min_snr_loss_matches_train_text_to_image(schedule, prediction_type, snr_gamma):
    ref, ac = schedule
    if prediction_type == "epsilon" and ref.config.rescale_betas_zero_snr:
        t = TIMESTEPS[TIMESTEPS != 999]  # 0/0 in both at the zero-SNR timestep
    else:
        t = TIMESTEPS
    pred, target = _batch(2, (len(t), 4, 6, 6))
    expected, expected_w = _reference_loss(ref, pred, target, t, snr_gamma, prediction_type)
    weights = losses.min_snr_weights(t, ac, snr_gamma, prediction_type)
    np.testing.assert_allclose(np.asarray(weights), expected_w, rtol=1e-4, atol=1e-7)
    loss = losses.diffusion_loss(pred, target, t, alphas_cumprod=ac, snr_gamma=snr_gamma,
                                 prediction_type=prediction_type)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_offset_weighs_the_x0_error_the_same_in_every_parameterization(prediction_type):
    ref = diffusers.DDPMScheduler(**SCHEDULE)
    ac = compute_alphas_cumprod(SchedulerConfig(**SCHEDULE))
    x0, noise = _batch(5)
    output, _ = _batch(6)
    xt = targets.add_noise(x0, noise, TIMESTEPS, ac)
    target = targets.training_target(prediction_type, x0, noise, TIMESTEPS, ac)
    alpha, sigma = np.sqrt(ac[TIMESTEPS])[:, None, None, None], np.sqrt(1 - ac[TIMESTEPS])[:, None, None, None]
    x0_hat, _ = targets.predicted_x0_and_eps(prediction_type, output, xt, alpha, sigma)
    snr = compute_snr(ref, torch.from_numpy(TIMESTEPS)).numpy()
    x0_error = ((np.asarray(x0_hat) - x0) ** 2).mean(axis=(1, 2, 3))
    expected = np.mean((np.minimum(snr, 5.0) + 1.0) * x0_error)
    got = losses.diffusion_loss(output, target, TIMESTEPS, alphas_cumprod=ac, snr_gamma=5.0,
                                prediction_type=prediction_type, snr_offset=1.0)
    np.testing.assert_allclose(float(got), expected, rtol=2e-3)
    if prediction_type == "v_prediction":  # plain v-MSE wherever SNR <= gamma
        weights = np.asarray(losses.min_snr_weights(TIMESTEPS, ac, 5.0, prediction_type, offset=1.0))
        np.testing.assert_allclose(weights[snr <= 5.0], 1.0, rtol=1e-5)
        assert np.all(weights[snr > 5.0] < 1.0)


@pytest.mark.parametrize("logit_mean", [0.0, 1.0])
def test_logit_normal_timesteps_follow_their_distribution(logit_mean):
    key, num = jax.random.PRNGKey(0), 20000
    t = np.asarray(targets.sample_timesteps(key, num, 1000, logit_std=1.0, logit_mean=logit_mean))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    edges = np.array([50, 200, 400, 500, 600, 800, 950])
    expected = scipy.stats.norm.cdf((scipy.special.logit(edges / 1000) - logit_mean) / 1.0)
    np.testing.assert_allclose((t[:, None] < edges).mean(axis=0), expected, atol=0.015)
    uniform = targets.sample_timesteps(key, 64, 1000)
    np.testing.assert_array_equal(uniform, jax.random.randint(key, (64,), 0, 1000))


def test_per_example_weights_and_plain_mse():
    ref = diffusers.DDPMScheduler(**SCHEDULE)
    ac = compute_alphas_cumprod(SchedulerConfig(**SCHEDULE))
    pred, target = _batch(3)
    np.testing.assert_allclose(float(losses.diffusion_loss(pred, target)),
                               F.mse_loss(torch.from_numpy(pred), torch.from_numpy(target)).item(), rtol=1e-6)
    w = np.linspace(0.0, 2.0, len(TIMESTEPS)).astype(np.float32)
    expected, _ = _reference_loss(ref, pred, target, TIMESTEPS, 5.0, "v_prediction", weights=w)
    got = losses.diffusion_loss(pred, target, TIMESTEPS, alphas_cumprod=ac, snr_gamma=5.0,
                                prediction_type="v_prediction", weights=w)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Weight 0 removes an example; the result stays a batch mean.
    per_example = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    only_first = np.zeros(len(w), np.float32)
    only_first[0] = 1.0
    np.testing.assert_allclose(float(losses.diffusion_loss(pred, target, weights=only_first)),
                               per_example[0] / len(w), rtol=1e-6)


def test_loss_errors_are_clear():
    pred, target = _batch(4)
    with pytest.raises(ValueError, match="model_output shape"):
        losses.diffusion_loss(pred, target[:, :2])
    with pytest.raises(ValueError, match="needs the timesteps"):
        losses.diffusion_loss(pred, target, snr_gamma=5.0)
    with pytest.raises(ValueError, match="one weight per example"):
        losses.diffusion_loss(pred, target, weights=np.ones(3))
    with pytest.raises(ValueError, match="prediction_type = 'x0'"):
        targets.training_target("x0", pred, target, TIMESTEPS, np.ones(1000) * 0.5)
