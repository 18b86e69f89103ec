"""Sampling timesteps, computed in numpy from the config and a static number of steps.

DDIM and DDPM space them as diffusers' DDIMScheduler / DDPMScheduler do; DPM-Solver++ as
DPMSolverMultistepScheduler does (its "leading" and "linspace" split the range into n + 1 parts).
"""
from __future__ import annotations

import numpy as np

from cxr_ldm.diffusion.schedules import SchedulerConfig


def _check_steps(config: SchedulerConfig, n: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= config.num_train_timesteps:
        raise ValueError(f"num_inference_steps = {n!r}: expected an integer in "
                         f"[1, num_train_timesteps = {config.num_train_timesteps}]")


def _check_range(config: SchedulerConfig, timesteps: np.ndarray, n: int) -> np.ndarray:
    T = config.num_train_timesteps
    if timesteps.size == 0 or timesteps.min() < 0 or timesteps.max() >= T:
        raise ValueError(f"timestep_spacing={config.timestep_spacing!r}, steps_offset={config.steps_offset} and "
                         f"num_inference_steps={n} give timesteps outside [0, {T}): {timesteps.tolist()}")
    return timesteps


def ddim_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """Descending int64 timesteps (n,) of DDIMScheduler.set_timesteps / DDPMScheduler.set_timesteps."""
    _check_steps(config, n)
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + config.steps_offset
    else:
        timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return _check_range(config, timesteps, n)


def dpm_solver_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """Descending int64 timesteps of DPMSolverMultistepScheduler.set_timesteps (default options)."""
    _check_steps(config, n)
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = T // (n + 1)
        if ratio == 0:
            raise ValueError(f"num_inference_steps = {n}: 'leading' spacing of DPM-Solver needs at most "
                             f"{T - 1} steps for num_train_timesteps = {T}")
        timesteps = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:
        timesteps = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    return _check_range(config, timesteps, n)
