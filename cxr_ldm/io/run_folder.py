"""The layout of a train.py workdir, and the writes that keep it consistent.

  <workdir>/config.json                 the run config
  <workdir>/<stage>/checkpoints/        Orbax checkpoints of a stage
  <workdir>/<stage>/done.json           the summary a finished stage writes last
  <workdir>/autoencoder/vae/            the trained VAE (a diffusers AutoencoderKL folder)
  <workdir>/text_pretrain/text_encoder/ the pretrained text encoder (a transformers CLIPTextModel folder)
  <workdir>/pipeline/                   the final model (a diffusers StableDiffusionPipeline folder)
  <workdir>/samples/                    sample grids
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

AUTOENCODER_STAGE = "autoencoder"
TEXT_PRETRAIN_STAGE = "text_pretrain"
LDM_STAGE = "ldm"
EXPORT_DIRNAME = "pipeline"  # where train.py writes the diffusers-format export inside a workdir
CHECKPOINTS_DIRNAME = "checkpoints"
SAMPLES_DIRNAME = "samples"


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def checkpoints_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, CHECKPOINTS_DIRNAME)


def vae_dir(workdir: str) -> str:
    return os.path.join(workdir, AUTOENCODER_STAGE, "vae")


def pretrained_text_encoder_dir(workdir: str) -> str:
    return os.path.join(workdir, TEXT_PRETRAIN_STAGE, "text_encoder")


def export_dir(workdir: str) -> str:
    return os.path.join(workdir, EXPORT_DIRNAME)


def done_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "done.json")


def read_done(workdir: str, stage: str) -> dict | None:
    """The summary a finished stage wrote, or None if the stage has not finished."""
    path = done_path(workdir, stage)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_done(workdir: str, stage: str, summary: dict) -> None:
    path = done_path(workdir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)


def write_folder_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_folder), then replaces `path` by it, so `path` is never half-written."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
