"""sample.py --init-image: edits written with their metadata, equal to Pipeline.img2img, and one-line errors
(exit status 2) for editing inputs it cannot take."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers import pipelines, scripts  # noqa: E402

import cxr_ldm  # noqa: E402

PROMPT = "moderate left pleural effusion."


sample_cli = scripts.load_script("sample")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random diffusers pipeline folder (1-channel VAE, 16x16 px, latents 8x8x4)."""
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipelines.tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def film(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 16-bit grayscale 16x16 PNG and its pixels as float (16, 16, 1) in [0, 1]."""
    y, x = np.mgrid[0:16, 0:16] / 15.0
    pixels = np.round((0.5 + 0.4 * np.sin(3 * x + y)) * 65535).astype(np.uint16)
    path = tmp_path_factory.mktemp("films") / "film.png"
    Image.fromarray(pixels).save(path)
    return path, (pixels / 65535.0).astype(np.float32)[..., None]


def _main(checkpoint: Path, out: Path, *extra: str) -> int:
    return sample_cli.main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--steps", "4", "--bits", "16",
                            "--seed", "3", "--out", str(out), *extra])


def test_init_image_run_writes_the_pipelines_img2img_edit(checkpoint, film, tmp_path):
    path, pixels = film
    assert _main(checkpoint, tmp_path / "out", "--init-image", str(path), "--strength", "0.5") == 0
    meta = json.loads((tmp_path / "out" / "0000_3.json").read_text())
    assert (meta["init_image"], meta["strength"], meta["seed"]) == (str(path.resolve()), 0.5, 3)
    with Image.open(tmp_path / "out" / "0000_3.png") as image:
        assert image.text["init_image"] == str(path.resolve())
        written = np.asarray(image).astype(np.float64) / 65535.0
    pipe = cxr_ldm.Pipeline.from_pretrained(checkpoint)
    expected = pipe.img2img(pixels[None], [PROMPT], strength=0.5, num_inference_steps=4, seed=3)[0, ..., 0]
    assert np.abs(written - expected).max() <= 1 / 65535
    assert np.abs(written - pixels[..., 0]).max() > 1e-2  # an edit, not a copy


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan"])
def test_strength_outside_zero_one_stops_before_loading(film, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path / "nowhere", tmp_path / "out", "--init-image", str(film[0]), "--strength", value)
    assert exit_info.value.code == 2
    assert re.fullmatch(rf"\S+: error: argument --strength: expected a number in \(0, 1\], got '{value}'",
                        _error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_strength_without_an_init_image_stops(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path / "nowhere", tmp_path / "out", "--strength", "0.5")
    assert exit_info.value.code == 2
    assert _error_line(capsys).endswith("error: --strength needs --init-image")


def _write(path: Path, kind: str) -> Path:
    if kind == "text":
        path.write_text("not a picture\n")
    elif kind == "palette":
        Image.new("P", (16, 16)).save(path)
    elif kind == "rgba":
        Image.new("RGBA", (16, 16)).save(path)
    else:  # 15x15 grayscale: not a multiple of the VAE's factor 2
        Image.new("L", (15, 15)).save(path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("text", r"--init-image \S+bad.png is not an image file that can be read \(.*\)"),
    ("palette", r"--init-image \S+bad.png has P pixels: expected a grayscale or RGB image"),
    ("rgba", r"--init-image \S+bad.png has RGBA pixels: expected a grayscale or RGB image"),
    ("odd_size", r"--init-image \S+bad.png is 15x15 pixels: expected sides that are multiples of 2, the "
                 r"downsampling factor of \S+'s VAE"),
])
def test_an_init_image_it_cannot_edit_is_a_one_line_error(checkpoint, tmp_path, capsys, kind, message):
    bad = _write(tmp_path / "bad.png", kind)
    with pytest.raises(SystemExit) as exit_info:
        _main(checkpoint, tmp_path / "out", "--init-image", str(bad))
    assert exit_info.value.code == 2
    assert re.fullmatch(f"error: {message}", _error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_a_strength_that_runs_no_step_is_a_one_line_error(checkpoint, film, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(checkpoint, tmp_path / "out", "--init-image", str(film[0]), "--strength", "0.2")
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: --strength 0.2 with --steps 4: strength 0.2 of 4 steps runs no step: expected "
                        r"strength \* num_inference_steps >= 1", _error_line(capsys))


def _mask_file(path: Path, kind: str = "ok") -> Path:
    """A 16x16 mask PNG, white (repaint) on the right half; or one of the kinds sample.py refuses."""
    pixels = np.zeros((16, 16), np.uint8)
    pixels[:, 8:] = 255
    if kind == "grey":
        pixels[0, 0] = 128
    elif kind == "small":
        pixels = pixels[:8]
    Image.fromarray(pixels).save(path)
    return path


def test_mask_run_writes_the_pipelines_inpainting(checkpoint, film, tmp_path):
    path, pixels = film
    mask = _mask_file(tmp_path / "mask.png")
    assert _main(checkpoint, tmp_path / "out", "--init-image", str(path), "--mask", str(mask)) == 0
    meta = json.loads((tmp_path / "out" / "0000_3.json").read_text())
    assert (meta["mask"], meta["strength"]) == (str(mask.resolve()), 1.0)
    with Image.open(tmp_path / "out" / "0000_3.png") as image:
        written = np.asarray(image).astype(np.float64) / 65535.0
    masks = np.zeros((1, 16, 16, 1), np.float32)
    masks[:, :, 8:] = 1.0
    pipe = cxr_ldm.Pipeline.from_pretrained(checkpoint)
    expected = pipe.inpaint(pixels[None], masks, [PROMPT], num_inference_steps=4, seed=3)[0, ..., 0]
    assert np.abs(written - expected).max() <= 1 / 65535
    img2img = pipe.img2img(pixels[None], [PROMPT], strength=1.0, num_inference_steps=4, seed=3)[0, ..., 0]
    assert np.abs(written - img2img).max() > 1e-2  # the mask was used


@pytest.mark.parametrize("kind,message", [
    ("grey", r"--mask \S+mask.png is not binary: expected black \(keep\) and white \(repaint\) pixels only, "
             r"found 3 levels"),
    ("small", r"--mask \S+mask.png is 16x8 pixels, the --init-image \S+film.png 16x16: expected the same size"),
])
def test_a_mask_it_cannot_use_is_a_one_line_error(film, tmp_path, capsys, kind, message):
    mask = _mask_file(tmp_path / "mask.png", kind)
    with pytest.raises(SystemExit) as exit_info:  # checked before the checkpoint is loaded
        _main(tmp_path / "nowhere", tmp_path / "out", "--init-image", str(film[0]), "--mask", str(mask))
    assert exit_info.value.code == 2
    assert re.fullmatch(f"error: {message}", _error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_mask_without_an_init_image_stops(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path / "nowhere", tmp_path / "out", "--mask", str(_mask_file(tmp_path / "mask.png")))
    assert exit_info.value.code == 2
    assert _error_line(capsys).endswith("error: --mask needs --init-image")


def test_invert_run_samples_from_the_pipelines_inversion(checkpoint, film, tmp_path):
    path, pixels = film
    assert _main(checkpoint, tmp_path / "out", "--init-image", str(path), "--invert", "--guidance", "1") == 0
    meta = json.loads((tmp_path / "out" / "0000_3.json").read_text())
    assert (meta["invert"], meta["guidance"], "strength" in meta) == (True, 1.0, False)
    with Image.open(tmp_path / "out" / "0000_3.png") as image:
        written = np.asarray(image).astype(np.float64) / 65535.0
    pipe = cxr_ldm.Pipeline.from_pretrained(checkpoint)
    inverted = pipe.invert(pixels[None], [PROMPT], num_inference_steps=4, seed=3)
    expected = pipe([PROMPT], num_inference_steps=4, guidance_scale=1.0, latents=inverted)[0, ..., 0]
    assert np.abs(written - expected).max() <= 1 / 65535
    fresh = pipe([PROMPT], num_inference_steps=4, guidance_scale=1.0, seed=3)[0, ..., 0]
    assert np.abs(written - fresh).max() > 1e-2  # drawn from the inversion, not from fresh noise


@pytest.mark.parametrize("extra,message", [
    (("--invert",), "--invert needs --init-image"),
    (("--invert", "--init-image", "f.png", "--strength", "0.5"),
     "--invert takes neither --mask nor --strength: it redraws the whole image from its inversion"),
    (("--invert", "--init-image", "f.png", "--mask", "m.png"),
     "--invert takes neither --mask nor --strength: it redraws the whole image from its inversion"),
])
def test_invert_with_editing_flags_it_does_not_take_stops(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path / "nowhere", tmp_path / "out", *extra)
    assert exit_info.value.code == 2
    assert _error_line(capsys).endswith(f"error: {message}")


def test_size_with_an_init_image_stops(film, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path / "nowhere", tmp_path / "out", "--init-image", str(film[0]), "--size", "16")
    assert exit_info.value.code == 2
    assert _error_line(capsys).endswith("error: --size does not apply with --init-image: the image's size is the "
                                        "output's")


def test_an_rgb_film_is_edited_as_its_gray_average(checkpoint, film, tmp_path):
    """A grayscale film saved as RGB (equal channels) gives the edit of the 8-bit gray film."""
    gray = np.round(film[1][..., 0] * 255).astype(np.uint8)
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    for name in ("rgb", "gray"):
        assert _main(checkpoint, tmp_path / name, "--init-image", str(tmp_path / f"{name}.png")) == 0
    with Image.open(tmp_path / "rgb" / "0000_3.png") as a, Image.open(tmp_path / "gray" / "0000_3.png") as b:
        difference = np.abs(np.asarray(a).astype(np.int64) - np.asarray(b).astype(np.int64))
    assert difference.max() <= 1  # the average of three equal floats rounds to within one 16-bit level
