"""Weight and JSON files are written with the mode open() gives a new file (0o666 less the umask), so that a model
folder shared with a group or with everyone is readable by them, safetensors as much as config.json."""
import os

import jax
import numpy as np
import pytest

from cxr_ldm.io.components import save_component
from cxr_ldm.io.run_folder import write_folder_atomically
from cxr_ldm.io.weights import read_safetensors, write_json, write_safetensors
from cxr_ldm.models import autoencoder


@pytest.fixture(params=[0o022, 0o027], ids=["umask_022", "umask_027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(folder) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mode & 0o777 for path in folder.rglob("*") if path.is_file()}


def test_safetensors_and_json_files_get_the_umask_mode(tmp_path, umask):
    write_safetensors(tmp_path / "model.safetensors", {"weight": np.arange(6, dtype=np.float32).reshape(2, 3)})
    write_json(tmp_path / "config.json", {"hidden_size": 3})
    assert _modes(tmp_path) == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}
    np.testing.assert_array_equal(read_safetensors(tmp_path / "model.safetensors")["weight"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_an_exported_component_folder_gets_the_umask_mode(tmp_path, umask):
    """As train.py's autoencoder stage exports its VAE: save_component into a folder replaced atomically."""
    config = autoencoder.AutoencoderConfig.from_dict(dict(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        sample_size=16))
    model = autoencoder.AutoencoderKL(config)
    params = jax.jit(model.init)(jax.random.key(0), *autoencoder.dummy_inputs(config))["params"]
    write_folder_atomically(str(tmp_path / "vae"), lambda path: save_component(model, params, path))
    assert _modes(tmp_path / "vae") == {"diffusion_pytorch_model.safetensors": 0o666 & ~umask,
                                        "config.json": 0o666 & ~umask}
