"""Stage 1: the KL autoencoder (VAE) for grayscale CXR, trained or taken from a diffusers folder.

Writes <workdir>/autoencoder/: checkpoints/, vae/ (a diffusers AutoencoderKL folder, written at the
end, with `scaling_factor` measured on the training data) and done.json.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_ldm.data.input_pipeline import ExampleConfig, make_eval_batches, make_train_iterator
from cxr_ldm.imaging import match_channels
from cxr_ldm.io.components import load_component, save_component
from cxr_ldm.io.run_folder import AUTOENCODER_STAGE, vae_dir, write_folder_atomically
from cxr_ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, dummy_inputs
from cxr_ldm.training import optimizer as optimizer_lib
from cxr_ldm.training import sharding as sharding_lib
from cxr_ldm.training import steps as steps_lib
from cxr_ldm.training.checkpoints import StopSignal
from cxr_ldm.training.discriminator import PatchDiscriminator
from cxr_ldm.training.sharding import to_host
from cxr_ldm.training.stage import StageSetup, dataset_name, run_stage
from cxr_ldm.training.state import init_train_state

STAGE = AUTOENCODER_STAGE


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh, tokenizer, stop: StopSignal) -> bool:
    """Trains (or resumes) the autoencoder stage; returns False if `stop` stopped it before the end."""
    return run_stage(STAGE, config, workdir, mesh, lambda: _setup(config, workdir, mesh, tokenizer), stop)


def _setup(config: ml_collections.ConfigDict, workdir: str, mesh, tokenizer) -> StageSetup:
    c = config.autoencoder
    dtype = jnp.dtype(config.compute_dtype)
    rng = jax.random.PRNGKey(config.seed)
    if c.init_from:
        vae, params = load_component(os.path.expanduser(c.init_from), dtype=dtype)
        vae = vae.clone(remat=config.remat)
    else:
        vae = AutoencoderKL(AutoencoderConfig.from_dict(c.model.to_dict(), source="config.autoencoder.model"),
                            dtype=dtype, remat=config.remat)
        params = jax.jit(vae.init)(jax.random.fold_in(rng, 1), *dummy_inputs(vae.config))["params"]
    trainable = {"vae": params}
    optimizer_config = optimizer_lib.OptimizerConfig(
        learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, total_steps=c.num_steps,
        weight_decay=0.0, clip_norm=config.optim.grad_clip, b1=config.optim.b1, b2=config.optim.b2)
    optimizer = optimizer_lib.make_optimizer(optimizer_config)
    discriminator = None
    if c.discriminator_start >= 0:
        discriminator = PatchDiscriminator(base_channels=32, num_layers=2, dtype=dtype)
        trainable["discriminator"] = jax.jit(discriminator.init)(
            jax.random.fold_in(rng, 2), jnp.zeros((1, c.model.sample_size, c.model.sample_size,
                                                   vae.config.out_channels)))["params"]
        optimizer = optimizer_lib.per_key_optimizer({
            "vae": optimizer, "discriminator": optimizer_lib.delayed_start(
                optimizer_lib.make_optimizer(dataclasses.replace(optimizer_config, warmup_steps=0)),
                c.discriminator_start)})
    loss_config = steps_lib.AutoencoderLossConfig(
        l1_weight=c.l1_weight, l2_weight=c.l2_weight, gradient_weight=c.gradient_weight,
        kl_weight=c.kl_weight, crop=c.train_crop,
        disc_start=c.discriminator_start if discriminator is not None else None,
        disc_weight=c.discriminator_weight)
    state, shardings = init_train_state(trainable, {}, optimizer, jax.random.fold_in(rng, 3), mesh)
    step_fn = steps_lib.make_autoencoder_train_step(
        vae, loss_config, optimizer, mesh, shardings, discriminator,
        grad_accum_steps=config.optim.grad_accum_steps,
        learning_rate_fn=optimizer_lib.learning_rate_schedule(optimizer_config))
    iterator = make_train_iterator(
        dataset_name(config), split="train", data_dir=config.data.data_dir, global_batch_size=c.batch_size,
        tokenizer=tokenizer, seed=config.seed,
        examples=ExampleConfig(augment=config.data.augment, oversample=dict(c.oversample)))
    metrics_fn = steps_lib.make_reconstruction_metrics(vae, mesh, shardings.trainable["vae"])

    def validate(step: int, state) -> dict:
        return reconstruction_quality(metrics_fn, state.trainable["vae"], config, tokenizer, mesh)

    def finish(state) -> dict:
        nonlocal vae
        params = to_host(state.trainable["vae"])
        if config.ldm.scaling_factor is not None:
            vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=float(config.ldm.scaling_factor)))
        elif not c.init_from:
            latents = training_latents(vae, params, config, tokenizer, mesh)
            if c.standardize_latents and vae.config.use_quant_conv and vae.config.use_post_quant_conv:
                params, scale = standardize_latent_channels(params, latents.mean((0, 1, 2)),
                                                            latents.std((0, 1, 2))), 1.0
            else:
                scale = 1.0 / float(latents.std())
            vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=scale))
        summary = {"scaling_factor": vae.config.scaling_factor, **validate(c.num_steps, state)}
        if jax.process_index() == 0:
            write_folder_atomically(vae_dir(workdir), lambda path: save_component(vae, params, path))
        return summary

    return StageSetup(state=state, step_fn=step_fn, iterator=iterator, num_steps=c.num_steps, batch_size=c.batch_size,
                      batch_keys=("image",), checkpoint_config={"autoencoder": c.to_dict(), "seed": config.seed},
                      finish=finish, hooks=[(c.eval_every, validate)])


def reconstruction_quality(metrics_fn, vae_params: Any, config, tokenizer, mesh) -> dict:
    """Mean PSNR / SSIM of posterior-mean reconstructions on the first validation batches."""
    c = config.autoencoder
    batches = make_eval_batches(dataset_name(config), split="validation", data_dir=config.data.data_dir,
                                global_batch_size=c.batch_size, tokenizer=tokenizer,
                                num_examples=c.num_eval_batches * c.batch_size)
    totals, count = {"val_psnr": 0.0, "val_ssim": 0.0}, 0
    for batch in batches:
        images = sharding_lib.global_batch_from_process(batch["image"], mesh)
        mask = to_host(sharding_lib.global_batch_from_process(batch["mask"], mesh))
        values = to_host(metrics_fn(vae_params, images))
        totals["val_psnr"] += float(np.sum(values["psnr"] * mask))
        totals["val_ssim"] += float(np.sum(values["ssim"] * mask))
        count += int(mask.sum())
    return {k: v / max(count, 1) for k, v in totals.items()}


def training_latents(vae, params, config, tokenizer, mesh, num_batches: int = 8) -> np.ndarray:
    """Posterior-mean latents (N, h, w, c), float64, of the first `num_batches` training batches."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0])
    iterator = make_train_iterator(dataset_name(config), split="train", data_dir=config.data.data_dir,
                                   global_batch_size=config.autoencoder.batch_size, tokenizer=tokenizer,
                                   seed=config.seed + 1, num_epochs=1)
    latents = []
    for _, batch in zip(range(num_batches), iterator):
        images = match_channels(
            sharding_lib.global_batch_from_process(batch["image"], mesh), vae.config.in_channels)
        latents.append(np.asarray(to_host(encode(params, images)), np.float64))
    return np.concatenate(latents)


def standardize_latent_channels(params: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """VAE params whose latents are standardized per channel, (z - mean) / std, with decoding unchanged.

    The affine map is folded into the 1x1 convs around the latent: quant_conv's mean outputs become
    (m - mean) / std and its log-variance outputs shift by -2 log std (the same posterior, rescaled);
    post_quant_conv takes z' and applies z = z' * std + mean first. With scaling_factor 1 the diffusion
    model then sees zero-mean, unit-variance channels, where one global 1 / std leaves channels with
    large offsets and unequal variances (a per-channel noise schedule). The result is an ordinary
    diffusers AutoencoderKL. mean, std: (latent_channels,) of the posterior means.
    """
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    channels = mean.shape[0]
    quant = {k: np.asarray(v, np.float64) for k, v in params["quant_conv"].items()}
    post = {k: np.asarray(v, np.float64) for k, v in params["post_quant_conv"].items()}
    quant_kernel, quant_bias = quant["kernel"].copy(), quant["bias"].copy()  # (1, 1, 2c, 2c), (2c,)
    quant_kernel[..., :channels] /= std
    quant_bias[:channels] = (quant_bias[:channels] - mean) / std
    quant_bias[channels:] -= 2.0 * np.log(std)
    post_bias = post["bias"] + mean @ post["kernel"][0, 0]  # kernel (1, 1, c_in, c_out)
    post_kernel = post["kernel"] * std[None, None, :, None]
    dtype = np.asarray(params["quant_conv"]["kernel"]).dtype
    cast = lambda x: np.asarray(x, dtype)
    return {**params, "quant_conv": {"kernel": cast(quant_kernel), "bias": cast(quant_bias)},
            "post_quant_conv": {"kernel": cast(post_kernel), "bias": cast(post_bias)}}
