"""train.py end to end on the tiny config: the three stages, outputs, exact resume after a preemption in each."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_ldm.data.tokenizer import prompt_length
from cxr_ldm.training import checkpoints
from cxr_ldm.training import logger as logger_lib
from cxr_ldm.training import trainer
from configs import tiny

STAGES = ("autoencoder", "text_pretrain", "ldm")


def _config(data_dir):
    config = tiny.get_config()
    assert tuple(config.stages) == STAGES
    config.data.data_dir = str(data_dir)
    config.autoencoder.update(num_steps=6, eval_every=6)
    config.ldm.update(num_steps=6, warmup_steps=1)
    config.text_pretrain.update(num_steps=6, warmup_steps=1)
    config.autoencoder.warmup_steps = 1
    config.update(log_every=1, checkpoint_every=2, sample_every=6)
    config.sample.steps = 2
    return config


def _losses(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The workdir of an uninterrupted tiny run."""
    workdir = tmp_path_factory.mktemp("straight")
    assert trainer.run(_config(data_dir), str(workdir))
    return workdir


def test_preempted_run_resumes_to_the_same_losses(data_dir, straight, tmp_path, monkeypatch):
    interrupted = tmp_path / "interrupted"
    stops = [("autoencoder", 3), ("text_pretrain", 3), ("ldm", 3)]  # one SIGTERM after each of these steps
    logged = []
    log = logger_lib.MetricsLogger.log

    def log_and_remember(self, step, metrics):
        logged.append((self.stage, step))
        return log(self, step, metrics)

    def requested_after_the_next_stop(self):  # polled after each logged step (log_every = 1)
        if stops and logged[-1] == stops[0]:
            stops.pop(0)
            return True
        return False

    with monkeypatch.context() as m:
        m.setattr(logger_lib.MetricsLogger, "log", log_and_remember)
        m.setattr(checkpoints.StopSignal, "requested", requested_after_the_next_stop)
        assert not trainer.run(_config(data_dir), str(interrupted))
        assert not (interrupted / "autoencoder" / "done.json").exists()
        assert [n for _, n, _ in _losses(interrupted)] == [1, 2, 3]
        assert not trainer.run(_config(data_dir), str(interrupted))
        assert [(s, n) for s, n, _ in _losses(interrupted)][-1] == ("text_pretrain", 3)
        assert not trainer.run(_config(data_dir), str(interrupted))
        assert [(s, n) for s, n, _ in _losses(interrupted)][-1] == ("ldm", 3)
    assert not stops
    cache = interrupted / "ldm" / "latent_cache" / "train-shard0of1.npy"
    stamp = cache.stat().st_mtime_ns
    assert trainer.run(_config(data_dir), str(interrupted))
    assert cache.stat().st_mtime_ns == stamp  # the resumed LDM stage read the latents cached before

    expected, got = _losses(straight), _losses(interrupted)
    assert [(s, n) for s, n, _ in got] == [(s, n) for s in STAGES for n in range(1, 7)]
    assert got == expected
    assert (interrupted / "samples" / "ldm_step_000006.png").exists()


def test_finished_run_is_skipped_and_exports_a_loadable_pipeline(data_dir, straight):
    import cxr_ldm
    before = (straight / "metrics.jsonl").read_text()
    assert trainer.run(_config(data_dir), str(straight))  # all stages done: nothing is retrained
    assert (straight / "metrics.jsonl").read_text() == before
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
