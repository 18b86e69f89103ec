"""Text-to-image sampling time: cxr_ldm.Pipeline (JAX) against diffusers' StableDiffusionPipeline (PyTorch).

    python benchmarks/sampling.py                          # small config, batches 4 and 8, 50 DDIM steps
    python benchmarks/sampling.py --batch 4 --repeats 5 --threads 2 --json sampling.json
    python benchmarks/sampling.py --config tiny --steps 3 --batch 2 --repeats 1   # smoke run

Both sides load the same random diffusers pipeline folder (built here, saved to a temporary directory),
sample the same prompts from the same initial latents with DDIM and classifier-free guidance, and
return float images in [0, 1]. Each side's time covers tokenisation, text encoding, the whole sampling
loop and VAE decode. Reported per batch size:
  first_call_s  ours: tracing + XLA compile + one run; diffusers: the first (warm-up) run
  median_s      steady-state seconds per batch, median of --repeats runs (ours and diffusers alternate,
                so machine-load drift hits both alike)
  images_per_s  batch / median_s
  ratio         ours median_s / diffusers median_s (< 1: ours is faster)
  max_abs_diff  largest pixel difference between the two outputs (a sanity check, values in [0, 1])

Threads: XLA's CPU backend uses every core in the process's CPU affinity mask. `--threads N` pins the
process to N cores before JAX starts and calls torch.set_num_threads(N), so both sides use the same
cores; the default N is the number of cores available to the process. PyTorch's OpenMP threads
spin-wait by default, which on a machine with more runnable processes than cores makes a 2-thread
diffusers run up to ~100x slower; unless OMP_WAIT_POLICY is already set, it is set to PASSIVE here
(on a 2-core machine at load ~16, tiny config, 3 steps: 17 s with spinning, 0.2 s passive, 0.15 s
with 1 thread). Set OMP_WAIT_POLICY=ACTIVE yourself to measure the spinning default on an idle machine.
The machine's load average is recorded before and after, since a shared machine slows both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Model sizes. "small" is the benchmark's config; "tiny" is a quick smoke run; "sd15" is Stable Diffusion
# 1.5 (3-channel VAE with f=8, CLIP ViT-L/14 text encoder), which gpu.py uses.
CONFIGS = {
    "sd15": dict(
        unet_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, latent_size=64,
        vae_channels=(128, 256, 512, 512), text_hidden=768, text_layers=12, text_heads=12, layers_per_block=2,
        image_channels=3),
    "small": dict(
        unet_channels=(64, 128, 128), cross_attention_dim=128, attention_head_dim=8, latent_size=16,
        vae_channels=(32, 64, 64), text_hidden=128, text_layers=2, text_heads=4),
    "tiny": dict(
        unet_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4, latent_size=8,
        vae_channels=(32, 32), text_hidden=32, text_layers=1, text_heads=4),
}
PROMPTS = ("Moderate right pleural effusion.", "No acute cardiopulmonary process.",
           "Mild cardiomegaly with pulmonary edema.", "Left lower lobe consolidation.",
           "Small left apical pneumothorax.", "Endotracheal tube in place.",
           "Right upper lobe atelectasis.", "Enlarged cardiomediastinal silhouette.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[4, 8], help="batch sizes (images per call)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (> 1)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small", help="model sizes (see CONFIGS)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="cores for both JAX and PyTorch (default: all cores available to the process)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def pin_threads(threads: int | None) -> int:
    """Restricts the process to `threads` cores (before JAX starts) and returns the core count used."""
    available = sorted(os.sched_getaffinity(0))
    if threads is None:
        return len(available)
    if not 1 <= threads <= len(available):
        raise SystemExit(f"error: --threads must be in 1..{len(available)} (cores available), got {threads}")
    os.sched_setaffinity(0, available[:threads])
    return threads


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages from /proc/loadavg."""
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def build_diffusers_pipeline(sizes: dict):
    """A random StableDiffusionPipeline (by default a 1-channel VAE and one layer per block) with an SD 1.x
    DDIM scheduler."""
    import diffusers
    import torch
    import transformers

    from cxr_ldm.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    levels, layers = len(sizes["unet_channels"]), sizes.get("layers_per_block", 1)
    channels = sizes.get("image_channels", 1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=sizes["latent_size"], in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=sizes["unet_channels"], cross_attention_dim=sizes["cross_attention_dim"],
        attention_head_dim=sizes["attention_head_dim"], norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))
    vae_levels = len(sizes["vae_channels"])
    vae = diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=sizes["vae_channels"],
        layers_per_block=layers, norm_num_groups=32, sample_size=sizes["latent_size"] * 2 ** (vae_levels - 1),
        down_block_types=("DownEncoderBlock2D",) * vae_levels, up_block_types=("UpDecoderBlock2D",) * vae_levels)
    hidden = sizes["text_hidden"]
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=sizes["text_layers"],
        num_attention_heads=sizes["text_heads"], max_position_embeddings=77, projection_dim=hidden))
    with torch.no_grad():  # diffusers zero-initialises output layers; make every weight matter
        for model in (unet, vae, text_encoder):
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=load_tokenizer(), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_batch(ours, reference, batch: int, args: argparse.Namespace) -> dict:
    """Times both pipelines at one batch size; returns one result row."""
    import numpy as np
    import torch

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    size = ours.default_size()
    latents = ours.initial_latents(list(range(batch)), size, size)  # (B, h, w, 4) NHWC
    latents_nchw = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())

    def run_ours():
        return ours(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler="ddim",
                    latents=latents)

    def run_diffusers():
        with torch.no_grad():
            return reference(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                             latents=latents_nchw.clone(), output_type="np").images

    ours_images, ours_first = timed(run_ours)
    diffusers_images, diffusers_first = timed(run_diffusers)
    ours_times, diffusers_times = [], []
    for _ in range(args.repeats):
        ours_times.append(timed(run_ours)[1])
        diffusers_times.append(timed(run_diffusers)[1])
    ours_median, diffusers_median = statistics.median(ours_times), statistics.median(diffusers_times)
    return {
        "batch": batch, "image_size": size,
        "ours_first_call_s": ours_first, "diffusers_first_call_s": diffusers_first,
        "ours_median_s": ours_median, "diffusers_median_s": diffusers_median,
        "ours_images_per_s": batch / ours_median, "diffusers_images_per_s": batch / diffusers_median,
        "ratio": ours_median / diffusers_median,
        "max_abs_diff": float(np.abs(ours_images - diffusers_images).max()),
        "ours_times_s": ours_times, "diffusers_times_s": diffusers_times,
    }


def format_table(rows: list[dict]) -> str:
    header = ("batch", "ours first s", "diff. first s", "ours s/batch", "diff. s/batch", "ours img/s",
              "diff. img/s", "ours/diff.", "max |diff|")
    lines = [" | ".join(header)]
    for r in rows:
        lines.append(" | ".join([
            str(r["batch"]), f"{r['ours_first_call_s']:.2f}", f"{r['diffusers_first_call_s']:.2f}",
            f"{r['ours_median_s']:.3f}", f"{r['diffusers_median_s']:.3f}", f"{r['ours_images_per_s']:.2f}",
            f"{r['diffusers_images_per_s']:.2f}", f"{r['ratio']:.2f}", f"{r['max_abs_diff']:.1e}"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or min(args.batch) < 1:
        raise SystemExit("error: --steps, --repeats and --batch must be >= 1")
    if args.guidance <= 1.0:
        raise SystemExit(f"error: --guidance must be > 1 (classifier-free guidance on), got {args.guidance}")
    threads = pin_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP runtime starts
    import diffusers
    import jax
    import torch

    import cxr_ldm

    torch.set_num_threads(threads)
    load_before = load_average()
    sizes = CONFIGS[args.config]
    with tempfile.TemporaryDirectory() as folder:
        reference = build_diffusers_pipeline(sizes)
        reference.save_pretrained(folder)
        ours = cxr_ldm.Pipeline.from_pretrained(folder)
        rows = []
        for batch in args.batch:
            rows.append(bench_batch(ours, reference, batch, args))
            print(f"batch {batch}: ours {rows[-1]['ours_median_s']:.3f} s, "
                  f"diffusers {rows[-1]['diffusers_median_s']:.3f} s", flush=True)
    result = {
        "benchmark": "text-to-image sampling", "sampler": "ddim", "steps": args.steps,
        "guidance": args.guidance, "config": args.config, "sizes": sizes, "repeats": args.repeats,
        "threads": threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "jax_devices": [str(d) for d in jax.devices()],
        "cpu": platform.processor() or platform.machine(), "load_average_before": load_before,
        "load_average_after": load_average(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "rows": rows,
    }
    print(f"\n{args.steps} DDIM steps, guidance {args.guidance}, config {args.config}, {threads} threads "
          f"(OMP_WAIT_POLICY {result['omp_wait_policy']}), {result['jax_devices'][0]}; "
          f"load average before {load_before}, after {result['load_average_after']}")
    print(format_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
