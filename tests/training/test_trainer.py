"""train.py end to end on the tiny config: the three stages, outputs, exact resume after a preemption in each."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal

import numpy as np
import pytest
from helpers.training import run_train_py

from cxr_ldm.data.tokenizer import prompt_length
from cxr_ldm.training import autoencoder_stage, checkpoints, fingerprint, ldm_stage, text_pretrain_stage
from cxr_ldm.training import logger as logger_lib
from cxr_ldm.training import trainer
from configs import tiny

STAGES = ("autoencoder", "text_pretrain", "ldm")


# configs/tiny.py at 6 steps a stage, logged at every step
OVERRIDES = {"autoencoder.num_steps": 6, "autoencoder.eval_every": 6, "autoencoder.warmup_steps": 1,
             "text_pretrain.num_steps": 6, "text_pretrain.warmup_steps": 1, "ldm.num_steps": 6,
             "ldm.warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "sample_every": 6, "sample.steps": 2}


def _config(data_dir):
    config = tiny.get_config()
    assert tuple(config.stages) == STAGES
    config.data.data_dir = str(data_dir)
    for name, value in OVERRIDES.items():
        _set(config, name, value)
    return config


def _set(config, dotted_name: str, value) -> None:
    *sections, field = dotted_name.split(".")
    for section in sections:
        config = config[section]
    config[field] = value


def _flags(data_dir, workdir) -> list[str]:
    """The train.py arguments of `_config(data_dir)` and `workdir`."""
    return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            *(f"--config.{name}={value}" for name, value in OVERRIDES.items())]


def _files(folder) -> dict:
    """{relative path: (size, mtime)} of every file under `folder` but the lock (which each run takes)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != "train.lock"}


def _losses(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """The workdir of an uninterrupted tiny run (the module's first, which builds the data set) and what it printed
    (stdout and stderr)."""
    workdir, printed = tmp_path_factory.mktemp("straight"), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        finished = trainer.run(_config(data_dir), str(workdir))
    assert finished, printed.getvalue()[-4000:]
    return workdir, printed.getvalue()


@pytest.fixture(scope="module")
def straight(straight_run):
    return straight_run[0]


def test_a_run_says_what_it_builds_and_ends_with_where_its_outputs_are(data_dir, straight_run):
    workdir, printed = straight_run
    assert f"building the phantom data set phantom_cxr/tiny: 160 studies in {data_dir}\n" in printed
    assert "Downloading and preparing" not in printed and "downloaded and prepared" not in printed
    assert "wall seconds of this run: data " in printed and ", ldm " in printed
    assert printed.endswith(
        f"done: {workdir}\n"
        f"  samples   {workdir}/samples/ldm_step_000006.png\n"
        f"  pipeline  {workdir}/pipeline\n"
        f"  sample    python sample.py --checkpoint {workdir} --prompt \"Moderate left pleural effusion.\"\n"
        f"  evaluate  python -m cxr_ldm.evaluate --checkpoint {workdir} --out report.json\n")


def _sigterm_at(monkeypatch, events: list) -> None:
    """Sends this process a SIGTERM at each of `events` in turn: (stage, step) just after that step was
    logged, (stage, "outputs") as that stage starts writing its exported folder, "data" as the data is
    prepared. Each event is popped from `events` when its SIGTERM is sent."""
    def at(event):
        if events and events[0] == event:
            events.pop(0)
            os.kill(os.getpid(), signal.SIGTERM)

    log = logger_lib.MetricsLogger.log

    def log_then_sigterm(self, step, metrics):
        record = log(self, step, metrics)
        at((self.stage, step))
        return record
    monkeypatch.setattr(logger_lib.MetricsLogger, "log", log_then_sigterm)
    for module in (autoencoder_stage, text_pretrain_stage, ldm_stage):
        write = module.write_folder_atomically
        monkeypatch.setattr(module, "write_folder_atomically",
                            lambda path, fn, write=write, stage=module.STAGE: (at((stage, "outputs")), write(path, fn)))
    prepare_data = trainer.prepare_data
    monkeypatch.setattr(trainer, "prepare_data", lambda config: (at("data"), prepare_data(config)))


def test_preempted_run_resumes_to_the_same_weights(data_dir, straight, tmp_path, monkeypatch):
    """SIGTERM at a step that writes a periodic checkpoint (checkpoint_every = 2), while a stage exports its
    outputs, at a stage's last step and at a step between checkpoints: each run stops with exit status 0 (False
    here) and the last rerun ends with the losses and weights of the run never stopped."""
    interrupted = tmp_path / "interrupted"
    events = [("autoencoder", 4), ("autoencoder", "outputs"), ("text_pretrain", 6), ("ldm", 3)]
    _sigterm_at(monkeypatch, events)
    assert not trainer.run(_config(data_dir), str(interrupted))
    with checkpoints.Checkpointer(str(interrupted / "autoencoder" / "checkpoints")) as saved:
        assert saved.all_steps() == [2, 4]  # step 4 saved once, though both the interval and the stop asked
    assert not (interrupted / "autoencoder" / "done.json").exists()
    assert [n for _, n, _ in _losses(interrupted)] == [1, 2, 3, 4]

    assert not trainer.run(_config(data_dir), str(interrupted))  # stopped after the export it was writing
    assert (interrupted / "autoencoder" / "done.json").exists() and (interrupted / "autoencoder" / "vae").is_dir()
    assert not (interrupted / "text_pretrain").exists()  # the next stage did not start

    assert not trainer.run(_config(data_dir), str(interrupted))  # the last step's checkpoint; outputs on resume
    assert not (interrupted / "text_pretrain" / "done.json").exists()
    with checkpoints.Checkpointer(str(interrupted / "text_pretrain" / "checkpoints")) as saved:
        assert saved.latest_step() == 6

    assert not trainer.run(_config(data_dir), str(interrupted))
    assert (interrupted / "text_pretrain" / "text_encoder").is_dir()
    assert [(s, n) for s, n, _ in _losses(interrupted)][-1] == ("ldm", 3)
    assert not events
    cache = interrupted / "ldm" / "latent_cache" / "train-shard0of1.npy"
    stamp = cache.stat().st_mtime_ns
    assert trainer.run(_config(data_dir), str(interrupted))
    assert cache.stat().st_mtime_ns == stamp  # the resumed LDM stage read the latents cached before
    # done.json times the invocation that finished the stage: the LDM stage resumed at its step-3 checkpoint.
    assert json.loads((interrupted / "ldm" / "done.json").read_text())["seconds"]["steps_run"] == 3
    straight_times = json.loads((straight / "ldm" / "done.json").read_text())["seconds"]
    assert straight_times["steps_run"] == 6
    assert min(straight_times[k] for k in ("setup", "steps", "hooks", "finish")) > 0

    expected, got = _losses(straight), _losses(interrupted)
    assert [(s, n) for s, n, _ in got] == [(s, n) for s in STAGES for n in range(1, 7)]
    assert got == expected
    assert (interrupted / "samples" / "ldm_step_000006.png").exists()
    weights = sorted(p.relative_to(straight) for p in straight.glob("pipeline/*/*.safetensors"))
    assert len(weights) == 3  # unet, text_encoder, vae
    for path in weights:
        assert (interrupted / path).read_bytes() == (straight / path).read_bytes(), path


def test_a_sigterm_during_the_data_build_stops_before_the_first_stage(data_dir, tmp_path, monkeypatch):
    _sigterm_at(monkeypatch, ["data"])
    assert not trainer.run(_config(data_dir), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "train.lock"]


def test_finished_run_is_skipped_and_exports_a_loadable_pipeline(data_dir, straight, capsys):
    import cxr_ldm
    before = (straight / "metrics.jsonl").read_text()
    config = _config(data_dir)
    config.update(log_every=3, checkpoint_every=3)  # settings that change no model: accepted, and recorded
    config.sample.steps, config.autoencoder.eval_every = 3, 3
    assert trainer.run(config, str(straight))  # all stages done: nothing is retrained
    assert "autoencoder done earlier, text_pretrain done earlier, ldm done earlier" in capsys.readouterr().err
    assert (straight / "metrics.jsonl").read_text() == before
    assert json.loads((straight / "config.json").read_text())["log_every"] == 3
    pipe = cxr_ldm.Pipeline.from_pretrained(straight)
    images = pipe(["Large left pleural effusion."], num_inference_steps=2, seed=0)
    assert images.shape == (1, 32, 32, 1) and np.isfinite(images).all()
    # Prompts were padded to the scratch text encoder's positions in training; the export keeps that.
    positions = _config(data_dir).ldm.text_encoder.max_position_embeddings
    assert positions < 77 and prompt_length(pipe.tokenizer) == positions
    vae_done = json.loads((straight / "autoencoder" / "done.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_done["scaling_factor"])


def test_unknown_stage_and_missing_vae_are_named(data_dir, tmp_path):
    config = _config(data_dir)
    config.stages = ("pretrain",)
    with pytest.raises(ValueError, match="unknown stage"):
        trainer.run(config, str(tmp_path / "a"))
    config.stages = ("autoencoder", "text_encoder", "ldm")
    with pytest.raises(ValueError, match="'text_encoder' stage is now called 'text_pretrain'"):
        trainer.run(config, str(tmp_path / "a"))
    config = _config(data_dir)
    config.stages = ("ldm",)
    with pytest.raises(FileNotFoundError, match="train the autoencoder first"):
        trainer.run(config, str(tmp_path / "b"))


def test_a_finished_run_rerun_with_a_wider_unet_exits_before_any_work(data_dir, straight):
    before, config_json = _files(straight), (straight / "config.json").read_bytes()
    result = run_train_py(*_flags(data_dir, straight), "--config.ldm.unet.block_out_channels=(64, 64)")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the ldm stage in {straight} was trained with other settings: ldm.unet.block_out_channels "
        "(32, 32) -> (64, 64). Use a new --workdir, or pass --retrain_from=ldm to delete that stage and the "
        "later ones and train them again")
    assert (straight / "config.json").read_bytes() == config_json
    assert _files(straight) == before


@pytest.mark.parametrize("field, value, retrain_from, message", [
    ("autoencoder.model.block_out_channels", (16, 64), None,
     "the autoencoder stage in {} was trained with other settings: autoencoder.model.block_out_channels "
     "(16, 32) -> (16, 64). Use a new --workdir, or pass --retrain_from=autoencoder"),
    ("autoencoder.model.block_out_channels", (16, 64), "ldm", "--retrain_from=autoencoder"),  # too late a stage
    ("ldm.num_steps", 12, None, "the ldm stage in {} was trained with other settings: ldm.num_steps 6 -> 12."),
    ("ldm.text_encoder.intermediate_size", 96, None, "ldm.text_encoder.intermediate_size 64 -> 96"),
])
def test_a_finished_stage_trained_otherwise_is_refused_before_any_work(data_dir, straight, monkeypatch, field,
                                                                      value, retrain_from, message):
    monkeypatch.setattr(trainer, "prepare_data", lambda config: pytest.fail("the data was prepared"))
    before, config_json = _files(straight), (straight / "config.json").read_bytes()
    config = _config(data_dir)
    _set(config, field, value)
    with pytest.raises(fingerprint.ConfigMismatchError) as raised:
        trainer.run(config, str(straight), retrain_from=retrain_from)
    assert message.format(straight) in str(raised.value)
    assert (straight / "config.json").read_bytes() == config_json
    assert _files(straight) == before


def test_a_started_stage_is_checked_as_a_finished_one(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "prepare_data", lambda config: pytest.fail("the data was prepared"))
    fingerprint.record(_config(data_dir), str(tmp_path), "autoencoder")
    config = _config(data_dir)
    config.autoencoder.learning_rate, config.seed = 1e-3, 7
    with pytest.raises(fingerprint.ConfigMismatchError,
                       match=r"other settings: autoencoder.learning_rate 0.002 -> 0.001; seed 0 -> 7\. Use"):
        trainer.run(config, str(tmp_path))


def test_a_replaced_input_folder_is_refused(data_dir, straight, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "prepare_data", lambda config: pytest.fail("the data was prepared"))
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    with open(workdir / "autoencoder" / "vae" / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(fingerprint.ConfigMismatchError, match=r"the ldm stage in \S+ was trained with other "
                       r"settings: inputs.vae 'sha256:[0-9a-f]{16}' -> 'sha256:[0-9a-f]{16}'\. Use"):
        trainer.run(_config(data_dir), str(workdir))


def test_a_field_added_to_the_configs_later_is_absent_from_older_runs_and_accepted_at_its_old_value(
        data_dir, straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    recorded = fingerprint.read_fingerprint(str(workdir), "autoencoder")
    assert recorded["config"].pop("autoencoder.train_crop") is None
    fingerprint.write_fingerprint(str(workdir), "autoencoder", recorded)  # as a run from before the field
    recorded = fingerprint.read_fingerprint(str(workdir), "ldm")
    assert recorded["config"].pop("ldm.timestep_logit_std") == 0.0
    fingerprint.write_fingerprint(str(workdir), "ldm", recorded)
    assert fingerprint.check_workdir(_config(data_dir), str(workdir)) == []
    config = _config(data_dir)
    config.autoencoder.train_crop = 16
    with pytest.raises(fingerprint.ConfigMismatchError, match="autoencoder.train_crop absent -> 16"):
        fingerprint.check_workdir(config, str(workdir))
    config = _config(data_dir)
    config.ldm.timestep_logit_std = 1.0
    with pytest.raises(fingerprint.ConfigMismatchError, match="ldm.timestep_logit_std absent -> 1.0"):
        fingerprint.check_workdir(config, str(workdir))


def test_retrain_from_retrains_the_stage_that_differs_and_the_later_ones(data_dir, straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    kept = {s: (workdir / s / "done.json").stat().st_mtime_ns for s in ("autoencoder", "text_pretrain")}
    config = _config(data_dir)
    config.ldm.learning_rate = 5e-4
    assert trainer.run(config, str(workdir), retrain_from="autoencoder")  # the first stage that differs: ldm
    assert {s: (workdir / s / "done.json").stat().st_mtime_ns for s in kept} == kept
    recorded = json.loads((workdir / "ldm" / "fingerprint.json").read_text())
    assert recorded["config"]["ldm.learning_rate"] == 5e-4
    assert json.loads((workdir / "config.json").read_text())["ldm"]["learning_rate"] == 5e-4
    ldm = [(n, loss) for s, n, loss in _losses(workdir) if s == "ldm"]
    expected = [(n, loss) for s, n, loss in _losses(straight) if s == "ldm"]
    assert [n for n, _ in ldm] == list(range(1, 7))
    assert ldm[0] == expected[0] and ldm[1:] != expected[1:]  # the same start, then the lower rate
    before = _files(workdir)
    assert trainer.run(config, str(workdir), retrain_from="autoencoder")  # the same command: nothing to redo
    assert _files(workdir) == before


def test_a_data_build_warns_of_nothing_and_keeps_the_callers_progress_bar_setting(tmp_path, caplog):
    """TFDS's check for a built data set warns that a folder not built yet "has no dataset_info.json". The
    phantom builder hides TFDS's own bars while it builds, then restores what the caller had chosen."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils
    tfds.display_progress_bar(False)
    try:
        trainer.prepare_data(_config(tmp_path))
        assert tqdm_utils._active is False
    finally:
        tfds.display_progress_bar(True)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
