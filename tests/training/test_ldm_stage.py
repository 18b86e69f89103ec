"""The LDM stage's `init_from`: a downloaded pipeline's pickles are refused unless
`config.ldm.init_allow_pickle` is set, in the words of the train.py command line, and `config.ldm.init_variant`
picks a weight variant; the loaded params equal the PyTorch tensors."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers import pipelines  # noqa: E402

from configs import tiny  # noqa: E402
from cxr_ldm.io.weights import PickleRefusedError  # noqa: E402
from cxr_ldm.training import ldm_stage  # noqa: E402

VOCAB = 49408  # the tiny pipeline's CLIP vocabulary (unused when loading: the folder's text encoder is taken)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> pipelines.Downloads:
    return pipelines.save_downloads(tmp_path_factory.mktemp("downloads"))


def _assert_params(setup: ldm_stage.LDMSetup, state_dicts: dict) -> None:
    for name in ("unet", "vae", "text_encoder"):
        pipelines.assert_params_equal(setup.params[name], state_dicts[name])


def test_init_from_pickles_need_the_config_field(downloads, tmp_path):
    config = tiny.get_config()
    config.ldm.init_from = str(downloads.pickle)
    flag = re.escape("--config.ldm.init_allow_pickle=True")
    with pytest.raises(PickleRefusedError, match=rf"diffusion_pytorch_model\.bin; .* Pass {flag} only"):
        ldm_stage.build_models(config, str(tmp_path), vocab_size=VOCAB)
    config.ldm.init_allow_pickle = True
    _assert_params(ldm_stage.build_models(config, str(tmp_path), vocab_size=VOCAB), downloads.fp32)


def test_init_from_takes_the_config_variant(downloads, tmp_path):
    config = tiny.get_config()
    config.ldm.init_from = str(downloads.variants)
    _assert_params(ldm_stage.build_models(config, str(tmp_path), vocab_size=VOCAB), downloads.fp32)
    config.ldm.init_variant = "fp16"
    _assert_params(ldm_stage.build_models(config, str(tmp_path), vocab_size=VOCAB), downloads.fp16)
