"""Text-to-image `Pipeline`: tokenizer + CLIP text encoder + UNet + VAE + sampler -> images; editing.
A pipeline may instead be conditioned on a BERT (`models.text_projection.ProjectedTextEncoder`): its folder
holds text_encoder/ as a transformers BertModel, tokenizer/ as WordPiece files and, when the BERT's width is not
the UNet's, text_projection/.

    pipe = Pipeline.from_pretrained("dir")      # diffusers StableDiffusionPipeline folder or train.py workdir
    images = pipe(["Large right pleural effusion."], num_inference_steps=50, guidance_scale=4.0)
    # float32 (B, H, W, C) in [0, 1]
    pipe.load_lora_weights("lora_dir", scale=1.0)            # diffusers / PEFT / kohya-ss LoRA, merged
    pipe.load_textual_inversion("learned_embeds.safetensors")  # a new token for prompts
    edited = pipe.img2img(images, prompts, strength=0.6)     # SDEdit
    repainted = pipe.inpaint(images, masks, prompts)         # masks (B, H, W, 1), 1 = repaint
    latents = pipe.invert(images, prompts)                   # DDIM inversion

Text encoding, the whole sampling loop (from any start step, with inpainting's blending) and the VAE decode
run in one `jax.jit`, compiled once per (batch, resolution, steps, start step, sampler, guidance on/off) and
reused; encoding images and DDIM inversion have their own. Batches are sharded over all local devices when
the batch divides evenly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cxr_ldm.data.tokenizer import load_tokenizer, load_wordpiece_tokenizer, prompt_length, tokenize, truncation
from cxr_ldm.diffusion import samplers
from cxr_ldm.diffusion.samplers import SAMPLERS
from cxr_ldm.diffusion.schedules import SchedulerConfig
from cxr_ldm.io import adapters
from cxr_ldm.io.components import load_component, save_component
from cxr_ldm.io.run_folder import EXPORT_DIRNAME
from cxr_ldm.io.weights import write_json
from cxr_ldm.models.bert import BertModel
from cxr_ldm.models.text_projection import ProjectedTextEncoder

TEXT_PROJECTION_DIRNAME = "text_projection"


def _resolve_folder(path: Path) -> Path:
    """A diffusers pipeline folder, or a train.py workdir holding one under `pipeline/`."""
    if (path / "model_index.json").is_file():
        return path
    if (path / EXPORT_DIRNAME / "model_index.json").is_file():
        return path / EXPORT_DIRNAME
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(
        f"{path} is neither a diffusers pipeline folder (no model_index.json) nor a finished train.py "
        f"workdir (no {EXPORT_DIRNAME}/model_index.json; run train.py to the end of the ldm stage)")


@dataclasses.dataclass
class Pipeline:
    """A loaded text-to-image model. Params are pytrees of arrays; modules are Flax linen modules."""

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_encoder_params: Any
    tokenizer: Any
    scheduler: SchedulerConfig
    scheduler_class: str = "DDIMScheduler"
    scheduler_file: dict | None = None  # the scheduler_config.json read, written back unchanged on save

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any = None, variant: str | None = None,
                        allow_pickle: bool = False) -> "Pipeline":
        """Loads a diffusers `StableDiffusionPipeline` folder (or a train.py workdir's export).

        Args:
          path: folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
          dtype: compute dtype of the modules (None: float32; bfloat16 on accelerators is typical).
          variant: weight variant of every component, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`
            and `model.fp16.safetensors` (as diffusers' `variant=`).
          allow_pickle: read components whose only weights are legacy `.bin` pickles; only for files you trust.
        Raises:
          io.weights.PickleRefusedError: a component holds only a pickle and `allow_pickle` is False.
        """
        folder = _resolve_folder(Path(path))
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"pipeline folder {folder} lacks the {sub}/ component")
        load = functools.partial(load_component, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
        unet, unet_params = load(folder / "unet")
        vae, vae_params = load(folder / "vae")
        text_encoder, text_params = load(folder / "text_encoder")
        if isinstance(text_encoder, BertModel):
            tokenizer = load_wordpiece_tokenizer(folder / "tokenizer")
            projection, text_params = None, {"bert": text_params}
            if (folder / TEXT_PROJECTION_DIRNAME).is_dir():
                projection, text_params["projection"] = load(folder / TEXT_PROJECTION_DIRNAME)
            text_encoder = ProjectedTextEncoder(text_encoder, projection)
        else:
            tokenizer = load_tokenizer(folder / "tokenizer")
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        raw = json.loads(scheduler_file.read_text())
        return cls(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                   SchedulerConfig.from_dict(raw, source=str(scheduler_file)),
                   raw.get("_class_name", "DDIMScheduler"), raw)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes a diffusers `StableDiffusionPipeline` folder (loadable by diffusers unchanged)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_component(self.unet, self.unet_params, path / "unet")
        save_component(self.vae, self.vae_params, path / "vae")
        text_classes = self._save_text_encoder(path)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        (path / "scheduler").mkdir(exist_ok=True)
        write_json(path / "scheduler" / "scheduler_config.json", self.scheduler_file or
                   {"_class_name": self.scheduler_class, **self.scheduler.to_dict()})
        none = [None, None]
        write_json(path / "model_index.json", {
            "_class_name": "StableDiffusionInpaintPipeline" if self.is_inpainting_model else "StableDiffusionPipeline",
            "_diffusers_version": "0.36.0",
            "feature_extractor": none, "image_encoder": none, "safety_checker": none,
            "requires_safety_checker": False,
            "scheduler": ["diffusers", self.scheduler_class],
            **text_classes,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })

    def _save_text_encoder(self, path: Path) -> dict:
        """Writes text_encoder/ (and a BERT's text_projection/); returns their model_index.json entries."""
        if not isinstance(self.text_encoder, ProjectedTextEncoder):
            save_component(self.text_encoder, self.text_encoder_params, path / "text_encoder")
            return {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
        save_component(self.text_encoder.bert, self.text_encoder_params["bert"], path / "text_encoder")
        classes = {"text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"]}
        if self.text_encoder.projection is not None:
            save_component(self.text_encoder.projection, self.text_encoder_params["projection"],
                           path / TEXT_PROJECTION_DIRNAME)
            classes[TEXT_PROJECTION_DIRNAME] = ["cxr_ldm", "TextProjection"]
        return classes

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Merges a LoRA into the UNet params (and the text encoder's, where the file adapts it), in place:
        W += scale * (alpha / r) up @ down for each adapted layer, as diffusers' `load_lora_weights` followed by
        `fuse_lora(lora_scale=scale)`.

        Args:
          path: a LoRA .safetensors file or folder written by diffusers (`save_lora_weights`), PEFT
            (adapter_config.json + adapter_model.safetensors) or kohya-ss, or by train.py (<workdir>/adapter/).
          scale: the LoRA strength (0 leaves the model as it is).
        Raises:
          ValueError naming the file and what does not fit (format, modules the model lacks, shapes).
        """
        lora = adapters.read_lora(path)
        if "unet" in lora:
            self.unet_params = adapters.merge_lora(self.unet_params, lora["unet"], scale, source=f"{path} (unet)")
        if "text_encoder" in lora:
            self.text_encoder_params = adapters.merge_lora(self.text_encoder_params, lora["text_encoder"], scale,
                                                           source=f"{path} (text_encoder)")

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> None:
        """Adds textual-inversion tokens, in place: each to the tokenizer and its vectors as new rows of the text
        encoder's token table, as diffusers' `load_textual_inversion` does. An embedding of n > 1 vectors adds
        the tokens token, token_1, ..., token_{n-1}, and prompts that hold the token use all n.

        Args:
          path: learned_embeds.safetensors ({token: (n, D)} or {"emb_params": (n, D)}), or a folder holding it
            (or learned_embeds_<i>.safetensors, one per token, as train.py writes several).
          token: the token for the file's embedding (needed for "emb_params"; else it replaces the file's name).
        Raises:
          ValueError if a token is already in the tokenizer or the vectors' width is not the text encoder's.
        """
        for name, vectors in adapters.read_embeddings(path, token):
            self._add_tokens([name] + [f"{name}_{i}" for i in range(1, len(vectors))], vectors, source=str(path))

    def _add_tokens(self, tokens: list[str], rows: np.ndarray, source: str) -> None:
        """Appends `tokens` to the tokenizer and `rows` (len(tokens), D) to the token table (rows beyond the
        tokenizer's, which no prompt reaches, are dropped, as diffusers' resize does)."""
        flat = traverse_util.flatten_dict(self.text_encoder_params)
        table = np.asarray(flat[adapters.TOKEN_EMBEDDING_PATH])
        vocab = self.tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise ValueError(f"{source}: token(s) {taken} are already in the tokenizer; pass another token=")
        if rows.shape[1] != table.shape[1]:
            raise ValueError(f"{source}: embedding width {rows.shape[1]}, but the text encoder's tokens have "
                             f"{table.shape[1]}")
        first = len(self.tokenizer)
        if table.shape[0] < first:
            raise ValueError(f"the text encoder's token table has {table.shape[0]} rows for a tokenizer of {first}")
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(first, first + len(tokens))):
            raise ValueError(f"{source}: tokens {tokens} got ids {ids}; expected consecutive ids from {first}")
        flat[adapters.TOKEN_EMBEDDING_PATH] = np.concatenate([table[:first], rows.astype(table.dtype)])
        self.text_encoder_params = traverse_util.unflatten_dict(flat)
        self.text_encoder = self.text_encoder.clone(
            config=dataclasses.replace(self.text_encoder.config, vocab_size=first + len(tokens)))

    def prompt_truncation(self, prompt: str) -> tuple[str, int] | None:
        """None when the text encoder reads all of `prompt`; else (the start of `prompt` it reads, the tokens
        `prompt` takes, start and end tokens included). Prompts are cut to `prompt_length(self.tokenizer)`
        tokens; a multi-vector textual-inversion token counts, and is written in the kept part, as all its tokens."""
        kept, num_tokens = truncation(self.tokenizer, _expand_multi_vector_tokens(self.tokenizer, prompt))
        return (kept, num_tokens) if num_tokens > prompt_length(self.tokenizer) else None

    def _token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids (B, L) of `prompts`, a multi-vector textual-inversion token written out as all its tokens;
        warns (UserWarning) of each prompt longer than L tokens, with the part the text encoder reads."""
        for prompt in dict.fromkeys(prompts):
            cut = self.prompt_truncation(prompt)
            if cut:
                warnings.warn(f"prompt truncated to {prompt_length(self.tokenizer)} tokens (it has {cut[1]}); the "
                              f"text encoder reads only {cut[0]!r}", stacklevel=3)
        return tokenize(self.tokenizer, [_expand_multi_vector_tokens(self.tokenizer, p) for p in prompts])

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale

    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> text encoder states (B, L, D), L = `prompt_length(self.tokenizer)`."""
        ids = self._token_ids(prompts)
        return self.text_encoder.apply({"params": self.text_encoder_params}, jnp.asarray(ids))

    def __call__(self, prompts: str | Sequence[str], num_inference_steps: int = 50,
                 guidance_scale: float = 4.0, negative_prompt: str | Sequence[str] | None = None,
                 sampler: str = "ddim", eta: float = 0.0, seed: int | Sequence[int] = 0, latents: Any = None,
                 height: int | None = None, width: int | None = None, guidance_rescale: float = 0.0,
                 apg_eta: float | None = None, apg_norm_threshold: float = 0.0) -> np.ndarray:
        """Generates one image per prompt.

        Args:
          prompts: a prompt or a list of B prompts. One longer than the tokenizer's `prompt_length` is cut to
            it with a warning that shows the part kept (`prompt_truncation`).
          guidance_scale: classifier-free guidance scale; <= 1 disables guidance (one UNet pass).
          negative_prompt: the unconditional prompt(s); None means "".
          sampler: "ddim", "dpmpp_2m" or "ddpm".
          eta: DDIM noise (0 = deterministic).
          seed: image i starts from the noise of seed + i (or of seed[i] for a list), so an image is
            reproducible alone (its DDPM / eta > 0 sampler noise comes from its own seed too).
          latents: optional initial noise (B, h, w, C) (NHWC), e.g. to reproduce another run.
          guidance_rescale: diffusers' `guidance_rescale` (0 = off): blends the guided prediction with itself
            rescaled to the conditional prediction's standard deviation (`samplers.guided_denoise_fn`).
          apg_eta: None for classifier-free guidance as diffusers' pipeline does it; else adaptive projected
            guidance (`samplers.projected_guidance` on the x0 estimates): the part of the guidance update
            parallel to the conditional x0 is scaled by apg_eta (0 drops it), which keeps strong guidance from
            saturating the image. apg_norm_threshold > 0 also caps the update's L2 norm per image.
        Returns:
          float32 numpy (B, H, W, C) in [0, 1].
        """
        prompts, negative, seeds = self._batch(prompts, negative_prompt, seed)
        height, width = height or self.default_size(), width or self.default_size()
        if height % self.vae_scale or width % self.vae_scale:
            raise ValueError(f"height and width must be multiples of {self.vae_scale}, got {height}x{width}")
        if latents is None:
            latents = self.initial_latents(seeds, height, width)
        shape = (len(prompts), height // self.vae_scale, width // self.vae_scale, self.latent_channels)
        if tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape} (NHWC), got {np.shape(latents)}")
        return self._sample(prompts, negative, seeds, latents, num_inference_steps, guidance_scale, sampler, eta,
                            guidance_rescale, apg_eta, apg_norm_threshold)

    def img2img(self, images: Any, prompts: str | Sequence[str], strength: float = 0.6,
                num_inference_steps: int = 50, guidance_scale: float = 4.0,
                negative_prompt: str | Sequence[str] | None = None, sampler: str = "ddim", eta: float = 0.0,
                seed: int | Sequence[int] = 0, noise: Any = None, encode_noise: Any = None,
                guidance_rescale: float = 0.0, apg_eta: float | None = None,
                apg_norm_threshold: float = 0.0) -> np.ndarray:
        """Edits images towards prompts (SDEdit), as diffusers' `StableDiffusionImg2ImgPipeline`: the image's
        latents are noised to the level of step `num_inference_steps - int(num_inference_steps * strength)` and
        denoised from there with the prompt's guidance.

        Args:
          images: float (B, H, W, C) in [0, 1], C the VAE's channels (or 1: repeated), H and W multiples of
            `vae_scale`.
          prompts: a prompt or B prompts.
          strength: in (0, 1]: how much of the denoising runs (1 = from noise; small keeps the image).
          seed: image i's encoding and start noise come from seed + i (or seed[i]).
          noise: optional start noise (B, h, w, C_latent), h = H / vae_scale (diffusers' second draw).
          encode_noise: optional noise of the VAE posterior sample, same shape (diffusers' first draw).
          The other arguments are those of `__call__`.
        Returns:
          float32 numpy (B, H, W, C) in [0, 1].
        """
        start_step = samplers.img2img_start_step(num_inference_steps, strength)
        prompts, negative, seeds = self._batch(prompts, negative_prompt, seed)
        init = self.encode_images(images, seeds, encode_noise)
        if len(init) != len(prompts):
            raise ValueError(f"{len(init)} images for {len(prompts)} prompts")
        noise = self._noise_or_draw(noise, seeds, init.shape, stream=0)
        latents = samplers.add_noise(self.scheduler, init, noise, num_inference_steps, sampler, start_step)
        return self._sample(prompts, negative, seeds, latents, num_inference_steps, guidance_scale, sampler, eta,
                            guidance_rescale, apg_eta, apg_norm_threshold, start_step=start_step)

    def inpaint(self, images: Any, masks: Any, prompts: str | Sequence[str], strength: float = 1.0,
                num_inference_steps: int = 50, guidance_scale: float = 4.0,
                negative_prompt: str | Sequence[str] | None = None, sampler: str = "ddim", eta: float = 0.0,
                seed: int | Sequence[int] = 0, noise: Any = None, encode_noise: Any = None,
                masked_encode_noise: Any = None, guidance_rescale: float = 0.0, apg_eta: float | None = None,
                apg_norm_threshold: float = 0.0) -> np.ndarray:
        """Repaints the masked part of images from prompts, as diffusers' `StableDiffusionInpaintPipeline`.

        A text-to-image model inpaints by latent blending: after every step the latent cells outside the mask
        are replaced by the image's latents noised to the next step's level (`samplers.Known`). An inpainting
        checkpoint (a UNet of 2 * C_latent + 1 input channels) reads the mask and the masked image's latents
        beside the noisy latents instead. The mask is taken at latent size by nearest-neighbour sampling.

        Args:
          images: float (B, H, W, C) in [0, 1], as for `img2img`.
          masks: (B, H, W, 1), 1 = repaint, 0 = keep (values >= 0.5 count as 1, as diffusers binarizes).
          strength: in (0, 1]; 1 starts from pure noise, less from the image noised as in `img2img`.
          noise: optional start noise (B, h, w, C_latent), h = H / vae_scale, which also noises the known
            latents (diffusers' `latents` at strength 1).
          encode_noise: optional noise of the image's VAE posterior sample (unused by an inpainting
            checkpoint at strength 1); masked_encode_noise: that of the masked image's (inpainting
            checkpoints only). Each defaults to a draw from the image's seed.
          The other arguments are those of `__call__`.
        Returns:
          float32 numpy (B, H, W, C) in [0, 1].
        """
        start_step = samplers.img2img_start_step(num_inference_steps, strength)
        prompts, negative, seeds = self._batch(prompts, negative_prompt, seed)
        images, masks = np.asarray(images, np.float32), np.asarray(masks, np.float32)
        if masks.shape != (*images.shape[:3], 1):
            raise ValueError(f"masks must have shape {(*images.shape[:3], 1)} to match the images, got {masks.shape}")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        masks = (masks >= 0.5).astype(np.float32)
        latent_masks = jnp.asarray(masks[:, ::self.vae_scale, ::self.vae_scale])
        shape = (*latent_masks.shape[:3], self.vae.config.latent_channels)
        noise = self._noise_or_draw(noise, seeds, shape, stream=0)
        init = None
        if strength < 1.0 or not self.is_inpainting_model:
            init = self.encode_images(images, seeds, encode_noise)
        known = unet_extra = None
        if self.is_inpainting_model:
            masked = 0.5 + (images - 0.5) * (1.0 - masks)  # diffusers: image in [-1, 1] times (mask < 0.5)
            masked_latents = self._encode_images(masked, seeds, masked_encode_noise, stream=3)
            unet_extra = jnp.concatenate([latent_masks, masked_latents], axis=-1)
        else:
            known = samplers.Known(init, latent_masks, noise)
        latents = noise if strength == 1.0 else samplers.add_noise(self.scheduler, init, noise,
                                                                   num_inference_steps, sampler, start_step)
        return self._sample(prompts, negative, seeds, latents, num_inference_steps, guidance_scale, sampler, eta,
                            guidance_rescale, apg_eta, apg_norm_threshold, start_step=start_step, known=known,
                            unet_extra=unet_extra)

    def invert(self, images: Any, prompts: str | Sequence[str] | None = None, num_inference_steps: int = 50,
               seed: int | Sequence[int] = 0, encode_noise: Any = None) -> np.ndarray:
        """DDIM inversion (`samplers.ddim_inversion`, diffusers' `DDIMInverseScheduler`) of images to the noise
        latents from which `pipe(prompts, latents=..., guidance_scale=1, sampler="ddim")` with the same steps
        redraws them (up to the inversion's error, the VAE's reconstruction error and the decoder's clipping).

        Args:
          images: float (B, H, W, C) in [0, 1], as for `img2img`.
          prompts: the prompt(s) the model is conditioned on while inverting (no guidance); None means "".
          seed, encode_noise: the VAE posterior sample, as in `img2img` (zeros encode to the posterior mean).
        Returns:
          float32 numpy latents (B, H / vae_scale, W / vae_scale, C_latent).
        """
        if self.is_inpainting_model:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels (an inpainting model): "
                             "DDIM inversion needs a text-to-image model")
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, C) in [0, 1], got shape {images.shape}")
        prompts, _, seeds = self._batch([""] * len(images) if prompts is None else prompts, None, seed)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        latents = self.encode_images(images, seeds, encode_noise)
        ids = jnp.asarray(self._token_ids(prompts))
        return np.asarray(_invert(self, self.unet_params, self.text_encoder_params, ids, latents,
                                  num_inference_steps=num_inference_steps), np.float32)

    @property
    def is_inpainting_model(self) -> bool:
        """Whether the UNet reads a mask and masked-image latents beside the noisy latents (SD inpainting)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def encode_images(self, images: Any, seeds: Sequence[int], noise: Any = None) -> jax.Array:
        """float (B, H, W, C) images in [0, 1] -> scaled latents (B, H/f, W/f, C_latent): a sample of the VAE
        posterior, mean + std * noise, times the VAE's scaling factor (diffusers' `retrieve_latents` with a
        generator). noise: (B, h, w, C_latent), or None to draw image i's from seeds[i]."""
        return self._encode_images(images, seeds, noise, stream=2)

    def _encode_images(self, images: Any, seeds: Sequence[int], noise: Any, stream: int) -> jax.Array:
        """`encode_images`, drawing missing noise from `stream` of each seed (see `_noise_or_draw`)."""
        images = np.asarray(images, np.float32)
        channels = self.vae.config.in_channels
        if images.ndim != 4 or images.shape[-1] not in (1, channels):
            raise ValueError(f"images must be (B, H, W, {channels} or 1) in [0, 1], got shape {images.shape}")
        if images.shape[1] % self.vae_scale or images.shape[2] % self.vae_scale:
            raise ValueError(f"image height and width must be multiples of {self.vae_scale}, got "
                             f"{images.shape[1]}x{images.shape[2]}")
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        shape = (len(images), images.shape[1] // self.vae_scale, images.shape[2] // self.vae_scale,
                 self.vae.config.latent_channels)
        noise = self._noise_or_draw(noise, seeds, shape, stream=stream)
        images = jnp.repeat(images, channels, axis=-1) if images.shape[-1] != channels else jnp.asarray(images)
        return _encode(self, self.vae_params, images, noise)

    def _noise_or_draw(self, noise: Any, seeds: Sequence[int], shape: tuple, stream: int) -> jax.Array:
        """`noise` checked to be `shape`, or standard normal noise of that shape, image i's from
        fold_in(key(seeds[i]), stream) (stream 0: the key itself; 1 is the sampler's)."""
        if noise is None:
            keys = [jax.random.key(s) if stream == 0 else jax.random.fold_in(jax.random.key(s), stream) for s in seeds]
            return jnp.stack([jax.random.normal(k, shape[1:], jnp.float32) for k in keys])
        if tuple(np.shape(noise)) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)} (NHWC), got {np.shape(noise)}")
        return jnp.asarray(noise, jnp.float32)

    def _batch(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
               seed: int | Sequence[int]) -> tuple[list[str], list[str], list[int]]:
        """The B prompts, B negative prompts and B seeds of a call."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negative = [negative_prompt or ""] * len(prompts)
        elif len(negative_prompt) != len(prompts):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        else:
            negative = list(negative_prompt)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        return prompts, negative, seeds

    def _sample(self, prompts: list[str], negative: list[str], seeds: list[int], latents: Any,
                num_inference_steps: int, guidance_scale: float, sampler: str, eta: float, guidance_rescale: float,
                apg_eta: float | None, apg_norm_threshold: float, start_step: int = 0,
                known: samplers.Known | None = None, unet_extra: jax.Array | None = None) -> np.ndarray:
        """Denoises `latents` (B, h, w, C) from step `start_step` and decodes them: float32 numpy (B, H, W, C).
        known: latents to blend in (inpainting); unet_extra: (B, h, w, C_extra) channels appended to the UNet's
        input (an inpainting checkpoint's mask and masked-image latents)."""
        if unet_extra is None and self.is_inpainting_model:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels (an inpainting model): "
                             "use inpaint() with a mask")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if apg_eta is not None and not 0.0 <= apg_eta <= 1.0:
            raise ValueError(f"apg_eta must be None or in [0, 1], got {apg_eta}")
        if apg_norm_threshold < 0.0:
            raise ValueError(f"apg_norm_threshold must be >= 0, got {apg_norm_threshold}")
        noise_keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 1) for s in seeds])
        ids = self._token_ids(prompts)
        neg_ids = self._token_ids(negative)
        args = _shard_batch((jnp.asarray(ids), jnp.asarray(neg_ids), jnp.asarray(latents, jnp.float32)))
        use_cfg = guidance_scale > 1.0
        projection = jnp.float32([0.0 if apg_eta is None else apg_eta, apg_norm_threshold])
        images = _generate(self, self._params(), *args, noise_keys, jnp.float32(guidance_scale),
                           jnp.float32(guidance_rescale), projection, num_inference_steps=num_inference_steps,
                           use_cfg=use_cfg, use_rescale=use_cfg and guidance_rescale > 0.0,
                           use_projection=use_cfg and apg_eta is not None, sampler=sampler, eta=float(eta),
                           start_step=start_step, known=known, unet_extra=unet_extra)
        return np.asarray(images, dtype=np.float32)

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> np.ndarray:
        """Standard normal latents (B, height/f, width/f, C), one independent draw per seed."""
        shape = (height // self.vae_scale, width // self.vae_scale, self.latent_channels)
        return np.stack([np.asarray(jax.random.normal(jax.random.key(s), shape, jnp.float32)) for s in seeds])

    def _params(self) -> dict:
        return {"unet": self.unet_params, "vae": self.vae_params, "text": self.text_encoder_params}

    def __hash__(self) -> int:  # static argument of the jitted generator: modules + scheduler only
        return hash((self.unet, self.vae, self.text_encoder, self.scheduler))

    def __eq__(self, other) -> bool:
        return isinstance(other, Pipeline) and (self.unet, self.vae, self.text_encoder, self.scheduler) == (
            other.unet, other.vae, other.text_encoder, other.scheduler)


def _expand_multi_vector_tokens(tokenizer, prompt: str) -> str:
    """`prompt` with each added token t that has companions t_1, t_2, ... (a multi-vector textual inversion)
    written "t t_1 t_2 ..." (diffusers' `TextualInversionLoaderMixin.maybe_convert_prompt`)."""
    if not any(f"{token}_1" in tokenizer.added_tokens_encoder for token in tokenizer.added_tokens_encoder):
        return prompt  # nothing to expand; tokenizing a long prompt would only warn that it is long
    for token in set(tokenizer.tokenize(prompt)):
        if token in tokenizer.added_tokens_encoder:
            replacement, i = token, 1
            while f"{token}_{i}" in tokenizer.added_tokens_encoder:
                replacement, i = f"{replacement} {token}_{i}", i + 1
            prompt = prompt.replace(token, replacement)
    return prompt


def _shard_batch(arrays: tuple) -> tuple:
    """Shards the batch axis over local devices when it divides evenly; else leaves arrays as they are."""
    devices = jax.local_devices()
    if len(devices) == 1 or arrays[0].shape[0] % len(devices):
        return arrays
    sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))
    return tuple(jax.device_put(a, sharding) for a in arrays)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("num_inference_steps", "use_cfg", "use_rescale", "use_projection", "sampler",
                                    "eta", "start_step"))
def _generate(pipe: Pipeline, params: dict, ids: jax.Array, neg_ids: jax.Array, latents: jax.Array,
              noise_keys: jax.Array, guidance_scale: jax.Array, guidance_rescale: jax.Array,
              projection: jax.Array, *, num_inference_steps: int, use_cfg: bool, use_rescale: bool,
              use_projection: bool, sampler: str, eta: float, start_step: int, known: samplers.Known | None = None,
              unet_extra: jax.Array | None = None) -> jax.Array:
    """ids, neg_ids: int32 (B, L) token ids; latents: (B, h, w, C) at the noise level of step `start_step` ->
    images (B, H, W, C_img) in [0, 1]. known: latents blended in after each step (`samplers.Known`); unet_extra:
    (B, h, w, C_extra) appended to the UNet's input channels (both halves of a guided batch).

    Guidance runs (diffusers' rule) when `use_cfg` (guidance_scale > 1), its rescaling when `use_rescale`
    (guidance_rescale > 0 as well), adaptive projected guidance instead of the plain rule when `use_projection`
    (projection = float32 [eta, norm_threshold]); the values are traced, so changing them does not recompile."""
    encode = lambda x: pipe.text_encoder.apply({"params": params["text"]}, x)

    def unet(x: jax.Array, t: jax.Array, states: jax.Array) -> jax.Array:
        if unet_extra is not None:
            x = jnp.concatenate([x, jnp.tile(unet_extra, (x.shape[0] // unet_extra.shape[0], 1, 1, 1))], axis=-1)
        return pipe.unet.apply({"params": params["unet"]}, x, t, states)

    cond = encode(ids)
    uncond = encode(neg_ids) if use_cfg else None
    apg = samplers.ProjectedGuidance(projection[0], projection[1], pipe.scheduler) if use_projection else None
    denoise = samplers.guided_denoise_fn(unet, cond, uncond, guidance_scale,
                                         guidance_rescale if use_rescale else None, apg)
    noise = _sampler_noise(pipe.scheduler, noise_keys, latents, num_inference_steps, sampler, eta, start_step)
    latents = samplers.sample(denoise, latents, pipe.scheduler, num_inference_steps=num_inference_steps,
                              sampler=sampler, eta=eta, noise=noise, start_step=start_step, known=known)
    decoded = pipe.vae.apply({"params": params["vae"]}, latents / pipe.vae.config.scaling_factor,
                             method=pipe.vae.decode)
    return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _sampler_noise(scheduler: SchedulerConfig, keys: jax.Array, latents: jax.Array, num_inference_steps: int,
                   sampler: str, eta: float, start_step: int) -> jax.Array | None:
    """Per-image noise of the stochastic samplers (DDPM, DDIM with eta > 0), (S, B, h, w, C), image i's
    from keys[i] alone, so that an image does not depend on the batch it was drawn in."""
    if sampler != "ddpm" and not (sampler == "ddim" and eta > 0):
        return None
    steps = len(samplers.sampling_timesteps(scheduler, num_inference_steps, sampler, start_step))
    noise = jax.vmap(lambda key: jax.random.normal(key, (steps, *latents.shape[1:]), jnp.float32))(keys)
    return jnp.swapaxes(noise, 0, 1)


@functools.partial(jax.jit, static_argnums=0)
def _encode(pipe: Pipeline, vae_params: Any, images: jax.Array, noise: jax.Array) -> jax.Array:
    """images (B, H, W, C_vae) in [0, 1], noise (B, h, w, C_latent) -> scaled posterior samples (B, h, w, C_latent)."""
    mean, logvar = pipe.vae.apply({"params": vae_params}, images * 2.0 - 1.0, method=pipe.vae.encode)
    return (mean + jnp.exp(0.5 * logvar) * noise) * pipe.vae.config.scaling_factor


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num_inference_steps",))
def _invert(pipe: Pipeline, unet_params: Any, text_params: Any, ids: jax.Array, latents: jax.Array, *,
            num_inference_steps: int) -> jax.Array:
    """ids: int32 (B, L) token ids; latents: scaled clean latents (B, h, w, C) -> DDIM-inverted noise latents."""
    states = pipe.text_encoder.apply({"params": text_params}, ids)
    denoise = lambda x, t: pipe.unet.apply({"params": unet_params}, x, t, states)
    return samplers.ddim_inversion(denoise, latents, pipe.scheduler, num_inference_steps=num_inference_steps)
