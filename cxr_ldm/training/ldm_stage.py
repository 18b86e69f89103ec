"""Stage 2: the text-conditioned latent diffusion model (UNet + CLIP text encoder over a frozen VAE).

Starts from scratch (the VAE of stage 1, and the text encoder of the optional "text_pretrain" stage when
it ran) or from a diffusers StableDiffusionPipeline folder
(`config.ldm.init_from`: SD 1.x/2.x, RoentGen; its weight variant and whether its pickles may be read:
`config.ldm.init_variant`, `config.ldm.init_allow_pickle`), and trains what `config.ldm.finetune` selects.
With `config.ldm.text_encoder_from` (a transformers BertModel folder with its WordPiece vocabulary) the UNet is
conditioned on that BERT instead of CLIP, through a learned projection when its width is not the UNet's
`cross_attention_dim` (`models.text_projection.ProjectedTextEncoder`).
With `config.ldm.cache_latents` the training images are encoded once (<workdir>/ldm/latent_cache/,
see `latent_cache`) rather than at every step. Writes <workdir>/ldm/checkpoints/, sample grids in <workdir>/samples/, ldm/done.json and, with
`config.export`, the diffusers pipeline folder <workdir>/pipeline/ that `Pipeline.from_pretrained`
(and diffusers) load.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_ldm.data.input_pipeline import ExampleConfig, corpus_token_ids, make_train_iterator
from cxr_ldm.data.tokenizer import prompt_length, set_prompt_length
from cxr_ldm.diffusion.schedules import SchedulerConfig, compute_alphas_cumprod
from cxr_ldm.io.components import load_component
from cxr_ldm.io.images import make_grid, save_png
from cxr_ldm.io.run_folder import (
    LDM_STAGE,
    adapter_dir,
    export_dir,
    pretrained_text_encoder_dir,
    vae_dir,
    write_folder_atomically,
)
from cxr_ldm.io.weights import PickleRefusedError
from cxr_ldm.models import text_projection
from cxr_ldm.models.bert import BertModel
from cxr_ldm.models.unet import UNet2DConditionModel, UNetConfig
from cxr_ldm.models.unet import dummy_inputs as unet_dummy_inputs
from cxr_ldm.pipeline import Pipeline
from cxr_ldm.training import finetune as finetune_lib
from cxr_ldm.training import latent_cache
from cxr_ldm.training import optimizer as optimizer_lib
from cxr_ldm.training import steps as steps_lib
from cxr_ldm.training.checkpoints import StopSignal
from cxr_ldm.training.sharding import to_host
from cxr_ldm.training.stage import StageSetup, dataset_name, run_stage
from cxr_ldm.training.state import init_train_state
from cxr_ldm.training.text_pretrain_stage import new_text_encoder

STAGE = LDM_STAGE


@dataclasses.dataclass
class LDMSetup:
    """The models, full params and scheduler the LDM stage starts from."""

    models: steps_lib.LDMModels
    params: dict  # {"unet", "text_encoder", "vae"}
    scheduler_file: dict  # a diffusers scheduler_config.json dict


def build_models(config: ml_collections.ConfigDict, workdir: str, vocab_size: int) -> LDMSetup:
    """Loads or initialises UNet, text encoder and VAE as the config says (see module doc)."""
    c = config.ldm
    dtype = jnp.dtype(config.compute_dtype)
    rng = jax.random.PRNGKey(config.seed)
    if c.init_from:
        folder = os.path.expanduser(c.init_from)
        load = functools.partial(load_component, dtype=dtype, variant=c.init_variant, allow_pickle=c.init_allow_pickle)
        try:
            unet, unet_params = load(os.path.join(folder, "unet"))
            if not c.text_encoder_from:
                text_encoder, text_params = load(os.path.join(folder, "text_encoder"))
            vae, vae_params = load(os.path.join(folder, "vae"))
        except PickleRefusedError as err:
            raise err.with_hint("--config.ldm.init_allow_pickle=True") from None
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            scheduler_file = json.load(f)
    else:
        source = vae_dir(workdir)
        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"config.ldm.init_from is None and {source} does not exist: train the autoencoder first "
                "(config.stages = ('autoencoder', 'ldm')) or give a diffusers pipeline folder in ldm.init_from")
        vae, vae_params = load_component(source, dtype=dtype)
        unet = UNet2DConditionModel(UNetConfig.from_dict(c.unet.to_dict(), source="config.ldm.unet"), dtype=dtype)
        unet_params = jax.jit(unet.init)(jax.random.fold_in(rng, 11), *unet_dummy_inputs(unet.config))["params"]
        scheduler_file = c.scheduler.to_dict()
    if c.scaling_factor is not None:
        vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=float(c.scaling_factor)))
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"the UNet takes {unet.config.in_channels} latent channels but the VAE makes "
                         f"{vae.config.latent_channels}")
    unet = unet.clone(remat=config.remat, remat_policy=config.remat_policy)
    if c.text_encoder_from:
        text_encoder, text_params = _bert_text_encoder(c, dtype, unet.config.cross_attention_dim,
                                                       jax.random.fold_in(rng, 13))
    elif not c.init_from:
        text_encoder, text_params = _scratch_text_encoder(config, workdir, vocab_size, dtype)
    return LDMSetup(steps_lib.LDMModels(unet, text_encoder, vae),
                    {"unet": unet_params, "text_encoder": text_params, "vae": vae_params}, scheduler_file)


def _scratch_text_encoder(config: ml_collections.ConfigDict, workdir: str, vocab_size: int, dtype) -> tuple[Any, dict]:
    """The CLIP text encoder of a run from scratch: the text_pretrain stage's, else a new one."""
    pretrained = pretrained_text_encoder_dir(workdir)
    if os.path.isdir(pretrained):  # the "text_pretrain" stage ran
        text_encoder, text_params = load_component(pretrained, dtype=dtype)
        if text_encoder.config.vocab_size != vocab_size:
            raise ValueError(f"the pretrained text encoder in {pretrained} has {text_encoder.config.vocab_size} "
                             f"token rows but the tokenizer {vocab_size}: it was trained with another tokenizer")
        return text_encoder, text_params
    if not finetune_lib.trains_text_encoder(config.ldm.finetune):
        warnings.warn(f"config.ldm.finetune = {config.ldm.finetune!r} keeps the text encoder as it starts, and no "
                      f"text_pretrain stage ran in {workdir}: the LDM is conditioned on a random text "
                      "encoder. Add 'text_pretrain' to config.stages or train it ('unet+text_encoder').",
                      stacklevel=3)
    return new_text_encoder(config, vocab_size)


def _bert_text_encoder(c: ml_collections.ConfigDict, dtype, width: int, rng: jax.Array) -> tuple[Any, dict]:
    """The BertModel of `c.text_encoder_from` as a `ProjectedTextEncoder` to `width` features, and its params
    {"bert", ["projection"]} (the projection initialised from `rng`)."""
    folder = os.path.expanduser(c.text_encoder_from)
    bert, bert_params = load_component(folder, dtype=dtype)
    if not isinstance(bert, BertModel):
        raise ValueError(f"config.ldm.text_encoder_from = {folder}: expected a transformers BertModel folder, "
                         f"got a {type(bert).__name__}")
    params = {"bert": bert_params}
    projection = None
    if bert.config.hidden_size != width:
        projection = text_projection.TextProjection(
            text_projection.TextProjectionConfig(bert.config.hidden_size, width), dtype=dtype)
        params["projection"] = jax.jit(projection.init)(
            rng, *text_projection.dummy_inputs(projection.config))["params"]
    return text_projection.ProjectedTextEncoder(bert, projection), params


def train_ldm(config: ml_collections.ConfigDict, workdir: str, mesh, tokenizer, stop: StopSignal) -> bool:
    """Trains (or resumes) the LDM stage; returns False if `stop` stopped it before the end."""
    return run_stage(STAGE, config, workdir, mesh, lambda: setup(config, workdir, mesh, tokenizer), stop)


def setup(config: ml_collections.ConfigDict, workdir: str, mesh, tokenizer) -> StageSetup:
    """The stage's models, fresh state, jitted step and batches, from a workdir whose earlier stages are done
    (its VAE and text encoder; the latent cache is built if missing)."""
    c = config.ldm
    finetune = finetune_lib.FinetuneConfig(mode=c.finetune, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                                           train_token_embedding=c.train_token_embedding)
    if c.text_encoder_from:
        finetune = dataclasses.replace(finetune, token_embedding_path=text_projection.TOKEN_EMBEDDING_PATH)
    finetune = dataclasses.replace(finetune, trained_token_ids=_trained_token_ids(config, finetune, tokenizer))
    init_token_ids = None
    if c.finetune == "textual_inversion":
        _, init_token_ids = finetune_lib.add_placeholder_tokens(tokenizer, c.placeholder_tokens,
                                                                c.initializer_tokens)
    setup = build_models(config, workdir, vocab_size=len(tokenizer))
    models = setup.models
    # Prompts fill the text encoder's positions (77 for SD's; fewer for a small one trained from
    # scratch), in training, in samples and in the exported tokenizer.
    positions = models.text_encoder.config.max_position_embeddings
    # A BERT's tokenizer states its own prompt length (often 512 positions, of which prompts need few).
    set_prompt_length(tokenizer, min(positions, prompt_length(tokenizer)) if c.text_encoder_from else positions)
    if c.finetune == "textual_inversion":
        models = dataclasses.replace(models, text_encoder=finetune_lib.with_vocab_size(
            models.text_encoder, len(tokenizer)))
    scheduler = SchedulerConfig.from_dict(setup.scheduler_file, source="ldm scheduler config")
    rng = jax.random.PRNGKey(config.seed)
    trainable, frozen = finetune_lib.split_params(finetune, setup.params, rng=jax.random.fold_in(rng, 21),
                                                  init_token_ids=init_token_ids)
    optimizer, lr_fn = _optimizer(config, trainable)
    state, shardings = init_train_state(trainable, frozen, optimizer, jax.random.fold_in(rng, 22), mesh,
                                        use_ema=c.ema_decay is not None)
    loss_config = steps_lib.LDMLossConfig(prediction_type=scheduler.prediction_type, snr_gamma=c.snr_gamma,
                                          snr_offset=c.snr_offset,
                                          timestep_logit_std=c.timestep_logit_std,
                                          timestep_logit_mean=c.timestep_logit_mean,
                                          latent_scale=models.vae.config.scaling_factor,
                                          latent_shift=models.vae.config.shift_factor or 0.0)
    step_fn = steps_lib.make_ldm_train_step(
        models, finetune, loss_config, compute_alphas_cumprod(scheduler), optimizer, mesh, shardings,
        grad_accum_steps=config.optim.grad_accum_steps, ema_decay=c.ema_decay, learning_rate_fn=lr_fn)
    cache = _latent_cache(config, workdir, models.vae, setup.params["vae"])
    iterator = make_train_iterator(
        dataset_name(config), split="train", data_dir=config.data.data_dir, global_batch_size=c.batch_size,
        tokenizer=tokenizer, seed=config.seed + 1,
        examples=ExampleConfig.from_config(config.data, oversample=dict(c.oversample), include_image=cache is None,
                                           include_index=cache is not None))
    frozen_host = to_host(state.frozen)

    def pipeline_of(state) -> Pipeline:
        trained = state.trainable if state.ema is None else state.ema
        params = finetune_lib.merge_params(finetune, to_host(trained), frozen_host)
        return Pipeline(models.unet.clone(remat=False), params["unet"], models.vae, params["vae"],
                        models.text_encoder, params["text_encoder"], tokenizer, scheduler,
                        setup.scheduler_file.get("_class_name", "DDIMScheduler"), setup.scheduler_file)

    def sample_grid(step: int, state) -> dict:
        path = write_sample_grid(pipeline_of(state), config, workdir, f"ldm_step_{step:06d}.png")
        return {"sample_grid": 1} if path else {}

    def finish(state) -> dict:
        if config.export and jax.process_index() == 0:
            write_folder_atomically(export_dir(workdir), pipeline_of(state).save_pretrained)
            finetune_lib.save_adapter(finetune, to_host(state.trainable if state.ema is None else state.ema),
                                      adapter_dir(workdir), c.placeholder_tokens)
        return {"nonfinite_count": int(to_host(state.nonfinite_count))}

    return StageSetup(state=state, step_fn=step_fn, iterator=iterator, num_steps=c.num_steps, batch_size=c.batch_size,
                      batch_keys=("image" if cache is None else "latent_moments", "input_ids"),
                      prepare_batch=None if cache is None else cache.batch_with_latents,
                      checkpoint_config={"ldm": c.to_dict(), "seed": config.seed}, finish=finish,
                      hooks=[(config.sample_every, sample_grid)])


def _latent_cache(config, workdir: str, vae, vae_params) -> latent_cache.LatentCache | None:
    """With config.ldm.cache_latents: the VAE posterior moments of this process's training records
    (encoded once, kept in <workdir>/ldm/latent_cache/), else None (the step encodes the images)."""
    if not config.ldm.get("cache_latents", False):
        return None
    if config.data.augment:
        raise ValueError("config.ldm.cache_latents = True needs config.data.augment = False: random crops "
                         "change the images every epoch, so their latents cannot be cached")
    return latent_cache.load_or_encode(
        vae, vae_params, dataset_name(config), split="train", data_dir=config.data.data_dir,
        cache_dir=os.path.join(workdir, STAGE, latent_cache.CACHE_DIRNAME),
        batch_size=config.ldm.batch_size // jax.process_count())


TRAINED_TOKEN_ROWS = ("all", "corpus")


def _trained_token_ids(config, finetune: finetune_lib.FinetuneConfig, tokenizer) -> tuple[int, ...] | None:
    """The token-table rows that train: None (all of them, or the mode trains no table) or, with
    `ldm.trained_token_rows` "corpus", the tokens of the training split's prompts and reports."""
    rows = config.ldm.trained_token_rows
    if rows not in TRAINED_TOKEN_ROWS:
        raise ValueError(f"config ldm.trained_token_rows = {rows!r}: expected one of {TRAINED_TOKEN_ROWS}")
    if rows == "all" or not finetune.trains_token_table:
        return None
    ids = corpus_token_ids(dataset_name(config), "train", config.data.data_dir, tokenizer)
    return tuple(int(i) for i in ids)


def _optimizer(config, trainable: dict) -> tuple[Any, Any]:
    """AdamW (+ warmup/cosine, clipping); with UNet and text encoder trained, each at its own rate."""
    c = config.ldm
    base = optimizer_lib.OptimizerConfig(
        learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, total_steps=c.num_steps,
        weight_decay=c.weight_decay, clip_norm=config.optim.grad_clip, b1=config.optim.b1, b2=config.optim.b2)
    if set(trainable) == {"unet", "text_encoder"} and c.text_encoder_learning_rate != c.learning_rate:
        text = dataclasses.replace(base, learning_rate=c.text_encoder_learning_rate)
        optimizer = optimizer_lib.per_key_optimizer({"unet": optimizer_lib.make_optimizer(base),
                                                     "text_encoder": optimizer_lib.make_optimizer(text)})
        return optimizer, optimizer_lib.learning_rate_schedule(base)
    return optimizer_lib.make_optimizer(base), optimizer_lib.learning_rate_schedule(base)


def write_sample_grid(pipe: Pipeline, config, workdir: str, name: str) -> str | None:
    """Samples one image per configured prompt and writes a labelled grid to <workdir>/samples/<name>."""
    s = config.sample
    if not s.prompts:
        return None
    images = pipe(list(s.prompts), num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                  sampler=s.sampler, seed=s.seed)
    if jax.process_index() != 0:
        return None
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", name)
    images = np.asarray(images)
    save_png(path, make_grid(images, list(s.prompts), ncols=min(4, len(s.prompts)),
                             scale=max(1, 128 // images.shape[2])))
    return path
