"""Prompts longer than the text encoder's window: Pipeline says what it cut and what the encoder reads."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers import pipelines  # noqa: E402

from cxr_ldm import Pipeline  # noqa: E402
from cxr_ldm.data.tokenizer import set_prompt_length  # noqa: E402

LONG = "Moderate left pleural effusion. Mild cardiomegaly. Small right apical pneumothorax."
KEPT = "Moderate left pleural effusion"  # its first 6 tokens, the start and end tokens make 8


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Pipeline:
    """The tiny pipeline with prompts of 8 tokens (start and end included)."""
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipelines.tiny_sd_pipeline().save_pretrained(folder)
    pipe = Pipeline.from_pretrained(folder)
    set_prompt_length(pipe.tokenizer, 8)
    return pipe


def test_a_long_prompt_warns_with_the_part_the_text_encoder_reads(pipe):
    with pytest.warns(UserWarning, match=rf"prompt truncated to 8 tokens \(it has 24\); the text encoder reads only "
                                         rf"'{KEPT}'") as record:
        states = pipe.encode_text([LONG, "Mild cardiomegaly."])
    assert len(record) == 1 and record[0].filename == __file__  # it points at the caller
    np.testing.assert_array_equal(states[:1], pipe.encode_text([KEPT]))  # what it says is what the encoder read
    assert pipe.prompt_truncation(LONG) == (KEPT, 24)


def test_a_prompt_that_fits_does_not_warn(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_text(["Mild cardiomegaly.", KEPT])  # 5 and 8 tokens
    assert pipe.prompt_truncation(KEPT) is None
