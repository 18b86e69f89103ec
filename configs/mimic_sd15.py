"""Fine-tune a downloaded Stable Diffusion 1.x folder on MIMIC-CXR-JPG at 512 px (RoentGen-style).

    python train.py --config configs/mimic_sd15.py --config.ldm.init_from=/models/sd15 \
        --config.data.manual_dir=/data/mimic-cxr-jpg --workdir runs/mimic_sd15

The recipe of the CXR Stable Diffusion adaptation work (Chambon et al. 2022, arXiv:2210.04133, and
RoentGen, arXiv:2211.12737): keep SD's VAE (grayscale images repeated to 3 channels), condition on the
report impression (<= 75 CLIP tokens), fine-tune the UNet (or UNet + text encoder: `--config.ldm.finetune`).
Check the papers' tables before claiming a replication; what they vary (steps, batch) is exposed here as
config fields. No results are recorded for it yet (docs/results.md).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "workdir/mimic_sd15"
    c.stages = ("ldm",)  # SD's pretrained VAE is kept
    c.data.name, c.data.config, c.data.resolution = "mimic_cxr_jpg", "512", 512
    c.data.manual_dir = None  # the PhysioNet download; set on the command line
    c.data.prompt_dropout = 0.1  # empty prompts for classifier-free guidance
    c.data.findings_prompt_rate = 0.0  # impressions only, as in the published fine-tunes
    c.data.word_order_rate = 0.0  # SD's pretrained text encoder reads real word order
    c.ldm.init_from = None  # required: a diffusers StableDiffusionPipeline folder of SD 1.x
    c.ldm.finetune = "unet"
    c.ldm.trained_token_rows = "all"  # with the text encoder trained: its whole table, as the published fine-tunes
    c.ldm.batch_size = 64  # global batch
    c.ldm.num_steps = 60_000
    c.ldm.learning_rate = 5e-5  # AdamW with a short warmup, the fine-tuning rate of the papers
    c.ldm.text_encoder_learning_rate = 5e-5  # with finetune "unet+text_encoder"
    c.ldm.warmup_steps = 500
    c.ldm.weight_decay = 1e-2
    c.ldm.snr_gamma = None  # plain MSE, SD's own loss
    c.ldm.ema_decay = 0.9999  # the EMA decay of diffusers' fine-tuning scripts
    c.compute_dtype = "bfloat16"
    c.remat = True  # recompute activations in the backward pass: the 512 px UNet fits
    c.mesh.fsdp = 1  # raise to shard params and optimizer state over devices (FSDP)
    c.log_every = 50
    c.checkpoint_every = 2000
    c.sample_every = 5000
    c.sample.update({"steps": 50, "guidance_scale": 4.0})  # sample grids (and evaluation) at guidance 4
    return c
