"""A batch that divides over the local devices is sampled across them, with the images one device draws: the
synthetic data set writer's rows do not depend on the machine's device count."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from helpers import pipelines  # noqa: E402

from cxr_ldm import Pipeline  # noqa: E402

PROMPTS = ["Large left pleural effusion.", "Moderate cardiomegaly.", "No acute cardiopulmonary process.",
           "Right apical pneumothorax."]
ARGS = dict(num_inference_steps=3, guidance_scale=3.0, seed=[0, 1, 2, 3])

FOUR_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from cxr_ldm import Pipeline
    from cxr_ldm.pipeline import _shard_batch
    folder, prompts, args, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    sharded = _shard_batch((np.zeros((len(prompts), 4)),))[0]
    images = Pipeline.from_pretrained(folder)(prompts, **args)
    np.save(out, images)
    print(json.dumps({"devices": jax.local_device_count(), "shards": len(sharded.sharding.device_set)}))
""")


def test_four_devices_draw_the_images_one_device_draws(tmp_path):
    folder = tmp_path / "pipe"
    pipelines.tiny_sd_pipeline().save_pretrained(folder)
    one = Pipeline.from_pretrained(folder)(PROMPTS, **ARGS)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(folder), json.dumps(PROMPTS), json.dumps(ARGS),
                           str(tmp_path / "four.npy")], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"devices": 4, "shards": 4}
    four = np.load(tmp_path / "four.npy")
    assert four.shape == one.shape and one.std() > 0.01
    np.testing.assert_allclose(four, one, atol=1e-4)
