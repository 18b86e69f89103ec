"""The layout of a train.py workdir, and the writes that keep it consistent.

  <workdir>/config.json                 the run config
  <workdir>/train.lock                  flock'ed by the train.py process that uses the workdir (its pid and host)
  <workdir>/<stage>/checkpoints/        Orbax checkpoints of a stage
  <workdir>/<stage>/fingerprint.json    what the stage trains with (its config fields and inputs), written first
  <workdir>/<stage>/done.json           the summary a finished stage writes last
  <workdir>/autoencoder/vae/            the trained VAE (a diffusers AutoencoderKL folder)
  <workdir>/text_pretrain/text_encoder/ the pretrained text encoder (a transformers CLIPTextModel folder)
  <workdir>/pipeline/                   the final model (a diffusers StableDiffusionPipeline folder)
  <workdir>/adapter/                    a "lora" / "textual_inversion" run's LoRA or embeddings alone (io.adapters)
  <workdir>/samples/                    sample grids
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from typing import Callable, Iterator

AUTOENCODER_STAGE = "autoencoder"
TEXT_PRETRAIN_STAGE = "text_pretrain"
LDM_STAGE = "ldm"
STAGES = (AUTOENCODER_STAGE, TEXT_PRETRAIN_STAGE, LDM_STAGE)  # in the order they run
EXPORT_DIRNAME = "pipeline"  # where train.py writes the diffusers-format export inside a workdir
ADAPTER_DIRNAME = "adapter"  # the LoRA / textual-inversion files of a run that trains an adapter
CHECKPOINTS_DIRNAME = "checkpoints"
SAMPLES_DIRNAME = "samples"
LOCK_FILENAME = "train.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot serve this run; the message (one line) says why and what to do."""


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's lock."""


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


def adapter_dir(workdir: str) -> str:
    return os.path.join(workdir, ADAPTER_DIRNAME)


def done_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "done.json")


def fingerprint_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "fingerprint.json")


def read_done(workdir: str, stage: str) -> dict | None:
    """The summary a finished stage wrote, or None if the stage has not finished."""
    return _read_json(done_path(workdir, stage))


def write_done(workdir: str, stage: str, summary: dict) -> None:
    write_file_atomically(done_path(workdir, stage), json.dumps(summary, indent=2))


def read_fingerprint(workdir: str, stage: str) -> dict | None:
    """What `stage` was started with (see `training.fingerprint`), or None if it never started."""
    return _read_json(fingerprint_path(workdir, stage))


def write_fingerprint(workdir: str, stage: str, fingerprint: dict) -> None:
    write_file_atomically(fingerprint_path(workdir, stage), json.dumps(fingerprint, indent=2))


def write_file_atomically(path: str, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it: `path` is never half-written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def folder_digest(path: str) -> str | None:
    """"sha256:<16 hex digits>" of the names and contents of every file under `path` (None if absent):
    what a stage records of a weights folder it loads, to notice when it is replaced."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(root, name)
            digest.update(f"{os.path.relpath(file, path)}\0{os.path.getsize(file)}\0".encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_folder_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_folder), then replaces `path` by it, so `path` is never half-written."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
    """Holds an exclusive flock on <workdir>/train.lock (created if absent) while the block runs; yields its path.

    The file records the holder's pid and host. The OS drops the lock when the holder exits, however it
    exits, so a crashed run leaves no stale lock (the file stays; only the flock counts). Raises
    WorkdirBusyError, naming the file and the holder, when another process holds it.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILENAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            raise WorkdirBusyError(f"{workdir} is in use by {holder} (lock file {path}): wait for that run to "
                                   "end, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)
