"""The long phantom recipe: the default (configs/default.py) with its autoencoder and its diffusion model
trained twice as long. On a CPU that is 64 px, 8000 VAE and 40000 LDM steps; with accelerators it is the
default's wider 128 px recipe (`default.scale_for_accelerators`), again with twice the steps.

    python train.py --config configs/phantom_full.py

Measured results: docs/results.md.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/phantom_full"
    c.autoencoder.num_steps *= 2  # a sharper VAE: more of the thin findings survive the round trip
    c.ldm.num_steps *= 2  # images nearer the real ones; reworded prompts gain most
    return c
