"""The skeleton every training stage runs: skip a finished stage, restore the newest checkpoint, log, run the
step loop (preemption and the NaN guard included), then let the stage write its outputs and mark it done.

A stage module supplies only what is its own: a `setup` function that builds its models, state, step
function and batches (`StageSetup`), and a `finish` function for its outputs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from cxr_ldm.io.run_folder import checkpoints_dir, read_done, write_done
from cxr_ldm.training.checkpoints import Checkpointer, StopSignal
from cxr_ldm.training.logger import MetricsLogger
from cxr_ldm.training.loop import run_steps
from cxr_ldm.training.state import TrainState

Hook = tuple[int, Callable[[int, TrainState], "dict | None"]]


@dataclasses.dataclass
class StageSetup:
    """What a stage trains and on what.

    state: the freshly initialised TrainState (replaced by the newest checkpoint, if any).
    step_fn: (state, global batch) -> (state, metrics), jitted.
    iterator: this process's checkpointable Grain iterator of numpy batches.
    num_steps / batch_size: the stage's length and global batch size (for logs and throughput).
    batch_keys: the batch entries the step takes (after `prepare_batch`, if given).
    checkpoint_config: JSON settings that must not change on resume (`Checkpointer(config=...)`).
    hooks: (every, fn(step, state) -> metrics or None) run every `every` steps and at the end.
    finish: fn(state) -> summary, run on every process after the last step: writes the stage's outputs
      (process 0 writes files) and returns what done.json records besides the step.
    """

    state: TrainState
    step_fn: Callable
    iterator: Any
    num_steps: int
    batch_size: int
    batch_keys: Sequence[str]
    checkpoint_config: dict
    finish: Callable[[TrainState], dict]
    prepare_batch: Callable[[dict], dict] | None = None
    hooks: Sequence[Hook] = ()


def run_stage(stage: str, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
              setup: Callable[[], StageSetup], stop: StopSignal) -> bool:
    """Runs (or resumes) `stage` in `workdir`; returns False if `stop` was requested during its steps (the
    step reached was checkpointed; the stage's outputs are written when it resumes).

    A stage whose done.json exists is skipped without calling `setup`. done.json records, besides the
    stage's summary, the wall seconds of this invocation's parts (`StageTimes`).
    """
    if read_done(workdir, stage) is not None:
        return True
    clock = time.perf_counter()
    s = setup()
    checkpointer = Checkpointer(checkpoints_dir(workdir, stage), save_interval_steps=config.checkpoint_every,
                                max_to_keep=config.keep_checkpoints, config=s.checkpoint_config)
    state = s.state
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state, s.iterator)
    first_step = int(state.step)
    setup_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    logger = MetricsLogger(workdir, stage, resume_step=int(state.step), total_steps=s.num_steps,
                           batch_size=s.batch_size)
    try:
        state, finished = run_steps(
            stage=stage, state=state, step_fn=s.step_fn, iterator=s.iterator, mesh=mesh, checkpointer=checkpointer,
            logger=logger, stop=stop, num_steps=s.num_steps, log_every=config.log_every,
            max_nonfinite_streak=config.max_nonfinite_steps, batch_keys=s.batch_keys,
            prepare_batch=s.prepare_batch, hooks=s.hooks)
    finally:
        checkpointer.close()
        logger.close()
    if not finished:
        return False
    loop_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    summary = s.finish(state)
    times = StageTimes(setup=setup_seconds, steps=loop_seconds - logger.excluded_seconds,
                       hooks=logger.excluded_seconds, finish=time.perf_counter() - clock,
                       steps_run=s.num_steps - first_step)
    if jax.process_index() == 0:
        write_done(workdir, stage, {"step": s.num_steps, **summary, "seconds": times.rounded()})
    return True


@dataclasses.dataclass
class StageTimes:
    """Wall seconds of one invocation of a stage.

    setup: the stage's models, state and data iterator (the LDM's latent cache included) and the checkpoint
      restore.
    steps: the step loop without its hooks (the first step's compilation included); `steps_run` steps.
    hooks: validation and sample grids inside the loop.
    finish: the stage's outputs (the LDM's exported pipeline).
    """

    setup: float
    steps: float
    hooks: float
    finish: float
    steps_run: int

    def rounded(self) -> dict:
        return {k: v if isinstance(v, int) else round(v, 3) for k, v in dataclasses.asdict(self).items()}


def dataset_name(config: ml_collections.ConfigDict) -> str:
    """"name/config" of the TFDS data set of a run config (e.g. "phantom_cxr/64")."""
    return f"{config.data.name}/{config.data.config}" if config.data.config else config.data.name
