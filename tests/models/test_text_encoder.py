"""CLIPTextModel equals transformers' CLIPTextModel (PyTorch) on a tiny random configuration."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cxr_ldm import load_component, save_component
from cxr_ldm.models.text_encoder import CLIPTextConfig

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=1)


def tiny_reference(tmp_path, hidden_act: str, seed: int = 0):
    """A random transformers CLIPTextModel (LayerNorms randomised too), saved to `tmp_path/ref`."""
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act=hidden_act, **TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ref")
    return model


def random_ids(batch=3, length=77, seed=1):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length)).astype(np.int32)


def torch_outputs(model, ids, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask).long()
        out = model(torch.from_numpy(ids).long(), attention_mask=mask, output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers(tmp_path, hidden_act):
    reference = tiny_reference(tmp_path, hidden_act)
    module, params = load_component(tmp_path / "ref")
    assert module.config.hidden_act == hidden_act
    assert params["embeddings"]["token_embedding"]["embedding"].shape == (1000, 32)
    ids = random_ids()
    apply = jax.jit(module.apply, static_argnums=2)
    last, states = apply({"params": params}, ids, True)
    want_last, want_states = torch_outputs(reference, ids)
    assert len(states) == len(want_states) == 3
    np.testing.assert_allclose(last, want_last, atol=2e-4, rtol=0)
    for got, want in zip(states, want_states):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    np.testing.assert_array_equal(apply({"params": params}, ids, False), last)


def test_padding_attention_mask_matches_transformers(tmp_path):
    reference = tiny_reference(tmp_path, "quick_gelu", seed=2)
    module, params = load_component(tmp_path / "ref")
    ids = random_ids(batch=2, length=12)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    got = module.apply({"params": params}, ids, attention_mask=mask)
    want, _ = torch_outputs(reference, ids, mask)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    unmasked = module.apply({"params": params}, ids)
    assert np.abs(np.asarray(unmasked[0, 8:]) - np.asarray(got[0, 8:])).max() > 1e-3


def test_save_component_reloads_in_transformers(tmp_path):
    reference = tiny_reference(tmp_path, "gelu", seed=3)
    module, params = load_component(tmp_path / "ref")
    save_component(module, params, tmp_path / "ours")
    reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.hidden_act == "gelu"
    want = reference.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    ids = random_ids(batch=2, length=9)
    np.testing.assert_allclose(torch_outputs(reloaded, ids)[0], module.apply({"params": params}, ids),
                               atol=2e-4, rtol=0)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert CLIPTextConfig.from_dict(config) == module.config


def test_bfloat16_compute_close_to_float32(tmp_path):
    reference = tiny_reference(tmp_path, "quick_gelu", seed=4)
    module, params = load_component(tmp_path / "ref", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    ids = random_ids(batch=2)
    got = module.apply({"params": params}, ids)
    assert got.dtype == jnp.bfloat16
    want, _ = torch_outputs(reference, ids)
    err = np.abs(np.asarray(got, np.float32) - want)
    assert err.max() < 0.1 and err.mean() < 0.015, (err.max(), err.mean())


def test_config_round_trip_and_errors():
    config = CLIPTextConfig.from_dict({**TINY, "hidden_act": "gelu", "model_type": "clip_text_model"})
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    with pytest.warns(UserWarning, match="frobnicate"):
        CLIPTextConfig.from_dict({**TINY, "frobnicate": 1}, source="x/config.json")
    with pytest.raises(ValueError, match=r"x/config.json.*hidden_act='relu'"):
        CLIPTextConfig.from_dict({**TINY, "hidden_act": "relu"}, source="x/config.json")
    with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
        CLIPTextConfig.from_dict({"model_type": "clip_vision_model"})
