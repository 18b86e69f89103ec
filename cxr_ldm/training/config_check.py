"""Checks of a run config before any work: every field that would break the run later (an interval of 0, a
batch that does not split over the devices, an image size the VAE cannot halve, a misspelled name, models
that do not fit together) is named with its full path, e.g. `config.checkpoint_every = 0: expected an
integer >= 1`.
"""
from __future__ import annotations

import os

import ml_collections

from cxr_ldm.data import builders
from cxr_ldm.diffusion.samplers import SAMPLERS
from cxr_ldm.io.run_folder import AUTOENCODER_STAGE, LDM_STAGE, STAGES, TEXT_PRETRAIN_STAGE
from cxr_ldm.models.autoencoder import AutoencoderConfig
from cxr_ldm.models.layers import REMAT_POLICIES
from cxr_ldm.models.text_encoder import CLIPTextConfig
from cxr_ldm.models.unet import UNetConfig
from cxr_ldm.training.finetune import FINETUNE_MODES
from cxr_ldm.training.ldm_stage import TRAINED_TOKEN_ROWS

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Integer fields that must be >= 1: every run reads the first group, a stage in config.stages its own.
_COUNTS = ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints", "max_nonfinite_steps",
           "optim.grad_accum_steps", "data.resolution", "sample.steps")
_STAGE_COUNTS = {
    AUTOENCODER_STAGE: ("autoencoder.batch_size", "autoencoder.num_steps", "autoencoder.eval_every",
                        "autoencoder.num_eval_batches"),
    TEXT_PRETRAIN_STAGE: ("text_pretrain.batch_size", "text_pretrain.num_steps", "text_pretrain.num_eval_batches",
                          "text_pretrain.projection_dim"),
    LDM_STAGE: ("ldm.batch_size", "ldm.num_steps"),
}


class ConfigError(ValueError):
    """A run config that cannot work; the message (one line) names each offending field."""


def check_config(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ConfigError naming every field of `config` that would break a run on `device_count` devices."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        renamed = " (the 'text_encoder' stage is now called 'text_pretrain')" if "text_encoder" in unknown else ""
        raise ConfigError(f"config.stages: unknown stage(s) {unknown}; expected some of {list(STAGES)}{renamed}")
    problems = [f"config.{name} = {_get(config, name)!r}: expected an integer >= 1"
                for name in _COUNTS + sum((_STAGE_COUNTS[s] for s in config.stages), ())
                if not _is_count(_get(config, name))]
    if not problems:
        problems = (_schedule_problems(config) + _device_problems(config, device_count) + _data_problems(config)
                    + _name_problems(config) + _bert_problems(config) + _ldm_loss_problems(config))
    if problems:
        raise ConfigError("; ".join(problems))
    check_models_fit(config)


def check_models_fit(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError, naming the config fields, if the models this config builds from scratch cannot
    work together.

    Checked where the config (not an `init_from` folder) defines the models: the text encoder's width
    against the UNet's `cross_attention_dim` (the UNet would otherwise train key/value weights that its own
    config and diffusers contradict), and, when this run trains the VAE, its latent channels against the
    UNet's channels and `data.resolution` / the VAE's downsampling factor against `ldm.unet.sample_size`
    (the exported pipeline's default image size).
    """
    if LDM_STAGE not in config.stages or config.ldm.init_from:
        return
    unet = _model_config(UNetConfig, config.ldm.unet, "config.ldm.unet")
    text = _model_config(CLIPTextConfig, config.ldm.text_encoder, "config.ldm.text_encoder")
    problems = []
    if text.hidden_size != unet.cross_attention_dim and not config.ldm.get("text_encoder_from"):  # BERT: projected
        problems.append(f"config.ldm.text_encoder.hidden_size={text.hidden_size} differs from "
                        f"config.ldm.unet.cross_attention_dim={unet.cross_attention_dim}")
    if AUTOENCODER_STAGE in config.stages and not config.autoencoder.init_from:
        vae = _autoencoder(config)
        for name in ("in_channels", "out_channels"):
            if getattr(unet, name) != vae.latent_channels:
                problems.append(f"config.ldm.unet.{name}={getattr(unet, name)} differs from "
                                f"config.autoencoder.model.latent_channels={vae.latent_channels}")
        latent_size, rest = divmod(config.data.resolution, vae.downsampling_factor)
        if rest or unet.sample_size not in (latent_size, (latent_size, latent_size)):
            problems.append(f"config.ldm.unet.sample_size={unet.sample_size} is not config.data.resolution="
                            f"{config.data.resolution} / {vae.downsampling_factor} (the downsampling factor of "
                            f"config.autoencoder.model's {len(vae.block_out_channels)} blocks)")
    if problems:
        raise ConfigError("the configured models do not fit together: " + "; ".join(problems))


def _schedule_problems(config) -> list[str]:
    """Warmup shorter than the stage: the cosine schedule decays over the steps after it."""
    return [f"config.{s}.warmup_steps = {config[s].warmup_steps}: expected 0 <= warmup_steps < "
            f"config.{s}.num_steps = {config[s].num_steps}" for s in config.stages
            if not (isinstance(config[s].warmup_steps, int) and 0 <= config[s].warmup_steps < config[s].num_steps)]


def _device_problems(config, device_count: int) -> list[str]:
    """The mesh covers the devices; every global batch splits evenly over them (and the gradient
    accumulation steps of the stages that accumulate)."""
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if not (_is_count(fsdp) and device_count % fsdp == 0 and (data == -1 or data * fsdp == device_count)):
        return [f"config.mesh = (data {data}, fsdp {fsdp}): expected fsdp dividing the {device_count} device(s) "
                "and data = -1 (the rest) or data * fsdp = the device count"]
    problems = []
    for stage in config.stages:
        accumulated = 1 if stage == TEXT_PRETRAIN_STAGE else config.optim.grad_accum_steps  # its batch is whole
        parts = device_count * accumulated
        if config[stage].batch_size % parts:
            splits = f"{device_count} device(s)" + (f" x config.optim.grad_accum_steps {accumulated}"
                                                      if accumulated > 1 else "")
            problems.append(f"config.{stage}.batch_size = {config[stage].batch_size}: expected a multiple of "
                            f"{splits} = {parts}")
    return problems


def _data_problems(config) -> list[str]:
    """A known data set and config, whose images have the side `data.resolution` says, which the VAE this run
    trains can downsample."""
    try:
        builder = builders.builder_class(config.data.name)
    except ValueError as e:
        return [f"config.data.name: {e}"]
    configs = {c.name: c for c in builder.BUILDER_CONFIGS}
    name = config.data.config or builder.DEFAULT_CONFIG_NAME or builder.BUILDER_CONFIGS[0].name  # TFDS's default
    if name not in configs:
        return [f"config.data.config = {config.data.config!r}: {config.data.name} has the configs {list(configs)}"]
    problems = []
    side = configs[name].resolution
    if config.data.resolution != side:
        problems.append(f"config.data.resolution = {config.data.resolution}: the images of "
                        f"{config.data.name}/{name} are {side} px")
    if AUTOENCODER_STAGE in config.stages and not config.autoencoder.init_from:  # else the folder's VAE
        factor = _autoencoder(config).downsampling_factor
        if side % factor:
            problems.append(f"config.data.resolution = {side}: expected a multiple of {factor}, the downsampling "
                            "factor of config.autoencoder.model")
        crop = config.autoencoder.train_crop
        if crop is not None and not (_is_count(crop) and crop % factor == 0 and crop <= side):
            problems.append(f"config.autoencoder.train_crop = {crop!r}: expected a multiple of {factor} (the "
                            f"VAE's downsampling factor) up to the image side {side}, or None")
    return problems


def _ldm_loss_problems(config) -> list[str]:
    if LDM_STAGE not in config.stages:
        return []
    c, problems = config.ldm, []
    if c.snr_offset and c.snr_gamma is None:
        problems.append(f"config.ldm.snr_offset = {c.snr_offset}: it adds to the min-SNR weight, so it needs "
                        "config.ldm.snr_gamma")
    if not c.timestep_logit_std >= 0:
        problems.append(f"config.ldm.timestep_logit_std = {c.timestep_logit_std}: expected >= 0 (0: uniform)")
    return problems


def _name_problems(config) -> list[str]:
    checks = [("compute_dtype", COMPUTE_DTYPES)]
    if LDM_STAGE in config.stages:
        checks += [("ldm.finetune", FINETUNE_MODES), ("ldm.trained_token_rows", TRAINED_TOKEN_ROWS),
                   ("sample.sampler", SAMPLERS), ("remat_policy", tuple(REMAT_POLICIES))]
    return [f"config.{name} = {_get(config, name)!r}: expected one of {list(allowed)}"
            for name, allowed in checks if _get(config, name) not in allowed]


def _bert_problems(config) -> list[str]:
    """What does not go with conditioning on the BERT of config.ldm.text_encoder_from."""
    folder = config.ldm.get("text_encoder_from")
    if LDM_STAGE not in config.stages or not folder:
        return []
    problems = []
    if not os.path.isdir(os.path.expanduser(folder)):
        problems.append(f"config.ldm.text_encoder_from = {folder!r}: no such folder")
    if TEXT_PRETRAIN_STAGE in config.stages:
        problems.append(f"config.stages = {tuple(config.stages)}: the text_pretrain stage pretrains a CLIP text "
                        "encoder that the LDM conditioned on config.ldm.text_encoder_from does not use; drop it")
    if config.ldm.finetune == "textual_inversion":
        problems.append("config.ldm.finetune = 'textual_inversion' adds tokens to a CLIP tokenizer; it does not "
                        "apply to the BERT of config.ldm.text_encoder_from")
    return problems


def _autoencoder(config) -> AutoencoderConfig:
    return _model_config(AutoencoderConfig, config.autoencoder.model, "config.autoencoder.model")


def _model_config(cls, section: ml_collections.ConfigDict, source: str):
    """`cls.from_dict` of a config section; the ValueError naming a field it cannot take as a ConfigError."""
    try:
        return cls.from_dict(section.to_dict(), source=source)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _get(config, dotted_name: str):
    for part in dotted_name.split("."):
        config = config[part]
    return config


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
