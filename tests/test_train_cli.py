"""train.py as a command: what it refuses, how it says so, its exit status."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
from helpers.training import ROOT, run_train_py

from cxr_ldm.io.run_folder import WorkdirBusyError, workdir_lock

_HOLD = "import sys, time\nfrom cxr_ldm.io.run_folder import workdir_lock\n" \
        "with workdir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"


@contextlib.contextmanager
def lock_held_by_another_process(workdir: pathlib.Path):
    """A subprocess that holds `workdir`'s lock until it is killed (SIGKILL, as in a crash); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()


def test_a_second_run_on_a_busy_workdir_exits_at_once_naming_the_lock_and_its_holder(tmp_path):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    with lock_held_by_another_process(workdir) as pid:
        result = run_train_py("--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {workdir} is in use by pid {pid} on host {socket.gethostname()} (lock file {workdir}/train.lock): "
        "wait for that run to end, or use another --workdir")
    assert "Traceback" not in result.stderr
    assert not data_dir.exists() and sorted(p.name for p in workdir.iterdir()) == ["train.lock"]


def test_the_lock_of_a_crashed_run_is_free(tmp_path):
    with lock_held_by_another_process(tmp_path) as pid:
        with pytest.raises(WorkdirBusyError, match=f"in use by pid {pid} "):
            with workdir_lock(str(tmp_path)):
                pass
    with workdir_lock(str(tmp_path)) as path:  # the holder was killed: the OS released its lock
        assert pathlib.Path(path).read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"


@pytest.mark.parametrize("args, message", [
    (["--config.ldm.nonexistent=1"], "error: unknown config field config.ldm.nonexistent in "
                                     "--config.ldm.nonexistent=1; config.ldm has ['batch_size', "),
    (["--config.ldm.unet.block_out_channel=(64, 64)"], "error: unknown config field config.ldm.unet.block_out_channel "
     "in --config.ldm.unet.block_out_channel=(64, 64) (did you mean config.ldm.unet.block_out_channels?)"),
    (["--config.log_every=often"], "error: flag --config.log_every=often: invalid literal for int()"),
    (["--config.checkpoint_every=0"], "error: config.checkpoint_every = 0: expected an integer >= 1"),
    (["--retrain_from=vae"], "error: retrain_from = 'vae': expected one of ['autoencoder', 'text_pretrain', 'ldm']"),
    (["runs/x"], "error: unexpected arguments ['runs/x']"),
    (["--config=configs/nonexistent.py"], "error: --config: [Errno 2] No such file or directory"),
])
def test_argument_errors_are_one_line_with_exit_status_2(tmp_path, args, message):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    result = run_train_py("--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                          *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not workdir.exists() and not data_dir.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail with ENOSPC")
def test_a_full_disk_is_one_line_naming_the_path(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json.tmp").symlink_to("/dev/full")  # config.json is written first, through its .tmp
    result = run_train_py("--config=configs/tiny.py", f"--workdir={workdir}",
                          f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no space left on device writing {workdir}: free some space and rerun the same command to resume "
        "(checkpoints and exports are written atomically; the last whole ones are kept)")
    assert "Traceback" not in result.stderr


def test_two_processes_started_with_the_launch_flags_train_one_run(tmp_path):
    """--coordinator_address/--num_processes/--process_id: jax.distributed starts before the config file is read
    (the config asks JAX for its backend), the run ends, and only process 0 logs."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    args = ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.stages=('autoencoder',)", "--config.autoencoder.num_steps=4", "--config.autoencoder.eval_every=4",
            f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    processes = [subprocess.Popen([sys.executable, "train.py", *args, f"--process_id={i}"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"}) for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    for process, error in zip(processes, errors):
        assert process.returncode == 0, error[-3000:]
    assert json.loads((workdir / "autoencoder" / "done.json").read_text())["step"] == 4
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], "loss" in row) for row in logged] == [(4, True), (4, False)]
