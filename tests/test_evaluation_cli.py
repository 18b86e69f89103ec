"""evaluate CLI plumbing: the data set and guidance scale come from the train.py workdir's config.json
unless overridden; without one, phantom_cxr at the checkpoint's image size and guidance 3."""
import json
import os

import pytest

from cxr_ldm import evaluate


def test_data_comes_from_the_workdir_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"data": {"name": "phantom_cxr", "config": "tiny", "data_dir": "/data/tfds", "manual_dir": None}}))
    resolved = evaluate.resolve_data(evaluate.EvalSettings(checkpoint=str(tmp_path)), 32)
    assert (resolved.dataset, resolved.dataset_config, resolved.data_dir) == ("phantom_cxr", "tiny", "/data/tfds")
    overridden = evaluate.resolve_data(evaluate.EvalSettings(checkpoint=str(tmp_path), data_dir="/other"), 32)
    assert overridden.data_dir == "/other" and overridden.dataset_config == "tiny"


def test_without_a_workdir_config_the_image_size_picks_the_config(tmp_path):
    resolved = evaluate.resolve_data(evaluate.EvalSettings(checkpoint=str(tmp_path)), 128)
    assert (resolved.dataset, resolved.dataset_config) == ("phantom_cxr", "128")
    assert resolved.data_dir == os.path.expanduser(evaluate.DEFAULT_DATA_DIR)
    assert evaluate.resolve_data(evaluate.EvalSettings(checkpoint=str(tmp_path)), 32).dataset_config == "tiny"
    with pytest.raises(ValueError, match="no config at the checkpoint's 48 px"):
        evaluate.resolve_data(evaluate.EvalSettings(checkpoint=str(tmp_path)), 48)


def test_guidance_comes_from_the_workdir_sample_config_unless_given(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sample": {"guidance_scale": 6.5}}))
    assert evaluate.resolve_guidance(evaluate.EvalSettings(checkpoint=str(tmp_path))).guidance == 6.5
    assert evaluate.resolve_guidance(evaluate.EvalSettings(checkpoint=str(tmp_path), guidance=2.0)).guidance == 2.0
    bare = tmp_path / "pipeline"
    bare.mkdir()
    assert evaluate.resolve_guidance(evaluate.EvalSettings(checkpoint=str(bare))).guidance == evaluate.DEFAULT_GUIDANCE


def test_cli_requires_checkpoint_and_out(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--out", "r.json"])
    assert "--checkpoint" in capsys.readouterr().err


def test_evaluation_seeds_draw_disjoint_sample_seeds():
    """Each use draws up to SEED_BLOCK consecutive seeds from its first one: no two (seed, use) pairs may
    share a sample seed, and seed 0 keeps the seeds its published numbers were drawn with."""
    blocks = [(first, first + evaluate.SEED_BLOCK) for seed in range(4)
              for first in evaluate.generation_seeds(seed).values()]
    starts = sorted(blocks)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(starts, starts[1:]))
    assert evaluate.generation_seeds(0) == {"conditioning": 0, "fid": 1_000_000, "augmentation": 2_000_000}
