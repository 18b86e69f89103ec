"""VAE reconstruction quality: encode (posterior mean) then decode real images, compare in [0, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cxr_ldm import imaging
from cxr_ldm.imaging import as_float_images


def reconstruct(vae, vae_params, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """images (N, H, W, 1|3) uint8 or float in [0, 1] -> reconstructions float32 (N, H, W, 1) in [0, 1].

    Grayscale images go to a 3-channel VAE (e.g. Stable Diffusion's) repeated, and come back as the
    channel mean."""
    images = as_float_images(images)
    channels = vae.config.in_channels

    @jax.jit
    def roundtrip(params, x):
        x = jnp.repeat(x, channels, axis=-1) if channels != 1 else x
        mean, _ = vae.apply({"params": params}, x * 2.0 - 1.0, method=vae.encode)
        decoded = vae.apply({"params": params}, mean, method=vae.decode).astype(jnp.float32)
        decoded = decoded.mean(axis=-1, keepdims=True) if decoded.shape[-1] != 1 else decoded
        return jnp.clip(decoded / 2.0 + 0.5, 0.0, 1.0)

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.pad(batch, ((0, batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
        out.append(np.asarray(roundtrip(vae_params, padded))[:len(batch)])
    return np.concatenate(out)


def reconstruction_metrics(vae, vae_params, images: np.ndarray, batch_size: int = 32) -> dict:
    """Mean PSNR (dB), SSIM and RMSE (in [0, 1] units) of the VAE round trip over `images`."""
    originals = as_float_images(images)
    reconstructions = reconstruct(vae, vae_params, originals, batch_size)
    return {"psnr": float(np.mean(imaging.psnr(originals, reconstructions))),
            "ssim": float(np.mean(imaging.ssim(originals, reconstructions))),
            "rmse": float(np.mean(imaging.rmse(originals, reconstructions))),
            "num_images": len(originals)}
