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


def test_a_fine_tune_reads_the_tokenizer_of_its_base_pipeline(tmp_path):
    from cxr_ldm.data.tokenizer import embedded_tokenizer_dir, load_tokenizer
    from cxr_ldm.training.trainer import tokenizer_source

    base = tmp_path / "sd2"
    sd2_like = load_tokenizer()
    sd2_like.pad_token = "!"  # SD 2.x pads with "!" (id 0), SD 1.x with <|endoftext|>
    sd2_like.save_pretrained(str(base / "tokenizer"))
    config = tiny.get_config()
    config.ldm.init_from = str(base)
    assert load_tokenizer(tokenizer_source(config))("a", padding="max_length", max_length=4).input_ids[-1] == 0
    config.data.tokenizer = str(embedded_tokenizer_dir())
    assert tokenizer_source(config) == str(embedded_tokenizer_dir())
    config.data.tokenizer, config.ldm.init_from = None, str(tmp_path / "no_tokenizer_here")
    assert tokenizer_source(config) is None
    assert load_tokenizer().pad_token_id != 0
