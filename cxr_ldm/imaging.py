"""Image math shared by every layer: quality (PSNR, RMSE, SSIM, MS-SSIM) and array conversions.

Images are float arrays (N, H, W, C) with values in [0, data_range]. SSIM follows Wang et al. (2004)
with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 and 'valid' filtering, the same
conventions as `tf.image.ssim`; MS-SSIM follows Wang et al. (2003) as `tf.image.ssim_multiscale`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(a: jnp.ndarray, b: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
    """Peak signal-to-noise ratio in dB per image: (N, H, W, C) x2 -> (N,)."""
    mse = jnp.mean(jnp.square(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


def rmse(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Root mean squared error per image: (N, H, W, C) x2 -> (N,)."""
    diff = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(diff), axis=(1, 2, 3)))


def masked_psnr(a: jnp.ndarray, b: jnp.ndarray, mask: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
    """PSNR in dB over the pixels where mask (N, H, W, 1) is true, per image: (N, H, W, C) x2 -> (N,);
    inf where those pixels are identical, NaN for an image whose mask is empty."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    weights = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), a.shape)
    count = weights.sum(axis=(1, 2, 3))
    mse = (weights * jnp.square(a - b)).sum(axis=(1, 2, 3)) / jnp.where(count > 0, count, jnp.nan)
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> jnp.ndarray:
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(x: jnp.ndarray, window: jnp.ndarray) -> jnp.ndarray:
    """Separable 'valid' filtering of (N, H, W, C) with a 1-D window, per channel."""
    c = x.shape[-1]
    k = window.size
    dn = ("NHWC", "HWIO", "NHWC")
    vertical = jnp.tile(window.reshape(k, 1, 1, 1), (1, 1, 1, c))
    horizontal = jnp.tile(window.reshape(1, k, 1, 1), (1, 1, 1, c))
    x = jax.lax.conv_general_dilated(x, vertical, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(x, horizontal, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c)


def _ssim_terms(a, b, data_range, window_size, sigma):
    """Mean SSIM and mean contrast-structure term per image and channel: (N, C) each."""
    window = _gaussian_window(window_size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, window), _filter(b, window)
    var_a = _filter(a * a, window) - mu_a ** 2
    var_b = _filter(b * b, window) - mu_b ** 2
    cov = _filter(a * b, window) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
    return jnp.mean(luminance * contrast_structure, axis=(1, 2)), jnp.mean(contrast_structure, axis=(1, 2))


def _check_size(shape, window_size: int, what: str) -> None:
    if shape[1] < window_size or shape[2] < window_size:
        raise ValueError(f"{what}: images of {shape[1]}x{shape[2]} are smaller than the {window_size}x"
                         f"{window_size} SSIM window")


@functools.partial(jax.jit, static_argnames=("data_range", "window_size", "sigma"))
def masked_ssim(a: jnp.ndarray, b: jnp.ndarray, mask: jnp.ndarray, data_range: float = 1.0, window_size: int = 11,
                sigma: float = 1.5) -> jnp.ndarray:
    """SSIM per image averaged over the windows centred on pixels where mask (N, H, W, 1) is true (the 'valid'
    windows only): (N, H, W, C) x2 -> (N,); NaN for an image with no such window."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    _check_size(a.shape, window_size, "masked_ssim")
    window = _gaussian_window(window_size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, window), _filter(b, window)
    var_a, var_b = _filter(a * a, window) - mu_a ** 2, _filter(b * b, window) - mu_b ** 2
    cov = _filter(a * b, window) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    half = window_size // 2
    weights = jnp.asarray(mask, jnp.float32)[:, half:a.shape[1] - half, half:a.shape[2] - half]
    weights = jnp.broadcast_to(weights, ssim_map.shape)
    count = weights.sum(axis=(1, 2, 3))
    return (weights * ssim_map).sum(axis=(1, 2, 3)) / jnp.where(count > 0, count, jnp.nan)


@functools.partial(jax.jit, static_argnames=("data_range", "window_size", "sigma"))
def ssim(a: jnp.ndarray, b: jnp.ndarray, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> jnp.ndarray:
    """Structural similarity per image (mean over pixels and channels): (N, H, W, C) x2 -> (N,)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    _check_size(a.shape, window_size, "ssim")
    value, _ = _ssim_terms(a, b, data_range, window_size, sigma)
    return value.mean(axis=-1)


def max_ms_ssim_scales(size: int, window_size: int = 11) -> int:
    """How many MS-SSIM scales (<= 5) fit an image side of `size` pixels with the given window."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and size // 2 ** scales >= window_size:
        scales += 1
    return scales


@functools.partial(jax.jit, static_argnames=("data_range", "scales", "window_size", "sigma"))
def ms_ssim(a: jnp.ndarray, b: jnp.ndarray, data_range: float = 1.0, scales: int | None = None,
            window_size: int = 11, sigma: float = 1.5) -> jnp.ndarray:
    """Multi-scale SSIM per image: (N, H, W, C) x2 -> (N,).

    The standard 5 scales need sides >= 176 px. `scales=None` uses as many as the image size allows
    (`max_ms_ssim_scales`), with the first `scales` standard weights renormalised to sum to one, so
    small images (64 px phantoms: 3 scales) get a comparable number. Negative contrast-structure
    terms are clipped to zero before the power, as in `tf.image.ssim_multiscale`.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    scales = scales or max_ms_ssim_scales(min(a.shape[1:3]), window_size)
    weights = jnp.asarray(MS_SSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    factors = []
    for scale in range(scales):
        _check_size(a.shape, window_size, f"ms_ssim scale {scale + 1} of {scales}")
        value, contrast_structure = _ssim_terms(a, b, data_range, window_size, sigma)
        factors.append(jnp.maximum(value if scale == scales - 1 else contrast_structure, 0.0))
        if scale < scales - 1:
            a, b = _downsample(a), _downsample(b)
    stacked = jnp.stack(factors, axis=-1)  # (N, C, scales)
    return jnp.prod(stacked ** weights, axis=-1).mean(axis=-1)


def _downsample(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 average pooling, 'SAME' padding for odd sides (tf.image.ssim_multiscale's choice)."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return x.reshape(n, (h + h % 2) // 2, 2, (w + w % 2) // 2, 2, c).mean(axis=(2, 4))


def as_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 or float images (N, H, W, C) -> float32 (N, H, W, 1) in [0, 1]; RGB is averaged to gray."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1|3), got shape {images.shape}")
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    return images.mean(axis=-1, keepdims=True) if images.shape[-1] == 3 else images


def resize(images: jnp.ndarray, size: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B, size, size, C), antialiased linear resampling; a no-op at the same size."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear")


def match_channels(images: jax.Array, channels: int) -> jax.Array:
    """Grayscale (B, H, W, 1) repeated to `channels` (e.g. 3 for an SD VAE); other counts must match."""
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] != 1:
        raise ValueError(f"images have {images.shape[-1]} channels: expected {channels} or 1 (grayscale)")
    return jnp.repeat(images, channels, axis=-1)
