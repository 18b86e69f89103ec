"""ProjectedTextEncoder equals transformers' BertModel (PyTorch, padding masked) followed by a PyTorch
nn.Linear holding the TextProjection component's saved weights; the component folder round-trips."""
import jax
import numpy as np
import safetensors.numpy
import torch
import transformers

from cxr_ldm import load_component, save_component
from cxr_ldm.models.text_projection import (ProjectedTextEncoder, TextProjection, TextProjectionConfig,
                                            dummy_inputs)

TINY = dict(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            max_position_embeddings=16, pad_token_id=0)


def tiny_bert(tmp_path):
    """A random transformers BertModel of width 24, its biases randomised too, saved to `tmp_path/bert`."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "bert")
    return model


def padded_ids() -> np.ndarray:
    """Two prompts of 5 and 9 tokens, padded with id 0 to 12."""
    rng = np.random.default_rng(3)
    ids = np.zeros((2, 12), np.int32)
    ids[0, :5] = rng.integers(1, TINY["vocab_size"], 5)
    ids[1, :9] = rng.integers(1, TINY["vocab_size"], 9)
    return ids


def init_projection(seed: int = 0):
    projection = TextProjection(TextProjectionConfig(in_features=24, out_features=32))
    return projection, projection.init(jax.random.PRNGKey(seed), *dummy_inputs(projection.config))["params"]


def test_matches_transformers_bert_and_saved_linear(tmp_path):
    reference = tiny_bert(tmp_path)
    bert, bert_params = load_component(tmp_path / "bert")
    projection, projection_params = init_projection()
    save_component(projection, projection_params, tmp_path / "projection")
    saved = safetensors.numpy.load_file(tmp_path / "projection" / "diffusion_pytorch_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {"linear.weight": (32, 24), "linear.bias": (32,)}
    linear = torch.nn.Linear(24, 32)
    linear.load_state_dict({k.removeprefix("linear."): torch.from_numpy(v) for k, v in saved.items()})

    ids = padded_ids()
    encoder = ProjectedTextEncoder(bert, projection)
    got = np.asarray(jax.jit(encoder.apply)({"params": {"bert": bert_params, "projection": projection_params}},
                                            ids))
    with torch.no_grad():
        hidden = reference(torch.from_numpy(ids).long(),
                           attention_mask=torch.from_numpy(ids != 0).long()).last_hidden_state
        want = linear(hidden).numpy()
    assert got.shape == (2, 12, 32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    # Padding is ignored: the first prompt's token states do not depend on how far it is padded.
    short = encoder.apply({"params": {"bert": bert_params, "projection": projection_params}}, ids[:1, :7])
    np.testing.assert_allclose(np.asarray(short)[0, :5], got[0, :5], atol=1e-5, rtol=0)

    # Without a projection (a UNet of the encoder's width) the states are BERT's masked last hidden state.
    plain = ProjectedTextEncoder(bert).apply({"params": {"bert": bert_params}}, ids)
    np.testing.assert_allclose(plain, hidden.numpy(), atol=1e-5, rtol=0)
    assert encoder.config.max_position_embeddings == 16


def test_projection_component_round_trip(tmp_path):
    projection, params = init_projection(seed=7)
    kernel = np.asarray(params["linear"]["kernel"])
    limit = np.sqrt(6 / (24 + 32))  # Xavier-uniform bound
    assert 0.9 * limit < np.abs(kernel).max() <= limit
    np.testing.assert_array_equal(params["linear"]["bias"], np.zeros(32, np.float32))
    np.testing.assert_array_equal(init_projection(seed=7)[1]["linear"]["kernel"], kernel)

    save_component(projection, params, tmp_path / "projection")
    loaded, loaded_params = load_component(tmp_path / "projection")
    assert loaded.config == TextProjectionConfig(in_features=24, out_features=32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, jax.tree_util.tree_map(np.asarray, params))
