"""The step loop: what its NaN/Inf guard says when it stops a run."""
from __future__ import annotations

import pytest
from helpers import training as common

from cxr_ldm.training import sharding
from cxr_ldm.training.checkpoints import Checkpointer, StopSignal
from cxr_ldm.training.logger import MetricsLogger
from cxr_ldm.training.loop import NonFiniteLossError, run_steps


def test_the_nan_stop_names_the_last_checkpoint_written_before_the_first_nan_step(tmp_path):
    state, step = common.noisy_regression(total_steps=20)
    iterator = common.numbered_batches(nan_from=5)  # batch 5 feeds step 6: steps 6, 7, 8 are NaN
    directory = tmp_path / "checkpoints"
    with Checkpointer(str(directory), save_interval_steps=2, max_to_keep=5) as checkpointer, StopSignal() as stop:
        logger = MetricsLogger(str(tmp_path), "toy", total_steps=20)
        with pytest.raises(NonFiniteLossError, match=(
                f"toy: the loss or gradient was NaN/Inf in the 3 steps 6 to 8; those updates were skipped and the "
                f"run stops. The last checkpoint written before step 6 is step 4 in {directory} ")):
            run_steps(stage="toy", state=state, step_fn=step, iterator=iterator, mesh=sharding.make_mesh(),
                      checkpointer=checkpointer, logger=logger, stop=stop, num_steps=20, log_every=5,
                      max_nonfinite_streak=3, batch_keys=("x", "y"))
        logger.close()
        assert checkpointer.all_steps() == [2, 4, 6, 8]  # 6 and 8 hold skipped steps
