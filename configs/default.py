"""The default recipe: a grayscale KL-VAE, a small CLIP text encoder pretrained on the reports, and a
text-conditioned latent diffusion UNet, all trained from scratch on the procedural `phantom_cxr` data set
(64 px on a CPU; wider 128 px models with accelerators, see `scale_for_accelerators`).

    python train.py                                  # this config, workdir ./workdir/default
    python train.py --config.ldm.num_steps=20000     # any field can be overridden

Measured results: docs/results.md. Why each default value: docs/recipes.md.

Fields that may be None are typed placeholders: the command line can set only typed fields
(`--config.ldm.init_from=DIR`), and a field set to None stays settable there.
"""
import ml_collections
from ml_collections.config_dict import placeholder

import jax


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/default"  # checkpoints, logs, samples and the exported pipeline
    c.seed = 0  # training seed: initialization, data order, noise
    c.stages = ("autoencoder", "text_pretrain", "ldm")  # run in this order; a finished stage is skipped
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # device mesh; -1: all remaining devices
    c.export = True  # write a diffusers StableDiffusionPipeline folder to <workdir>/pipeline at the end

    c.data = ml_collections.ConfigDict()
    c.data.name = "phantom_cxr"  # the TFDS builder
    c.data.config = "64"  # the TFDS builder config: resolution in pixels
    c.data.data_dir = "~/tensorflow_datasets"  # where the data set is built and read
    c.data.manual_dir = placeholder(str)  # the manual download of a data set that needs one (MIMIC-CXR-JPG)
    c.data.resolution = 64  # training image side in pixels
    c.data.augment = False  # random crops; must stay off while ldm.cache_latents is on
    c.data.prompt_dropout = 0.1  # probability of an empty prompt, for classifier-free guidance
    # Probability that an LDM training prompt comes from the report's FINDINGS section instead of the
    # impression, so that other phrasings of the same findings reach the text encoder.
    c.data.findings_prompt_rate = 0.3
    # "positive": only the sentences that state a finding (a normal study's whole section); "all": the whole
    # section, negatives included.
    c.data.findings_prompt_sentences = "positive"
    # Probability that a training prompt has its words reordered within each sentence
    # (`reorder_prompt_words`); off, because reordering loses which side a finding is on.
    c.data.word_order_rate = 0.0
    c.data.word_order = "shuffle"  # "shuffle": random order; "rotate": a cyclic shift
    c.data.tokenizer = placeholder(str)  # tokenizer folder; None: ldm.init_from's tokenizer/, else embedded CLIP BPE

    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.init_from = placeholder(str)  # a diffusers AutoencoderKL folder to start from
    # diffusers AutoencoderKL arguments: one gray channel in and out, 4 latent channels, 4x downsampling
    c.autoencoder.model = ml_collections.ConfigDict({
        "in_channels": 1, "out_channels": 1, "latent_channels": 4,
        "block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
        "sample_size": 64,
    })
    c.autoencoder.batch_size = 8
    c.autoencoder.num_steps = 4000  # fewer steps lose thin devices and fractures in the round trip
    c.autoencoder.learning_rate = 2e-3  # AdamW peak rate (warmup, then cosine decay)
    c.autoencoder.warmup_steps = 100
    c.autoencoder.kl_weight = 1e-6  # KL term weight, as small as in Stable Diffusion's VAE
    c.autoencoder.l2_weight = 1.0  # pixel MSE
    c.autoencoder.l1_weight = 1.0  # pixel L1
    c.autoencoder.gradient_weight = 4.0  # L1 on image finite differences: keeps ribs and tubes sharp
    # ((CheXpert label, factor), ...): studies with these findings appear `factor` times per epoch. Tubes,
    # lines and fractures are thin and in few studies; without this the VAE learns to drop them.
    c.autoencoder.oversample = (("Support Devices", 8), ("Fracture", 8))
    c.autoencoder.train_crop = placeholder(int)  # train on random windows of this side (px); None: whole images
    c.autoencoder.discriminator_start = -1  # step at which a patch discriminator starts; -1: none
    c.autoencoder.discriminator_weight = 0.1  # the discriminator's loss weight once started
    # Fold the per-channel mean / std of the latents into the VAE's 1x1 convs (scaling_factor 1): the
    # diffusion model then sees zero-mean, unit-variance channels.
    c.autoencoder.standardize_latents = True
    c.autoencoder.eval_every = 500  # steps between validation PSNR / SSIM
    c.autoencoder.num_eval_batches = 4  # validation batches per evaluation

    # The "text_pretrain" stage: pretrains the scratch text encoder of c.ldm.text_encoder to match each
    # study's impression with its FINDINGS sentences (contrastive), so that prompts worded unlike the
    # impressions still carry their findings.
    c.text_pretrain = ml_collections.ConfigDict({
        "batch_size": 128,  # impression / findings pairs per batch; the other pairs serve as negatives
        "num_steps": 300,  # longer pretraining matched no better
        "learning_rate": 1e-3, "warmup_steps": 100, "weight_decay": 1e-2,
        "projection_dim": 128,  # the matching head's width (dropped after the stage)
        "num_eval_batches": 3,  # validation batches per evaluation
    })

    c.ldm = ml_collections.ConfigDict()
    c.ldm.init_from = placeholder(str)  # a diffusers StableDiffusionPipeline folder (SD, RoentGen) to fine-tune
    c.ldm.init_variant = placeholder(str)  # init_from's weight variant, e.g. "fp16" for *.fp16.safetensors
    # A transformers BertModel folder + its WordPiece vocab.txt (CXR-BERT, PubMedBERT) to condition on, not CLIP
    c.ldm.text_encoder_from = placeholder(str)
    c.ldm.init_allow_pickle = False  # read init_from components whose only weights are .bin pickles (trusted only)
    # What trains: unet | unet+text_encoder | text_encoder | textual_inversion | lora. "unet" keeps the text
    # encoder as the text_pretrain stage left it, and skips its backward pass.
    c.ldm.finetune = "unet"
    c.ldm.train_token_embedding = True  # where the text encoder trains: its token table too (False freezes it)
    # "corpus": only the token-table rows of tokens in the training split's prompts and reports train; the
    # others would get zero gradients anyway, so the optimizer and EMA skip them (faster, same updates).
    c.ldm.trained_token_rows = "corpus"
    c.ldm.lora_rank = 8  # finetune "lora": rank of the low-rank updates
    c.ldm.lora_alpha = 8.0  # finetune "lora": their scale is alpha / rank
    c.ldm.placeholder_tokens = ()  # textual inversion: new tokens
    c.ldm.initializer_tokens = ()  # textual inversion: the words whose embeddings start them
    # Encode the training images with the frozen VAE once, not at every step (<workdir>/ldm/latent_cache,
    # memory-mapped; SD's VAE at 512 px: 128 KiB per image). Needs data.augment = False.
    c.ldm.cache_latents = True
    # None: a new VAE's latents standardized (or 1 / their std), a loaded VAE's own
    c.ldm.scaling_factor = placeholder(float)
    # diffusers UNet2DConditionModel arguments: 16 x 16 x 4 latents, cross-attention below the top level
    c.ldm.unet = ml_collections.ConfigDict({
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64, 128), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 128, "attention_head_dim": 8, "num_attention_heads": placeholder(int),
        # 8, not SD's 32: with 32 groups a 32-channel block normalizes each channel alone, and its second
        # norm removes the timestep embedding the resnet adds (UNetConfig warns)
        "norm_num_groups": 8,
        "use_linear_projection": True,
        # "text": the attention-pooled prompt added to every resnet's timestep embedding; None: off, as in SD
        "addition_embed_type": placeholder(str), "addition_embed_type_num_heads": 64,
    })
    # CLIPTextModel arguments of the scratch text encoder
    c.ldm.text_encoder = ml_collections.ConfigDict({
        "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 2,  # a deeper encoder trained from scratch lost which side a finding is on
        "num_attention_heads": 4,
        # prompts are padded to this many tokens (the exported tokenizer too); phantom prompts have at
        # most 40, and fewer positions than CLIP's 77 make a step faster
        "max_position_embeddings": 48,
        "hidden_act": "quick_gelu", "projection_dim": 128,
    })
    # diffusers DDIMScheduler config: Stable Diffusion's noise schedule and epsilon prediction
    c.ldm.scheduler = ml_collections.ConfigDict({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    })
    c.ldm.batch_size = 8  # on a CPU, many small steps beat fewer large ones at equal images seen
    c.ldm.num_steps = 20_000  # the LDM is compute-bound here; more steps still help
    c.ldm.learning_rate = 1e-3  # AdamW peak rate of the UNet (warmup, then cosine decay)
    # With finetune "unet+text_encoder": the text encoder's rate, low so that it keeps the text_pretrain
    # stage's pretraining
    c.ldm.text_encoder_learning_rate = 1e-4
    c.ldm.warmup_steps = 100
    c.ldm.weight_decay = 1e-2
    # As autoencoder.oversample, for the diffusion model's training studies: fractures are rare and thin
    # and are drawn only when seen more often; a higher factor takes steps from the other findings.
    c.ldm.oversample = (("Fracture", 4), ("Support Devices", 2))
    # Min-SNR-gamma loss weighting; None: plain MSE (the command line cannot write None; a gamma above the
    # schedule's largest SNR, e.g. 1e5, weighs the same).
    c.ldm.snr_gamma = ml_collections.FieldReference(5.0, field_type=float)
    c.ldm.snr_offset = 0.0  # added to the min-SNR weight of the x0 error (losses.min_snr_weights); 0: the paper's
    c.ldm.timestep_logit_std = 0.0  # logit-normal training timesteps of this spread; 0: uniform
    c.ldm.timestep_logit_mean = 0.0  # their centre on the logit scale; > 0 leans to the noisy end
    c.ldm.ema_decay = 0.999  # EMA of the trained weights; the sample grids and the export use the EMA

    # AdamW gradient clipping (global norm), gradient accumulation and betas, for every stage
    c.optim = ml_collections.ConfigDict({"grad_clip": 1.0, "grad_accum_steps": 1, "b1": 0.9, "b2": 0.999})
    c.compute_dtype = "float32"  # "bfloat16" on accelerators
    c.remat = False  # recompute UNet activations in the backward pass: less memory, slower
    # what the UNet's remat keeps: "full" (nothing), "dots_saveable" (matmuls), "dots_and_convs_saveable"
    c.remat_policy = "full"
    c.max_nonfinite_steps = 10  # consecutive NaN/Inf losses before the run stops

    c.log_every = 50  # steps between logged metrics
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2  # the newest checkpoints kept per stage
    c.sample_every = 1000  # steps between LDM sample grids of sample.prompts
    c.sample = ml_collections.ConfigDict({
        "prompts": ("No acute cardiopulmonary process.", "Large left pleural effusion.",
                    "Moderate cardiomegaly.", "Right apical pneumothorax.",
                    "Right lower lobe consolidation.", "Left upper lobe mass.",
                    "Mild pulmonary edema.", "Endotracheal tube and right central line in place."),
        # guidance_scale: also what `python -m cxr_ldm.evaluate` uses for this workdir; 3 scored best of
        # 2, 3 and 4 on average
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
