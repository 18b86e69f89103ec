"""Jitted train steps: the LDM denoising step and the autoencoder (VAE + optional PatchGAN) step.

Both are built by `make_train_step` from a loss function
    loss_fn(trainable, frozen, batch, rng, update_index) -> (scalar loss, {name: scalar})
and run as one `jax.jit` with explicit shardings and the state donated. The step draws its randomness
from fold_in(state.rng, state.step) with global shapes, so (with jax's partitionable threefry) the
numbers do not depend on how many devices share the batch. A non-finite loss or gradient skips the
update: params, optimizer state and EMA stay as they were, step advances, nonfinite_count counts it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cxr_ldm.diffusion.losses import diffusion_loss
from cxr_ldm.diffusion.schedules import PREDICTION_TYPES
from cxr_ldm.diffusion.targets import add_noise, sample_timesteps, training_target
from cxr_ldm.imaging import match_channels, psnr, ssim
from cxr_ldm.training import finetune as finetune_lib
from cxr_ldm.training import optimizer as optimizer_lib
from cxr_ldm.training import sharding as sharding_lib
from cxr_ldm.training.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, *, grad_accum_steps: int = 1, ema_decay: float | None = None,
                    ema_warmup: bool = True, learning_rate_fn: optax.Schedule | None = None) -> Callable:
    """step(state, batch) -> (state, metrics), jitted; `state` is donated.

    batch: dict of global arrays (B, ...) sharded by `sharding.batch_sharding(mesh)`
    (see `sharding.global_batch_from_process`). B must be divisible by grad_accum_steps x device count.
    metrics (replicated float32 scalars): "loss", the loss_fn's aux entries, "grad_norm" (before clipping),
    "learning_rate" (if learning_rate_fn), "nonfinite" (1 if this update was skipped), "nonfinite_count",
    "nonfinite_streak".
    ema_decay: maximum EMA decay (state.ema must exist), with diffusers' warmup if `ema_warmup`.
    """
    grad_fn = optimizer_lib.accumulated_value_and_grad(
        lambda trainable, batch, rng, frozen, update_index: loss_fn(trainable, frozen, batch, rng, update_index),
        grad_accum_steps, sharding_lib.batch_sharding(mesh))

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        update_index = state.step - state.nonfinite_count
        (loss, aux), grads = grad_fn(state.trainable, batch, rng, state.frozen, update_index)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if ema_decay is not None:
            decay = optimizer_lib.ema_decay(update_index + 1, ema_decay, ema_warmup)
            ema = optimizer_lib.ema_update(state.ema, trainable, decay)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state), ema=keep(ema, state.ema),
            nonfinite_count=state.nonfinite_count + skipped,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "nonfinite": skipped,
                   "nonfinite_count": new_state.nonfinite_count, "nonfinite_streak": new_state.nonfinite_streak}
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(update_index)
        return new_state, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class LDMModels:
    """The three modules of the LDM stage (their dtype / remat fields set the compute dtype and remat)."""

    unet: nn.Module
    text_encoder: nn.Module
    vae: nn.Module


@dataclasses.dataclass(frozen=True)
class LDMLossConfig:
    """prediction_type: "epsilon", "v_prediction" or "sample" (the scheduler config's).
    snr_gamma: min-SNR-gamma loss weighting, None = plain MSE.
    snr_offset: added to the min-SNR weight of the x0 error (`losses.min_snr_weights`); needs snr_gamma.
    timestep_logit_std, timestep_logit_mean: logit-normal training timesteps (`targets.sample_timesteps`);
      std 0 = uniform.
    noise_offset: adds noise_offset * N(0, 1) per example and channel to the noise (0 = off).
    latent_scale, latent_shift: latents = (z - latent_shift) * latent_scale, z the VAE posterior sample
      (or mean, if not sample_posterior); the VAE config's scaling_factor / shift_factor, or measured."""

    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    snr_offset: float = 0.0
    timestep_logit_std: float = 0.0
    timestep_logit_mean: float = 0.0
    noise_offset: float = 0.0
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    sample_posterior: bool = True

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type = {self.prediction_type!r}: expected one of {PREDICTION_TYPES}")
        if self.snr_offset and self.snr_gamma is None:
            raise ValueError(f"snr_offset = {self.snr_offset} needs snr_gamma (min-SNR weighting) to be set")
        if self.timestep_logit_std < 0:
            raise ValueError(f"timestep_logit_std = {self.timestep_logit_std}: expected >= 0")



def encode_latents(vae: nn.Module, vae_params: Any, images: jax.Array, rng: jax.Array | None,
                   scale: float, shift: float = 0.0) -> jax.Array:
    """Scaled float32 latents (B, h, w, latent_channels) of images (B, H, W, 1|C) in [-1, 1]: a posterior
    sample (rng given) or the posterior mean (rng None). No gradient flows into the VAE."""
    mean, logvar = vae.apply({"params": vae_params}, match_channels(images, vae.config.in_channels),
                             method=vae.encode)
    return latents_from_moments(jnp.concatenate([mean, logvar], axis=-1), rng, scale, shift)


def latents_from_moments(moments: jax.Array, rng: jax.Array | None, scale: float, shift: float = 0.0) -> jax.Array:
    """Scaled float32 latents (B, h, w, c) from posterior moments (B, h, w, 2c) = [mean, logvar]
    (`encode_latents`, or a `latent_cache`): a sample (rng given) or the mean (rng None)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return jax.lax.stop_gradient((z.astype(jnp.float32) - shift) * scale)


def measure_latent_scale(vae: nn.Module, vae_params: Any, images: jax.Array, rng: jax.Array,
                         shift: float = 0.0) -> float:
    """1 / std of the (shifted) posterior-sample latents of `images` (B, H, W, 1|C) in [-1, 1]: the
    latent scale that gives unit-variance diffusion inputs for a VAE trained from scratch (Rombach et al.
    2022 measured SD's 0.18215 this way on a first batch). Runs jitted on the given arrays."""
    latents = jax.jit(lambda p, x, r: encode_latents(vae, p, x, r, 1.0, shift))(vae_params, images, rng)
    return float(1.0 / jnp.std(latents))


def make_ldm_loss_fn(models: LDMModels, finetune: finetune_lib.FinetuneConfig, config: LDMLossConfig,
                     alphas_cumprod) -> LossFn:
    """The denoising loss of one batch {"image": (B, H, W, C) in [-1, 1], "input_ids": int (B, L)}
    (or "latent_moments" (B, h, w, 2c) from a `latent_cache` in place of "image"): encode to latents, draw t
    and noise, predict with the UNet conditioned on the text encoder's last hidden state, MSE to the prediction
    target (min-SNR weighted if set). t is drawn by `targets.sample_timesteps` (uniform unless
    config.timestep_logit_std).
    Prompt dropout for classifier-free guidance is done by the input pipeline (empty prompts)."""
    alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
    num_timesteps = alphas_cumprod.shape[0]

    def loss_fn(trainable, frozen, batch, rng, update_index):
        del update_index
        params = finetune_lib.merge_params(finetune, trainable, frozen)
        latent_rng, t_rng, noise_rng, offset_rng = jax.random.split(rng, 4)
        posterior_rng = latent_rng if config.sample_posterior else None
        if "latent_moments" in batch:
            latents = latents_from_moments(batch["latent_moments"], posterior_rng, config.latent_scale,
                                           config.latent_shift)
        else:
            latents = encode_latents(models.vae, params["vae"], batch["image"], posterior_rng,
                                     config.latent_scale, config.latent_shift)
        batch_size, channels = latents.shape[0], latents.shape[-1]
        noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
        if config.noise_offset:
            noise = noise + config.noise_offset * jax.random.normal(offset_rng, (batch_size, 1, 1, channels))
        t = sample_timesteps(t_rng, batch_size, num_timesteps, config.timestep_logit_std, config.timestep_logit_mean)
        noisy = add_noise(latents, noise, t, alphas_cumprod)
        context = models.text_encoder.apply({"params": params["text_encoder"]}, batch["input_ids"])
        prediction = models.unet.apply({"params": params["unet"]}, noisy, t, context, train=True)
        target = training_target(config.prediction_type, latents, noise, t, alphas_cumprod)
        loss = diffusion_loss(prediction, target, t, alphas_cumprod=alphas_cumprod,
                              prediction_type=config.prediction_type, snr_gamma=config.snr_gamma,
                              snr_offset=config.snr_offset)
        return loss, {}
    return loss_fn


def make_ldm_train_step(models: LDMModels, finetune: finetune_lib.FinetuneConfig, config: LDMLossConfig,
                        alphas_cumprod, optimizer: optax.GradientTransformation, mesh: Mesh,
                        state_shardings: TrainState, **step_options) -> Callable:
    """step(state, batch) -> (state, metrics) for the LDM stage; step_options as `make_train_step`'s
    (grad_accum_steps, ema_decay, ema_warmup, learning_rate_fn)."""
    return make_train_step(make_ldm_loss_fn(models, finetune, config, alphas_cumprod), optimizer, mesh,
                           state_shardings, **step_options)


def make_eval_loss(loss_fn: LossFn, mesh: Mesh, state_shardings: TrainState) -> Callable:
    """eval(state, batch, rng) -> loss (replicated scalar), jitted, no update; with the EMA params in place
    of the trained ones when the state has them. A fixed rng gives comparable validation losses."""
    def evaluate(state: TrainState, batch: dict, rng: jax.Array) -> jax.Array:
        trainable = state.trainable if state.ema is None else jax.tree_util.tree_map(
            lambda e, p: e.astype(p.dtype), state.ema, state.trainable)
        return loss_fn(trainable, state.frozen, batch, rng, state.step - state.nonfinite_count)[0]
    return jax.jit(evaluate, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh),
                                           sharding_lib.replicated(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
    """VAE loss of latent diffusion's autoencoder stage (taming-transformers' LPIPSWithDiscriminator
    without the LPIPS term): per-image sums over pixels / latent elements, averaged over the batch.

    l1_weight, l2_weight: reconstruction = l1_weight |x - x'| + l2_weight (x - x')^2.
    gradient_weight: adds gradient_weight (|dx x - dx x'| + |dy x - dy x'|), an L1 loss on the horizontal
      and vertical finite differences: it weighs thin structures (ribs, tubes, lines) that pixel losses
      blur away (0 = off).
    kl_weight: weight of KL(q(z|x) || N(0, I)) (1e-6 in Stable Diffusion's VAE).
    sample_posterior: decode a posterior sample (else the mean).
    crop: train on one random crop x crop window of each image (its corner on the latent grid: a multiple
      of the VAE's downsampling factor), None = the whole image. A step costs about the window's share of the
      pixels; what a convolutional VAE learns from windows serves whole images, as Stable Diffusion's VAE
      trained on 256 px crops serves 512 px ones (at 64 px it learned no faster per unit of compute:
      docs/recipes.md).
    disc_start: optimizer updates before the PatchGAN terms switch on; None = no discriminator.
    disc_weight: weight of the generator's hinge loss; with adaptive_disc_weight multiplied by
      |grad reconstruction| / |grad GAN| at the decoder's last layer `last_layer` (Esser et al. 2021).
    """

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    gradient_weight: float = 0.0
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    crop: int | None = None
    disc_start: int | None = None
    disc_weight: float = 0.5
    adaptive_disc_weight: bool = True
    last_layer: tuple[str, ...] = ("decoder", "conv_out", "kernel")


def make_autoencoder_loss_fn(vae: nn.Module, config: AutoencoderLossConfig,
                             discriminator: nn.Module | None = None) -> LossFn:
    """Loss of one batch {"image": (B, H, W, C) in [-1, 1]} for trainable {"vae": ...} (plus
    {"discriminator": ...} when `discriminator` is given; its hinge loss enters the same scalar with the
    generator's params stopped, so one gradient trains both). Aux: rec_loss, kl, l1 (mean per pixel),
    and with a discriminator g_loss, d_loss, disc_weight."""
    if (discriminator is None) != (config.disc_start is None):
        raise ValueError("autoencoder loss: give a discriminator module exactly when disc_start is set")

    def reconstruction(images, recon):
        diff = recon - images
        per_pixel = config.l1_weight * jnp.abs(diff) + config.l2_weight * jnp.square(diff)
        loss = jnp.sum(per_pixel, axis=(1, 2, 3))
        if config.gradient_weight:
            edges = (jnp.sum(jnp.abs(jnp.diff(diff, axis=axis)), axis=(1, 2, 3)) for axis in (1, 2))
            loss = loss + config.gradient_weight * sum(edges)
        return jnp.mean(loss)

    def loss_fn(trainable, frozen, batch, rng, update_index):
        del frozen
        params = trainable["vae"]
        images = match_channels(batch["image"], vae.config.in_channels).astype(jnp.float32)
        if config.crop is not None:
            rng, crop_rng = jax.random.split(rng)
            images = random_windows(images, config.crop, vae.config.downsampling_factor, crop_rng)
        mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape) if config.sample_posterior else mean
        decode = lambda p: vae.apply({"params": p}, z, method=vae.decode)
        recon = decode(params)
        rec = reconstruction(images, recon)
        kl = jnp.mean(0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        loss = rec + config.kl_weight * kl
        aux = {"rec_loss": rec, "kl": kl, "l1": jnp.mean(jnp.abs(recon - images))}
        if discriminator is None:
            return loss, aux

        disc_params = trainable["discriminator"]
        logits = lambda p, x: discriminator.apply({"params": p}, x)
        gan = lambda r: -jnp.mean(logits(jax.lax.stop_gradient(disc_params), r))
        weight = config.disc_weight
        if config.adaptive_disc_weight:
            weight = weight * _adaptive_weight(lambda p: reconstruction(images, decode(p)),
                                               lambda p: gan(decode(p)), params, config.last_layer)
        g_loss = gan(recon)
        d_loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits(disc_params, images)))
                        + jnp.mean(jax.nn.relu(1.0 + logits(disc_params, jax.lax.stop_gradient(recon)))))
        active = (jnp.asarray(update_index) >= config.disc_start).astype(jnp.float32)
        loss = loss + active * (weight * g_loss + d_loss)
        return loss, {**aux, "g_loss": g_loss, "d_loss": d_loss, "disc_weight": active * weight}
    return loss_fn


def random_windows(images: jax.Array, size: int, grid: int, rng: jax.Array) -> jax.Array:
    """One size x size window of each image (B, H, W, C) -> (B, size, size, C), its top-left corner drawn
    uniformly from the multiples of `grid` that keep it inside the image."""
    height, width = images.shape[1:3]
    if size % grid or not grid <= size <= min(height, width):
        raise ValueError(f"autoencoder crop = {size}: expected a multiple of {grid} (the VAE's downsampling "
                         f"factor) between {grid} and the image side {min(height, width)}")
    y_rng, x_rng = jax.random.split(rng)
    corner = lambda key, side: grid * jax.random.randint(key, (images.shape[0],), 0, (side - size) // grid + 1)
    window = lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), (size, size, image.shape[-1]))
    return jax.vmap(window)(images, corner(y_rng, height), corner(x_rng, width))


def _adaptive_weight(rec_fn, gan_fn, params, last_layer) -> jax.Array:
    """stop_gradient(|d rec / d W| / (|d gan / d W| + 1e-4)) clipped to [0, 1e4], W the last-layer kernel."""
    kernel = finetune_lib.tree_get(params, last_layer)
    with_kernel = lambda k: finetune_lib.tree_set(params, last_layer, k)
    grads = jax.jacrev(lambda k: jnp.stack([rec_fn(with_kernel(k)), gan_fn(with_kernel(k))]))(kernel)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads.reshape(2, -1)), axis=1))
    return jax.lax.stop_gradient(jnp.clip(norms[0] / (norms[1] + 1e-4), 0.0, 1e4))


def make_autoencoder_train_step(vae: nn.Module, config: AutoencoderLossConfig,
                                optimizer: optax.GradientTransformation, mesh: Mesh, state_shardings: TrainState,
                                discriminator: nn.Module | None = None, **step_options) -> Callable:
    """step(state, batch) -> (state, metrics) for the autoencoder stage. With a discriminator, build the
    optimizer as per_key_optimizer({"vae": ..., "discriminator": delayed_start(..., disc_start)})."""
    return make_train_step(make_autoencoder_loss_fn(vae, config, discriminator), optimizer, mesh,
                           state_shardings, **step_options)


def make_reconstruction_metrics(vae: nn.Module, mesh: Mesh, params_shardings: Any) -> Callable:
    """metrics(vae_params, images) -> {"psnr": (B,), "ssim": (B,)} (dB / [0, 1]) of the reconstruction
    through the posterior mean, on images mapped from [-1, 1] to [0, 1]; jitted, replicated output."""
    def metrics(params, images):
        images = match_channels(images, vae.config.in_channels).astype(jnp.float32)
        recon, _, _ = vae.apply({"params": params}, images)
        a, b = (images + 1.0) / 2.0, jnp.clip((recon + 1.0) / 2.0, 0.0, 1.0)
        return {"psnr": psnr(a, b), "ssim": ssim(a, b)}
    return jax.jit(metrics, in_shardings=(params_shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
