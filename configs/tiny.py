"""A smoke test of the whole recipe: the default's three stages at tiny sizes on `phantom_cxr/tiny` (32 px),
fast on a CPU; the images are not meant to be good.

    python train.py --config configs/tiny.py --workdir /tmp/tiny

The global batch of 8 divides over 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
No results are recorded for it (docs/results.md lists the measured configs).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/tiny"
    c.data.config, c.data.resolution = "tiny", 32  # 128 / 16 / 16 train / validation / test studies at 32 px
    # two-level VAE and UNet, a one-layer text encoder
    c.autoencoder.model.update({"block_out_channels": (16, 32), "norm_num_groups": 8, "sample_size": 32,
                                "down_block_types": ("DownEncoderBlock2D",) * 2,
                                "up_block_types": ("UpDecoderBlock2D",) * 2})
    c.autoencoder.update({"batch_size": 8, "num_steps": 20, "warmup_steps": 2, "eval_every": 10,
                          "num_eval_batches": 1})
    c.ldm.unet.update({"sample_size": 16, "block_out_channels": (32, 32), "norm_num_groups": 8,
                       "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                       "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32})
    c.ldm.text_encoder.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "projection_dim": 32})
    # 20 steps per stage, as the VAE's: enough to reach a checkpoint and a sample grid
    c.ldm.update({"batch_size": 8, "num_steps": 20, "warmup_steps": 2})
    c.text_pretrain.update({"batch_size": 8, "num_steps": 20, "warmup_steps": 2, "num_eval_batches": 1})
    c.log_every = 5
    c.checkpoint_every = 10
    c.sample_every = 20
    c.sample.update({"prompts": ("Large left pleural effusion.", "No acute cardiopulmonary process."),
                     "steps": 5})
    return c
