"""The three stages in about a minute on a CPU: a smoke test of the whole recipe (images are not good).

    python train.py --config configs/tiny.py --workdir /tmp/tiny
Global batch 8: divisible by 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/tiny"
    c.data.config, c.data.resolution = "tiny", 32
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
    c.ldm.update({"batch_size": 8, "num_steps": 20, "warmup_steps": 2})
    c.text_pretrain.update({"batch_size": 8, "num_steps": 20, "warmup_steps": 2, "num_eval_batches": 1})
    c.log_every = 5
    c.checkpoint_every = 10
    c.sample_every = 20
    c.sample.update({"prompts": ("Large left pleural effusion.", "No acute cardiopulmonary process."),
                     "steps": 5})
    return c
