"""sample.py: files, PNG metadata, bit depth, per-image seeds and errors, on a tiny random pipeline folder."""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers import pipelines, scripts  # noqa: E402

from cxr_ldm.data.tokenizer import load_tokenizer, tokenize  # noqa: E402

PROMPTS = ("moderate left pleural effusion.", "no acute cardiopulmonary process.")
NUM_IMAGES, SEED = 2, 10


sample_cli = scripts.load_script("sample")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random diffusers pipeline folder (1-channel VAE, 16x16 px, latents 8x8x4)."""
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipelines.tiny_sd_pipeline().save_pretrained(folder)
    return folder


def _run(checkpoint: Path, out: Path, *extra: str) -> Path:
    assert sample_cli.main(["--checkpoint", str(checkpoint), "--steps", "3", "--bits", "16",
                            "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(checkpoint, tmp_path_factory) -> Path:
    """Prompt 0 from --prompt, prompt 1 from --prompts-file; batches of 3 then 1 (a remainder batch)."""
    prompts_file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts_file.write_text(f"\n{PROMPTS[1]}\n\n")  # blank lines are skipped
    return _run(checkpoint, tmp_path_factory.mktemp("run") / "samples", "--prompt", PROMPTS[0],
                "--prompts-file", str(prompts_file), "--num-images", str(NUM_IMAGES), "--seed", str(SEED),
                "--batch-size", "3", "--grid")


def _expected_stems() -> dict[str, tuple[str, int]]:
    """File stem -> (prompt, seed): image j of prompt i has seed SEED + i * NUM_IMAGES + j."""
    stems = {}
    for i, prompt in enumerate(PROMPTS):
        for j in range(NUM_IMAGES):
            seed = SEED + i * NUM_IMAGES + j
            stems[f"{i:04d}_{seed}"] = (prompt, seed)
    return stems


def _png_bit_depth(path: Path) -> int:
    """Bit depth from the IHDR chunk (signature 8 bytes, length 4, type 4, width 4, height 4, depth 1)."""
    header = path.read_bytes()[:25]
    assert header[12:16] == b"IHDR"
    return struct.unpack(">B", header[24:25])[0]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.int64)


def test_writes_pngs_sidecars_and_grid(full_run, checkpoint):
    expected = _expected_stems()
    assert sorted(p.name for p in full_run.iterdir()) == sorted(
        [f"{s}.png" for s in expected] + [f"{s}.json" for s in expected] + ["grid.png"])
    for stem, (prompt, seed) in expected.items():
        sidecar = json.loads((full_run / f"{stem}.json").read_text())
        assert sidecar == {"prompt": prompt, "prompt_used": prompt, "truncated": False, "negative_prompt": "",
                           "seed": seed, "sampler": "ddim",
                           "steps": 3, "guidance": 4.0, "guidance_rescale": 0.0, "eta": 0.0,
                           "checkpoint": str(checkpoint.resolve())}
        with Image.open(full_run / f"{stem}.png") as image:
            assert image.text == {key: str(value) for key, value in sidecar.items()}
            assert image.size == (16, 16)
        assert _png_bit_depth(full_run / f"{stem}.png") == 16
    pixels = [_pixels(full_run / f"{stem}.png") for stem in expected]
    assert all(np.ptp(p) > 1000 for p in pixels)  # images, not flat fields
    assert min(np.abs(a - b).max() for k, a in enumerate(pixels) for b in pixels[k + 1:]) > 1000
    with Image.open(full_run / "grid.png") as grid:
        assert grid.mode == "RGB"
        assert grid.width >= NUM_IMAGES * 16 and grid.height >= len(PROMPTS) * 16


def test_same_seed_gives_identical_pixels(full_run, checkpoint, tmp_path):
    again = _run(checkpoint, tmp_path / "again", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--num-images", str(NUM_IMAGES), "--seed", str(SEED), "--batch-size", "3")
    for stem in _expected_stems():
        np.testing.assert_array_equal(_pixels(again / f"{stem}.png"), _pixels(full_run / f"{stem}.png"))


@pytest.mark.parametrize("prompt_index,image_index", [(1, 1), (0, 1)])
def test_one_image_is_reproduced_alone_by_its_seed(full_run, checkpoint, tmp_path, prompt_index, image_index):
    seed = SEED + prompt_index * NUM_IMAGES + image_index
    alone = _run(checkpoint, tmp_path / "alone", "--prompt", PROMPTS[prompt_index], "--seed", str(seed))
    got = _pixels(alone / f"0000_{seed}.png")
    want = _pixels(full_run / f"{prompt_index:04d}_{seed}.png")
    if prompt_index == 1 and image_index == 1:  # it was the remainder batch of one: same computation
        np.testing.assert_array_equal(got, want)
    else:  # it was sampled in a batch of 3: batch size changes float rounding only (5e-4 of full scale)
        assert np.abs(got - want).max() <= 0.0005 * 65535
    neighbour = _pixels(full_run / f"{prompt_index:04d}_{seed - 1}.png")
    assert np.abs(got - neighbour).max() > 1000  # the seed matters: the check is not vacuous


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=r"cannot load checkpoint .*nowhere.*does not exist"):
        sample_cli.main(["--checkpoint", str(missing), "--prompt", "x", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="model_index.json"):
        sample_cli.main(["--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [
    ("truncate_unet_weights", r"cannot load checkpoint .*unet.*safetensors"),
    ("break_vae_config", r"cannot load checkpoint .*vae.config\.json is not valid JSON"),
    ("drop_text_encoder", r"cannot load checkpoint .*lacks the text_encoder/ component"),
])
def test_unreadable_checkpoint_is_a_clear_error(checkpoint, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    if damage == "truncate_unet_weights":
        weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "break_vae_config":
        (broken / "vae" / "config.json").write_text("{not json")
    else:
        shutil.rmtree(broken / "text_encoder")
    with pytest.raises(SystemExit, match=message):
        sample_cli.main(["--checkpoint", str(broken), "--prompt", "x", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_no_prompts_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--prompt or --prompts-file"):
        sample_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="--prompt or --prompts-file"):
        sample_cli.main(["--checkpoint", str(checkpoint), "--prompts-file", str(empty)])
    with pytest.raises(SystemExit, match="does not exist"):
        sample_cli.main(["--checkpoint", str(checkpoint), "--prompts-file", str(tmp_path / "absent.txt")])


def test_a_long_prompt_warns_and_the_sidecar_records_what_the_model_read(checkpoint, tmp_path):
    sentence = "Normal chest radiograph."  # 5 tokens: 15 of them fill the 77 (75 between the start and end tokens)
    prompt = " ".join([sentence] * 20)
    with pytest.warns(UserWarning, match=r"prompt truncated to 77 tokens \(it has 102\)"):
        out = _run(checkpoint, tmp_path / "long", "--prompt", prompt)
    sidecar = json.loads((out / "0000_0.json").read_text())
    used = sidecar["prompt_used"]
    assert (sidecar["prompt"], used, sidecar["truncated"]) == (prompt, " ".join([sentence] * 15), True)
    tokenizer = load_tokenizer(checkpoint)
    np.testing.assert_array_equal(tokenize(tokenizer, used), tokenize(tokenizer, prompt))  # all the model read
    with Image.open(out / "0000_0.png") as image:
        assert (image.text["prompt"], image.text["prompt_used"], image.text["truncated"]) == (prompt, used, "True")


@pytest.mark.parametrize("flag,value,expected", [
    ("--size", "-8", "an integer >= 1"), ("--size", "0", "an integer >= 1"), ("--steps", "0", "an integer >= 1"),
    ("--num-images", "0", "an integer >= 1"), ("--batch-size", "-2", "an integer >= 1"),
    ("--steps", "2.5", "an integer >= 1"), ("--guidance", "0.5", r"a number >= 1 \(1 = no guidance\)"),
    ("--guidance", "nan", r"a number >= 1 \(1 = no guidance\)"), ("--guidance-rescale", "1.5", r"a number in \[0, 1\]"),
    ("--apg-eta", "-0.1", r"a number in \[0, 1\]"), ("--apg-norm-threshold", "-1", "a number >= 0"),
    ("--eta", "2", r"a number in \[0, 1\]"),
])
def test_out_of_range_arguments_stop_before_loading_with_status_2(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist: loading would say so
        sample_cli.main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "out"),
                         flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"\S+: error: argument {flag}: expected {expected}, got '{re.escape(value)}'", error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--size", "13", r"--size 13: expected a multiple of 2, the downsampling factor of .*'s VAE"),
    ("--steps", "1001", r"--steps 1001: expected at most the 1000 training timesteps of "),
])
def test_arguments_the_checkpoint_cannot_take_stop_before_sampling(checkpoint, tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        sample_cli.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--out", str(tmp_path / "out"), flag, value])
    assert not (tmp_path / "out").exists()
