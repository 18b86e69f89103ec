"""AutoencoderKL against diffusers' PyTorch AutoencoderKL at tiny random configs (fp32 parity <= 2e-4)."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from safetensors.numpy import load_file, save_file

import cxr_ldm
from cxr_ldm.io.convert import ConversionError, state_dict_to_params
from cxr_ldm.models import layers
from cxr_ldm.models.autoencoder import AutoencoderConfig, dummy_inputs

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 2e-4
# bf16 keeps 8 significant bits (relative rounding 2^-9); through ~20 layers the error grows to a few
# percent of the output range (measured: max 3-4%, mean 0.3-0.5% of the largest fp32 magnitude).
# Bounds: max error 8%, mean error 1% of that magnitude.
BF16_MAX_REL, BF16_MEAN_REL = 0.08, 0.01


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_vae(channels: int, groups: int, seed: int) -> TorchAutoencoderKL:
    """A tiny diffusers VAE with every param perturbed: norm scales start at exactly 1 and norm biases
    at 0, which would hide a scale/bias or norm mix-up."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(
        in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=groups, sample_size=32, scaling_factor=0.5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_outputs(model: TorchAutoencoderKL, images: torch.Tensor):
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        return posterior.mean, posterior.logvar, model.decode(posterior.mean).sample


_CASES = {}


def make_case(channels: int, groups: int, tmp_path_factory):
    """(torch model, its save_pretrained folder, NCHW test images in [-1, 1]), built once per module."""
    if (channels, groups) not in _CASES:
        model = torch_vae(channels, groups, seed=channels)
        folder = tmp_path_factory.mktemp(f"vae{channels}")
        model.save_pretrained(folder)
        images = torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        _CASES[channels, groups] = model, folder, images
    return _CASES[channels, groups]


@pytest.fixture(scope="module", params=[(1, 8), (3, 16)], ids=["gray-g8", "rgb-g16"])
def case(request, tmp_path_factory):
    """Grayscale and RGB tiny VAEs: for the parity tests."""
    return make_case(*request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """The grayscale tiny VAE: for the tests whose subject does not depend on the channel count."""
    return make_case(1, 8, tmp_path_factory)


def test_encode_decode_match_diffusers(case):
    model, folder, images = case
    module, params = cxr_ldm.load_component(folder)
    assert module.config.in_channels == images.shape[1] and module.config.scaling_factor == 0.5
    mean_t, logvar_t, decoded_t = torch_outputs(model, images)
    mean, logvar = module.apply({"params": params}, nhwc(images), method=module.encode)
    decoded = module.apply({"params": params}, nhwc(mean_t), method=module.decode)
    assert mean.shape == (2, 16, 16, 4) and decoded.shape == (2, 32, 32, images.shape[1])
    np.testing.assert_allclose(mean, nhwc(mean_t), atol=TOL, rtol=0)
    np.testing.assert_allclose(logvar, nhwc(logvar_t), atol=TOL, rtol=0)
    np.testing.assert_allclose(decoded, nhwc(decoded_t), atol=TOL, rtol=0)
    reconstruction, mean2, _ = module.apply({"params": params}, nhwc(images))
    np.testing.assert_allclose(mean2, mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(reconstruction, nhwc(decoded_t), atol=TOL, rtol=0)


def test_posterior_sample_uses_gaussian_rng(gray):
    _, folder, images = gray
    module, params = cxr_ldm.load_component(folder)
    rng = jax.random.key(3)
    reconstruction, mean, logvar = module.apply({"params": params}, nhwc(images), sample_posterior=True,
                                                rngs={"gaussian": rng})
    # The noise key is the first make_rng("gaussian") of the root scope.
    key = module.apply({"params": params}, method=lambda m: m.make_rng("gaussian"), rngs={"gaussian": rng})
    latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    expected = module.apply({"params": params}, latents, method=module.decode)
    np.testing.assert_allclose(reconstruction, expected, atol=1e-5, rtol=0)
    assert np.abs(latents - mean).max() > 1e-3


def test_save_component_reloads_in_diffusers(case, tmp_path):
    model, folder, images = case
    module, params = cxr_ldm.load_component(folder)
    cxr_ldm.save_component(module, params, tmp_path)
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path).eval()
    for key in ("in_channels", "block_out_channels", "norm_num_groups", "latent_channels", "scaling_factor"):
        assert np.array_equal(reloaded.config[key], model.config[key]), key
    for a, b in zip(torch_outputs(model, images), torch_outputs(reloaded, images)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_legacy_attention_keys_load(gray, tmp_path):
    """Checkpoints from before diffusers 0.14 name the mid-block attention query/key/value/proj_attn
    and store its projections as 1x1 convs."""
    model, folder, images = gray
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in load_file(folder / WEIGHTS).items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    save_file(legacy, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    module, params = cxr_ldm.load_component(tmp_path)
    mean, _ = module.apply({"params": params}, nhwc(images), method=module.encode)
    np.testing.assert_allclose(mean, nhwc(torch_outputs(model, images)[0]), atol=TOL, rtol=0)


def test_bf16_compute_stays_close_to_fp32(gray):
    _, folder, images = gray
    module32, params = cxr_ldm.load_component(folder)
    module16, _ = cxr_ldm.load_component(folder, dtype=jnp.bfloat16)
    out32 = module32.apply({"params": params}, nhwc(images))
    out16 = jax.jit(module16.apply)({"params": params}, nhwc(images))
    for a16, a32 in zip(out16, out32):  # reconstruction, mean, logvar
        assert a16.dtype == jnp.float32
        scale = np.abs(a32).max()
        err = np.abs(np.asarray(a16) - np.asarray(a32))
        assert err.max() <= BF16_MAX_REL * scale and err.mean() <= BF16_MEAN_REL * scale, (err.max(), scale)


def test_remat_keeps_params_and_wraps_every_block(gray):
    _, folder, images = gray
    module, params = cxr_ldm.load_component(folder)
    remat = module.clone(remat=True)
    inputs = dummy_inputs(module.config)
    remat_shapes = jax.eval_shape(lambda: remat.init(jax.random.key(0), *inputs))["params"]
    assert jax.tree.structure(remat_shapes) == jax.tree.structure(params)

    def rematerialised(m):  # the remat primitive is "remat2" in current jax, "checkpoint" in others
        jaxpr = jax.make_jaxpr(lambda p: m.apply({"params": p}, nhwc(images)))(params)
        return len(re.findall(r"= (?:remat2|checkpoint)\[", str(jaxpr)))

    # Encoder: 2 down-block + 2 mid resnets, decoder: 2 mid + 2 x 2 up-block resnets; 2 attentions.
    assert rematerialised(remat) == 12 and rematerialised(module) == 0


def test_config_round_trips_and_warns_on_unknown_keys(gray):
    _, folder, _ = gray
    raw = json.loads((folder / "config.json").read_text())
    with pytest.warns(UserWarning, match="unknown keys \\['my_note'\\]"):
        config = AutoencoderConfig.from_dict({**raw, "my_note": 1}, source="cfg.json")
    assert AutoencoderConfig.from_dict(config.to_dict()) == config
    assert config.downsampling_factor == 2 and config.block_out_channels == (32, 64)
    assert AutoencoderConfig(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2).block_out_channels == (32, 64)


@pytest.mark.parametrize("key, value, expected", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "down_block_types"),
    ("up_block_types", ["UpDecoderBlock2D"], "up_block_types"),
    ("act_fn", "gelu", "act_fn"),
    ("block_out_channels", [32, 60], "block_out_channels"),
    ("latent_channels", 0, "latent_channels"),
])
def test_unsupported_config_values_raise(gray, tmp_path, key, value, expected):
    _, folder, _ = gray
    raw = {**json.loads((folder / "config.json").read_text()), key: value}
    with pytest.raises(ValueError, match=f"cfg.json: '{expected}'"):
        AutoencoderConfig.from_dict(raw, source="cfg.json")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=expected):
        cxr_ldm.load_component(tmp_path)


def test_missing_tensor_is_named(gray, tmp_path):
    _, folder, _ = gray
    state = load_file(folder / WEIGHTS)
    del state["decoder.mid_block.attentions.0.to_k.bias"]
    save_file(state, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"missing tensor.*\n\s+decoder\.mid_block\.attentions\.0\.to_k\.bias"):
        cxr_ldm.load_component(tmp_path)


def test_unet_variants_of_shared_layers_match_diffusers():
    """The layer settings the VAE does not use (time embedding, symmetric downsampling padding, upsampling
    to an odd skip-connection size) against diffusers' own layers."""
    torch.manual_seed(0)
    x, temb = torch.randn(2, 32, 7, 5), torch.randn(2, 16)
    cases = [
        (TorchResnetBlock2D(in_channels=32, out_channels=64, temb_channels=16, groups=8, eps=1e-5,
                            output_scale_factor=2.0),
         layers.ResnetBlock2D(64, groups=8, output_scale_factor=2.0), (x, temb), {}),
        (TorchDownsample2D(32, use_conv=True, out_channels=48, padding=1, name="op"), layers.Downsample2D(48),
         (x,), {}),
        (TorchUpsample2D(32, use_conv=True, out_channels=16), layers.Upsample2D(16), (x,), {"output_size": (13, 9)}),
    ]
    for torch_layer, layer, args, kwargs in cases:
        with torch.no_grad():
            for p in torch_layer.parameters():
                p.add_(0.05 * torch.randn_like(p))
            expected = nhwc(torch_layer(*args, **kwargs))
        flax_args = (nhwc(args[0]), *(a.numpy() for a in args[1:]))
        abstract = jax.eval_shape(lambda: layer.init(jax.random.key(0), *flax_args, **kwargs))["params"]
        state = {k: v.numpy() for k, v in torch_layer.state_dict().items()}
        params = state_dict_to_params(state, abstract)
        actual = layer.apply({"params": params}, *flax_args, **kwargs)
        assert actual.shape == expected.shape, type(layer).__name__
        np.testing.assert_allclose(actual, expected, atol=TOL, rtol=0, err_msg=type(layer).__name__)
