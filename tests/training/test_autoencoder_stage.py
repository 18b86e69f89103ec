"""Folding per-channel latent standardization into the VAE's 1x1 convs."""
import jax
import jax.numpy as jnp
import numpy as np

from cxr_ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, dummy_inputs
from cxr_ldm.training.autoencoder_stage import standardize_latent_channels


def tiny_vae() -> tuple[AutoencoderKL, dict]:
    config = AutoencoderConfig.from_dict({
        "in_channels": 1, "out_channels": 1, "latent_channels": 3, "block_out_channels": (8, 16),
        "layers_per_block": 1, "norm_num_groups": 4, "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2, "sample_size": 16})
    vae = AutoencoderKL(config)
    params = vae.init(jax.random.PRNGKey(0), *dummy_inputs(config))["params"]
    # Give the latents offsets and unequal scales, as a trained VAE has.
    params = jax.tree_util.tree_map(np.asarray, params)
    params["quant_conv"]["bias"] = params["quant_conv"]["bias"] + np.array([3.0, -1.0, 0.5, 0, 0, 0], np.float32)
    params["quant_conv"]["kernel"] = params["quant_conv"]["kernel"] * np.array([1, 4, 0.3, 1, 1, 1], np.float32)
    return vae, params


def test_standardized_latents_have_zero_mean_unit_std_and_decode_the_same():
    vae, params = tiny_vae()
    images = jax.random.uniform(jax.random.PRNGKey(1), (6, 16, 16, 1), minval=-1.0, maxval=1.0)
    encode = lambda p: vae.apply({"params": p}, images, method=vae.encode)
    decode = lambda p, z: vae.apply({"params": p}, z, method=vae.decode)
    mean, logvar = (np.asarray(a, np.float64) for a in encode(params))
    channel_mean, channel_std = mean.mean((0, 1, 2)), mean.std((0, 1, 2))
    assert np.abs(channel_mean).max() > 0.3 and channel_std.max() / channel_std.min() > 2  # not standard yet

    folded = standardize_latent_channels(params, channel_mean, channel_std)
    new_mean, new_logvar = (np.asarray(a, np.float64) for a in encode(folded))
    np.testing.assert_allclose(new_mean, (mean - channel_mean) / channel_std, atol=1e-4)
    np.testing.assert_allclose(new_mean.mean((0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(new_mean.std((0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(new_logvar, logvar - 2 * np.log(channel_std), atol=1e-4)
    # The same latent, expressed in either coordinate system, decodes to the same image.
    np.testing.assert_allclose(decode(folded, jnp.asarray(new_mean, jnp.float32)),
                               decode(params, jnp.asarray(mean, jnp.float32)), atol=1e-4)
    assert folded["quant_conv"]["kernel"].dtype == np.float32
