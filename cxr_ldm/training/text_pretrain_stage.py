"""Optional stage before "ldm": pretrains the scratch text encoder by matching report sections.

A text encoder trained from scratch only through the diffusion loss learns the training prompts'
wording; prompts phrased otherwise land near "no finding". This stage first trains it contrastively:
each study's impression and the finding-stating sentences of its FINDINGS section (`report_pairs`) are
embedded (mean over all token states, a linear projection, unit length) and each must pick its partner
out of the batch (symmetric InfoNCE; studies whose films show the same findings, sides and grades,
`report_pairs.finding_group`, are not each other's negatives). The LDM stage then starts its text encoder
from the result instead of a random one.

Writes <workdir>/text_encoder/: checkpoints/, text_encoder/ (a transformers CLIPTextModel folder; the
projection head is dropped) and done.json (validation matching accuracy).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cxr_ldm.data.report_pairs import PAIR_KEYS, make_report_pair_iterator
from cxr_ldm.io.components import save_component
from cxr_ldm.io.run_folder import (
    TEXT_PRETRAIN_STAGE,
    pretrained_text_encoder_dir,
    write_folder_atomically,
)
from cxr_ldm.models.text_encoder import CLIPTextConfig, CLIPTextModel
from cxr_ldm.models.text_encoder import dummy_inputs as text_dummy_inputs
from cxr_ldm.training import optimizer as optimizer_lib
from cxr_ldm.training import sharding as sharding_lib
from cxr_ldm.training import steps as steps_lib
from cxr_ldm.training.checkpoints import StopSignal
from cxr_ldm.training.sharding import to_host
from cxr_ldm.training.stage import StageSetup, dataset_name, run_stage
from cxr_ldm.training.state import init_train_state

STAGE = TEXT_PRETRAIN_STAGE


def new_text_encoder(config: ml_collections.ConfigDict, vocab_size: int) -> tuple[CLIPTextModel, dict]:
    """A randomly initialised text encoder of `config.ldm.text_encoder` (the seed's key 12)."""
    text_config = CLIPTextConfig.from_dict({"vocab_size": vocab_size, **config.ldm.text_encoder.to_dict()},
                                           source="config.ldm.text_encoder")
    model = CLIPTextModel(text_config, dtype=jnp.dtype(config.compute_dtype))
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 12)
    return model, jax.jit(model.init)(rng, *text_dummy_inputs(text_config))["params"]


class SectionProjection(nn.Module):
    """Token states (B, L, D) -> unit vectors (B, features): mean over positions, then a linear map.
    Holds the learned logit scale (log of the inverse temperature, CLIP's start 1 / 0.07)."""

    features: int

    @nn.compact
    def __call__(self, states: jax.Array) -> jax.Array:
        self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())
        z = nn.Dense(self.features, dtype=jnp.float32)(states.astype(jnp.float32).mean(axis=1))
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def section_matching_loss(a: jax.Array, b: jax.Array, groups: jax.Array,
                          logit_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE of paired unit vectors a[i] <-> b[i], both (B, F).

    groups: int (B,); pairs i != j of one group are left out of each other's softmax (neither positive
    nor negative). Returns (mean cross-entropy over both directions, matching accuracy: the fraction of
    rows and columns whose best match, over the same candidates, is their partner or one of its group)."""
    logits = a @ b.T * jnp.exp(logit_scale)
    same_group = groups[:, None] == groups[None, :]
    logits = jnp.where(same_group & ~jnp.eye(len(groups), dtype=bool), -jnp.inf, logits)
    targets = jnp.arange(len(groups))
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, targets).mean())
    hits = jnp.concatenate([groups[jnp.argmax(logits, axis=1)] == groups,
                            groups[jnp.argmax(logits, axis=0)] == groups])
    return loss, hits.mean()


def make_matching_loss(text_encoder: CLIPTextModel, head: SectionProjection):
    """loss_fn(trainable, frozen, batch, rng, update_index) for `steps.make_train_step`;
    trainable = {"text_encoder", "head"}, batch = the `report_pairs.PAIR_KEYS` arrays."""
    def loss_fn(trainable, frozen, batch, rng, update_index):
        def embed(ids):
            states = text_encoder.apply({"params": trainable["text_encoder"]}, ids)
            return head.apply({"params": trainable["head"]}, states)
        loss, accuracy = section_matching_loss(embed(batch["impression_ids"]), embed(batch["findings_ids"]),
                                               batch["label_group"], trainable["head"]["logit_scale"])
        return loss, {"match_accuracy": accuracy}
    return loss_fn


def pretrain_text_encoder(config: ml_collections.ConfigDict, workdir: str, mesh, tokenizer, stop: StopSignal) -> bool:
    """Trains (or resumes) this stage; returns False if `stop` stopped it before the end."""
    return run_stage(STAGE, config, workdir, mesh, lambda: _setup(config, workdir, mesh, tokenizer), stop)


def _setup(config: ml_collections.ConfigDict, workdir: str, mesh, tokenizer) -> StageSetup:
    if config.ldm.init_from:
        raise ValueError(f"config.stages has {STAGE!r} but config.ldm.init_from = {config.ldm.init_from!r} loads "
                         "a trained text encoder: the stage pretrains a new one from scratch; drop one of them")
    c = config.text_pretrain
    text_encoder, text_params = new_text_encoder(config, len(tokenizer))
    max_length = text_encoder.config.max_position_embeddings  # prompts fill the encoder's positions
    head = SectionProjection(c.projection_dim)
    rng = jax.random.PRNGKey(config.seed)
    head_params = jax.jit(head.init)(jax.random.fold_in(rng, 31),
                                     jnp.zeros((1, 1, text_encoder.config.hidden_size)))["params"]
    optimizer_config = optimizer_lib.OptimizerConfig(
        learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, total_steps=c.num_steps,
        weight_decay=c.weight_decay, clip_norm=config.optim.grad_clip, b1=config.optim.b1, b2=config.optim.b2)
    optimizer = optimizer_lib.make_optimizer(optimizer_config)
    state, shardings = init_train_state({"text_encoder": text_params, "head": head_params}, {}, optimizer,
                                        jax.random.fold_in(rng, 32), mesh)
    loss_fn = make_matching_loss(text_encoder, head)
    # One batch is the pool of negatives, so gradients are never accumulated over smaller ones.
    step_fn = steps_lib.make_train_step(loss_fn, optimizer, mesh, shardings,
                                        learning_rate_fn=optimizer_lib.learning_rate_schedule(optimizer_config))
    iterator = make_report_pair_iterator(dataset_name(config), split="train", data_dir=config.data.data_dir,
                                         global_batch_size=c.batch_size, tokenizer=tokenizer, seed=config.seed + 2,
                                         max_length=max_length)

    def finish(state) -> dict:
        validation = validation_matching(loss_fn, state.trainable, config, tokenizer, mesh, max_length)
        params = to_host(state.trainable["text_encoder"])
        if jax.process_index() == 0:
            write_folder_atomically(pretrained_text_encoder_dir(workdir),
                                    lambda path: save_component(text_encoder, params, path))
        return validation

    return StageSetup(state=state, step_fn=step_fn, iterator=iterator, num_steps=c.num_steps, batch_size=c.batch_size,
                      batch_keys=PAIR_KEYS, finish=finish,
                      checkpoint_config={"text_pretrain": c.to_dict(), "text_encoder": config.ldm.text_encoder.to_dict(),
                                         "seed": config.seed})


def validation_matching(loss_fn, trainable, config, tokenizer, mesh, max_length: int) -> dict:
    """Mean loss and matching accuracy over `text_pretrain.num_eval_batches` validation batches of prompts
    padded to `max_length` tokens."""
    c = config.text_pretrain
    evaluate = jax.jit(lambda params, batch: loss_fn(params, {}, batch, None, 0))
    batches = make_report_pair_iterator(dataset_name(config), split="validation", data_dir=config.data.data_dir,
                                        global_batch_size=c.batch_size, tokenizer=tokenizer, seed=0, num_epochs=1,
                                        max_length=max_length)
    losses, accuracies = [], []
    for _, batch in zip(range(c.num_eval_batches), batches):
        loss, aux = evaluate(trainable, sharding_lib.global_batch_from_process({k: batch[k] for k in PAIR_KEYS}, mesh))
        losses.append(float(loss))
        accuracies.append(float(aux["match_accuracy"]))
    if not losses:
        raise ValueError(f"text_pretrain.batch_size = {c.batch_size} exceeds the validation split of "
                         f"{dataset_name(config)}: no validation batch")
    return {"val_match_loss": float(np.mean(losses)), "val_match_accuracy": float(np.mean(accuracies))}
