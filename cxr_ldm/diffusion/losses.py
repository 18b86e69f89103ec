"""The denoising loss: mean squared error with optional min-SNR-gamma and per-example weights."""
from __future__ import annotations

import jax.numpy as jnp

from cxr_ldm.diffusion.schedules import PREDICTION_TYPES, snr


def min_snr_weights(t: jnp.ndarray, alphas_cumprod, snr_gamma: float, prediction_type: str,
                    offset: float = 0.0) -> jnp.ndarray:
    """Min-SNR-gamma loss weights (Hang et al. 2023) as diffusers' train_text_to_image.py computes them.

    w = m / SNR_t for "epsilon", m / (SNR_t + 1) for "v_prediction", m for "sample", with
    m = min(SNR_t, gamma) + offset the weight of the x0 error the loss stands for (MSE(eps) = SNR MSE(x0),
    MSE(v) = (SNR + 1) MSE(x0)). offset 0 is the paper's; offset 1 with "v_prediction" keeps plain v-MSE
    (w = 1) wherever SNR_t <= gamma, so high-noise steps are not weighted down to SNR_t.
    t: int (B,) -> float32 (B,). With a zero-terminal-SNR schedule the "epsilon" weight at the last
    timestep is 0/0 (NaN), as in diffusers: such schedules need v_prediction.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type = {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    s = snr(t, alphas_cumprod)
    clipped = jnp.minimum(s, snr_gamma) + offset
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def diffusion_loss(model_output: jnp.ndarray, target: jnp.ndarray, t: jnp.ndarray | None = None, *,
                   alphas_cumprod=None, prediction_type: str = "epsilon", snr_gamma: float | None = None,
                   snr_offset: float = 0.0, weights: jnp.ndarray | None = None) -> jnp.ndarray:
    """Scalar float32 loss: mean over the batch of (per-example MSE x min-SNR weight x `weights`).

    model_output, target: (B, ...), compared in float32; t: int (B,), needed with `snr_gamma`, like
    `alphas_cumprod` (T,) and `prediction_type`; snr_offset: `min_snr_weights`' offset.
    weights: optional float (B,) multiplying each example's loss (the result stays a plain batch mean, not
    divided by sum(weights)). Without snr_gamma and weights this is the mean over all elements,
    F.mse_loss(..., reduction="mean").
    """
    if model_output.shape != target.shape:
        raise ValueError(f"model_output shape {model_output.shape} != target shape {target.shape}")
    err = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    if snr_gamma is not None:
        if t is None or alphas_cumprod is None:
            raise ValueError("diffusion_loss with snr_gamma needs the timesteps t and alphas_cumprod")
        per_example = per_example * min_snr_weights(t, alphas_cumprod, snr_gamma, prediction_type, snr_offset)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != per_example.shape:
            raise ValueError(f"weights shape {weights.shape}: expected one weight per example {per_example.shape}")
        per_example = per_example * weights
    return jnp.mean(per_example)
