"""Loading options through every Python and CLI entry point: a downloaded pipeline whose only weights are
PyTorch pickles is refused unless the entry point's allow flag is given, in that entry point's words, and then
loads to the weights of its safetensors save; an fp16 variant loads with variant="fp16"."""
from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers import pipelines, scripts  # noqa: E402

from cxr_ldm import Pipeline, evaluate  # noqa: E402
from cxr_ldm.evaluation import evaluator  # noqa: E402
from cxr_ldm.io.weights import PickleRefusedError  # noqa: E402

COMPONENTS = ("unet", "vae", "text_encoder")
REFUSED = r"unet holds only the pickle file diffusion_pytorch_model\.bin; .* Pass {} only for a file you trust"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> pipelines.Downloads:
    return pipelines.save_downloads(tmp_path_factory.mktemp("downloads"))


def assert_weights(pipe: Pipeline, state_dicts: dict) -> None:
    """The pipeline's UNet, VAE and text encoder params equal the PyTorch tensors."""
    for name in COMPONENTS:
        pipelines.assert_params_equal(getattr(pipe, f"{name}_params"), state_dicts[name])


def test_python_refuses_pickles_unless_allowed_then_loads_the_safetensors_weights(downloads):
    with pytest.raises(PickleRefusedError, match=REFUSED.format(re.escape("allow_pickle=True"))):
        Pipeline.from_pretrained(downloads.pickle)
    pipe = Pipeline.from_pretrained(downloads.pickle, allow_pickle=True)
    assert_weights(pipe, downloads.fp32)
    safe = Pipeline.from_pretrained(downloads.safetensors)
    for name in COMPONENTS:
        jax.tree.map(np.testing.assert_array_equal, getattr(pipe, f"{name}_params"), getattr(safe, f"{name}_params"))


def test_python_loads_the_fp16_variant_only_when_asked(downloads):
    assert_weights(Pipeline.from_pretrained(downloads.variants, variant="fp16"), downloads.fp16)
    assert_weights(Pipeline.from_pretrained(downloads.variants), downloads.fp32)
    rounded = downloads.fp16["unet"]["conv_in.weight"]
    assert np.abs(rounded - downloads.fp32["unet"]["conv_in.weight"]).max() > 0  # the check is not vacuous
    with pytest.raises(FileNotFoundError, match=r"no weights in .*unet: expected diffusion_pytorch_model\.bf16"):
        Pipeline.from_pretrained(downloads.variants, variant="bf16")


def test_sample_cli_takes_allow_pickle_and_variant(downloads, tmp_path):
    sample_cli = scripts.load_script("sample")

    def pixels(checkpoint: Path, name: str, *flags: str) -> np.ndarray:
        out = tmp_path / name
        assert sample_cli.main(["--checkpoint", str(checkpoint), "--prompt", "Mild cardiomegaly.", "--steps", "2",
                                "--bits", "16", "--out", str(out), *flags]) == 0
        (png,) = out.glob("*.png")
        return np.asarray(Image.open(png), dtype=np.int64)

    with pytest.raises(SystemExit, match=REFUSED.format("--allow-pickle")) as refused:
        pixels(downloads.pickle, "refused")
    assert "allow_pickle=True" not in str(refused.value)
    assert not (tmp_path / "refused").exists()
    safe = pixels(downloads.safetensors, "safe")
    np.testing.assert_array_equal(pixels(downloads.pickle, "pickle", "--allow-pickle"), safe)
    np.testing.assert_array_equal(pixels(downloads.variants, "fp32"), safe)
    assert np.abs(pixels(downloads.variants, "fp16", "--variant", "fp16") - safe).max() > 0


def test_evaluate_cli_takes_allow_pickle_and_variant(downloads, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r.json")
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--checkpoint", str(downloads.pickle), "--out", out])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert re.search(REFUSED.format("--allow-pickle"), message) and "allow_pickle=True" not in message

    handed = []

    def evaluate_loaded(checkpoint, out, *, pipe, prompts, **options):
        evaluator.EvalSettings(checkpoint=str(checkpoint), **options)  # the loading flags are not settings
        handed.append(pipe)
        return dict.fromkeys(("conditioning_accuracy", "presence_accuracy", "classifier_accuracy_real"), 0.0)

    monkeypatch.setattr(evaluate, "evaluate", evaluate_loaded)
    evaluate.main(["--checkpoint", str(downloads.pickle), "--out", out, "--allow-pickle"])
    evaluate.main(["--checkpoint", str(downloads.variants), "--out", out, "--variant", "fp16"])
    assert_weights(handed[0], downloads.fp32)
    assert_weights(handed[1], downloads.fp16)
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--checkpoint", str(downloads.pickle), "--out", out, "--vae-only"])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert re.search(REFUSED.replace("unet", "vae")
                     .format("--allow-pickle"), message) and "allow_pickle=True" not in message
    _, vae_params = evaluator.load_autoencoder(downloads.pickle, allow_pickle=True)
    pipelines.assert_params_equal(vae_params, downloads.fp32["vae"])
    _, vae_params = evaluator.load_autoencoder(downloads.variants, variant="fp16")
    pipelines.assert_params_equal(vae_params, downloads.fp16["vae"])
