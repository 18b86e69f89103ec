"""The coffee-break recipe: the default (configs/default.py) cut to about 30 minutes on 2 CPU cores, for a
first look at the whole job (data, VAE, text encoder, LDM, pipeline, evaluation). Its images follow their
prompts far less often than the default's (docs/recipes.md, "Where the main job's time goes").
With accelerators it cuts the accelerators' recipe by the same fractions.

    python train.py --config configs/quick.py

Measured results: docs/results.md.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/quick"
    c.autoencoder.num_steps = c.autoencoder.num_steps * 3 // 8  # 1500 on a CPU
    c.ldm.num_steps = c.ldm.num_steps * 11 // 40  # 5500 on a CPU
    c.ldm.learning_rate *= 2  # 2e-3 on a CPU: the short run's rate (docs/recipes.md)
    c.ldm.warmup_steps *= 2
    c.sample_every = c.ldm.num_steps  # one sample grid, at the end
    return c
