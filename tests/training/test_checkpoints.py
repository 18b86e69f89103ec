"""Orbax checkpoints: exact round trip, resume = uninterrupted run (state, rng, EMA, optimizer and Grain
iterator position), clear errors on mismatched runs, frozen params saved once, SIGTERM flag."""
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import training as common

from cxr_ldm.training.checkpoints import Checkpointer, StopSignal


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _run(st, step, data, num_steps, checkpointer=None):
    losses = []
    for _ in range(num_steps):
        st, metrics = step(st, next(data))
        losses.append(float(metrics["loss"]))
        if checkpointer is not None:
            checkpointer.save(int(st.step), st, data)
    return st, losses


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tmp_path):
    st0, step = common.noisy_regression()
    fresh = _copy(st0)
    reference_state, reference = _run(_copy(st0), step, common.numbered_batches(), 6)

    with Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2, config={"width": 3}) as ckpt:
        _run(st0, step, common.numbered_batches(), 3, ckpt)  # "preempted" after step 3; last saved step is 2
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2]
    with Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2, config={"width": 3}) as ckpt:
        data = common.numbered_batches()
        resumed = ckpt.restore(fresh, data)
        assert int(resumed.step) == 2
        resumed_state, losses = _run(resumed, step, data, 4, ckpt)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 6]
    assert losses == reference[2:]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, resumed_state),
                           jax.tree_util.tree_map(np.asarray, reference_state))


def test_restore_is_an_exact_round_trip_in_the_target_shardings(tmp_path):
    st, step = common.noisy_regression()
    st, _ = _run(st, step, common.numbered_batches(), 3)
    with Checkpointer(str(tmp_path), async_save=True) as ckpt:
        assert ckpt.save(3, st, force=True)
        ckpt.wait_until_finished()
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), st)
        restored = ckpt.restore(target.replace(frozen=st.frozen))
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding and a.dtype == b.dtype


def test_mismatched_checkpoints_raise_naming_what_differs(tmp_path):
    st, _ = common.noisy_regression(width=3)
    with Checkpointer(str(tmp_path), config={"model": {"width": 3, "depth": 2}, "seed": 0}) as ckpt:
        ckpt.save(0, st, force=True)
        ckpt.wait_until_finished()
    with Checkpointer(str(tmp_path), config={"model": {"width": 5, "depth": 2}, "seed": 0}) as ckpt:
        with pytest.raises(ValueError, match=r"a different config \(model.width 3 -> 5\); use"):
            ckpt.restore(st)
    other, _ = common.noisy_regression(width=5)
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError, match=r"item 'frozen': v is float32\(3, 2\) in the checkpoint.*\(5, 2\)"):
            ckpt.restore(other)
        with pytest.raises(ValueError, match=r"item 'state': (ema|trainable)/w is float32\(4, 3\).*\(4, 5\)"):
            ckpt.restore(other.replace(frozen=st.frozen))
        with pytest.raises(ValueError, match="no 'data' item"):
            ckpt.restore(st, common.numbered_batches())


def test_frozen_params_are_written_once_and_restored(tmp_path):
    st, _ = common.noisy_regression()
    with Checkpointer(str(tmp_path)) as ckpt:
        assert not ckpt.has_frozen()
        ckpt.save_frozen(st.frozen)
        ckpt.save_frozen({"v": jnp.zeros((3, 2))})  # already there: not rewritten
        restored = ckpt.restore_frozen(st.frozen)
    np.testing.assert_array_equal(np.asarray(restored["v"]), np.asarray(st.frozen["v"]))
    assert restored["v"].sharding == st.frozen["v"].sharding


def test_sigterm_sets_the_stop_flag():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.requested()
    assert signal.getsignal(signal.SIGTERM) == before


_STOP_WORKER = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from cxr_ldm.training.checkpoints import StopSignal
with StopSignal() as stop:
    print("ready", flush=True)
    for call in range(1, 3000):
        if stop.requested():
            break
        time.sleep(0.01)
    print(call, stop.requested(), flush=True)
"""


def test_a_sigterm_to_one_process_stops_every_process_at_the_same_call():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, "-c", _STOP_WORKER, address, str(i)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"]
        workers[1].send_signal(signal.SIGTERM)  # JAX's preemption service catches it, on process 1 only
        results = [w.communicate(timeout=120)[0].split() for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0]
    assert results[0] == results[1] and results[0][1] == "True" and int(results[0][0]) < 2999
