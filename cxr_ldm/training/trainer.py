"""train.py's job: lock the workdir, prepare the data set, then run the configured stages in order (finished
ones are skipped), resuming from the workdir's checkpoints (the workdir layout: `cxr_ldm.io.run_folder`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

import jax
import ml_collections
from jax.experimental import multihost_utils

from cxr_ldm.data import builders
from cxr_ldm.data.tokenizer import load_tokenizer
from cxr_ldm.io.run_folder import (
    LDM_STAGE,
    SAMPLES_DIRNAME,
    export_dir,
    stage_dir,
    workdir_lock,
    write_file_atomically,
)
from cxr_ldm.models.autoencoder import AutoencoderConfig
from cxr_ldm.models.text_encoder import CLIPTextConfig
from cxr_ldm.models.unet import UNetConfig
from cxr_ldm.training import fingerprint
from cxr_ldm.training.autoencoder_stage import train_autoencoder
from cxr_ldm.training.ldm_stage import train_ldm
from cxr_ldm.training.sharding import make_mesh
from cxr_ldm.training.text_pretrain_stage import pretrain_text_encoder

STAGES = {"autoencoder": train_autoencoder, "text_pretrain": pretrain_text_encoder, "ldm": train_ldm}


def run(config: ml_collections.ConfigDict, workdir: str, retrain_from: str | None = None) -> bool:
    """Runs every stage of `config.stages`; returns False if SIGTERM stopped the run (resumable).

    Process 0 holds the workdir's lock (`run_folder.workdir_lock`) from before the data is prepared until
    the end; raises `run_folder.WorkdirBusyError` if another run holds it. Then the stages the workdir
    holds are checked against `config` (`fingerprint.check_workdir`): a stage trained otherwise raises
    `fingerprint.ConfigMismatchError`, or, at or after the stage `retrain_from` names, is deleted with the
    later stages to be trained again. Only then is <workdir>/config.json (re)written.
    """
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        renamed = " (the 'text_encoder' stage is now called 'text_pretrain')" if "text_encoder" in unknown else ""
        raise ValueError(f"config.stages: unknown stage(s) {unknown}; expected some of {sorted(STAGES)}{renamed}")
    if retrain_from is not None and retrain_from not in STAGES:
        raise ValueError(f"retrain_from: unknown stage {retrain_from!r}; expected one of {list(STAGES)}")
    check_models_fit(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config.data.data_dir = os.path.abspath(os.path.expanduser(config.data.data_dir))
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        retrain = fingerprint.check_workdir(config, workdir, retrain_from)
        if jax.process_index() == 0:
            _delete_stages(workdir, retrain)
            _write_config(config, workdir)
        return _run_stages(config, workdir)


def _run_stages(config: ml_collections.ConfigDict, workdir: str) -> bool:
    prepare_data(config)
    mesh = make_mesh(data=None if config.mesh.data == -1 else config.mesh.data, fsdp=config.mesh.fsdp)
    _say(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.default_backend()} device(s); workdir {workdir}")
    for stage in config.stages:
        tokenizer = load_tokenizer(config.data.tokenizer)
        if jax.process_index() == 0:
            fingerprint.record(config, workdir, stage)
        if not STAGES[stage](config, workdir, mesh, tokenizer):
            _say(f"stopped by SIGTERM in the {stage} stage after saving a checkpoint; rerun the same "
                 "command to resume")
            return False
    return True


def _delete_stages(workdir: str, stages: list[str]) -> None:
    """Deletes the folders of `stages` (and the export and sample grids with the LDM stage's)."""
    paths = [stage_dir(workdir, s) for s in stages]
    if LDM_STAGE in stages:
        paths += [export_dir(workdir), os.path.join(workdir, SAMPLES_DIRNAME)]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    if stages:
        _say(f"retraining the stage(s) {stages}: their settings differ from what the workdir recorded; deleted "
             f"{[os.path.relpath(p, workdir) for p in paths]}")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes <workdir>/config.json (if it changed), after the fingerprint check found the config true of
    every stage the workdir holds: other fields may differ only where they change no model or describe
    stages still to train."""
    path, text = os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    write_file_atomically(path, text)


def check_models_fit(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the config fields, if the models this config builds from scratch cannot
    work together; run before any stage, so that a mismatch is not found hours into training.

    Checked where the config (not an `init_from` folder) defines the models: the text encoder's width
    against the UNet's `cross_attention_dim` (the UNet would otherwise train key/value weights that its own
    config and diffusers contradict), and, when this run trains the VAE, its latent channels against the
    UNet's channels and `data.resolution` / the VAE's downsampling factor against `ldm.unet.sample_size`
    (the exported pipeline's default image size).
    """
    if "ldm" not in config.stages or config.ldm.init_from:
        return
    unet = UNetConfig.from_dict(config.ldm.unet.to_dict(), source="config.ldm.unet")
    text = CLIPTextConfig.from_dict(config.ldm.text_encoder.to_dict(), source="config.ldm.text_encoder")
    problems = []
    if text.hidden_size != unet.cross_attention_dim:
        problems.append(f"config.ldm.text_encoder.hidden_size={text.hidden_size} differs from "
                        f"config.ldm.unet.cross_attention_dim={unet.cross_attention_dim}")
    if "autoencoder" in config.stages and not config.autoencoder.init_from:
        vae = AutoencoderConfig.from_dict(config.autoencoder.model.to_dict(), source="config.autoencoder.model")
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
        raise ValueError("the configured models do not fit together: " + "; ".join(problems))


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Builds the TFDS data set if absent: process 0 first, the others after it finished."""
    def build():
        builders.prepare(config.data.name, config.data.data_dir, config.data.config or None,
                         manual_dir=config.data.manual_dir)
    if jax.process_index() == 0:
        build()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cxr_ldm data prepared")
        if jax.process_index() != 0:
            build()


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
