"""Component folders <-> Flax params: strict key checks, shards, variants, pickles, config.json handling."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from cxr_ldm import load_component, save_component
from cxr_ldm.io import convert

TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, bos_token_id=998, eos_token_id=999)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP)).eval()


@pytest.fixture()
def folder(tmp_path, reference):
    reference.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def assert_params_equal(params, state_dict: dict[str, torch.Tensor]):
    """Every param equals the (float32) torch tensor of the same key, layout converted."""
    flat = traverse_util.flatten_dict(params)
    assert len(flat) == len(state_dict)
    for path, value in flat.items():
        key = convert.flax_path_to_torch_key(path)
        want = convert.torch_to_flax_layout(state_dict[key].float().numpy(), path[-1])
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=key)


class TorchTiny(torch.nn.Module):
    """Conv, GroupNorm, Linear ("linear_1"/"linear_2" literal names), Embedding, and a numbered child list."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        block = torch.nn.Module()
        block.norm = torch.nn.GroupNorm(4, 8)
        block.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.down_blocks = torch.nn.ModuleList([block])
        self.time_embedding = torch.nn.Module()
        self.time_embedding.linear_1 = torch.nn.Linear(8, 16)
        self.time_embedding.linear_2 = torch.nn.Linear(16, 8)
        self.class_embedding = torch.nn.Embedding(10, 8)

    def forward(self, x, labels):  # x: NCHW
        h = self.conv_in(x)
        block = self.down_blocks[0]
        h = block.conv1(torch.nn.functional.silu(block.norm(h)))
        t = self.time_embedding.linear_2(torch.nn.functional.silu(self.time_embedding.linear_1(
            self.class_embedding(labels))))
        return h + t[:, :, None, None]


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Conv(8, (3, 3), padding=1, name="conv1")(nn.silu(nn.GroupNorm(4, epsilon=1e-5, name="norm")(h)))


class FlaxTimeEmbedding(nn.Module):
    @nn.compact
    def __call__(self, e):
        return nn.Dense(8, name="linear_2")(nn.silu(nn.Dense(16, name="linear_1")(e)))


class FlaxTiny(nn.Module):
    def setup(self):
        self.conv_in = nn.Conv(8, (3, 3), padding=1)
        self.down_blocks = [FlaxBlock()]
        self.time_embedding = FlaxTimeEmbedding()
        self.class_embedding = nn.Embed(10, 8)

    def __call__(self, x, labels):  # x: NHWC
        h = self.down_blocks[0](self.conv_in(x))
        return h + self.time_embedding(self.class_embedding(labels))[:, None, None, :]


def test_generic_conversion_matches_torch_modules():
    torch.manual_seed(0)
    torch_model = TorchTiny().eval()
    with torch.no_grad():
        torch_model.down_blocks[0].norm.weight.add_(torch.randn(8))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    labels = np.array([3, 7])
    abstract = jax.eval_shape(lambda: FlaxTiny().init(jax.random.key(0), x.transpose(0, 2, 3, 1), labels))["params"]
    params = convert.state_dict_to_params(state, abstract)
    assert set(params["time_embedding"]) == {"linear_1", "linear_2"}
    assert set(params["down_blocks_0"]) == {"norm", "conv1"}
    got = FlaxTiny().apply({"params": params}, x.transpose(0, 2, 3, 1), labels)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x), torch.from_numpy(labels)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    back = convert.params_to_state_dict(params)
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def test_conversion_errors_name_every_bad_key(folder):
    state = load_file(folder / "model.safetensors")
    del state["encoder.layers.1.mlp.fc2.bias"]
    state["encoder.layers.0.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    state["final_layer_norm.weight"] = np.zeros((33,), np.float32)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(convert.ConversionError) as err:
        load_component(folder)
    message = str(err.value)
    assert str(folder) in message
    assert "1 missing" in message and "encoder.layers.1.mlp.fc2.bias" in message
    assert "1 unexpected" in message and "encoder.layers.0.extra_proj.weight" in message
    assert "1 mis-shaped" in message and "final_layer_norm.weight: file has (33,), model expects (32,)" in message


def test_prefixed_and_unprefixed_keys_load_alike(tmp_path, folder, reference):
    _, params = load_component(folder)
    assert_params_equal(params, reference.state_dict())
    module, _ = load_component(folder)
    save_component(module, params, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "model.safetensors").keys()
    assert all(k.startswith("text_model.") for k in keys)
    _, again = load_component(tmp_path / "ours")
    assert_params_equal(again, reference.state_dict())


def test_sharded_index(tmp_path, reference):
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    _, params = load_component(tmp_path / "sharded")
    assert_params_equal(params, reference.state_dict())
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_component(tmp_path / "sharded")


@pytest.mark.parametrize("variant,dtype,shard", [("fp16", torch.float16, None), ("bf16", torch.bfloat16, None),
                                                 ("fp16", torch.float16, "40KB")])
def test_half_precision_variants(tmp_path, reference, variant, dtype, shard):
    half = transformers.CLIPTextModel(reference.config).eval()
    half.load_state_dict(reference.state_dict())
    half.to(dtype).save_pretrained(tmp_path / "v", variant=variant, **({"max_shard_size": shard} if shard else {}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_component(tmp_path / "v", variant="fp32")
    _, params = load_component(tmp_path / "v", variant=variant)
    assert_params_equal(params, half.state_dict())
    _, params16 = load_component(tmp_path / "v", variant=variant, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


def test_pickle_needs_allow_pickle(tmp_path, folder, reference):
    (folder / "model.safetensors").unlink()
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_component(folder)
    _, params = load_component(folder, allow_pickle=True)
    assert_params_equal(params, reference.state_dict())


def test_unknown_config_key_warns(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "frobnicate": 3}))
    with pytest.warns(UserWarning, match=r"config.json.*frobnicate"):
        load_component(folder)


def test_missing_or_unsupported_config_names_path(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "config.json")):
        load_component(tmp_path / "nowhere")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{folder / 'config.json'} is not valid JSON"):
        load_component(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"]}))
    with pytest.raises(ValueError, match="'T5EncoderModel' is not supported"):
        load_component(folder)
