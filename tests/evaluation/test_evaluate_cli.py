"""evaluate CLI plumbing: the data set and guidance scale come from the train.py workdir's config.json
unless overridden; without one, phantom_cxr at the checkpoint's image size and guidance 3."""
import json
import os
import re

import numpy as np
import pytest

from cxr_ldm import evaluate
from cxr_ldm.evaluation import evaluator
from tests.evaluation.test_evaluator import tiny_pipeline


def test_data_comes_from_the_workdir_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"data": {"name": "phantom_cxr", "config": "tiny", "data_dir": "/data/tfds", "manual_dir": None}}))
    resolved = evaluator.resolve_data(evaluator.EvalSettings(checkpoint=str(tmp_path)), 32)
    assert (resolved.dataset, resolved.dataset_config, resolved.data_dir) == ("phantom_cxr", "tiny", "/data/tfds")
    overridden = evaluator.resolve_data(evaluator.EvalSettings(checkpoint=str(tmp_path), data_dir="/other"), 32)
    assert overridden.data_dir == "/other" and overridden.dataset_config == "tiny"


def test_without_a_workdir_config_the_image_size_picks_the_config(tmp_path):
    resolved = evaluator.resolve_data(evaluator.EvalSettings(checkpoint=str(tmp_path)), 128)
    assert (resolved.dataset, resolved.dataset_config) == ("phantom_cxr", "128")
    assert resolved.data_dir == os.path.expanduser(evaluator.DEFAULT_DATA_DIR)
    assert evaluator.resolve_data(evaluator.EvalSettings(checkpoint=str(tmp_path)), 32).dataset_config == "tiny"
    with pytest.raises(ValueError, match="no config at the checkpoint's 48 px"):
        evaluator.resolve_data(evaluator.EvalSettings(checkpoint=str(tmp_path)), 48)


def test_guidance_comes_from_the_workdir_sample_config_unless_given(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sample": {"guidance_scale": 6.5}}))
    assert evaluator.resolve_guidance(evaluator.EvalSettings(checkpoint=str(tmp_path))).guidance == 6.5
    assert evaluator.resolve_guidance(evaluator.EvalSettings(checkpoint=str(tmp_path), guidance=2.0)).guidance == 2.0
    bare = tmp_path / "pipeline"
    bare.mkdir()
    assert evaluator.resolve_guidance(evaluator.EvalSettings(checkpoint=str(bare))).guidance == evaluator.DEFAULT_GUIDANCE


def test_cli_requires_checkpoint_and_out(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--out", "r.json"])
    assert "--checkpoint" in capsys.readouterr().err


def test_evaluation_seeds_draw_disjoint_sample_seeds():
    """Each use draws up to SEED_BLOCK consecutive seeds from its first one: no two (seed, use) pairs may
    share a sample seed, and seed 0 keeps the seeds its published numbers were drawn with."""
    blocks = [(first, first + evaluator.SEED_BLOCK) for seed in range(4)
              for first in evaluator.generation_seeds(seed).values()]
    starts = sorted(blocks)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(starts, starts[1:]))
    assert evaluator.generation_seeds(0) == {"conditioning": 0, "fid": 1_000_000, "augmentation": 2_000_000}


@pytest.mark.parametrize("layout", ["workdir", "pipeline", "workdir_export", "bare"])
def test_vae_only_finds_the_autoencoder_in_each_layout(tmp_path, layout):
    import jax
    import numpy as np

    from cxr_ldm.io.components import save_component
    from cxr_ldm.models import autoencoder

    config = autoencoder.AutoencoderConfig.from_dict(dict(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        sample_size=16))
    model = autoencoder.AutoencoderKL(config)
    params = jax.jit(model.init)(jax.random.key(3), *autoencoder.dummy_inputs(config))["params"]
    folder = {"workdir": tmp_path / "autoencoder" / "vae", "pipeline": tmp_path / "vae",
              "workdir_export": tmp_path / "pipeline" / "vae", "bare": tmp_path}[layout]
    (tmp_path / "autoencoder").mkdir()  # a workdir's stage folder without its VAE yet is skipped
    (tmp_path / "config.json").write_text(json.dumps({"seed": 0}))  # a train.py config is not a VAE's
    save_component(model, params, folder)
    loaded, loaded_params = evaluator.load_autoencoder(tmp_path)
    assert loaded.config.sample_size == 16
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    np.testing.assert_array_equal(flat(loaded_params), flat(params))


def test_vae_only_names_where_it_looked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FileNotFoundError, match="no AutoencoderKL folder .*autoencoder/vae"):
        evaluator.load_autoencoder(tmp_path)


def test_judge_only_measures_the_ceiling_of_a_prompt_set_and_headline_only_reuses_its_judge(tmp_path, monkeypatch):
    from cxr_ldm.evaluation import classifier as clf
    from cxr_ldm.evaluation.prompts import HANDWRITTEN

    recipe = clf.TrainConfig(input_size=32, widths=(8, 16), feature_dim=32, min_positives=5, epochs=1,
                             batch_size=32, warmup_steps=2)
    prompts = HANDWRITTEN[:2] + HANDWRITTEN[3:5] + HANDWRITTEN[30:32]  # normal, effusion, cardiomegaly
    out = tmp_path / "judge.json"
    results = evaluator.evaluate_judge(out, prompts=prompts, classifier_config=recipe, dataset_config="tiny",
                                       data_dir=str(tmp_path / "tfds"), num_samples=3)
    assert json.loads(out.read_text()) == results
    assert results["classifier"]["training_studies"] == evaluator.JUDGE_TRAIN_FACTOR * 128  # the tiny train split x4
    real = results["conditioning_real_studies"]
    assert results["conditioning_accuracy_real_studies"] == pytest.approx(
        np.mean([p["success_rate"] for p in real["per_prompt"]]))
    low, high = results["conditioning_accuracy_real_studies_ci"]
    assert low <= results["conditioning_accuracy_real_studies"] <= high
    assert results["conditioning_accuracy_real_studies"] <= results["presence_accuracy_real_studies"]
    # single findings that the phantom always shows: no study is occluded, so the visible studies are all of them
    assert real["occluded_share"] == 0.0
    assert real["conditioning_accuracy_visible"] == pytest.approx(results["conditioning_accuracy_real_studies"])
    low, high = results["presence_accuracy_real_studies_ci"]
    assert low <= results["presence_accuracy_real_studies"] <= high
    assert results["prompt_set"]["name"] == "custom" and results["prompt_set"]["num_prompts"] == len(real["per_prompt"])
    assert all(p["num_images"] == 3 for p in real["per_prompt"])
    # the cached judge is recognised without drawing its extra training studies again
    monkeypatch.setattr(evaluator, "phantom_split", lambda *args: pytest.fail("drew the judge's studies again"))
    again = evaluator.evaluate_judge(tmp_path / "again.json", prompts=prompts, classifier_config=recipe,
                                     dataset_config="tiny", data_dir=str(tmp_path / "tfds"), num_samples=3)
    assert again["classifier"]["cached"] and again["classifier"]["thresholds"] == results["classifier"]["thresholds"]
    with pytest.raises(SystemExit):
        evaluate.main(["--out", str(tmp_path / "x.json")])

    # --headline-only on a pipeline, with that judge: the strict and presence headline, nothing optional
    out = tmp_path / "headline" / "h.json"
    headline = evaluator.evaluate(tiny_pipeline(tmp_path / "pipe"), out, prompts=prompts, classifier_config=recipe,
                                  dataset_config="tiny", data_dir=str(tmp_path / "tfds"), num_samples=3, steps=2,
                                  batch_size=8, headline_only=True)
    assert json.loads(out.read_text()) == headline and headline["classifier"]["cached"]
    per_prompt = headline["conditioning"]["per_prompt"]
    assert headline["conditioning_accuracy"] == pytest.approx(np.mean([p["success_rate"] for p in per_prompt]))
    assert all(p["num_images"] == 3 for p in per_prompt)
    low, high = headline["conditioning_accuracy_ci"]
    assert low <= headline["conditioning_accuracy"] <= high
    assert headline["conditioning_accuracy"] <= headline["presence_accuracy"]
    skipped = ("fid", "diversity", "reconstruction", "memorization", "conditioning_real_studies",
               "conditioning_accuracy_real_studies", "conditioning_vae_reconstructed")
    assert all(headline[key] is None for key in skipped)
    assert list(headline["timings_s"]) == ["data", "classifier", "conditioning"]
    assert "skipped (`--headline-only`)" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="headline_only skips the optional sections"):
        evaluator.EvalSettings(checkpoint="", headline_only=True, guidance_sweep=(2.0,))


@pytest.mark.parametrize("flag,value,expected", [
    ("--num-samples", "0", "an integer >= 1"), ("--num-fid", "-5", "an integer >= 1"), ("--steps", "0", "an integer >= 1"),
    ("--batch-size", "0", "an integer >= 1"), ("--guidance", "0.5", r"a number >= 1 \(1 = no guidance\)"),
    ("--guidance-rescale", "2", r"a number in \[0, 1\]"), ("--apg-eta", "1.5", r"a number in \[0, 1\]"),
    ("--apg-norm-threshold", "-1", "a number >= 0"),
])
def test_out_of_range_arguments_stop_before_any_work_with_status_2(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist: loading it would raise
        evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json"), flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"\S+: error: argument {flag}: expected {expected}, got '{re.escape(value)}'", error)
    assert not list(tmp_path.iterdir())


def test_headline_only_with_an_optional_section_stops_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json"),
                       "--headline-only", "--guidance-sweep", "2,4"])
    assert exit_info.value.code == 2
    assert "--headline-only skips every optional section" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_augmentation_data_without_the_experiment_stops_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json"),
                       "--augmentation-data", str(tmp_path / "synth")])
    assert exit_info.value.code == 2
    assert "--augmentation-data needs --augmentation-experiment" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_augmentation_classifiers_take_the_judges_network_and_the_default_epochs():
    from cxr_ldm.evaluation import classifier as clf

    judge = clf.TrainConfig(input_size=64, epochs=3, **evaluator.JUDGE_NETWORK)
    recipe = evaluator.augmentation_recipe(judge)
    assert recipe.epochs == clf.TrainConfig.epochs == 24
    assert (recipe.downsample, recipe.stem_layers, recipe.input_size) == ("maxpool", 2, 64)
