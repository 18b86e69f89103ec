"""Noise schedules and scheduler configs against diffusers' schedulers (PyTorch, float32)."""
import dataclasses
import json
import warnings

import diffusers
import numpy as np
import pytest

from cxr_ldm.diffusion import schedules, timesteps
from cxr_ldm.diffusion.schedules import SchedulerConfig, compute_alphas_cumprod, compute_betas

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]

# The scheduler_config.json files of Stable Diffusion 1.5 and 2.1 (768, v-prediction).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


@pytest.mark.parametrize("reference", [diffusers.DDIMScheduler, diffusers.DDPMScheduler])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_betas_and_alphas_cumprod_match_diffusers(reference, rescale, schedule):
    kwargs = dict(schedule, rescale_betas_zero_snr=rescale)
    ref = reference(**kwargs)
    config = SchedulerConfig(**kwargs)
    np.testing.assert_allclose(compute_betas(config), ref.betas.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(compute_alphas_cumprod(config), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    if rescale:
        assert compute_alphas_cumprod(config)[-1] == 0.0


def test_trained_betas_match_diffusers():
    betas = np.linspace(1e-4, 3e-2, 50) ** 1.5
    ref = diffusers.DDIMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    config = SchedulerConfig.from_dict({"num_train_timesteps": 50, "trained_betas": betas.tolist()})
    np.testing.assert_allclose(compute_alphas_cumprod(config), ref.alphas_cumprod.numpy(), rtol=1e-6)


def test_snr_is_alpha_squared_over_sigma_squared():
    config = SchedulerConfig(**SCHEDULES[1])
    ac = compute_alphas_cumprod(config)
    t = np.array([0, 1, 500, 999])
    np.testing.assert_allclose(np.asarray(schedules.snr(t, ac)), ac[t] / (1 - ac[t]), rtol=1e-5)


def _expected_from_class(class_name: str) -> dict:
    """What DDIMScheduler.from_config(<class>().config) holds, plus DDPM's variance_type."""
    ddim = diffusers.DDIMScheduler().config
    own = getattr(diffusers, class_name)().config
    names = [f.name for f in dataclasses.fields(SchedulerConfig)]
    expected = {k: own[k] if k in own else ddim.get(k) for k in names}
    expected["variance_type"] = own.get("variance_type") or "fixed_small"
    return expected


@pytest.mark.parametrize("class_name", sorted(schedules.CLASS_DEFAULTS))
def test_missing_keys_take_the_defaults_of_the_named_class(class_name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = SchedulerConfig.from_dict({"_class_name": class_name})
    assert config.to_dict() == _expected_from_class(class_name)


def test_reads_stable_diffusion_configs():
    sd15 = SchedulerConfig.from_dict(SD15_SCHEDULER)
    assert (sd15.beta_schedule, sd15.steps_offset, sd15.set_alpha_to_one, sd15.clip_sample,
            sd15.timestep_spacing, sd15.prediction_type) == ("scaled_linear", 1, False, False, "leading", "epsilon")
    sd21 = SchedulerConfig.from_dict(SD21_SCHEDULER)
    assert sd21.prediction_type == "v_prediction" and sd21.steps_offset == 1


def test_to_dict_round_trips_through_diffusers(tmp_path):
    config = SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction", timestep_spacing="trailing",
                             rescale_betas_zero_snr=True, clip_sample=False, steps_offset=1)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDIMScheduler", **config.to_dict()}))
    ref = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    for key, value in config.to_dict().items():
        if key != "variance_type":  # DDPM-only
            assert ref.config[key] == value, key
    assert SchedulerConfig.from_file(path) == config


def test_dpm_solver_config_reads_without_warnings():
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = SchedulerConfig.from_dict({"_class_name": "DPMSolverMultistepScheduler", **ref.config})
    assert (config.timestep_spacing, config.prediction_type, config.variance_type) == (
        "linspace", "v_prediction", "fixed_small")


@pytest.mark.parametrize("update, key", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"thresholding": True}, "thresholding"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"clip_sample": "yes"}, "clip_sample"),
])
def test_unsupported_values_name_key_and_source(update, key):
    with pytest.raises(ValueError, match=rf"my/scheduler_config\.json.*'{key}'"):
        SchedulerConfig.from_dict({**SD15_SCHEDULER, **update}, source="my/scheduler_config.json")


def test_unknown_keys_and_other_solver_settings_warn():
    with pytest.warns(UserWarning, match="unknown keys.*'shiny'"):
        SchedulerConfig.from_dict({"shiny": 1})
    with pytest.warns(UserWarning, match="solver_order=3 is ignored"):
        SchedulerConfig.from_dict({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3})


def test_from_file_rejects_bad_json(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json: not valid JSON"):
        SchedulerConfig.from_file(path)


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_timesteps_match_diffusers(spacing, offset, n):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    for reference, ours in [(diffusers.DDIMScheduler, timesteps.ddim_timesteps),
                            (diffusers.DDPMScheduler, timesteps.ddim_timesteps),
                            (diffusers.DPMSolverMultistepScheduler, timesteps.dpm_solver_timesteps)]:
        ref = reference(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(ours(config, n), ref.timesteps.numpy(), err_msg=reference.__name__)


def test_timesteps_reject_bad_step_counts():
    config = SchedulerConfig(timestep_spacing="trailing")
    with pytest.raises(ValueError, match="num_inference_steps = 0"):
        timesteps.ddim_timesteps(config, 0)
    with pytest.raises(ValueError, match="outside"):  # diffusers would index timestep -1 here
        timesteps.ddim_timesteps(config, 61)
