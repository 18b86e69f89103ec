"""What each stage of a workdir was trained with, and the check that a rerun would train the same thing.

A stage records its fingerprint in <workdir>/<stage>/fingerprint.json when it starts:

  config: {dotted config field: value} of the fields that change the stage's model or its inputs
  inputs: the data set (name/config@version) and digests of the weight folders the stage loads
          (the workdir's VAE and pretrained text encoder, `init_from` folders)

Before a rerun prepares data or builds a model, `check_workdir` compares every recorded fingerprint with
the one the new config gives. A difference stops the run (`ConfigMismatchError`, naming each differing
field as `ldm.unet.block_out_channels (32, 32) -> (64, 64)`), unless the run was told to retrain from that
stage or an earlier one: the differing stage and every later one are then deleted and trained again.
Raising a finished stage's `num_steps` is such a difference too: the learning-rate schedule spans
`num_steps`, so a longer stage is another training, not a continuation.
"""
from __future__ import annotations

import json
import os

import ml_collections

from cxr_ldm.data import builders
from cxr_ldm.io.run_folder import (
    AUTOENCODER_STAGE,
    LDM_STAGE,
    STAGES,
    TEXT_PRETRAIN_STAGE,
    WorkdirError,
    folder_digest,
    pretrained_text_encoder_dir,
    read_done,
    read_fingerprint,
    stage_dir,
    vae_dir,
    write_fingerprint,
)
from cxr_ldm.json_config import differences, flatten

_COMMON_FIELDS = ("seed", "compute_dtype", "optim", "data.name", "data.config")
# The config sections (and single fields) each stage reads to build and train its model.
CONFIG_FIELDS = {
    AUTOENCODER_STAGE: _COMMON_FIELDS + ("data.augment", "autoencoder", "ldm.scaling_factor"),
    TEXT_PRETRAIN_STAGE: _COMMON_FIELDS + ("data.tokenizer", "text_pretrain", "ldm.text_encoder"),
    LDM_STAGE: _COMMON_FIELDS + ("data", "ldm"),
}
# Fields inside those that change neither the model nor its inputs: where files are (an `init_from`
# folder is recorded by the digest of its contents instead), whether pickles may be read, how often to validate.
IGNORED_FIELDS = frozenset({
    "data.data_dir", "data.manual_dir", "autoencoder.init_from", "ldm.init_from", "ldm.text_encoder_from",
    "ldm.init_allow_pickle",
    "autoencoder.eval_every", "autoencoder.num_eval_batches", "text_pretrain.num_eval_batches"})
# Fields added to the configs after stages were trained, with the value that trains what those stages did
# without them (a field added at None is also taken as unchanged).
ADDED_FIELDS = {"ldm.snr_offset": 0.0, "ldm.timestep_logit_std": 0.0, "ldm.timestep_logit_mean": 0.0}


class ConfigMismatchError(WorkdirError):
    """A stage of the workdir was trained with other settings or inputs than the run asks for."""


def stage_fingerprint(stage: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """{"config": {dotted field: value}, "inputs": {name: str | None}} of `stage` run with `config` in
    `workdir` (values as JSON reads them back: tuples are lists)."""
    flat = flatten(json.loads(json.dumps(config.to_dict())))
    fields = {k: v for k, v in flat.items() if _selected(k, CONFIG_FIELDS[stage]) and k not in IGNORED_FIELDS}
    name = config.data.name
    data = f"{name}/{config.data.config}" if config.data.config else name
    inputs = {"data": f"{data}@{builders.builder_class(name).VERSION}"}
    if stage == AUTOENCODER_STAGE:
        inputs["init_from"] = _digest(config.autoencoder.init_from)
    elif stage == LDM_STAGE and config.ldm.init_from:
        inputs["init_from"] = _digest(config.ldm.init_from)
    elif stage == LDM_STAGE:
        inputs["vae"] = folder_digest(vae_dir(workdir))
        inputs["text_encoder"] = folder_digest(pretrained_text_encoder_dir(workdir))
    if stage == LDM_STAGE and config.ldm.get("text_encoder_from"):
        inputs["text_encoder"] = _digest(config.ldm.text_encoder_from)
    return {"config": fields, "inputs": inputs}


def check_workdir(config: ml_collections.ConfigDict, workdir: str, retrain_from: str | None = None) -> list[str]:
    """The stages of `workdir` to delete and retrain before this run (usually none).

    Compares the recorded fingerprint of each stage that started in `workdir` (all of them, not only
    those of `config.stages`: the workdir's config.json must describe what it holds) with this run's.
    The first stage that differs, and every later stage, are to be retrained if `retrain_from` names it
    or an earlier stage; otherwise raises ConfigMismatchError naming each differing field.
    """
    for index, stage in enumerate(STAGES):
        recorded = read_fingerprint(workdir, stage)
        if recorded is None:
            continue
        current = stage_fingerprint(stage, config, workdir)
        current_config = {key: value for key, value in current["config"].items()
                          if key in recorded["config"] or (value is not None and value != ADDED_FIELDS.get(key))}
        changes = (differences(recorded["config"], current_config)  # named as on the command line
                   + differences({"inputs": recorded["inputs"]}, {"inputs": current["inputs"]}))
        if not changes:
            continue
        if retrain_from is not None and STAGES.index(retrain_from) <= index:
            return [s for s in STAGES[index:] if os.path.exists(stage_dir(workdir, s))]
        raise ConfigMismatchError(
            f"the {stage} stage in {workdir} was trained with other settings: {'; '.join(changes)}. Use a new "
            f"--workdir, or pass --retrain_from={stage} to delete that stage and the later ones and train them again")
    return []


def record(config: ml_collections.ConfigDict, workdir: str, stage: str) -> None:
    """Writes `stage`'s fingerprint when it starts (not for a finished stage, nor over a recorded one)."""
    if read_done(workdir, stage) is None and read_fingerprint(workdir, stage) is None:
        write_fingerprint(workdir, stage, stage_fingerprint(stage, config, workdir))


def _selected(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _digest(folder: str | None) -> str | None:
    return None if not folder else folder_digest(os.path.expanduser(folder))
