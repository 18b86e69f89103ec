"""train.py's job: prepare the data set, then run the configured stages in order (finished ones are
skipped), resuming from the workdir's checkpoints. See DESIGN.md for the CLI contract."""
from __future__ import annotations

import os
import sys

import jax
import ml_collections
from jax.experimental import multihost_utils

from cxr_ldm.data import builders
from cxr_ldm.data.tokenizer import load_tokenizer
from cxr_ldm.training.autoencoder_stage import train_autoencoder
from cxr_ldm.training.ldm_stage import train_ldm
from cxr_ldm.training.sharding import make_mesh
from cxr_ldm.training.text_encoder_stage import train_text_encoder

STAGES = {"autoencoder": train_autoencoder, "text_encoder": train_text_encoder, "ldm": train_ldm}


def run(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Runs every stage of `config.stages`; returns False if SIGTERM stopped the run (resumable)."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"config.stages: unknown stage(s) {unknown}; expected some of {sorted(STAGES)}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config.data.data_dir = os.path.abspath(os.path.expanduser(config.data.data_dir))
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    prepare_data(config)
    mesh = make_mesh(data=None if config.mesh.data == -1 else config.mesh.data, fsdp=config.mesh.fsdp)
    _say(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.default_backend()} device(s); workdir {workdir}")
    for stage in config.stages:
        tokenizer = load_tokenizer(config.data.tokenizer)
        if not STAGES[stage](config, workdir, mesh, tokenizer):
            _say(f"stopped by SIGTERM in the {stage} stage after saving a checkpoint; rerun the same "
                 "command to resume")
            return False
    return True


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
