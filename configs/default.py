"""The embedded main job: a grayscale VAE, then a text-conditioned latent diffusion model, both trained
from scratch on the procedural `phantom_cxr` data set at 64 px.

    python train.py                                  # this config, workdir ./workdir/default
    python train.py --config.ldm.num_steps=20000     # any field can be overridden

On a 2-core CPU the whole job (data build, VAE, latent cache, LDM, export) takes 1.5 to 2.5 hours,
depending on the CPU (docs/results/default_run.md).
With accelerators the batch and the models grow (see `scale_for_accelerators`): the same recipe then
trains longer and wider for a better model.

Fields that may be None are typed placeholders: the command line can set only typed fields
(`--config.ldm.init_from=DIR`), and a field set to None stays settable there.
"""
import ml_collections
from ml_collections.config_dict import placeholder

import jax


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/default"
    c.seed = 0
    # VAE, then the text encoder pretrained on the reports, then the diffusion model (docs/results/default_run.md)
    c.stages = ("autoencoder", "text_encoder", "ldm")
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # -1: all remaining devices
    c.export = True  # write a diffusers StableDiffusionPipeline folder to <workdir>/pipeline at the end

    c.data = ml_collections.ConfigDict()
    c.data.name = "phantom_cxr"
    c.data.config = "64"  # the TFDS builder config: resolution in pixels
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.manual_dir = placeholder(str)  # the manual download of a data set that needs one (MIMIC-CXR-JPG)
    c.data.resolution = 64
    c.data.augment = False
    c.data.prompt_dropout = 0.1  # probability of an empty prompt, for classifier-free guidance
    # Probability that a training prompt is taken from the report's FINDINGS section instead of the
    # impression (LDM stage), so other phrasings reach the text encoder. "positive": only the sentences that
    # state a finding (a normal study's whole section); "all": the whole section, negatives included.
    # Paired on seed 0 (docs/results/default_run.md): 0.3 positive took prompts worded unlike the impressions
    # from 0.20 to 0.51 and conditioning accuracy from 0.51 to 0.55 (impressions 0.62 -> 0.57, within the
    # seed spread); the whole section at 0.5 had cost 0.15 on seed 1.
    # 0.5 on the 4000-step VAE: 0.820 against 0.807 (templates 0.871, rewordings unchanged), within the spread.
    c.data.findings_prompt_rate = 0.3
    c.data.findings_prompt_sentences = "positive"
    # Probability that a training prompt has its sentences shuffled and the words within each sentence
    # reordered, by `word_order` "shuffle" (random order) or "rotate" (a cyclic shift), so that the text encoder
    # sees findings, sides and grades in other orders than the impressions' (`pipeline.reorder_prompt_words`).
    # Off: on seed 0, shuffling 30 % of the prompts took reworded prompts from 0.69 to 0.74 but the
    # template-worded ones from 0.81 to 0.76 and side accuracy from 0.94 to 0.69; rotating them kept sides and
    # templates but the rewordings fell to 0.63 (overall 0.757 / 0.761 vs 0.776; docs/results/default_run.md).
    c.data.word_order_rate = 0.0
    c.data.word_order = "shuffle"
    c.data.tokenizer = placeholder(str)  # None: the embedded CLIP BPE tokenizer; else a tokenizer folder

    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.init_from = placeholder(str)  # a diffusers AutoencoderKL folder to start from
    c.autoencoder.model = ml_collections.ConfigDict({
        "in_channels": 1, "out_channels": 1, "latent_channels": 4,
        "block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
        "sample_size": 64,
    })
    # 4000 x 8 at 2e-3 with the gradient term, device and fracture studies 8x as often: validation PSNR
    # 39.6 dB and a conditioning ceiling of 0.92 (2000 steps: 38.1 dB, 0.90; 1000 steps, no oversampling:
    # 35.2 dB, 0.79, the tubes and lines lost; docs/results/default_run.md). The LDM scored the same on the
    # 2000-step VAE; 4000 is the VAE of the measured default run. Its extra ~15 min: the frozen text encoder
    # (ldm.finetune) wins back about 8.
    c.autoencoder.batch_size = 8
    c.autoencoder.num_steps = 4000
    c.autoencoder.learning_rate = 2e-3
    c.autoencoder.warmup_steps = 100
    c.autoencoder.kl_weight = 1e-6
    c.autoencoder.l2_weight = 1.0
    c.autoencoder.l1_weight = 1.0
    c.autoencoder.gradient_weight = 4.0  # L1 on image finite differences: keeps ribs and tubes sharp
    # ((CheXpert label, factor), ...): studies with these findings appear `factor` times per epoch. Tubes,
    # lines and fractures are thin and in few studies; without this the VAE learns to drop them.
    c.autoencoder.oversample = (("Support Devices", 8), ("Fracture", 8))
    c.autoencoder.discriminator_start = -1  # step at which a patch discriminator starts; -1: none
    c.autoencoder.discriminator_weight = 0.1
    # Fold the per-channel mean / std of the latents into the VAE's 1x1 convs (scaling_factor 1): the
    # diffusion model then sees zero-mean, unit-variance channels.
    c.autoencoder.standardize_latents = True
    c.autoencoder.eval_every = 500
    c.autoencoder.num_eval_batches = 4

    # The "text_encoder" stage: pretrains the scratch text encoder of c.ldm.text_encoder to match each study's
    # impression with its findings sentences, so that prompts worded unlike the impressions still carry their
    # findings (cxr_ldm/training/text_encoder_stage.py); about 4 min on 2 cores. With ldm.oversample and
    # ldm.text_encoder_learning_rate below it gave conditioning accuracy 0.811 (seed 0) against 0.780 without
    # the three (0.759 with the LDM's text learning rate at 1e-3, which undid the pretraining;
    # docs/results/default_run.md).
    c.text_pretrain = ml_collections.ConfigDict({
        "batch_size": 128, "num_steps": 300, "learning_rate": 1e-3, "warmup_steps": 100, "weight_decay": 1e-2,
        "projection_dim": 128, "num_eval_batches": 3,
    })

    c.ldm = ml_collections.ConfigDict()
    c.ldm.init_from = placeholder(str)  # a diffusers StableDiffusionPipeline folder (SD, RoentGen) to fine-tune
    # unet | unet+text_encoder | text_encoder | textual_inversion | lora. "unet": the text encoder stays as the
    # text_encoder stage left it. Against "unet+text_encoder" (text lr 1e-4) on the same VAE and seed: conditioning
    # accuracy 0.809 vs 0.807 at guidance 4 and 0.828 vs 0.802 at 3, side accuracy 0.99 vs 0.97, domain FID 65 vs
    # 73, and 1.17x the images/s (docs/results/default_run.md).
    c.ldm.finetune = "unet"
    # False freezes the 49408-row token table (a step ~15 % faster), but measured on the default run it cost
    # conditioning accuracy: 0.49 frozen vs 0.60 trained, prompts unlike the reports 0.12 vs 0.41.
    c.ldm.train_token_embedding = True
    # "corpus": only the table's rows of tokens in the training split's prompts and reports train (332 of 49408
    # on phantom_cxr); they update as with "all" (the others get zero gradients), and the optimizer and EMA
    # skip the rest of the table: 1.16x the LDM images/s here (docs/results/default_run.md).
    c.ldm.trained_token_rows = "corpus"
    c.ldm.lora_rank = 8
    c.ldm.lora_alpha = 8.0
    c.ldm.placeholder_tokens = ()  # textual inversion: new tokens
    c.ldm.initializer_tokens = ()  # textual inversion: the words whose embeddings start them
    # Encode the training images with the frozen VAE once, not at every step (<workdir>/ldm/latent_cache,
    # memory-mapped; SD's VAE at 512 px: 128 KiB per image). Needs data.augment = False.
    c.ldm.cache_latents = True
    # None: a new VAE's latents standardized (or 1 / their std), a loaded VAE's own
    c.ldm.scaling_factor = placeholder(float)
    c.ldm.unet = ml_collections.ConfigDict({
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64, 128), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 128, "attention_head_dim": 8, "num_attention_heads": placeholder(int),
        "norm_num_groups": 8, "use_linear_projection": True,
        # "text": the prompt, attention-pooled, is added to the timestep embedding of every resnet (the
        # 16 x 16 level has no attention of its own); None: off, as in SD. Paired with the default end to end
        # (seed 0, 8 heads): conditioning accuracy 0.872 against 0.902, the mass drawn as a device again.
        "addition_embed_type": placeholder(str), "addition_embed_type_num_heads": 64,
    })
    # 8 groups, not SD's 32: with 32 the 32-channel blocks normalize each channel alone, and norm2 removes the
    # timestep embedding their resnets add (UNetConfig warns). With 8 (13000 steps) the training loss ended 8 %
    # lower on seed 0, as low as 20000 steps with 32 groups, and side accuracy rose from 0.94 to 0.97 / 0.98 on
    # seeds 0 and 1; conditioning accuracy 0.780 / 0.793 vs 0.776, domain FID 81 / 77 vs 67
    # (docs/results/default_run.md).
    # 2 layers: 4 (seed 0) lost sides, conditioning accuracy 0.687 vs 0.780, side accuracy 0.76 vs 0.97.
    c.ldm.text_encoder = ml_collections.ConfigDict({
        "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        # Prompts are padded to this many tokens (the exported tokenizer too): the phantom prompts have
        # at most 40; 48 instead of CLIP's 77 makes a default step ~10 % faster.
        "max_position_embeddings": 48, "hidden_act": "quick_gelu", "projection_dim": 128,
    })
    c.ldm.scheduler = ml_collections.ConfigDict({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    })
    # On CPU more, smaller steps beat fewer large ones at equal images seen (measured: 2000 x 16 gave
    # 4x the conditioning accuracy of 1000 x 32); with the latent cache a batch-8 step takes about 0.2 s.
    # The LDM is compute-bound here: on one host and seed, 6500 x 8 gave conditioning accuracy 0.55,
    # 6500 x 16 gave 0.70 and 13000 x 8 gave 0.78 (domain FID 128 / 89 / 67); 20000 x 8 gave only 0.79
    # then, with the text encoder trained in this stage. With the encoder pretrained and frozen and fractures
    # 4x, 20000 x 8 gave 0.861 / 0.887 on seeds 0 / 1 against 0.837 / 0.837 at 13000 (fractures found 0.75 /
    # 0.65 against 0.30 / 0.55, domain FID 46 against 55-65), for 89 min of LDM pinned to one core instead of
    # 57 (docs/results/default_run.md).
    c.ldm.batch_size = 8
    c.ldm.num_steps = 20_000
    c.ldm.learning_rate = 1e-3
    # With finetune "unet+text_encoder": 1e-4, not the UNet's 1e-3, keeps part of the text_encoder stage's
    # pretraining (see c.text_pretrain)
    c.ldm.text_encoder_learning_rate = 1e-4
    c.ldm.warmup_steps = 100
    c.ldm.weight_decay = 1e-2
    # As autoencoder.oversample, for the diffusion model's training studies. With the scratch text encoder
    # it took fractures from 0.23 to 0.50-0.62 and template prompts to 0.82-0.87 but rewordings from 0.78 to
    # 0.41-0.54 (four runs); with the pretrained encoder at text lr 1e-4 the rewordings held (0.70) and the
    # template prompts kept 0.85: 0.811 overall. Fractures at 4x / 8x: fracture detection 0.30 / 0.42 and the
    # clavicles no longer drawn as a device, but rewordings 0.67 / 0.66: 0.817 / 0.820, within a seed's spread
    # (docs/results/default_run.md). With the encoder pretrained on finding groups and frozen, fractures 4x:
    # 0.837 on seeds 0 and 1 alike, against 0.811 at 2x (seed 0, phantom_cxr 1.1.0).
    c.ldm.oversample = (("Fracture", 4), ("Support Devices", 2))
    # Min-SNR-gamma loss weighting; None: plain MSE (the command line cannot write None; a gamma above the
    # schedule's largest SNR, e.g. 1e5, weighs the same).
    c.ldm.snr_gamma = ml_collections.FieldReference(5.0, field_type=float)
    c.ldm.ema_decay = 0.999

    c.optim = ml_collections.ConfigDict({"grad_clip": 1.0, "grad_accum_steps": 1, "b1": 0.9, "b2": 0.999})
    c.compute_dtype = "float32"  # "bfloat16" on accelerators
    c.remat = False
    c.max_nonfinite_steps = 10  # consecutive NaN/Inf losses before the run stops

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.sample_every = 1000
    c.sample = ml_collections.ConfigDict({
        "prompts": ("No acute cardiopulmonary process.", "Large left pleural effusion.",
                    "Moderate cardiomegaly.", "Right apical pneumothorax.",
                    "Right lower lobe consolidation.", "Left upper lobe mass.",
                    "Mild pulmonary edema.", "Endotracheal tube and right central line in place."),
        # `python -m cxr_ldm.evaluate` uses this scale too. On five checkpoints of the 0.80-0.82 recipes, 3 against
        # 4 scored +0.009 conditioning accuracy on average (-0.005 to +0.019) with a lower domain FID where
        # measured; 2 did worse on three of four, 1 far worse (`evaluate --guidance-sweep`,
        # docs/results/default_run.md). The earlier, weaker runs had preferred 4 to 3, 6 and 8.
        "steps": 25, "guidance_scale": 3.0, "sampler": "ddim", "seed": 0,
    })
    scale_for_accelerators(c)
    return c


def scale_for_accelerators(c: ml_collections.ConfigDict) -> None:
    """Wider models, bigger batches and longer training when GPUs/TPUs are present."""
    if jax.default_backend() == "cpu":
        return
    devices = jax.device_count()
    c.compute_dtype = "bfloat16"
    c.data.config, c.data.resolution = "128", 128
    c.autoencoder.model.sample_size = 128
    c.autoencoder.model.block_out_channels = (64, 128, 128)
    c.autoencoder.batch_size = 32 * devices
    c.autoencoder.eval_every = 2000
    c.autoencoder.num_steps = 10_000
    c.ldm.unet.sample_size = 32
    c.ldm.unet.block_out_channels = (128, 256, 256)
    c.ldm.unet.layers_per_block = 2
    c.ldm.unet.norm_num_groups = 32  # 4+ channels per group at these widths
    c.ldm.unet.cross_attention_dim = 256
    c.ldm.text_encoder.update({"hidden_size": 256, "intermediate_size": 1024, "projection_dim": 256,
                               "num_hidden_layers": 4})
    c.ldm.batch_size = 64 * devices
    c.ldm.num_steps = 30_000
    c.sample_every = 5000
