"""Adapter files that are not a plain SD 1.x / 2.x LoRA or embedding are refused, naming the file and the
format; LoRA layers that do not fit the model are listed by name. (Numbers against diffusers:
tests/test_pipeline_adapters.py, tests/training/test_adapter_export.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from cxr_ldm.io import adapters
from cxr_ldm.io.weights import write_safetensors

A, B = np.ones((2, 4), np.float32), np.ones((4, 2), np.float32)


@pytest.mark.parametrize("state,message", [
    ({"lora_unet_a_b.hada_w1_a": A, "lora_unet_a_b.hada_w1_b": B}, "LyCORIS LoHa"),
    ({"unet.a.lora_A.weight": A, "unet.a.lora_B.weight": B, "unet.a.lora_magnitude_vector": B[:, 0]}, "DoRA"),
    ({"lora_te1_text_model_x.lora_down.weight": A, "lora_te1_text_model_x.lora_up.weight": B}, "SDXL"),
    ({"unet.a.processor.to_q_lora.down.weight": A, "unet.a.processor.to_q_lora.up.weight": B}, "before 0.21"),
    ({"unet.a.lora_A.weight": A}, "lack lora_A or lora_B"),
])
def test_other_adapter_formats_are_refused_by_name(tmp_path, state, message):
    write_safetensors(tmp_path / "x.safetensors", state)
    with pytest.raises(ValueError, match=message) as err:
        adapters.read_lora(tmp_path / "x.safetensors")
    assert "x.safetensors" in str(err.value)


def test_pickles_are_not_read(tmp_path):
    for name, read in (("lora.bin", adapters.read_lora), ("learned_embeds.bin", adapters.read_embeddings)):
        (tmp_path / name).write_bytes(b"\x80\x02}q\x00.")
        with pytest.raises(ValueError, match="pickled"):
            read(tmp_path / name)


def test_embeddings_need_a_token_where_the_file_names_none(tmp_path):
    vectors = np.arange(8, dtype=np.float32).reshape(2, 4)
    write_safetensors(tmp_path / "a1111.safetensors", {"emb_params": vectors})
    with pytest.raises(ValueError, match="pass token="):
        adapters.read_embeddings(tmp_path / "a1111.safetensors")
    [(token, read)] = adapters.read_embeddings(tmp_path / "a1111.safetensors", token="<x>")
    assert token == "<x>"
    np.testing.assert_array_equal(read, vectors)
    write_safetensors(tmp_path / "sdxl.safetensors", {"clip_l": vectors, "clip_g": vectors})
    with pytest.raises(ValueError, match="SDXL"):
        adapters.read_embeddings(tmp_path / "sdxl.safetensors")


def test_merge_lists_every_module_the_model_lacks_and_every_mis_shaped_layer():
    params = {"mid_block": {"to_q": {"kernel": np.zeros((4, 4), np.float32)}}}
    layers = {"mid_block.to_q": adapters.LoraLayer(np.ones((2, 3)), np.ones((4, 2)), 1.0),
              "input_blocks_1_1_proj_in": adapters.LoraLayer(A, B, 1.0)}
    with pytest.raises(ValueError) as err:
        adapters.merge_lora(params, layers, source="x.safetensors")
    message = str(err.value)
    assert "x.safetensors" in message and "input_blocks_1_1_proj_in" in message and "SGM" in message
    assert "mid_block.to_q: the LoRA makes (3, 4), the model's kernel is (4, 4)" in message
