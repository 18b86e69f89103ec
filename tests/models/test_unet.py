"""UNet2DConditionModel: parity with diffusers' PyTorch UNet at tiny random configs, config handling, remat."""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import cxr_ldm  # noqa: E402
from cxr_ldm.io.convert import flax_path_to_torch_key  # noqa: E402
from cxr_ldm.models.layers import REMAT_POLICIES, ResnetBlock2D  # noqa: E402
from cxr_ldm.models.unet import UNet2DConditionModel, UNetConfig, dummy_inputs  # noqa: E402

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            sample_size=16, in_channels=4, out_channels=4)
CONFIGS = {
    # SD 1.x layout: 1x1-conv projections; "attention_head_dim" 8 means 8 heads in diffusers.
    "sd1": dict(TINY, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                attention_head_dim=8),
    # SD 2.x layout: linear projections, per-block heads, upcast attention, two transformer layers.
    "sd2": dict(TINY, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1),
    # Attention and plain blocks mixed, per-block layer counts. The Flax config states the heads as
    # `num_attention_heads` (diffusers itself refuses that key, see test_num_attention_heads_config).
    "mixed": dict(TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 2),
                  attention_head_dim=(4, 2)),
    # The prompt pooled into the timestep embedding (addition_embed_type "text"), so the plain block's
    # resnets see it too.
    "pooled_text": dict(TINY, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                        addition_embed_type="text", addition_embed_type_num_heads=4),
}
MAX_ABS_ERR = 2e-4
# The test programs are tiny; skipping LLVM's expensive passes halves their compile time on CPU.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def _torch_unet(name: str):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers (e.g. conv_out); make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """name -> (torch model, Flax module, Flax params), built on first use; the Flax side is read from
    the torch model's save_pretrained folder."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _torch_unet(name)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            if name == "mixed":
                config_file = folder / "config.json"
                config = json.loads(config_file.read_text())
                config.update(num_attention_heads=config["attention_head_dim"], attention_head_dim=8)
                config_file.write_text(json.dumps(config))
            cache[name] = (model, *cxr_ldm.load_component(folder))
        return cache[name]

    return get


def _inputs(batch=2, height=16, width=16, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 7, 32)).astype(np.float32)
    return sample, context


def _torch_forward(model, sample, timesteps, context):
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.as_tensor(timesteps),
                    torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _check_parity(model, module, params, timesteps, shape=(16, 16)):
    sample, context = _inputs(height=shape[0], width=shape[1])
    ref = _torch_forward(model, sample, timesteps, context)
    out = np.asarray(jit(module.apply)({"params": params}, sample, jnp.asarray(timesteps), context))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= MAX_ABS_ERR, np.abs(out - ref).max()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(unets, name):
    model, module, params = unets(name)
    # The mixed config runs at an odd size, where diffusers forwards explicit upsample sizes.
    _check_parity(model, module, params, np.array([3, 871]), shape=(13, 15) if name == "mixed" else (16, 16))


def test_scalar_timestep_matches_diffusers(unets):
    model, module, params = unets("sd1")
    _check_parity(model, module, params, 500)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_heads_follow_diffusers_naming_quirk(unets, name):
    _, module, _ = unets(name)
    expected = {"sd1": (8, 8), "sd2": (2, 4), "mixed": (4, 2), "pooled_text": (4, 4)}[name]
    assert module.config.heads_per_block == expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_component_reloads_in_diffusers(unets, name, tmp_path):
    model, module, params = unets(name)
    cxr_ldm.save_component(module, params, tmp_path)
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    want, got = model.state_dict(), reloaded.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
    # Same weights, same architecture: outputs agree to float32 round-off (a plain diffusers
    # save_pretrained/from_pretrained round trip also moves them by ~2e-6).
    sample, context = _inputs(batch=1)
    np.testing.assert_allclose(_torch_forward(reloaded, sample, 10, context),
                               _torch_forward(model, sample, 10, context), rtol=0, atol=1e-5)


# bfloat16 has an 8-bit mantissa; errors stay within 4% of the output range through the tiny UNet.
BF16_REL_TOL = 0.04


def test_bfloat16_compute(unets):
    model, module, params = unets("sd2")  # linear projections, upcast attention
    sample, context = _inputs()
    ref = _torch_forward(model, sample, np.array([3, 871]), context)
    out = jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, sample, jnp.array([3, 871]), context)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err <= BF16_REL_TOL * np.abs(ref).max(), (err, np.abs(ref).max())


def test_remat_gives_same_outputs_and_gradients():
    # One cross-attention block keeps the gradient programs small; remat wraps every resnet and
    # transformer block alike, with each policy of what the blocks keep.
    config = UNetConfig.from_dict(dict(CONFIGS["sd1"], block_out_channels=(32,), attention_head_dim=4,
                                       down_block_types=("CrossAttnDownBlock2D",),
                                       up_block_types=("CrossAttnUpBlock2D",)))
    module = UNet2DConditionModel(config)
    sample, context = _inputs(batch=1, height=8, width=8)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(config)))["params"]
    rng = np.random.default_rng(1)  # eager module.init would compile every initializer separately
    params = jax.tree.map(lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32), shapes)

    def loss(p, mod):
        return jnp.mean(mod.apply({"params": p}, sample, jnp.array([871]), context) ** 2)

    value, grads = jit(jax.value_and_grad(lambda p: loss(p, module)))(params)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for policy in REMAT_POLICIES:
        rematerialised = module.clone(remat=True, remat_policy=policy)
        jaxpr = str(jax.make_jaxpr(lambda p: loss(p, rematerialised))(params))
        # 5 resnets and 4 transformer blocks, each with the policy
        assert len(re.findall(r"= (?:remat2|checkpoint)\[", jaxpr)) == 9, policy
        kept = REMAT_POLICIES[policy]
        shown = f"<function {kept.__name__}" if callable(kept) and hasattr(kept, "__name__") else str(kept)
        assert jaxpr.count(f"policy={shown}") == 9, policy
        if policy == "dots_and_convs_saveable":  # jax.checkpoint's policies all share one gradient rule
            continue
        value_r, grads_r = jit(jax.value_and_grad(lambda p: loss(p, rematerialised)))(params)
        np.testing.assert_allclose(value_r, value, rtol=1e-6, err_msg=policy)
        flat_r = jax.tree_util.tree_leaves(grads_r)
        assert len(flat) == len(flat_r)
        for (path, g), g_r in zip(flat, flat_r):
            np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7, err_msg=f"{policy} {jax.tree_util.keystr(path)}")
    with pytest.raises(ValueError, match="remat policy 'dots'"):
        module.clone(remat=True, remat_policy="dots").init(jax.random.key(0), *dummy_inputs(config))


def test_num_attention_heads_config():
    # diffusers refuses the key (its attention_head_dim already holds head counts); we read it as heads.
    config = dict(CONFIGS["mixed"], num_attention_heads=(4, 2), attention_head_dim=8)
    with pytest.raises(ValueError, match="num_attention_heads"):
        diffusers.UNet2DConditionModel(**config)
    parsed = UNetConfig.from_dict(config)
    assert parsed.heads_per_block == (4, 2)
    written = parsed.to_dict()
    assert written["num_attention_heads"] is None and written["attention_head_dim"] == [4, 2]
    assert UNetConfig.from_dict(written).heads_per_block == (4, 2)


def test_config_round_trip_and_param_names():
    config = UNetConfig.from_dict(dict(CONFIGS["sd2"], _class_name="UNet2DConditionModel"))
    assert UNetConfig.from_dict(config.to_dict()) == config
    module = UNet2DConditionModel(config)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(config)))["params"]
    torch_keys = set(diffusers.UNet2DConditionModel(**CONFIGS["sd2"]).state_dict())
    ours = {flax_path_to_torch_key(path) for path in traverse_util.flatten_dict(params)}
    assert ours == torch_keys
    for key in ("down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q.weight", "time_embedding.linear_1.weight",
                "conv_norm_out.weight", "up_blocks.0.upsamplers.0.conv.weight", "mid_block.resnets.1.conv2.bias"):
        assert key in ours


def test_text_states_of_another_width_are_refused():
    """Dense layers would size to_k / to_v from whatever states come in: a UNet whose params then
    contradict its own cross_attention_dim (and diffusers' reading of it). It must refuse instead."""
    config = UNetConfig.from_dict(CONFIGS["sd1"])
    sample, timesteps, states = dummy_inputs(config)
    module = UNet2DConditionModel(config)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), sample, timesteps, states))["params"]
    assert params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape[0] == 32
    wide = jnp.zeros((*states.shape[:-1], 64))
    with pytest.raises(ValueError, match=r"64 wide; this UNet's cross_attention_dim is 32"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), sample, timesteps, wide))


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
                                        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("dropout", 0.1),
                                        ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
                                        ("act_fn", "gelu")])
def test_unsupported_values_name_key_and_source(key, value):
    with pytest.raises(ValueError, match=rf"unet/config\.json: .*{key}"):
        UNetConfig.from_dict(dict(CONFIGS["sd1"], **{key: value}), source="unet/config.json")


def test_unknown_key_warns_and_bookkeeping_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UNetConfig.from_dict(dict(CONFIGS["sd1"], _class_name="UNet2DConditionModel", _diffusers_version="0.36.0",
                                  resnet_skip_time_act=False))
    with pytest.warns(UserWarning, match="my/config.json: .*'frobnicate'"):
        UNetConfig.from_dict(dict(CONFIGS["sd1"], frobnicate=1), source="my/config.json")


def test_one_channel_per_group_erases_the_timestep_embedding():
    """ResnetBlock2D adds the timestep embedding per channel just before norm2: with one channel per group
    the norm subtracts it again (the block's output does not depend on temb), with four it does not."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    temb_a, temb_b = jax.random.normal(jax.random.key(1), (2, 2, 16))
    for groups, erased in ((32, True), (8, False)):
        block = ResnetBlock2D(32, groups=groups)
        params = block.init(jax.random.key(2), x, temb_a)
        change = np.max(np.abs(block.apply(params, x, temb_a) - block.apply(params, x, temb_b)))
        assert (change < 1e-4) == erased, (groups, change)


def test_config_warns_when_a_block_has_one_channel_per_group():
    with pytest.warns(UserWarning, match=r"block_out_channels \[32\] equal norm_num_groups=32"):
        UNetConfig(**dict(CONFIGS["sd1"], norm_num_groups=32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UNetConfig(**CONFIGS["sd1"])


def _full_size_benchmark():
    """benchmarks/full_size_unet.py, which holds the SD 1.5 / SD 2.1 UNet configs."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "full_size_unet.py"
    spec = importlib.util.spec_from_file_location("full_size_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_parameter_counts(name):
    bench = _full_size_benchmark()
    ours = bench.flax_param_count(bench.MODELS[name])  # jax.eval_shape: nothing is allocated
    assert ours == bench.diffusers_param_count(bench.MODELS[name]) == bench.EXPECTED_PARAMS[name]
