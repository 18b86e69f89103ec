"""Noise schedules: the scheduler config of a diffusers folder and the betas / alphas_cumprod it defines.

`SchedulerConfig` holds every setting that changes the numbers of the DDIM, DPM-Solver++ and DDPM samplers
and of the training targets. It reads the `scheduler_config.json` of any common diffusers scheduler class
(PNDM of SD 1.x, DDIM / Euler of SD 2.x, DPM-Solver, ...): a key missing from the file takes the default of
the class named in `_class_name`, as diffusers does when it loads the folder and then builds another
scheduler with `from_config(scheduler.config)`.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from cxr_ldm.json_config import HOOK_STACKLEVEL, JsonConfig

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# "fixed_small_log" draws the same noise scale as "fixed_small" in diffusers' DDPMScheduler.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

# Defaults that differ from DDIMScheduler's, per diffusers scheduler class. A key a class does not take
# keeps DDIMScheduler's default (what `DDIMScheduler.from_config(that_class.config)` gives).
_LINSPACE = {"timestep_spacing": "linspace"}
_KARRAS_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {},
    "DDIMInverseScheduler": {},
    "DDPMScheduler": {},
    "PNDMScheduler": {"set_alpha_to_one": False},
    "DPMSolverMultistepScheduler": _LINSPACE,
    "DPMSolverSinglestepScheduler": {},
    "DEISMultistepScheduler": _LINSPACE,
    "UniPCMultistepScheduler": _LINSPACE,
    "EulerDiscreteScheduler": _LINSPACE,
    "EulerAncestralDiscreteScheduler": _LINSPACE,
    "LMSDiscreteScheduler": _LINSPACE,
    "HeunDiscreteScheduler": {**_LINSPACE, **_KARRAS_BETAS, "clip_sample": False},
    "KDPM2DiscreteScheduler": {**_LINSPACE, **_KARRAS_BETAS},
    "KDPM2AncestralDiscreteScheduler": {**_LINSPACE, **_KARRAS_BETAS},
    "LCMScheduler": {**_KARRAS_BETAS, "beta_schedule": "scaled_linear", "clip_sample": False},
}

# Keys that select the solver of one diffusers scheduler class. The samplers of this package are chosen
# with `sample(sampler=...)` and always run as documented there, so these keys are read and dropped.
# The values listed are those the samplers reproduce; another value draws a warning.
SOLVER_KEYS: dict[str, Any] = {
    "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
    "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
    "lambda_min_clipped": -math.inf,
}
# Keys without effect on the samplers of this package (metadata, PNDM/Euler/UniPC/LCM-only settings,
# thresholding parameters that only matter when thresholding is on).
IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_use_default_values", "_name_or_path",
    "skip_prk_steps", "interpolation_type", "timestep_type", "sigma_min", "sigma_max", "sigma_data",
    "sigma_schedule", "rho", "flow_shift", "time_shift_type", "shift_terminal", "disable_corrector",
    "predict_x0", "solver_p", "original_inference_steps", "timestep_scaling", "dynamic_thresholding_ratio",
    "sample_max_value",
})


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(JsonConfig):
    """Diffusion noise schedule and sampler settings, with diffusers' names and meanings.

    Attributes:
      num_train_timesteps: T; timesteps are integers in [0, T).
      beta_start, beta_end: first and last beta of the "linear" / "scaled_linear" schedules.
      beta_schedule: "linear", "scaled_linear" (linear in sqrt(beta)) or "squaredcos_cap_v2" (cosine).
      trained_betas: explicit betas (T values); when set, the three fields above are not used.
      prediction_type: what the model predicts: "epsilon" (the noise), "v_prediction" or "sample" (x0).
      timestep_spacing: how sampling picks timesteps: "leading", "trailing" or "linspace".
      steps_offset: added to "leading" timesteps (1 for Stable Diffusion).
      set_alpha_to_one: DDIM's last step goes to alpha_cumprod = 1 (else alphas_cumprod[0]).
      clip_sample: DDIM and DDPM clip the predicted x0 to [-clip_sample_range, clip_sample_range].
      clip_sample_range: the clipping bound.
      rescale_betas_zero_snr: rescale betas so that the last timestep has zero SNR (Lin et al. 2023).
      variance_type: DDPM noise scale: "fixed_small" (posterior variance), "fixed_small_log" (same
        numbers) or "fixed_large" (beta_t).

    `to_dict` writes all fields with diffusers' key names; `DDIMScheduler.from_config` (and DDPM /
    DPM-Solver multistep) accept it. There is no `_class_name`: the writer of the folder adds it.
    `from_file` reads a scheduler_config.json file.
    """

    _ignored_keys = IGNORED_KEYS

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    variance_type: str = "fixed_small"

    def __post_init__(self):
        _validate(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "scheduler config") -> "SchedulerConfig":
        """Reads a diffusers scheduler config dict (the contents of scheduler_config.json).

        Missing keys take the defaults of the class named by `_class_name` (DDIMScheduler's if absent
        or unknown). Unknown keys draw a warning. Values this package cannot reproduce (e.g.
        thresholding=True, variance_type="learned", beta_schedule="sigmoid") raise ValueError naming
        the key and `source`.
        """
        return cls._read_dict(d, source)

    @classmethod
    def _read_key(cls, key: str, value: Any, source: str) -> bool:
        """thresholding (false only) and the solver keys (read and dropped, see SOLVER_KEYS)."""
        if key == "thresholding":
            if value:
                raise ValueError(f"{source}: 'thresholding': true (dynamic thresholding) is not supported;"
                                 " expected false")
        elif key in SOLVER_KEYS:
            if value != SOLVER_KEYS[key]:
                warnings.warn(f"{source}: {key}={value!r} is ignored; the samplers run with "
                              f"{key}={SOLVER_KEYS[key]!r} (see cxr_ldm.diffusion.samplers)",
                              stacklevel=HOOK_STACKLEVEL)
        else:
            return False
        return True

    @classmethod
    def _prepare(cls, values: dict[str, Any], d: Mapping[str, Any], source: str) -> dict[str, Any]:
        """The defaults of the class named by `_class_name`, DPM-Solver's null variance_type, trained_betas."""
        class_name = d.get("_class_name", "DDIMScheduler")
        values = {**(CLASS_DEFAULTS.get(class_name, {}) if isinstance(class_name, str) else {}), **values}
        if values.get("variance_type", "") is None:  # DPM-Solver's "not learned"
            values["variance_type"] = "fixed_small"
        if values.get("trained_betas") is not None:
            betas = values["trained_betas"]
            if not isinstance(betas, (list, tuple, np.ndarray)):
                raise ValueError(f"{source}: 'trained_betas' must be a list of numbers or null, got {betas!r}")
            values["trained_betas"] = tuple(float(b) for b in betas)
        return values


def _validate(c: SchedulerConfig) -> None:
    """Raises ValueError naming the first field whose value is not supported."""
    def check(ok: bool, key: str, expected: str):
        if not ok:
            raise ValueError(f"'{key}' = {getattr(c, key)!r}: expected {expected}")

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)

    check(is_int(c.num_train_timesteps) and c.num_train_timesteps >= 1, "num_train_timesteps",
          "a positive integer")
    check(is_number(c.beta_start) and 0 < c.beta_start < 1, "beta_start", "a number in (0, 1)")
    check(is_number(c.beta_end) and 0 < c.beta_end < 1, "beta_end", "a number in (0, 1)")
    check(c.beta_schedule in BETA_SCHEDULES, "beta_schedule", f"one of {BETA_SCHEDULES}")
    if c.trained_betas is not None:
        check(isinstance(c.trained_betas, tuple) and len(c.trained_betas) == c.num_train_timesteps
              and all(is_number(b) and 0 < b <= 1 for b in c.trained_betas), "trained_betas",
              f"null or {c.num_train_timesteps} numbers in (0, 1]")
    check(c.prediction_type in PREDICTION_TYPES, "prediction_type", f"one of {PREDICTION_TYPES}")
    check(c.timestep_spacing in TIMESTEP_SPACINGS, "timestep_spacing", f"one of {TIMESTEP_SPACINGS}")
    check(is_int(c.steps_offset) and c.steps_offset >= 0, "steps_offset", "a non-negative integer")
    for key in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
        check(isinstance(getattr(c, key), (bool, np.bool_)), key, "true or false")
    check(is_number(c.clip_sample_range) and c.clip_sample_range > 0, "clip_sample_range", "a positive number")
    check(c.variance_type in VARIANCE_TYPES, "variance_type", f"one of {VARIANCE_TYPES} (or null)")


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021)."""
    def alpha_bar(t):
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(num_steps, dtype=np.float64) / num_steps
    return np.minimum(1 - alpha_bar(t + 1 / num_steps) / alpha_bar(t), max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alphas_cumprod) so that it keeps its first value and ends at exactly 0
    (Lin et al. 2023, Algorithm 1). betas: (T,) -> (T,), float64."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def compute_betas(config: SchedulerConfig) -> np.ndarray:
    """The T training betas, float64 (T,), as diffusers' schedulers build them."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=np.float64) ** 2
    else:
        betas = _cosine_betas(T)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def compute_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 (T,). x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    return np.cumprod(1.0 - compute_betas(config))


def alpha_sigma_tables(alphas_cumprod) -> tuple[jnp.ndarray, jnp.ndarray]:
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar), float32 (T,) each. A numpy `alphas_cumprod` is turned
    into them in float64 first: near t = 0, 1 - alpha_bar loses its leading digits in float32."""
    if isinstance(alphas_cumprod, np.ndarray):
        ac = alphas_cumprod.astype(np.float64)
        return jnp.asarray(np.sqrt(ac), jnp.float32), jnp.asarray(np.sqrt(1.0 - ac), jnp.float32)
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def snr(t: jnp.ndarray, alphas_cumprod) -> jnp.ndarray:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps t (any shape), float32.
    `alphas_cumprod`: (T,), numpy (computed in float64, see `alpha_sigma_tables`) or jax."""
    if isinstance(alphas_cumprod, np.ndarray):
        ac = alphas_cumprod.astype(np.float64)
        return jnp.asarray(ac / (1.0 - ac), jnp.float32)[t]
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    return (ac / (1.0 - ac))[t]
