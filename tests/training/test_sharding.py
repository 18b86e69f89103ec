"""Mesh, partition rules, and device-count independence: a step sharded over 8 simulated CPU devices
(data and fsdp) and a 2-process jax.distributed run equal the 1-device run."""
import socket

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from cxr_ldm.training import sharding
from helpers import training as common

MESH_4x2 = AbstractMesh((4, 2), ("data", "fsdp"))


def test_fsdp_splits_the_largest_divisible_axis_of_large_leaves():
    assert sharding.fsdp_spec((3, 3, 320, 640), 2, min_fsdp_size=1) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((768, 3), 4, min_fsdp_size=1) == P("fsdp", None)
    assert sharding.fsdp_spec((320, 320), 2, min_fsdp_size=1) == P(None, "fsdp")  # ties: the last axis
    assert sharding.fsdp_spec((5, 7), 2, min_fsdp_size=1) == P()  # nothing divides
    assert sharding.fsdp_spec((64, 64), 2, min_fsdp_size=64 * 64 + 1) == P()  # small: replicated
    assert sharding.fsdp_spec((64, 64), 1, min_fsdp_size=1) == P()


def test_rules_are_matched_in_order_on_the_leaf_path():
    rules = ((r"vae/", None), (r"to_q/kernel$", P("fsdp", None)), (r".*", sharding.FSDP))
    spec = lambda path, shape: sharding.leaf_spec(path, shape, MESH_4x2, rules, min_fsdp_size=1)
    assert spec("frozen/vae/conv_in/kernel", (3, 3, 4, 64)) == P()
    assert spec("trainable/unet/attn1/to_q/kernel", (64, 32)) == P("fsdp", None)
    assert spec("opt_state/1/0/mu/unet/attn1/to_q/kernel", (64, 32)) == P("fsdp", None)
    assert spec("trainable/unet/conv_in/kernel", (3, 3, 4, 64)) == P(None, None, None, "fsdp")
    assert sharding.leaf_spec("x", (4,), MESH_4x2, ()) == P()  # no rule: replicated
    with pytest.raises(ValueError, match="partition rule"):
        sharding.leaf_spec("a/kernel", (4,), MESH_4x2, ((r"kernel", P(None, "fsdp")),))


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match="fsdp=3"):
        sharding.make_mesh(fsdp=3, devices=[object()] * 8)
    with pytest.raises(ValueError, match="data=3 x fsdp=2"):
        sharding.make_mesh(3, 2, devices=[object()] * 8)


def _assert_same_run(result, reference, rtol=1e-5):
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=rtol)
    for leaf, ref in zip(result["leaves"], reference["leaves"], strict=True):
        np.testing.assert_allclose(leaf, ref, rtol=rtol, atol=1e-6)


@pytest.mark.slow  # four compiles of the LDM step in a subprocess: about 3 minutes on 2 CPU cores
def test_step_on_8_devices_with_data_and_fsdp_equals_the_1_device_step(tmp_path):
    # data only; data x fsdp (a multi-host pod: fsdp within a host); fsdp only (one v5p/v6e host's chips)
    runs = [dict(num_steps=3, num_devices=1), dict(num_steps=3, data=8, fsdp=1),
            dict(num_steps=3, data=4, fsdp=2), dict(num_steps=3, data=1, fsdp=8)]
    one, *sharded = common.worker_results(common.run_worker(runs, str(tmp_path), devices=8))
    assert one["devices"] == 8
    for run in sharded:
        _assert_same_run(run, one)


@pytest.mark.slow  # three processes compiling the LDM step at once: about 3 minutes on 2 CPU cores
def test_two_process_distributed_run_logs_the_losses_of_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    run = [dict(num_steps=3, data=2, fsdp=2)]
    workers = [common.run_worker(run, str(tmp_path), devices=2,
                                 distributed={"address": f"localhost:{port}", "num_processes": 2, "process_id": i})
               for i in range(2)]
    reference = common.run_worker([dict(num_steps=3, num_devices=1)], str(tmp_path), devices=1)
    results = [common.worker_results(w)[0] for w in workers]
    reference = common.worker_results(reference)[0]
    for result in results:
        assert result["devices"] == 4
        _assert_same_run(result, reference)
