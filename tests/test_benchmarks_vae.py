"""benchmarks/vae_step.py times the same step on both sides: its PyTorch loss equals the autoencoder stage's."""
import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from cxr_ldm.io.components import save_component
from cxr_ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, dummy_inputs
from cxr_ldm.training import steps

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vae_step.py"


@pytest.fixture(scope="module")
def bench():
    path = list(sys.path)  # the script puts the checkout on it
    spec = importlib.util.spec_from_file_location("vae_step_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = path
    return module


def test_the_pytorch_loss_equals_the_stage_loss_on_the_same_weights(bench, tmp_path):
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    config = AutoencoderConfig.from_dict(bench.PRESETS["tiny"].get_config().autoencoder.model.to_dict())
    vae = AutoencoderKL(config)
    params = vae.init(jax.random.PRNGKey(0), *dummy_inputs(config))["params"]
    save_component(vae, params, tmp_path / "vae")
    images = bench.make_images(config, batch=2)
    loss = dict(vars(bench.LOSS), sample_posterior=False)
    ours = steps.make_autoencoder_loss_fn(vae, steps.AutoencoderLossConfig(**loss))(
        {"vae": params}, {}, {"image": images}, jax.random.PRNGKey(1), 0)[0]
    model = TorchAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        theirs = bench.torch_loss(model, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), sample_posterior=False)
    assert float(ours) == pytest.approx(theirs.item(), rel=1e-4)
    assert float(ours) > 0
