"""train.py's job: lock the workdir, prepare the data set, then run the configured stages in order (finished
ones are skipped), resuming from the workdir's checkpoints (the workdir layout: `cxr_ldm.io.run_folder`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from cxr_ldm.data import builders
from cxr_ldm.data.tokenizer import load_tokenizer, load_wordpiece_tokenizer
from cxr_ldm.io.run_folder import (
    LDM_STAGE,
    SAMPLES_DIRNAME,
    adapter_dir,
    export_dir,
    read_done,
    stage_dir,
    workdir_lock,
    write_file_atomically,
)
from cxr_ldm.training import fingerprint
from cxr_ldm.training.autoencoder_stage import train_autoencoder
from cxr_ldm.training.checkpoints import StopSignal
from cxr_ldm.training.config_check import ConfigError, check_config
from cxr_ldm.training.ldm_stage import train_ldm
from cxr_ldm.training.sharding import make_mesh
from cxr_ldm.training.text_pretrain_stage import pretrain_text_encoder

STAGES = {"autoencoder": train_autoencoder, "text_pretrain": pretrain_text_encoder, "ldm": train_ldm}


def run(config: ml_collections.ConfigDict, workdir: str, retrain_from: str | None = None) -> bool:
    """Runs every stage of `config.stages`; returns False if SIGTERM stopped the run (resumable: each
    stage's progress is checkpointed).

    First the config is checked (`config_check.check_config`: raises `ConfigError`, naming the fields).
    Process 0 holds the workdir's lock (`run_folder.workdir_lock`) from before the data is prepared until
    the end; raises `run_folder.WorkdirBusyError` if another run holds it. Then the stages the workdir
    holds are checked against `config` (`fingerprint.check_workdir`): a stage trained otherwise raises
    `fingerprint.ConfigMismatchError`, or, at or after the stage `retrain_from` names, is deleted with the
    later stages to be trained again. Only then is <workdir>/config.json (re)written.
    """
    check_config(config, jax.device_count())
    if retrain_from is not None and retrain_from not in STAGES:
        raise ConfigError(f"retrain_from = {retrain_from!r}: expected one of {list(STAGES)}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config.data.data_dir = os.path.abspath(os.path.expanduser(config.data.data_dir))
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(), StopSignal() as stop:
        retrain = fingerprint.check_workdir(config, workdir, retrain_from)
        if jax.process_index() == 0:
            _delete_stages(workdir, retrain)
            _write_config(config, workdir)
        return _run_stages(config, workdir, stop)


def tokenizer_source(config: ml_collections.ConfigDict) -> str | None:
    """Where the run's tokenizer comes from: data.tokenizer, else the tokenizer/ of the ldm.init_from pipeline
    (a fine-tune keeps its base model's vocabulary and padding: SD 2.x pads with "!"), else None (embedded)."""
    if config.data.tokenizer:
        return config.data.tokenizer
    init_from = config.ldm.get("init_from")
    if init_from and os.path.isdir(os.path.join(init_from, "tokenizer")):
        return init_from
    return None


def load_run_tokenizer(config: ml_collections.ConfigDict):
    """The WordPiece tokenizer of the ldm.text_encoder_from BERT, else the CLIP tokenizer of `tokenizer_source`."""
    if config.ldm.get("text_encoder_from"):
        return load_wordpiece_tokenizer(os.path.expanduser(config.ldm.text_encoder_from))
    return load_tokenizer(tokenizer_source(config))


def _run_stages(config: ml_collections.ConfigDict, workdir: str, stop: StopSignal) -> bool:
    """Prepares the data and runs the stages; a SIGTERM (`stop`) is honoured after the step it came in, or,
    when it came during the data build or a stage's setup or outputs, once that work is done."""
    clock = time.perf_counter()
    prepare_data(config)
    times = {"data": f"{time.perf_counter() - clock:.0f}"}
    mesh = make_mesh(data=None if config.mesh.data == -1 else config.mesh.data, fsdp=config.mesh.fsdp)
    _say(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.default_backend()} device(s); workdir {workdir}")
    for stage in config.stages:
        if stop.requested():
            _say(f"stopped by SIGTERM before the {stage} stage; rerun the same command to resume")
            return False
        tokenizer = load_run_tokenizer(config)
        if jax.process_index() == 0:
            fingerprint.record(config, workdir, stage)
        done_earlier = read_done(workdir, stage) is not None
        clock = time.perf_counter()
        if not STAGES[stage](config, workdir, mesh, tokenizer, stop):
            _say(f"stopped by SIGTERM in the {stage} stage after saving a checkpoint; rerun the same "
                 "command to resume")
            return False
        times[stage] = "done earlier" if done_earlier else f"{time.perf_counter() - clock:.0f}"
    _say("wall seconds of this run: " + ", ".join(f"{k} {v}" for k, v in times.items())
         + " (a stage's parts: <workdir>/<stage>/done.json)")
    _say_where_the_outputs_are(workdir)
    return True


def _say_where_the_outputs_are(workdir: str) -> None:
    """The run's last lines: its newest sample grid, its exported model (and adapter), and the commands that sample
    and evaluate that model."""
    shown = _shown(workdir)
    lines = [f"done: {shown}"]
    samples = os.path.join(workdir, SAMPLES_DIRNAME)
    grids = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    if grids:
        lines.append(f"  samples   {os.path.join(_shown(samples), grids[-1])}")
    if os.path.isdir(adapter_dir(workdir)):
        lines.append(f"  adapter   {_shown(adapter_dir(workdir))}")
    if os.path.isdir(export_dir(workdir)):
        lines += [f"  pipeline  {_shown(export_dir(workdir))}",
                  f"  sample    python sample.py --checkpoint {shown} --prompt \"Moderate left pleural effusion.\"",
                  f"  evaluate  python -m cxr_ldm.evaluate --checkpoint {shown} --out report.json"]
    _say("\n".join(lines))


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def _delete_stages(workdir: str, stages: list[str]) -> None:
    """Deletes the folders of `stages` (and the export and sample grids with the LDM stage's)."""
    paths = [stage_dir(workdir, s) for s in stages]
    if LDM_STAGE in stages:
        paths += [export_dir(workdir), adapter_dir(workdir), os.path.join(workdir, SAMPLES_DIRNAME)]
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
