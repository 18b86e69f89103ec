"""Small files of a train.py workdir: stage completion markers, atomic folder writes, host copies."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import jax
import ml_collections
from jax.experimental import multihost_utils


def dataset_name(config: ml_collections.ConfigDict) -> str:
    """"name/config" of the TFDS data set of a run config (e.g. "phantom_cxr/64")."""
    return f"{config.data.name}/{config.data.config}" if config.data.config else config.data.name


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


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, multi-process) arrays, the same on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
