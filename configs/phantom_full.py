"""The long phantom recipe: 128 px, wider models, many more steps. Sized for an accelerator: on a 2-core CPU
one VAE step (batch 32 at 128 px) takes about a minute, so the recipe would take weeks there. Not yet
measured on a GPU.

    python train.py --config configs/phantom_full.py
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/phantom_full"
    c.data.config, c.data.resolution = "128", 128
    c.autoencoder.model.update({"sample_size": 128, "block_out_channels": (64, 128, 128)})
    c.autoencoder.update({"batch_size": 32, "num_steps": 8000, "learning_rate": 5e-4, "eval_every": 2000})
    c.ldm.unet.update({"sample_size": 32, "block_out_channels": (128, 256, 256), "layers_per_block": 2,
                       "cross_attention_dim": 256, "attention_head_dim": 8, "norm_num_groups": 32})
    c.ldm.text_encoder.update({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "projection_dim": 256})
    c.ldm.update({"batch_size": 64, "num_steps": 40_000, "learning_rate": 2e-4, "finetune": "unet+text_encoder",
                  "text_encoder_learning_rate": 2e-4, "warmup_steps": 1000, "ema_decay": 0.9995})
    c.checkpoint_every = 2000
    c.sample_every = 5000
    return c
