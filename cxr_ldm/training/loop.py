"""The step loop shared by both stages: data -> jitted step -> logs, checkpoints, preemption, NaN guard."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from cxr_ldm.training import sharding as sharding_lib
from cxr_ldm.training.checkpoints import Checkpointer, StopSignal
from cxr_ldm.training.logger import MetricsLogger
from cxr_ldm.training.state import TrainState


class NonFiniteLossError(RuntimeError):
    """Too many NaN/Inf losses in a row; the last good checkpoint is kept."""


def run_steps(*, stage: str, state: TrainState, step_fn: Callable, iterator: Any, mesh: Mesh,
              checkpointer: Checkpointer, logger: MetricsLogger, stop: StopSignal, num_steps: int, log_every: int,
              max_nonfinite_streak: int, batch_keys: Sequence[str],
              prepare_batch: Callable[[dict], dict] | None = None,
              hooks: Sequence[tuple[int, Callable[[int, TrainState], dict | None]]] = ()) -> tuple[TrainState, bool]:
    """Runs steps state.step .. num_steps - 1.

    iterator: yields this process's numpy batches (dicts); `batch_keys` of each go to the step, after
      `prepare_batch` (if given) mapped the batch (e.g. record indices -> cached latents).
    hooks: (every, fn): fn(step, state) after step % every == 0 steps and at the end; a returned dict
      is logged as metrics of that step (e.g. validation PSNR, a sample grid's path).
    stop: polled after every step (the last one included), after that step's checkpoint if the interval
      saves one.
    Returns (state, finished): finished is False when `stop` was requested; a checkpoint of the step
    reached was then written (once) and the caller should exit cleanly.
    Raises NonFiniteLossError after `max_nonfinite_streak` skipped updates in a row.
    """
    step = int(jax.device_get(state.step))
    previous = None  # (step, metrics) of the step before: checked one step late, so the host never waits

    def check_finite(at_step: int, metrics: dict) -> None:
        streak = int(jax.device_get(metrics["nonfinite_streak"]))
        if streak >= max_nonfinite_streak:
            checkpointer.wait_until_finished()
            first = at_step - streak + 1
            good = [s for s in sorted(checkpointer.all_steps()) if s < first]
            where = (f"The last checkpoint written before step {first} is step {good[-1]}" if good else
                     f"No checkpoint written before step {first} is left")
            raise NonFiniteLossError(
                f"{stage}: the loss or gradient was NaN/Inf in the {streak} steps {first} to {at_step}; those "
                f"updates were skipped and the run stops. {where} in {checkpointer.directory} (later ones "
                "were written during the NaN/Inf steps). Lower the learning rate or check the data.")

    while step < num_steps:
        batch = next(iterator)
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        global_batch = sharding_lib.global_batch_from_process({k: batch[k] for k in batch_keys}, mesh)
        state, metrics = step_fn(state, global_batch)
        step += 1
        if previous is not None:
            check_finite(*previous)
        previous = (step, metrics)
        if step % log_every == 0 or step == num_steps:
            logger.log(step, jax.device_get(metrics))
        else:
            logger.advance(step)
        for every, hook in hooks:
            if step % every == 0 or step == num_steps:
                start = time.perf_counter()
                extra = hook(step, state)
                if extra:
                    logger.log_extra(step, extra)
                logger.exclude_time(time.perf_counter() - start)
        if step == num_steps:
            check_finite(*previous)
        stopping = stop.requested()
        checkpointer.save(step, state, iterator, force=step == num_steps or stopping)
        if stopping:
            checkpointer.wait_until_finished()
            return state, False
    checkpointer.wait_until_finished()
    return state, True
