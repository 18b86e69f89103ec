"""The run config is checked before any work, each offending field named with its full path."""
from __future__ import annotations

import pathlib
import re

import pytest

from configs import tiny
from cxr_ldm.training.config_check import ConfigError, check_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tiny(**overrides):
    config = tiny.get_config()
    for dotted, value in overrides.items():
        *sections, field = dotted.split("__")
        node = config
        for section in sections:
            node = node[section]
        node[field] = value
    return config


@pytest.mark.parametrize("overrides, message", [
    ({"checkpoint_every": 0}, "config.checkpoint_every = 0: expected an integer >= 1"),
    ({"log_every": -5, "ldm__batch_size": 0},
     "config.log_every = -5: expected an integer >= 1; config.ldm.batch_size = 0: expected an integer >= 1"),
    ({"text_pretrain__num_eval_batches": 0}, "config.text_pretrain.num_eval_batches = 0: expected an integer >= 1"),
    ({"autoencoder__warmup_steps": 20},
     "config.autoencoder.warmup_steps = 20: expected 0 <= warmup_steps < config.autoencoder.num_steps = 20"),
    ({"data__resolution": 30}, "config.data.resolution = 30: the images of phantom_cxr/tiny are 32 px"),
    ({"data__config": "16"}, "config.data.config = '16': phantom_cxr has the configs ['64', '128', '256', 'tiny']"),
    ({"data__name": "mimic"}, "config.data.name: Unknown data set 'mimic'; expected one of"),
    ({"autoencoder__model__block_out_channels": (16,) * 7, "autoencoder__model__down_block_types":
      ("DownEncoderBlock2D",) * 7, "autoencoder__model__up_block_types": ("UpDecoderBlock2D",) * 7},
     "config.data.resolution = 32: expected a multiple of 64, the downsampling factor of config.autoencoder.model"),
    ({"autoencoder__model__block_out_channels": (16, 32, 64)},
     "config.autoencoder.model: 'down_block_types' = ('DownEncoderBlock2D', 'DownEncoderBlock2D'): expected 3 x"),
    ({"compute_dtype": "fp16", "ldm__finetune": "full"},
     "config.compute_dtype = 'fp16': expected one of ['float32', 'bfloat16', 'float16']; config.ldm.finetune = "
     "'full': expected one of ['unet', 'unet+text_encoder', 'text_encoder', 'textual_inversion', 'lora']"),
    ({"stages": ("autoencoder", "text_encoder", "ldm")}, "'text_encoder' stage is now called 'text_pretrain'"),
    ({"remat_policy": "dots"},
     "config.remat_policy = 'dots': expected one of ['full', 'dots_saveable', 'dots_and_convs_saveable']"),
    ({"autoencoder__train_crop": 5}, "config.autoencoder.train_crop = 5: expected a multiple of 2 (the VAE's "
     "downsampling factor) up to the image side 32, or None"),
    ({"autoencoder__train_crop": 64}, "config.autoencoder.train_crop = 64: expected a multiple of 2"),
    ({"ldm__snr_gamma": None, "ldm__snr_offset": 1.0, "ldm__timestep_logit_std": -1.0},
     "config.ldm.snr_offset = 1.0: it adds to the min-SNR weight, so it needs config.ldm.snr_gamma; "
     "config.ldm.timestep_logit_std = -1.0: expected >= 0 (0: uniform)"),
    ({"ldm__text_encoder__hidden_size": 64},
     "config.ldm.text_encoder.hidden_size=64 differs from config.ldm.unet.cross_attention_dim=32"),
    ({"ldm__text_encoder_from": "/no/bert"}, "config.ldm.text_encoder_from = '/no/bert': no such folder"),
    ({"ldm__text_encoder_from": str(REPO)},
     "config.stages = ('autoencoder', 'text_pretrain', 'ldm'): the text_pretrain stage pretrains a CLIP text "
     "encoder that the LDM conditioned on config.ldm.text_encoder_from does not use; drop it"),
    ({"ldm__text_encoder_from": str(REPO), "stages": ("autoencoder", "ldm"), "ldm__finetune": "textual_inversion"},
     "config.ldm.finetune = 'textual_inversion' adds tokens to a CLIP tokenizer; it does not apply to the BERT"),
])
def test_fields_that_would_break_a_run_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(_tiny(**overrides), device_count=1)


def test_batches_must_split_over_the_devices_and_accumulation_steps():
    check_config(_tiny(), device_count=8)  # tiny's batches of 8 divide over 8 devices
    with pytest.raises(ConfigError, match=re.escape(
            "config.autoencoder.batch_size = 8: expected a multiple of 8 device(s) x config.optim.grad_accum_steps "
            "2 = 16; config.ldm.batch_size = 8: expected a multiple of 8 device(s) x config.optim.grad_accum_steps "
            "2 = 16")):  # text pretraining does not accumulate: its batch of 8 fits
        check_config(_tiny(optim__grad_accum_steps=2), device_count=8)
    with pytest.raises(ConfigError, match=re.escape("config.text_pretrain.batch_size = 8: expected a multiple of "
                                                    "3 device(s) = 3")):
        check_config(_tiny(), device_count=3)
    with pytest.raises(ConfigError, match=re.escape("config.mesh = (data 4, fsdp 1): expected fsdp dividing")):
        check_config(_tiny(mesh__data=4), device_count=8)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__"))
def test_shipped_configs_pass(name, monkeypatch):
    monkeypatch.chdir(REPO)
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    check_config(module.get_config(), device_count=1)
