"""Samplers: DDIM, DPM-Solver++ (2M) and DDPM, each equal to its diffusers scheduler step by step, and DDIM
inversion (`ddim_inversion`, as diffusers' DDIMInverseScheduler).

Every sampler is reduced to per-step coefficients computed in numpy (float64) from the scheduler config
and the number of steps; the jitted loop then runs one rule for all of them:

    x0, eps = estimates from the model output at x (by prediction_type); x0 clipped if the sampler clips
    x <- c_sample * x + c_x0 * x0 + c_eps * eps + c_prev_x0 * x0_of_previous_step + noise_std * z

DDIM (DDIMScheduler.step): c_x0 = sqrt(alpha_bar_prev), c_eps = sqrt(1 - alpha_bar_prev - std^2),
  std = eta * sqrt(var); the previous timestep is t - T // n, as diffusers takes it for every spacing.
DDPM (DDPMScheduler.step after set_timesteps(n)): the posterior mean of x_prev given x and x0; noise
  with the fixed_small / fixed_large variance at every t > 0.
DPM-Solver++ 2M (DPMSolverMultistepScheduler defaults: solver_order=2, midpoint, final_sigmas_type
  "zero"): first order at the first and the last step, second order (multistep) in between.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cxr_ldm.diffusion.schedules import SchedulerConfig, alpha_sigma_tables, compute_alphas_cumprod
from cxr_ldm.diffusion.targets import model_output_from_x0, predicted_x0_and_eps
from cxr_ldm.diffusion.timesteps import ddim_timesteps, dpm_solver_timesteps

SAMPLERS = ("ddim", "dpmpp_2m", "ddpm")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The numbers of one sampling run, float64 numpy arrays (S,) over the S steps (int64 timesteps).

    alpha, sigma: x_t = alpha * x0 + sigma * eps at the step's timestep (turns the model output into
    x0 and eps). The coefficients are those of the update rule in the module docstring.
    clip_range: bound of the clipped x0 estimate, or None for no clipping.
    """

    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    c_sample: np.ndarray
    c_x0: np.ndarray
    c_eps: np.ndarray
    c_prev_x0: np.ndarray
    noise_std: np.ndarray
    clip_range: float | None


def _zeros_like(a: np.ndarray) -> np.ndarray:
    return np.zeros(a.shape, np.float64)


def _ddim_plan(config: SchedulerConfig, n: int, eta: float) -> StepPlan:
    ac = compute_alphas_cumprod(config)
    ts = ddim_timesteps(config, n)
    prev = ts - config.num_train_timesteps // n
    final = 1.0 if config.set_alpha_to_one else ac[0]
    a, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * np.sqrt(variance)
    return StepPlan(ts, np.sqrt(a), np.sqrt(1 - a), c_sample=_zeros_like(a), c_x0=np.sqrt(a_prev),
                    c_eps=np.sqrt(1 - a_prev - std**2), c_prev_x0=_zeros_like(a), noise_std=std,
                    clip_range=config.clip_sample_range if config.clip_sample else None)


def _ddpm_plan(config: SchedulerConfig, n: int) -> StepPlan:
    ac = compute_alphas_cumprod(config)
    ts = ddim_timesteps(config, n)
    prev = np.append(ts[1:], -1)
    a, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    beta = 1 - a / a_prev  # of the (strided) step t -> prev
    if config.variance_type == "fixed_large":
        variance = beta
    else:  # fixed_small, fixed_small_log: the posterior variance, floored as diffusers does
        variance = np.maximum((1 - a_prev) / (1 - a) * beta, 1e-20)
    return StepPlan(ts, np.sqrt(a), np.sqrt(1 - a), c_sample=np.sqrt(1 - beta) * (1 - a_prev) / (1 - a),
                    c_x0=np.sqrt(a_prev) * beta / (1 - a), c_eps=_zeros_like(a), c_prev_x0=_zeros_like(a),
                    noise_std=np.where(ts > 0, np.sqrt(variance), 0.0),
                    clip_range=config.clip_sample_range if config.clip_sample else None)


def _dpm_solver_plan(config: SchedulerConfig, n: int) -> StepPlan:
    ac = compute_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24  # as DPMSolverMultistepScheduler: keeps log-SNR finite
    ts = dpm_solver_timesteps(config, n)
    alpha, sigma = np.sqrt(ac[ts]), np.sqrt(1 - ac[ts])
    log_snr = np.log(alpha) - np.log(sigma)
    steps = len(ts)
    c_sample, c_x0, c_prev = _zeros_like(alpha), _zeros_like(alpha), _zeros_like(alpha)
    c_x0[-1] = 1.0  # the last step goes to sigma = 0: x <- x0 estimate
    for i in range(steps - 1):
        h = log_snr[i + 1] - log_snr[i]
        c_sample[i] = sigma[i + 1] / sigma[i]
        c_x0[i] = -alpha[i + 1] * np.expm1(-h)
        if i > 0:  # second order: D1 = (x0_i - x0_{i-1}) / r0, weight 0.5 (midpoint)
            r0 = (log_snr[i] - log_snr[i - 1]) / h
            half = 0.5 * alpha[i + 1] * np.expm1(-h) / r0
            c_x0[i] -= half
            c_prev[i] = half
    return StepPlan(ts, alpha, sigma, c_sample=c_sample, c_x0=c_x0, c_eps=_zeros_like(alpha),
                    c_prev_x0=c_prev, noise_std=_zeros_like(alpha), clip_range=None)


def step_plan(config: SchedulerConfig, num_inference_steps: int, sampler: str, eta: float = 0.0,
              start_step: int = 0) -> StepPlan:
    """The per-step numbers of `sampler` (see `StepPlan`). eta: DDIM's noise weight (0 = deterministic).

    start_step: the plan's steps from this one on, as diffusers runs them after `set_begin_index(start_step)`
      (img2img): the same coefficients, except that a multistep solver starts afresh at first order.
    """
    if start_step and not 0 < start_step < num_inference_steps:
        raise ValueError(f"start_step = {start_step}: expected 0 <= start_step < num_inference_steps = "
                         f"{num_inference_steps}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler = {sampler!r}: expected one of {SAMPLERS}")
    if not isinstance(eta, numbers.Real) or eta < 0:
        raise ValueError(f"eta = {eta!r}: expected a non-negative Python number (it is static)")
    if eta and sampler != "ddim":
        raise ValueError(f"eta = {eta}: only the 'ddim' sampler takes eta; '{sampler}' has its own noise")
    if sampler == "ddim":
        plan = _ddim_plan(config, num_inference_steps, float(eta))
    elif sampler == "ddpm":
        plan = _ddpm_plan(config, num_inference_steps)
    else:
        plan = _dpm_solver_plan(config, num_inference_steps)
    if config.prediction_type == "epsilon" and np.any(plan.alpha == 0):
        raise ValueError(f"sampler '{sampler}' would divide by alpha_t = 0 at timestep {plan.timesteps[0]}: "
                         "an epsilon-prediction model cannot start from the zero-SNR timestep of "
                         "rescale_betas_zero_snr=true (use v_prediction, or 'leading' timestep_spacing)")
    if start_step == 0:
        return plan
    fields = {f.name: getattr(plan, f.name)[start_step:].copy() for f in dataclasses.fields(plan)
              if f.name != "clip_range"}
    fields["c_x0"][0] += fields["c_prev_x0"][0]  # no previous x0 yet: the first-order update
    fields["c_prev_x0"][0] = 0.0
    return StepPlan(**fields, clip_range=plan.clip_range)


def sampling_timesteps(config: SchedulerConfig, num_inference_steps: int, sampler: str,
                       start_step: int = 0) -> np.ndarray:
    """The descending int64 timesteps (S,) at which `sampler` calls the model from `start_step` on
    (S = num_inference_steps - start_step for all valid settings)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler = {sampler!r}: expected one of {SAMPLERS}")
    if sampler == "dpmpp_2m":
        return dpm_solver_timesteps(config, num_inference_steps)[start_step:]
    return ddim_timesteps(config, num_inference_steps)[start_step:]


def img2img_start_step(num_inference_steps: int, strength: float) -> int:
    """The first of `num_inference_steps` steps that an edit of `strength` in (0, 1] runs, as diffusers'
    img2img `get_timesteps`: the last int(num_inference_steps * strength) steps run."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength = {strength}: expected a number in (0, 1]")
    runs = min(int(num_inference_steps * strength), num_inference_steps)
    if runs < 1:
        raise ValueError(f"strength {strength} of {num_inference_steps} steps runs no step: expected "
                         f"strength * num_inference_steps >= 1")
    return num_inference_steps - runs


def add_noise(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, num_inference_steps: int, sampler: str,
              start_step: int) -> jax.Array:
    """x0 (B, ...) noised to the level of the sampler's step `start_step`: alpha_t * x0 + sigma_t * noise, as
    the diffusers scheduler's `add_noise` at that step's timestep t."""
    plan = step_plan(config, num_inference_steps, sampler, start_step=start_step)
    return jnp.float32(plan.alpha[0]) * x0 + jnp.float32(plan.sigma[0]) * noise


@dataclasses.dataclass(frozen=True)
class Known:
    """What inpainting keeps: latents (B, ...) of the known image, mask (B, ..., 1) at latent size (1 =
    repaint, 0 = keep), and the noise (B, ...) that brings the latents to each step's level (diffusers'
    `StableDiffusionInpaintPipeline` with a 4-channel UNet blends `add_noise(latents, noise, t_next)`)."""

    latents: jax.Array
    mask: jax.Array
    noise: jax.Array


jax.tree_util.register_dataclass(Known, data_fields=["latents", "mask", "noise"], meta_fields=[])


def sample(denoise_fn: DenoiseFn, latents: jax.Array, config: SchedulerConfig, *, num_inference_steps: int,
           sampler: str = "ddim", eta: float = 0.0, rng: jax.Array | None = None,
           noise: jax.Array | None = None, start_step: int = 0, known: Known | None = None) -> jax.Array:
    """Runs the reverse diffusion from `latents` (pure noise, (B, ...)) to a float32 sample of the same shape.

    denoise_fn(x float32 (B, ...), t int32 (B,)) -> model output (B, ...) in `config.prediction_type`.
    num_inference_steps, sampler, eta: static Python values; the whole loop is one `lax.scan`, so this
    function is jittable (and compiled as one loop when called eagerly).
    rng: key for the noise of DDPM and of DDIM with eta > 0; step i draws normal(fold_in(rng, i)).
    noise: instead of rng, the noise itself, (S, *latents.shape) with S = len(sampling_timesteps(...));
      step i adds noise[i] (scaled by that step's std; steps without noise ignore it).
    start_step: static; run the steps from this one on, `latents` being noised to its level (`add_noise`).
    known: inpainting by latent blending (see `Known`): after each step, the cells outside the mask are replaced
      by the known latents noised to the next step's level (clean after the last step).
    """
    plan = step_plan(config, num_inference_steps, sampler, eta, start_step)
    steps = len(plan.timesteps)
    stochastic = bool(np.any(plan.noise_std > 0))
    if stochastic and noise is None and rng is None:
        raise ValueError(f"sampler={sampler!r} with eta={eta} adds noise: pass `rng` (a jax.random key) or `noise`")
    if noise is not None and noise.shape != (steps, *latents.shape):
        raise ValueError(f"noise shape {noise.shape}: expected (steps, *latents.shape) = "
                         f"{(steps, *latents.shape)}")
    per_step: dict[str, Any] = {
        name: jnp.asarray(getattr(plan, name), jnp.float32)
        for name in ("alpha", "sigma", "c_sample", "c_x0", "c_eps", "c_prev_x0", "noise_std")}
    per_step["t"] = jnp.asarray(plan.timesteps, jnp.int32)
    per_step["index"] = jnp.arange(steps)
    if stochastic and noise is not None:
        per_step["noise"] = jnp.asarray(noise, jnp.float32)
    if known is not None:  # the level of the step after each one; the last step leaves x0 clean
        per_step["next_alpha"] = jnp.asarray(np.append(plan.alpha[1:], 1.0), jnp.float32)
        per_step["next_sigma"] = jnp.asarray(np.append(plan.sigma[1:], 0.0), jnp.float32)
    # Terms whose coefficient is zero at every step are left out of the loop.
    uses = {name: bool(np.any(getattr(plan, name) != 0)) for name in ("c_sample", "c_eps", "c_prev_x0")}
    batch = latents.shape[0]

    def step(carry, s):
        x, prev_x0 = carry
        output = denoise_fn(x, jnp.full((batch,), s["t"], jnp.int32)).astype(jnp.float32)
        x0, eps = predicted_x0_and_eps(config.prediction_type, output, x, s["alpha"], s["sigma"])
        if plan.clip_range is not None:
            x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
        new_x = s["c_x0"] * x0
        if uses["c_sample"]:
            new_x = new_x + s["c_sample"] * x
        if uses["c_eps"]:
            new_x = new_x + s["c_eps"] * eps
        if uses["c_prev_x0"]:
            new_x = new_x + s["c_prev_x0"] * prev_x0
        if stochastic:
            z = s["noise"] if noise is not None else jax.random.normal(
                jax.random.fold_in(rng, s["index"]), x.shape, jnp.float32)
            new_x = new_x + s["noise_std"] * z
        if known is not None:
            noised = s["next_alpha"] * known.latents + s["next_sigma"] * known.noise
            new_x = known.mask * new_x + (1.0 - known.mask) * noised
        return (new_x, x0 if uses["c_prev_x0"] else prev_x0), None

    x = jnp.asarray(latents, jnp.float32)
    prev_x0 = jnp.zeros_like(x) if uses["c_prev_x0"] else jnp.zeros((), jnp.float32)
    (x, _), _ = jax.lax.scan(step, (x, prev_x0), per_step)
    return x


def ddim_inversion(denoise_fn: DenoiseFn, latents: jax.Array, config: SchedulerConfig, *,
                   num_inference_steps: int) -> jax.Array:
    """DDIM inversion: clean latents (B, ...) -> the noise latents from which DDIM (eta 0) with the same
    `denoise_fn` and `num_inference_steps` returns to them (up to the error of each step's linearisation).

    Runs the DDIM timesteps in ascending order, each step as diffusers' `DDIMInverseScheduler.step`: at
    timestep t the model sees x (at the level of t - T // n, or of `set_alpha_to_one`'s final alpha before the
    first step), x0 and eps are estimated from its output, and x <- sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
    denoise_fn and num_inference_steps as in `sample`; returns float32 of the shape of `latents`.
    """
    ac = compute_alphas_cumprod(config)
    ts = ddim_timesteps(config, num_inference_steps)[::-1]
    current = np.minimum(ts - config.num_train_timesteps // num_inference_steps, config.num_train_timesteps - 1)
    initial = 1.0 if config.set_alpha_to_one else ac[0]
    a_cur = np.where(current >= 0, ac[np.maximum(current, 0)], initial)
    per_step = {"t": jnp.asarray(ts, jnp.int32), "alpha": jnp.asarray(np.sqrt(a_cur), jnp.float32),
                "sigma": jnp.asarray(np.sqrt(1 - a_cur), jnp.float32),
                "next_alpha": jnp.asarray(np.sqrt(ac[ts]), jnp.float32),
                "next_sigma": jnp.asarray(np.sqrt(1 - ac[ts]), jnp.float32)}
    batch = latents.shape[0]

    def step(x, s):
        output = denoise_fn(x, jnp.full((batch,), s["t"], jnp.int32)).astype(jnp.float32)
        x0, eps = predicted_x0_and_eps(config.prediction_type, output, x, s["alpha"], s["sigma"])
        if config.clip_sample:
            x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
        return s["next_alpha"] * x0 + s["next_sigma"] * eps, None

    x, _ = jax.lax.scan(step, jnp.asarray(latents, jnp.float32), per_step)
    return x


def projected_guidance(cond: jax.Array, uncond: jax.Array, guidance_scale: float | jax.Array,
                       eta: float | jax.Array, norm_threshold: float | jax.Array = 0.0) -> jax.Array:
    """Adaptive projected guidance (APG; Sadat et al., ICLR 2025), without momentum, on (B, ...) predictions.

    The guidance update d = cond - uncond is shrunk per image to an L2 norm of at most `norm_threshold`
    (<= 0: no limit) and split into its part parallel to `cond` and the rest (orthogonal); the result is
    uncond + guidance_scale * (d_orthogonal + eta * d_parallel). The parallel part mostly raises contrast and
    brightness, which saturates images at strong guidance; eta < 1 damps it. eta = 1 without a limit is plain
    classifier-free guidance. Equal to diffusers' `guiders.adaptive_projected_guidance.normalized_guidance`
    with momentum None (it computes the projection in float64, this in float32). Returns float32.
    """
    axes = tuple(range(1, cond.ndim))
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    diff = cond - uncond
    diff_norm = jnp.sqrt(jnp.sum(diff * diff, axis=axes, keepdims=True))
    shrink = jnp.where(norm_threshold > 0, jnp.minimum(1.0, norm_threshold / jnp.maximum(diff_norm, 1e-12)), 1.0)
    diff = diff * shrink
    unit = cond / jnp.maximum(jnp.sqrt(jnp.sum(cond * cond, axis=axes, keepdims=True)), 1e-12)
    parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    return uncond + guidance_scale * (diff - parallel + eta * parallel)


@dataclasses.dataclass(frozen=True)
class ProjectedGuidance:
    """APG settings for `guided_denoise_fn`: `projected_guidance` applied to the x0 estimates of the
    conditional and unconditional outputs (the denoised predictions, as in the paper), the guided x0 then
    turned back into the model's output type. eta, norm_threshold: floats or traced scalars."""

    eta: float | jax.Array
    norm_threshold: float | jax.Array
    scheduler: SchedulerConfig


def guided_denoise_fn(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any,
                      guidance_scale: float | jax.Array, guidance_rescale: float | jax.Array | None = None,
                      projection: ProjectedGuidance | None = None) -> DenoiseFn:
    """Classifier-free guidance: output = u + guidance_scale * (c - u), u and c the model outputs with
    `uncond` and `cond` context, computed as one doubled batch [uncond; cond] (diffusers' order).

    model_fn(x (B, ...), t int (B,), context) -> output (B, ...); cond, uncond: contexts with batch B
    (arrays (B, L, D) or pytrees of them), uncond None -> plain model_fn with cond (no guidance).
    guidance_scale: a float or a traced scalar. The guided output is float32.
    guidance_rescale: None for none; else phi (float or traced scalar): the guided output g of each image is
      blended with g rescaled to the standard deviation of c, phi * g * std(c) / std(g) + (1 - phi) * g, as
      diffusers' `guidance_rescale` (Lin et al. 2023, sec. 3.4), against the over-exposure that strong
      guidance gives zero-terminal-SNR models.
    projection: None for the plain rule above; else adaptive projected guidance on the x0 estimates
      (`ProjectedGuidance`), before any rescaling.
    """
    if uncond is None:
        return lambda x, t: model_fn(x, t, cond)
    cond_shapes = jax.tree.map(jnp.shape, cond)
    if jax.tree.map(jnp.shape, uncond) != cond_shapes:
        raise ValueError(f"uncond context shapes {jax.tree.map(jnp.shape, uncond)} differ from cond "
                         f"context shapes {cond_shapes}")
    context = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), context).astype(jnp.float32)
        u, c = jnp.split(out, 2)
        if projection is None:
            guided = u + guidance_scale * (c - u)
        else:
            guided = _projected_output(projection, guidance_scale, c, u, x, t)
        if guidance_rescale is None:
            return guided
        image_axes = tuple(range(1, guided.ndim))
        ratio = jnp.std(c, axis=image_axes, keepdims=True) / jnp.std(guided, axis=image_axes, keepdims=True)
        return guidance_rescale * guided * ratio + (1.0 - guidance_rescale) * guided

    return denoise


def _projected_output(projection: ProjectedGuidance, guidance_scale, cond_out: jax.Array, uncond_out: jax.Array,
                      x: jax.Array, t: jax.Array) -> jax.Array:
    """APG on the x0 estimates of two model outputs at x_t (B, ...), t (B,), returned as a model output."""
    scheduler = projection.scheduler
    alphas, sigmas = alpha_sigma_tables(compute_alphas_cumprod(scheduler))
    shape = (t.shape[0],) + (1,) * (x.ndim - 1)
    alpha, sigma = alphas[t].reshape(shape), sigmas[t].reshape(shape)
    x0_cond, _ = predicted_x0_and_eps(scheduler.prediction_type, cond_out, x, alpha, sigma)
    x0_uncond, _ = predicted_x0_and_eps(scheduler.prediction_type, uncond_out, x, alpha, sigma)
    x0 = projected_guidance(x0_cond, x0_uncond, guidance_scale, projection.eta, projection.norm_threshold)
    return model_output_from_x0(scheduler.prediction_type, x0, x, alpha, sigma)
