"""BertModel equals transformers' BertModel (PyTorch) on a tiny random configuration, loaded from and saved
to a transformers folder."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from cxr_ldm import load_component, save_component

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12)


def tiny_reference(tmp_path, hidden_act: str = "gelu", seed: int = 0):
    """A random transformers BertModel (LayerNorms and biases randomised too), saved to `tmp_path/ref`."""
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(hidden_act=hidden_act, **TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ref")
    return model


def random_inputs(batch=3, length=16, seed=1):
    """Token ids (B, T) and random segment ids (B, T), int32."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, TINY["vocab_size"], (batch, length)).astype(np.int32),
            rng.integers(0, TINY["type_vocab_size"], (batch, length)).astype(np.int32))


def torch_outputs(model, ids, attention_mask=None, token_type_ids=None):
    """(last_hidden_state, pooler_output) as numpy."""
    as_torch = lambda a: None if a is None else torch.from_numpy(a).long()
    with torch.no_grad():
        out = model(as_torch(ids), attention_mask=as_torch(attention_mask), token_type_ids=as_torch(token_type_ids))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_matches_transformers(tmp_path, hidden_act):
    reference = tiny_reference(tmp_path, hidden_act)
    module, params = load_component(tmp_path / "ref")
    assert (module.config.hidden_act, module.config.layer_norm_eps) == (hidden_act, 1e-12)
    ids, segments = random_inputs()
    got = module.apply({"params": params}, ids)
    want, _ = torch_outputs(reference, ids)
    assert got.shape == (3, 16, 32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    apply = jax.jit(module.apply, static_argnames="output_pooled")
    got, pooled = apply({"params": params}, ids, token_type_ids=segments, output_pooled=True)
    want, want_pooled = torch_outputs(reference, ids, token_type_ids=segments)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5, rtol=0)


def test_padding_attention_mask_matches_transformers(tmp_path):
    reference = tiny_reference(tmp_path, seed=2)
    module, params = load_component(tmp_path / "ref")
    ids, segments = random_inputs(batch=2, length=12, seed=3)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, 10:] = 0
    got = module.apply({"params": params}, ids, attention_mask=mask, token_type_ids=segments)
    want, _ = torch_outputs(reference, ids, attention_mask=mask, token_type_ids=segments)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    unmasked = module.apply({"params": params}, ids, token_type_ids=segments)
    assert np.abs(np.asarray(unmasked[0, :7]) - np.asarray(got[0, :7])).max() > 1e-3  # the mask matters


def test_save_component_reloads_in_transformers(tmp_path):
    reference = tiny_reference(tmp_path, seed=4)
    module, params = load_component(tmp_path / "ref")
    save_component(module, params, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["BertModel"], "bert")
    reloaded = transformers.BertModel.from_pretrained(tmp_path / "ours").eval()
    want = reference.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(want)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("key,value,message", [
    ("position_embedding_type", "relative_key", "position_embedding_type='relative_key' is not supported"),
    ("is_decoder", True, "is_decoder=true is not supported"),
    ("add_cross_attention", True, "add_cross_attention=true is not supported"),
    ("hidden_act", "swish", "hidden_act='swish' is not supported"),
])
def test_unsupported_configs_are_named(tmp_path, key, value, message):
    tiny_reference(tmp_path)
    config_file = tmp_path / "ref" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), key: value}))
    with pytest.raises(ValueError, match=rf"config\.json: .*{message}"):
        load_component(tmp_path / "ref")


def test_a_task_head_checkpoint_says_how_to_keep_its_encoder(tmp_path):
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match=r"'BertForMaskedLM' is not supported.*BertModel\.from_pretrained"):
        load_component(tmp_path / "mlm")
    transformers.BertModel.from_pretrained(tmp_path / "mlm").save_pretrained(tmp_path / "encoder")
    reference = transformers.BertModel.from_pretrained(tmp_path / "encoder").eval()
    module, params = load_component(tmp_path / "encoder")
    ids, _ = random_inputs(batch=2, length=8, seed=5)
    np.testing.assert_allclose(module.apply({"params": params}, ids), torch_outputs(reference, ids)[0],
                               atol=1e-5, rtol=0)
