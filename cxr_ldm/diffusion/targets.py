"""Forward diffusion and what the model is trained to predict.

x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t);
v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022). Arrays are NHWC (or any (B, ...)); t is int (B,).
All functions are jittable; `alphas_cumprod` is a (T,) array, numpy (preferred: see
`schedules.alpha_sigma_tables`) or jax; results are float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cxr_ldm.diffusion.schedules import PREDICTION_TYPES, alpha_sigma_tables


def _alpha_sigma(t: jnp.ndarray, alphas_cumprod, ndim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """alpha_t, sigma_t for int timesteps t (B,), shaped (B, 1, ..., 1) to broadcast over ndim dims."""
    alphas, sigmas = alpha_sigma_tables(alphas_cumprod)
    t = jnp.asarray(t)
    shape = t.shape + (1,) * (ndim - t.ndim)
    return alphas[t].reshape(shape), sigmas[t].reshape(shape)


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int, logit_std: float = 0.0,
                     logit_mean: float = 0.0) -> jnp.ndarray:
    """Training timesteps, int32 (batch_size,) in [0, num_timesteps): uniform when logit_std is 0, else
    logit-normal (Esser et al. 2024): t = floor(T sigmoid(n)), n ~ N(logit_mean, logit_std^2), which draws
    the middle of the schedule more often than its ends (a positive mean leans to the noisy end)."""
    if not logit_std:
        return jax.random.randint(rng, (batch_size,), 0, num_timesteps)
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,), jnp.float32))
    return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray, alphas_cumprod) -> jnp.ndarray:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise. x0, noise: (B, ...); t: int (B,)."""
    alpha, sigma = _alpha_sigma(t, alphas_cumprod, x0.ndim)
    return alpha * x0 + sigma * noise


def velocity(x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray, alphas_cumprod) -> jnp.ndarray:
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (diffusers' `get_velocity(x0, noise, t)`)."""
    alpha, sigma = _alpha_sigma(t, alphas_cumprod, x0.ndim)
    return alpha * noise - sigma * x0


def training_target(prediction_type: str, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray,
                    alphas_cumprod) -> jnp.ndarray:
    """The regression target of the model for x_t = add_noise(x0, noise, t): noise ("epsilon"),
    velocity ("v_prediction") or x0 ("sample"). Shapes (B, ...)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type = {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def predicted_x0_and_eps(prediction_type: str, model_output: jnp.ndarray, x_t: jnp.ndarray,
                         alpha: jnp.ndarray, sigma: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Turns a model output at x_t into its estimates of x0 and eps.

    alpha, sigma: scalars (or broadcastable) with x_t = alpha x0 + sigma eps. Returns (x0, eps).
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    raise ValueError(f"prediction_type = {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def model_output_from_x0(prediction_type: str, x0: jnp.ndarray, x_t: jnp.ndarray, alpha: jnp.ndarray,
                         sigma: jnp.ndarray) -> jnp.ndarray:
    """The model output at x_t whose x0 estimate is `x0`: the inverse of `predicted_x0_and_eps` for a fixed
    x_t (needs sigma > 0 for "epsilon" and "v_prediction")."""
    if prediction_type == "sample":
        return x0
    eps = (x_t - alpha * x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    raise ValueError(f"prediction_type = {prediction_type!r}: expected one of {PREDICTION_TYPES}")
