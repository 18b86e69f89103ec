"""The accelerator figures in one run: SD 1.5 train-step sweep and 512 px sampling, ours vs diffusers.

    bash benchmarks/gpu.sh --out $OUT                 # a lent GPU: installs .whl/*.whl offline, then this
    python benchmarks/gpu.py --preset tiny --out /tmp/gpu   # dry run of the same code on the CPU (< 1 min)

Sections (random weights, nothing downloaded), each inside its time box in seconds (--budgets); an item
that would start after its box has closed is recorded as skipped, one already started runs to its end:
  train   the UNet train step of train_step.py (epsilon MSE, clipping, AdamW; bf16 compute with float32
          master weights and optimizer state, float32 in the tiny preset) per batch size: ours without
          remat, then with the remat policies in turn while it runs out of memory (and with XLA's
          attention if the stack refuses cuDNN's); diffusers (SDPA, bf16 autocast) without, then
          with gradient checkpointing. ms/step, images/s, MFU of the analytic FLOP count
          (cxr_ldm.models.unet_flops, checked once against XLA's cost analysis), peak memory, compile time.
  sample  50 DDIM steps with classifier-free guidance and VAE decode: cxr_ldm.Pipeline (bf16) vs diffusers'
          StableDiffusionPipeline (fp16 on CUDA, SDPA) loading the same random folder, from the same latents.
PyTorch runs first, in a child process, so that its memory is free before JAX takes its share. Building
and saving the random pipeline folder and loading it are outside the time boxes.
Writes OUT/<device>_<preset>.json and OUT/<device>_<preset>.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PRESETS = {
    "sd15": dict(train="sd15", dtype="bfloat16", train_batches=(8, 32, 16, 64), sampling="sd15",
                 sample_batches=(4, 1, 16), steps=50, timed_steps=5, warmup=2, repeats=2,
                 budgets={"torch_train": 35, "torch_sample": 45, "jax_train": 75, "jax_sample": 60}),
    "tiny": dict(train="tiny", dtype="float32", train_batches=(2, 4), sampling="tiny", sample_batches=(1, 2),
                 steps=3, timed_steps=2, warmup=1, repeats=1,
                 budgets={"torch_train": 20, "torch_sample": 20, "jax_train": 20, "jax_sample": 20}),
}
GUIDANCE = 7.5
REMAT_ORDER = (None, "dots_saveable", "full")  # tried in turn while a step runs out of memory


class TimeBox:
    """Seconds left of a section's budget."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def open(self) -> bool:
        return time.monotonic() < self.end


def out_of_memory(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


def sample_latents(batch: int, size: int):
    import numpy as np
    return np.random.default_rng(batch).standard_normal((batch, size, size, 4)).astype(np.float32)


def sample_prompts(batch: int) -> list[str]:
    from sampling import PROMPTS
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


# --- PyTorch (child process) ---------------------------------------------------------------------------

def torch_worker(job: dict) -> dict:
    """The diffusers half: train sweep, then sampling; builds and saves the pipeline folder for ours."""
    import numpy as np
    import torch

    import sampling
    import train_step

    preset = PRESETS[job["preset"]]
    cuda = torch.cuda.is_available()
    config, latent, text = train_step.PRESETS[preset["train"]]
    rows, box = [], TimeBox(preset["budgets"]["torch_train"])
    for batch in preset["train_batches"]:
        if not box.open():
            rows.append({"batch": batch, "skipped": "time box"})
            continue
        inputs = train_step.make_inputs(config, latent, text, batch)
        for remat in (False, True):
            try:
                result = train_step.bench_torch(config, inputs, preset["dtype"], remat, preset["timed_steps"],
                                                preset["warmup"])
                rows.append({"batch": batch, "remat": remat, **result})
                break
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"batch": batch, "remat": remat, "error": f"out of memory: {str(e)[:200]}"})
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()

    pipe = sampling.build_diffusers_pipeline(sampling.CONFIGS[preset["sampling"]])
    pipe.save_pretrained(job["folder"])
    dtype = torch.float16 if preset["dtype"] == "bfloat16" else torch.float32  # diffusers' usual half
    pipe = pipe.to("cuda" if cuda else "cpu", dtype)
    samples, images, box = [], {}, TimeBox(preset["budgets"]["torch_sample"])
    size = sampling.CONFIGS[preset["sampling"]]["latent_size"]
    for batch in preset["sample_batches"]:
        if not box.open():
            samples.append({"batch": batch, "skipped": "time box"})
            continue
        latents = torch.from_numpy(sample_latents(batch, size).transpose(0, 3, 1, 2).copy()).to(pipe.device, dtype)

        def run():
            with torch.no_grad():
                out = pipe(sample_prompts(batch), num_inference_steps=preset["steps"], guidance_scale=GUIDANCE,
                           latents=latents.clone(), output_type="np").images
            if cuda:
                torch.cuda.synchronize()
            return out

        first_images, first = sampling.timed(run)
        times = [sampling.timed(run)[1] for _ in range(preset["repeats"])]
        images[f"b{batch}"] = first_images[0]
        samples.append({"batch": batch, "first_call_s": first, "median_s": statistics.median(times),
                        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None})
    np.savez(job["images"], **images)
    return {"train": rows, "sample": samples, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


# --- JAX (this process) --------------------------------------------------------------------------------

def jax_train(preset: dict) -> tuple[list[dict], dict]:
    """Our train sweep and the analytic FLOP count against XLA's (at batch 1)."""
    import jax
    import jax.numpy as jnp

    import train_step
    from cxr_ldm.models import unet_flops
    from cxr_ldm.models.unet import UNet2DConditionModel
    from cxr_ldm.training import optimizer

    config, latent, text = train_step.PRESETS[preset["train"]]
    params = train_step.random_params(config)
    rows, box, attention = [], TimeBox(preset["budgets"]["jax_train"]), "auto"
    for batch in preset["train_batches"]:
        if not box.open():
            rows.append({"batch": batch, "skipped": "time box"})
            continue
        inputs = train_step.make_inputs(config, latent, text, batch)
        remats = list(REMAT_ORDER)
        while remats:
            attempt = {"batch": batch, "remat": remats[0] or "none", "attention": attention}
            try:
                rows.append({**attempt, **train_step.bench_jax(
                    config, inputs, preset["dtype"], remats[0], preset["timed_steps"], preset["warmup"],
                    count_flops=False, params=params, attention=attention)})
                break
            except Exception as e:  # noqa: BLE001 -- recorded; the next attempt changes what failed
                rows.append({**attempt, "error": str(e)[:300]})
                if out_of_memory(e):
                    remats.pop(0)
                elif attention == "auto":  # a kernel (cuDNN attention) that this stack does not take
                    attention = "xla"
                else:
                    break
            finally:
                gc.collect()
    module = UNet2DConditionModel(config, dtype=jnp.dtype(preset["dtype"]))
    tx = optimizer.make_optimizer(optimizer.OptimizerConfig(learning_rate=1e-4, schedule="constant"))
    analytic = unet_flops.train_step_flops(config, 1, latent, latent, text)
    try:
        xla = train_step.step_flops(module, tx, jax.eval_shape(lambda p: p, params),
                                    train_step.make_inputs(config, latent, text, 1))
    except Exception as e:  # noqa: BLE001 -- the analytic count stands alone then
        return rows, {"analytic_per_image": analytic, "xla_per_image": None, "xla_error": str(e)[:300]}
    return rows, {"analytic_per_image": analytic, "xla_per_image": xla, "analytic_over_xla": analytic / xla}


def jax_sample(preset: dict, folder: str, reference_images: dict) -> list[dict]:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import sampling
    from cxr_ldm import Pipeline

    dtype = jnp.dtype(preset["dtype"])
    pipe = Pipeline.from_pretrained(folder, dtype=dtype)
    cast = lambda tree: jax.device_put(jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree))
    pipe = dataclasses.replace(pipe, unet_params=cast(pipe.unet_params), vae_params=cast(pipe.vae_params),
                               text_encoder_params=cast(pipe.text_encoder_params))
    size = sampling.CONFIGS[preset["sampling"]]["latent_size"]
    rows, box = [], TimeBox(preset["budgets"]["jax_sample"])
    for batch in preset["sample_batches"]:
        if not box.open():
            rows.append({"batch": batch, "skipped": "time box"})
            continue
        latents = sample_latents(batch, size)
        run = lambda: pipe(sample_prompts(batch), num_inference_steps=preset["steps"], guidance_scale=GUIDANCE,
                           sampler="ddim", latents=latents)
        try:
            images, first = sampling.timed(run)
            times = [sampling.timed(run)[1] for _ in range(preset["repeats"])]
        except Exception as e:  # noqa: BLE001 -- recorded; a smaller batch may still run
            rows.append({"batch": batch, "error": str(e)[:300]})
            continue
        reference = reference_images.get(f"b{batch}")
        rows.append({"batch": batch, "first_call_s": first, "median_s": statistics.median(times),
                     "max_abs_diff": None if reference is None else float(np.abs(images[0] - reference).max())})
    return rows


# --- report --------------------------------------------------------------------------------------------

def merge(ours: list[dict], theirs: list[dict], per_image_flops: float | None, peak_tflops: float | None) -> list[dict]:
    """One row per batch: the successful (or last) attempt of each side with the failed ones before it,
    images/s, MFU, ratio."""
    def final(rows, batch):
        attempts = [r for r in rows if r["batch"] == batch]
        done = [r for r in attempts if "step_s" in r or "median_s" in r]
        return (done or attempts or [{}])[-1], [r for r in attempts if "error" in r]

    out = []
    for batch in dict.fromkeys(r["batch"] for r in ours + theirs):
        row = {"batch": batch}
        for side, rows in (("ours", ours), ("diffusers", theirs)):
            result, failed = final(rows, batch)
            seconds = result.get("step_s", result.get("median_s"))
            row[side] = {**result, "failed_attempts": failed,
                         "images_per_s": batch / seconds if seconds else None}
            if seconds and per_image_flops:
                achieved = per_image_flops * batch / seconds / 1e12
                row[side].update(achieved_tflops=achieved, mfu=achieved / peak_tflops if peak_tflops else None)
        a, b = row["ours"]["images_per_s"], row["diffusers"]["images_per_s"]
        row["ours_over_diffusers"] = a / b if a and b else None
        out.append(row)
    return sorted(out, key=lambda r: r["batch"])


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ms(side: dict) -> str:
    """Step milliseconds, or why there are none."""
    return _num(1e3 * side["step_s"], ".1f") if "step_s" in side else side.get("skipped", "failed")


def _gigabytes(side: dict) -> str:
    """Ours: the step executable's memory (XLA's analysis); diffusers: torch's peak allocation."""
    value = side.get("xla_bytes") or side.get("peak_bytes")
    return _num(value and value / 1e9, ".1f")


def markdown(result: dict) -> str:
    versions, flops = result["versions"], result["flops"]
    lines = [f"# {result['preset']} on {result['device']}", "",
             f"jax {versions['jax']}, torch {versions['torch']}, diffusers {versions['diffusers']}; compute dtype "
             f"{result['dtype']}; FLOPs per image and train step {flops['analytic_per_image']:.4g} (analytic, MFU) / "
             f"{_num(flops['xla_per_image'], '.4g')} (XLA cost analysis)", "",
             "| batch | ours ms | ours img/s | ours MFU | ours remat, attention | ours GB | compile s | diffusers ms | "
             "diffusers img/s | diffusers MFU | diffusers GB | ours / diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        o, d = r["ours"], r["diffusers"]
        lines.append(f"| {r['batch']} | {_ms(o)} | {_num(o['images_per_s'], '.2f')} | {_num(o.get('mfu'), '.1%')} | "
                     f"{o.get('remat', '-')}, {o.get('attention', '-')} | {_gigabytes(o)} | "
                     f"{_num(o.get('compile_s'), '.1f')} | {_ms(d)} | "
                     f"{_num(d['images_per_s'], '.2f')} | {_num(d.get('mfu'), '.1%')} | {_gigabytes(d)} | "
                     f"{_num(r['ours_over_diffusers'], '.2f')} |")
    lines += ["", f"Sampling: {result['sample_steps']} DDIM steps, guidance {GUIDANCE}, VAE decode included.", "",
              "| batch | ours s | ours img/s | ours first call s | diffusers s | diffusers img/s | "
              "ours / diffusers | max abs diff (image 0) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["sample"]:
        o, d = r["ours"], r["diffusers"]
        lines.append(f"| {r['batch']} | {_num(o.get('median_s'), '.3f')} | {_num(o['images_per_s'], '.2f')} | "
                     f"{_num(o.get('first_call_s'), '.1f')} | {_num(d.get('median_s'), '.3f')} | "
                     f"{_num(d['images_per_s'], '.2f')} | {_num(r['ours_over_diffusers'], '.2f')} | "
                     f"{_num(o.get('max_abs_diff'), '.2g')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--budgets", type=json.loads, default=None,
                        help='JSON seconds per section, e.g. \'{"jax_train": 200}\' (others keep the preset\'s)')
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cxr_ldm_jax_cache",
                        help="JAX's persistent compilation cache")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        job = json.loads(Path(args.torch_worker).read_text())
        PRESETS[job["preset"]]["budgets"].update(job["budgets"])
        Path(job["result"]).write_text(json.dumps(torch_worker(job)))
        return 0

    start = time.monotonic()
    if args.preset == "tiny":  # a dry run: compile fast, the timings mean nothing
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see sampling.py
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # JAX's share of GPU memory (default 0.75)
    preset = PRESETS[args.preset]
    preset["budgets"].update(args.budgets or {})
    with tempfile.TemporaryDirectory() as tmp:
        job = {"preset": args.preset, "budgets": preset["budgets"], "folder": f"{tmp}/pipeline",
               "images": f"{tmp}/images.npz", "result": f"{tmp}/torch.json"}
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        worker = subprocess.run([sys.executable, __file__, "--torch-worker", f"{tmp}/job.json"],
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})  # JAX there must not take GPU memory
        theirs = (json.loads(Path(job["result"]).read_text()) if worker.returncode == 0 else
                  {"train": [], "sample": [], "torch": None, "device": f"worker exit status {worker.returncode}"})

        import diffusers
        import jax
        import numpy as np

        jax.config.update("jax_compilation_cache_dir", str(args.cache))  # a rerun on the same machine skips compiles

        import train_step
        device = jax.devices()[0]
        peak = next((v for k, v in train_step.PEAK_TFLOPS.items() if device.device_kind.startswith(k)), None)
        train_rows, flops = jax_train(preset)
        images = dict(np.load(job["images"])) if Path(job["images"]).exists() else {}
        sample_rows = jax_sample(preset, job["folder"], images) if Path(job["folder"]).is_dir() else []
    result = {
        "preset": args.preset, "device": f"{device.platform}:{device.device_kind}", "torch_device": theirs["device"],
        "versions": {"jax": jax.__version__, "torch": theirs["torch"], "diffusers": diffusers.__version__},
        "dtype": preset["dtype"], "peak_tflops": peak, "budgets_s": preset["budgets"],
        "sample_steps": preset["steps"], "flops": flops,
        "train": merge(train_rows, theirs["train"], flops["analytic_per_image"], peak),
        "sample": merge(sample_rows, theirs["sample"], None, None),
        "wall_s": time.monotonic() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", device.device_kind).strip("_").lower() + f"_{args.preset}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / name}.json and .md in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
