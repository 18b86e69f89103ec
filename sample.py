"""Generate chest X-rays from report-style prompts with a trained or downloaded checkpoint.

    python sample.py --checkpoint workdir --prompt "Moderate left pleural effusion." --num-images 4
    python sample.py --checkpoint sd-folder --prompts-file prompts.txt --sampler dpmpp_2m --steps 25 --grid
    python sample.py --checkpoint sd-fp16-folder --variant fp16 --prompt "Mild cardiomegaly."
    python sample.py --checkpoint workdir --init-image film.png --strength 0.6 --prompt "Mild cardiomegaly."
    python sample.py --checkpoint workdir --init-image film.png --mask mask.png --prompt "Left pneumothorax."
    python sample.py --checkpoint workdir --init-image film.png --invert --guidance 1 --prompt "Normal chest."

Writes <out>/<prompt index>_<seed>.png (8- or 16-bit grayscale for 1-channel models) with the prompt,
what the text encoder read of it (prompt_used: the start of a prompt longer than its window, with truncated
true), seed, sampler, steps, guidance (its rescale, and the projected-guidance settings when used) and checkpoint
in PNG text chunks and in a JSON sidecar next to it. With --init-image the images are edits of that file
(img2img, or with --mask inpainting of its white part; the files' paths and --strength are recorded too), or
with --invert images drawn from its DDIM inversion under each prompt (guidance 1 redraws the file).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
from tqdm import tqdm

from cxr_ldm.cli_types import number, positive_int, strength
from cxr_ldm.diffusion.samplers import img2img_start_step
from cxr_ldm.io.compilation_cache import NO_CACHE_HELP, enable_compilation_cache
from cxr_ldm.io.images import make_grid, read_image, save_png
from cxr_ldm.io.weights import PickleRefusedError
from cxr_ldm.pipeline import SAMPLERS, Pipeline


def _fail(message: str) -> NoReturn:
    """Stops on a bad input file, as argparse stops on a bad argument: one error line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="diffusers StableDiffusionPipeline folder or a train.py workdir")
    p.add_argument("--variant", default=None,
                   help="weight variant of the checkpoint's components, e.g. fp16 for *.fp16.safetensors")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read components whose only weights are .bin pickles; only for files you trust")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--guidance", type=number(1.0, note=" (1 = no guidance)"), default=4.0,
                   help="classifier-free guidance scale, >= 1 (1 = no guidance)")
    p.add_argument("--guidance-rescale", type=number(0.0, 1.0), default=0.0,
                   help="diffusers' guidance_rescale in [0, 1] (0 = off), for zero-terminal-SNR models")
    p.add_argument("--apg-eta", type=number(0.0, 1.0), default=None,
                   help="adaptive projected guidance: weight in [0, 1] of the guidance update's part parallel to "
                        "the conditional prediction, 0 against saturation at strong guidance (default: plain "
                        "classifier-free guidance)")
    p.add_argument("--apg-norm-threshold", type=number(0.0), default=0.0,
                   help="with --apg-eta: cap on the guidance update's L2 norm per image (0 = none)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=number(0.0, 1.0), default=0.0, help="DDIM noise in [0, 1] (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i uses seed + i * num_images + j")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--size", type=positive_int, default=None,
                   help="height = width in pixels, a multiple of the VAE's downsampling factor (default: the model's)")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth for grayscale")
    p.add_argument("--grid", action="store_true", help="also write grid.png, a labelled contact sheet")
    p.add_argument("--out", default="samples")
    p.add_argument("--init-image", default=None,
                   help="a grayscale or RGB image file to edit (img2img); its size is the output's")
    p.add_argument("--strength", type=strength, default=None,
                   help="with --init-image: the part of the denoising that runs, in (0, 1] (default 0.6; "
                        "small keeps more of the image; 1 with --mask)")
    p.add_argument("--mask", default=None,
                   help="with --init-image: a black-and-white image file of the same size; white = repaint "
                        "(inpainting), black = keep")
    p.add_argument("--invert", action="store_true",
                   help="with --init-image: DDIM-invert it under each prompt over --steps, then sample from the "
                        "inverted latents (--guidance 1 redraws the image; more pushes it towards the prompt)")
    p.add_argument("--no-compilation-cache", action="store_true", help=NO_CACHE_HELP)
    args = p.parse_args(argv)
    for flag, value in (("--strength", args.strength), ("--mask", args.mask)):
        if args.init_image is None and value is not None:
            p.error(f"{flag} needs --init-image")
    if args.invert and args.init_image is None:
        p.error("--invert needs --init-image")
    if args.invert and (args.mask is not None or args.strength is not None):
        p.error("--invert takes neither --mask nor --strength: it redraws the whole image from its inversion")
    if args.init_image is not None and args.size is not None:
        p.error("--size does not apply with --init-image: the image's size is the output's")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"error: --prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt or --prompts-file")
    return prompts


def _prompt_read(pipe: Pipeline, prompt: str) -> dict:
    """What the text encoder reads of `prompt`: all of it, or its start when it is longer than the encoder's
    window (the pipeline warns then too)."""
    cut = pipe.prompt_truncation(prompt)
    return {"prompt_used": cut[0] if cut else prompt, "truncated": cut is not None}


def read_init_image(args: argparse.Namespace) -> np.ndarray | None:
    """The --init-image file as float32 (H, W, 1 or 3) in [0, 1], or None without one."""
    if args.init_image is None:
        return None
    try:
        return read_image(args.init_image)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"--init-image {e}")


def read_mask(args: argparse.Namespace, init: np.ndarray | None) -> np.ndarray | None:
    """The --mask file as float32 (H, W, 1) in {0, 1} (1 = repaint), the init image's size, or None."""
    if args.mask is None:
        return None
    try:
        mask = read_image(args.mask)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"--mask {e}")
    if mask.shape[:2] != init.shape[:2]:
        _fail(f"--mask {args.mask} is {mask.shape[1]}x{mask.shape[0]} pixels, the --init-image "
              f"{args.init_image} {init.shape[1]}x{init.shape[0]}: expected the same size")
    levels = np.unique(mask)
    if not np.isin(levels, (0.0, 1.0)).all() or np.ptp(mask, axis=-1).any():
        _fail(f"--mask {args.mask} is not binary: expected black (keep) and white (repaint) pixels only, "
              f"found {len(levels)} levels")
    return mask[..., :1]


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    init = read_init_image(args)
    mask = read_mask(args, init)
    strength = args.strength if args.strength is not None else 0.6 if mask is None else 1.0
    enable_compilation_cache(not args.no_compilation_cache)
    try:
        pipe = Pipeline.from_pretrained(args.checkpoint, variant=args.variant, allow_pickle=args.allow_pickle)
    except PickleRefusedError as e:
        raise SystemExit(f"error: cannot load checkpoint {args.checkpoint}: {e.with_hint('--allow-pickle')}") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"error: cannot load checkpoint {args.checkpoint}: {e}") from None
    if args.size is not None and args.size % pipe.vae_scale:
        raise SystemExit(f"error: --size {args.size}: expected a multiple of {pipe.vae_scale}, the downsampling "
                         f"factor of {args.checkpoint}'s VAE")
    if args.steps > pipe.scheduler.num_train_timesteps:
        raise SystemExit(f"error: --steps {args.steps}: expected at most the {pipe.scheduler.num_train_timesteps} "
                         f"training timesteps of {args.checkpoint}")
    if init is not None:
        init = _fit_init_image(init, pipe, args, strength)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    read = {prompt: _prompt_read(pipe, prompt) for prompt in prompts}
    jobs = [(i, prompt, args.seed + i * args.num_images + j)
            for i, prompt in enumerate(prompts) for j in range(args.num_images)]
    bits = args.bits if pipe.vae.config.out_channels == 1 else 8
    images, labels = [], []
    start = time.perf_counter()
    for b in tqdm(range(0, len(jobs), args.batch_size), desc="sampling", unit="batch"):
        batch = jobs[b:b + args.batch_size]
        settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance,
                        guidance_rescale=args.guidance_rescale, apg_eta=args.apg_eta,
                        apg_norm_threshold=args.apg_norm_threshold, negative_prompt=args.negative_prompt,
                        sampler=args.sampler, eta=args.eta, seed=[s for _, _, s in batch])
        batch_prompts = [p for _, p, _ in batch]
        if init is None:
            generated = pipe(batch_prompts, height=args.size, width=args.size, **settings)
        elif args.invert:
            inverted = pipe.invert(np.repeat(init[None], len(batch), axis=0), batch_prompts,
                                   num_inference_steps=args.steps, seed=settings["seed"])
            generated = pipe(batch_prompts, latents=inverted, **settings)
        elif mask is not None:
            generated = pipe.inpaint(np.repeat(init[None], len(batch), axis=0),
                                     np.repeat(mask[None], len(batch), axis=0), batch_prompts, strength=strength,
                                     **settings)
        else:
            generated = pipe.img2img(np.repeat(init[None], len(batch), axis=0), batch_prompts, strength=strength,
                                     **settings)
        for (index, prompt, seed), image in zip(batch, generated):
            meta = {"prompt": prompt, **read[prompt], "negative_prompt": args.negative_prompt or "", "seed": seed,
                    "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
                    "guidance_rescale": args.guidance_rescale, "eta": args.eta,
                    "checkpoint": str(Path(args.checkpoint).resolve())}
            if args.apg_eta is not None:
                meta.update(apg_eta=args.apg_eta, apg_norm_threshold=args.apg_norm_threshold)
            if init is not None:
                meta["init_image"] = str(Path(args.init_image).resolve())
                if args.invert:
                    meta["invert"] = True
                else:
                    meta["strength"] = strength
            if mask is not None:
                meta.update(mask=str(Path(args.mask).resolve()))
            stem = out / f"{index:04d}_{seed}"
            save_png(stem.with_suffix(".png"), image, bits=bits, metadata=meta)
            stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
            if args.grid:
                images.append(image)
                labels.append(f"{prompt} [seed {seed}]")
    elapsed = time.perf_counter() - start
    if args.grid:
        save_png(out / "grid.png", make_grid(np.stack(images), labels, ncols=args.num_images))
    print(f"wrote {len(jobs)} images to {out} in {elapsed:.1f} s ({len(jobs) / elapsed:.2f} images/s)")
    return 0


def _fit_init_image(init: np.ndarray, pipe: Pipeline, args: argparse.Namespace, strength: float) -> np.ndarray:
    """The init image (H, W, C) checked against the model and the settings; RGB averaged to gray for a
    1-channel model."""
    height, width = init.shape[:2]
    if height % pipe.vae_scale or width % pipe.vae_scale:
        _fail(f"--init-image {args.init_image} is {width}x{height} pixels: expected sides that are multiples of "
              f"{pipe.vae_scale}, the downsampling factor of {args.checkpoint}'s VAE")
    try:
        if not args.invert:
            img2img_start_step(args.steps, strength)
    except ValueError as e:
        _fail(f"--strength {strength} with --steps {args.steps}: {e}")
    if init.shape[-1] == 3 and pipe.vae.config.in_channels == 1:
        return init.mean(axis=-1, keepdims=True)
    return init


if __name__ == "__main__":
    sys.exit(main())
