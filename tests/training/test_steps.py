"""Train steps: LDM loss wiring, non-finite skip, gradient accumulation, EMA and schedule against
diffusers/torch, autoencoder loss with the PatchGAN discriminator."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxr_ldm.diffusion.targets import add_noise, sample_timesteps
from cxr_ldm.training import discriminator as disc_lib
from cxr_ldm.training import optimizer, sharding, state, steps
from helpers import training as common


@pytest.fixture(scope="module")
def ldm():
    """A 1-device tiny LDM run in "unet" mode (compiled once for the module)."""
    models, ft, mesh, train_state, shardings, step = common.build("unet")
    return dict(models=models, ft=ft, mesh=mesh, state=train_state, shardings=shardings, step=step)


def test_ldm_loss_is_the_denoising_mse_of_scaled_vae_latents(ldm):
    models, ft = ldm["models"], ldm["ft"]
    trainable, frozen = ldm["state"].trainable, ldm["state"].frozen
    batch = common.tiny_batch(0)
    ac = common.alphas_cumprod()
    config = steps.LDMLossConfig(latent_scale=0.5)
    rng = jax.random.PRNGKey(3)
    loss, _ = jax.jit(steps.make_ldm_loss_fn(models, ft, config, ac))(trainable, frozen, batch, rng, 0)
    prediction, noise, x_t, latents, t = jax.jit(functools.partial(_by_hand, models))(trainable, frozen, batch,
                                                                                     rng, ac)
    np.testing.assert_allclose(float(loss), float(np.mean((np.asarray(prediction) - noise) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(add_noise(latents, noise, t, ac)), x_t, atol=1e-6)


def test_ldm_loss_wires_v_prediction_snr_offset_and_logit_normal_timesteps(ldm):
    models, ft = ldm["models"], ldm["ft"]
    trainable, frozen = ldm["state"].trainable, ldm["state"].frozen
    batch, ac, rng = common.tiny_batch(1), common.alphas_cumprod(), jax.random.PRNGKey(4)
    config = steps.LDMLossConfig(prediction_type="v_prediction", snr_gamma=5.0, snr_offset=1.0,
                                 timestep_logit_std=1.0, timestep_logit_mean=0.5, latent_scale=0.5)
    loss, _ = jax.jit(steps.make_ldm_loss_fn(models, ft, config, ac))(trainable, frozen, batch, rng, 0)
    draw_t = lambda key: sample_timesteps(key, 8, 1000, logit_std=1.0, logit_mean=0.5)
    prediction, noise, _, latents, t = jax.jit(functools.partial(_by_hand, models, draw_t=draw_t))(
        trainable, frozen, batch, rng, ac)
    t, ac = np.asarray(t), np.asarray(ac)
    v = np.sqrt(ac[t])[:, None, None, None] * noise - np.sqrt(1 - ac[t])[:, None, None, None] * latents
    snr = ac[t] / (1 - ac[t])
    weights = (np.minimum(snr, 5.0) + 1.0) / (snr + 1.0)
    expected = np.mean(weights * np.mean((np.asarray(prediction) - v) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="snr_offset = 1.0 needs snr_gamma"):
        steps.LDMLossConfig(snr_offset=1.0)


def _by_hand(models, trainable, frozen, batch, rng, ac, draw_t=lambda key: jax.random.randint(key, (8,), 0, 1000)):
    """The LDM loss's draws and prediction, composed step by step (latent scale 0.5)."""
    latent_rng, t_rng, noise_rng, _ = jax.random.split(rng, 4)
    mean, logvar = models.vae.apply({"params": frozen["vae"]}, batch["image"], method=models.vae.encode)
    latents = 0.5 * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(latent_rng, mean.shape))
    noise = jax.random.normal(noise_rng, latents.shape)
    t = draw_t(t_rng)
    context = models.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
    x_t = jnp.sqrt(ac[t])[:, None, None, None] * latents + jnp.sqrt(1 - ac[t])[:, None, None, None] * noise
    prediction = models.unet.apply({"params": trainable["unet"]}, x_t, t, context)
    return prediction, noise, x_t, latents, t


def test_measured_latent_scale_gives_unit_variance_latents(ldm):
    vae, vae_params = ldm["models"].vae, ldm["state"].frozen["vae"]
    images, rng = common.tiny_batch(0)["image"], jax.random.PRNGKey(5)
    scale = steps.measure_latent_scale(vae, vae_params, images, rng)
    latents = jax.jit(lambda p: steps.encode_latents(vae, p, images, rng, scale))(vae_params)
    np.testing.assert_allclose(float(jnp.std(latents)), 1.0, rtol=1e-5)


def test_nonfinite_loss_skips_the_update_and_counts(ldm):
    train_state, step, mesh = ldm["state"], ldm["step"], ldm["mesh"]
    before = jax.tree_util.tree_map(np.asarray, (train_state.trainable, train_state.opt_state, train_state.ema))
    bad = common.tiny_batch(0)
    bad["image"][0, 0, 0, 0] = np.nan
    for expected_streak in (1, 2):
        train_state, metrics = step(train_state, sharding.global_batch_from_process(bad, mesh))
        assert not np.isfinite(float(metrics["loss"]))
        assert float(metrics["nonfinite"]) == 1 and float(metrics["nonfinite_streak"]) == expected_streak
    after = jax.tree_util.tree_map(np.asarray, (train_state.trainable, train_state.opt_state, train_state.ema))
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)
    assert int(train_state.step) == 2 and int(train_state.nonfinite_count) == 2

    train_state, metrics = step(train_state, sharding.global_batch_from_process(common.tiny_batch(0), mesh))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite_streak"]) == 0
    assert float(metrics["nonfinite_count"]) == 2
    # The first applied update runs at learning rate schedule(0) = 0 (warmup), the second one moves.
    train_state, metrics = step(train_state, sharding.global_batch_from_process(common.tiny_batch(1), mesh))
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                     jax.tree_util.tree_map(np.asarray, train_state.trainable), before[0])
    assert all(jax.tree_util.tree_leaves(changed))
    ldm["state"] = train_state


def _quadratic_step(grad_accum_steps, ema_decay=None):
    """A linear-regression loss through make_train_step (exact expectations, fast to compile)."""
    def loss_fn(trainable, frozen, batch, rng, update_index):
        del rng, update_index
        pred = batch["x"] @ trainable["w"] + frozen["b"]
        return jnp.mean((pred - batch["y"]) ** 2), {"pred_mean": jnp.mean(pred)}
    mesh = sharding.make_mesh()
    tx = optax.sgd(0.1)
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    st, shardings = state.init_train_state({"w": w}, {"b": np.ones(3, np.float32)}, tx, jax.random.PRNGKey(0),
                                           mesh, use_ema=ema_decay is not None)
    step = steps.make_train_step(loss_fn, tx, mesh, shardings, grad_accum_steps=grad_accum_steps,
                                 ema_decay=ema_decay)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((8, 4)).astype(np.float32), "y": rng.standard_normal((8, 3)).astype(np.float32)}
    return st, step, batch, w


def test_gradient_accumulation_equals_the_full_batch_gradient():
    results = []
    for k in (1, 4):
        st, step, batch, w = _quadratic_step(k)
        st, metrics = step(st, batch)
        results.append((np.asarray(st.trainable["w"]), float(metrics["loss"]), float(metrics["pred_mean"])))
    x, y = batch["x"], batch["y"]
    grad = 2 * x.T @ (x @ w + 1 - y) / y.size
    np.testing.assert_allclose(results[0][0], w - 0.1 * grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1][1:], results[0][1:], rtol=1e-5)


def test_ema_follows_diffusers_ema_model():
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel
    st, step, batch, _ = _quadratic_step(1, ema_decay=0.9)
    param = torch.nn.Parameter(torch.tensor(np.asarray(st.trainable["w"])))
    ema = EMAModel([param], decay=0.9)
    for _ in range(4):
        st, _ = step(st, batch)
        with torch.no_grad():
            param.copy_(torch.tensor(np.asarray(st.trainable["w"])))
        ema.step([param])
    np.testing.assert_allclose(np.asarray(st.ema["w"]), ema.shadow_params[0].numpy(), rtol=1e-6, atol=1e-7)


def test_schedule_matches_diffusers_cosine_with_warmup():
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_cosine_schedule_with_warmup
    config = optimizer.OptimizerConfig(learning_rate=2e-4, warmup_steps=5, total_steps=30)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    reference = get_cosine_schedule_with_warmup(opt, 5, 30)
    ours = optimizer.learning_rate_schedule(config)
    for i in range(30):
        np.testing.assert_allclose(float(ours(i)), reference.get_last_lr()[0], rtol=1e-5, atol=1e-12)
        opt.step()
        reference.step()


def test_delayed_start_leaves_params_and_state_untouched_until_start():
    tx = optimizer.delayed_start(optax.adamw(0.1, weight_decay=0.5), start_step=2)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    fresh = tx.init(params)
    for call in range(3):
        updates, opt_state = tx.update({"w": jnp.full(3, 2.0)}, opt_state, params)
        if call < 2:
            np.testing.assert_array_equal(updates["w"], 0.0)
            jax.tree_util.tree_map(np.testing.assert_array_equal, opt_state.inner_state, fresh.inner_state)
    reference, _ = optax.adamw(0.1, weight_decay=0.5).update({"w": jnp.full(3, 2.0)}, fresh.inner_state, params)
    np.testing.assert_allclose(updates["w"], reference["w"], rtol=1e-6)


def test_autoencoder_step_with_discriminator_after_warmup():
    vae = common.tiny_models().vae
    disc = disc_lib.PatchDiscriminator(base_channels=8, num_layers=2, norm_groups=4)
    vae_params = common.random_params(vae, jnp.zeros((1, 16, 16, 1)))
    disc_params = common.random_params(disc, jnp.zeros((1, 16, 16, 1)), seed=1)
    config = steps.AutoencoderLossConfig(kl_weight=1e-3, disc_start=1, disc_weight=0.5)
    opt = optimizer.OptimizerConfig(learning_rate=1e-3, total_steps=10)
    tx = optimizer.per_key_optimizer({"vae": optimizer.make_optimizer(opt),
                                      "discriminator": optimizer.delayed_start(optimizer.make_optimizer(opt), 1)})
    mesh = sharding.make_mesh()
    st, shardings = state.init_train_state({"vae": vae_params, "discriminator": disc_params}, {}, tx,
                                           jax.random.PRNGKey(0), mesh)
    step = steps.make_autoencoder_train_step(vae, config, tx, mesh, shardings, discriminator=disc)
    batch = {"image": common.tiny_batch(0)["image"]}

    st1, m1 = step(st, batch)
    assert float(m1["disc_weight"]) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, st1.trainable["discriminator"]),
                           disc_params)
    loss_fn = steps.make_autoencoder_loss_fn(vae, config, disc)
    rng = jax.random.fold_in(st1.rng, 1)
    aux, by_hand = jax.jit(functools.partial(_autoencoder_terms, vae, loss_fn))(st1.trainable, batch, rng)
    np.testing.assert_allclose(float(aux["rec_loss"]), float(by_hand), rtol=1e-5)

    st2, m2 = step(st1, batch)
    assert float(m2["disc_weight"]) > 0 and math.isfinite(float(m2["d_loss"]))
    assert not np.array_equal(np.asarray(st2.trainable["discriminator"]["conv_0"]["kernel"]),
                              disc_params["conv_0"]["kernel"])
    metrics = steps.make_reconstruction_metrics(vae, mesh, shardings.trainable["vae"])(st2.trainable["vae"],
                                                                                         batch["image"])
    assert metrics["psnr"].shape == (8,) and np.all(np.isfinite(metrics["ssim"]))


def _autoencoder_terms(vae, loss_fn, trainable, batch, rng):
    """The loss's aux terms and its reconstruction term by hand: per-image sum of |x - x'|, batch mean."""
    _, aux = loss_fn(trainable, {}, batch, rng, 1)
    x = batch["image"]
    mean, logvar = vae.apply({"params": trainable["vae"]}, x, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = vae.apply({"params": trainable["vae"]}, z, method=vae.decode)
    return aux, jnp.mean(jnp.abs(recon - x).sum((1, 2, 3)))


def test_autoencoder_gradient_loss_term_is_the_l1_of_finite_difference_errors():
    vae = common.tiny_models().vae
    vae_params = common.random_params(vae, jnp.zeros((1, 16, 16, 1)))
    batch = {"image": common.tiny_batch(0)["image"]}
    rng = jax.random.PRNGKey(5)
    terms = {}
    for weight in (0.0, 3.0):
        config = steps.AutoencoderLossConfig(l1_weight=1.0, l2_weight=0.5, gradient_weight=weight, kl_weight=0.0)
        _, aux = jax.jit(steps.make_autoencoder_loss_fn(vae, config))({"vae": vae_params}, {}, batch, rng, 0)
        terms[weight] = float(aux["rec_loss"])
    x = np.asarray(batch["image"], np.float64)
    mean, logvar = vae.apply({"params": vae_params}, batch["image"], method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    error = np.asarray(vae.apply({"params": vae_params}, z, method=vae.decode), np.float64) - x
    b, h, w, _ = error.shape
    edges = sum(abs(error[i, r + 1, c] - error[i, r, c]).sum() for i in range(b) for r in range(h - 1) for c in range(w))
    edges += sum(abs(error[i, r, c + 1] - error[i, r, c]).sum() for i in range(b) for r in range(h) for c in range(w - 1))
    np.testing.assert_allclose(terms[0.0], np.mean(np.sum(abs(error) + 0.5 * error ** 2, axis=(1, 2, 3))), rtol=1e-4)
    np.testing.assert_allclose(terms[3.0] - terms[0.0], 3.0 * edges / b, rtol=1e-4)


def test_random_windows_are_grid_aligned_crops_and_reach_every_corner():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 1)), jnp.float32)
    seen = set()
    for key in range(20):
        windows = np.asarray(steps.random_windows(images, 8, 4, jax.random.PRNGKey(key)))
        assert windows.shape == (4, 8, 8, 1)
        for i, window in enumerate(windows):
            corners = [(y, x) for y in range(0, 9, 4) for x in range(0, 9, 4)
                       if np.array_equal(window, np.asarray(images)[i, y:y + 8, x:x + 8])]
            assert len(corners) == 1
            seen.add(corners[0])
    assert seen == {(y, x) for y in (0, 4, 8) for x in (0, 4, 8)}
    with pytest.raises(ValueError, match="crop = 6: expected a multiple of 4"):
        steps.random_windows(images, 6, 4, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="crop = 20: .* image side 16"):
        steps.random_windows(images, 20, 4, jax.random.PRNGKey(0))


def test_autoencoder_crop_trains_on_the_windows():
    vae = common.tiny_models().vae
    vae_params = common.random_params(vae, jnp.zeros((1, 16, 16, 1)))
    batch = {"image": common.tiny_batch(0)["image"]}
    rng = jax.random.PRNGKey(5)
    config = steps.AutoencoderLossConfig(l1_weight=1.0, l2_weight=0.5, gradient_weight=2.0, kl_weight=1e-3)
    grid = vae.config.downsampling_factor
    cropped, _ = steps.make_autoencoder_loss_fn(vae, dataclasses.replace(config, crop=8))(
        {"vae": vae_params}, {}, batch, rng, 0)
    rng_rest, crop_rng = jax.random.split(rng)
    windows = {"image": steps.random_windows(batch["image"], 8, grid, crop_rng)}
    expected, _ = steps.make_autoencoder_loss_fn(vae, config)({"vae": vae_params}, {}, windows, rng_rest, 0)
    whole, _ = steps.make_autoencoder_loss_fn(vae, config)({"vae": vae_params}, {}, batch, rng, 0)
    np.testing.assert_allclose(float(cropped), float(expected), rtol=1e-5)
    assert float(cropped) < 0.5 * float(whole)  # per-image sums over a quarter of the pixels
