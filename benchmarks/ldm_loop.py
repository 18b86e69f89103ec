"""Where an LDM training step of `train.py`'s loop goes: the host's batch vs the jitted step.

Builds the LDM stage of configs/default.py (its models, state, jitted step and Grain batches, `ldm_stage.setup`)
on a workdir whose earlier stages are done, such as a finished `python train.py` run, and times per step, each
part alone, after two warm-up steps:

- host: the next batch of the input pipeline (decoded records, prompts tokenized) with its cached latents, put
  on the devices;
- step: the jitted step (frozen text encoder, noise, UNet forward and backward, AdamW, EMA) on one batch;
- loop: both in turn, waiting for each step's NaN flag as the loop's check does (one step late there).

    python benchmarks/ldm_loop.py --workdir W --data-dir D [--batch 8 16] [--steps 40] [--unet-channels 32 48 96]
        [--json out.json]

Nothing is trained or saved; a workdir without ldm/latent_cache gets one (the VAE's posterior of the training
images, as the stage writes it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from configs import default  # noqa: E402
from cxr_ldm.training import ldm_stage, sharding  # noqa: E402
from cxr_ldm.training.trainer import load_run_tokenizer  # noqa: E402


def time_loop(workdir: str, data_dir: str, batch: int, steps: int,
              unet_channels: tuple[int, ...] | None = None) -> dict:
    """Milliseconds per step of the host's batch, the jitted step and the two in turn, and the loop's images/s.
    unet_channels: the UNet's block_out_channels instead of the default's (a fresh UNet either way)."""
    config = default.get_config()
    config.data.data_dir, config.ldm.batch_size = data_dir, batch
    if unet_channels:
        config.ldm.unet.block_out_channels = tuple(unet_channels)
    mesh = sharding.make_mesh()
    stage = ldm_stage.setup(config, workdir, mesh, load_run_tokenizer(config))
    state, iterator = stage.state, stage.iterator

    def host_batch():
        local = stage.prepare_batch(next(iterator))
        return sharding.global_batch_from_process({k: local[k] for k in stage.batch_keys}, mesh)

    fixed = host_batch()
    for _ in range(2):
        state, metrics = stage.step_fn(state, fixed)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        last = host_batch()
    jax.block_until_ready(last)
    host = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = stage.step_fn(state, fixed)
    jax.block_until_ready((state, metrics))
    step = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = stage.step_fn(state, host_batch())
        int(metrics["nonfinite_streak"])
    loop = time.perf_counter() - start
    return {"batch": batch, "unet_channels": list(config.ldm.unet.block_out_channels), "host_ms": 1e3 * host / steps,
            "step_ms": 1e3 * step / steps, "loop_ms": 1e3 * loop / steps, "loop_images_per_s": batch * steps / loop}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a train.py workdir with autoencoder/ and text_pretrain/ done")
    parser.add_argument("--data-dir", required=True, help="the TFDS folder holding its phantom_cxr/64")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16], help="global batch sizes")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per part")
    parser.add_argument("--unet-channels", type=int, nargs="+", help="the UNet's block_out_channels (default: "
                        "the config's)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = [time_loop(args.workdir, args.data_dir, batch, args.steps, args.unet_channels) for batch in args.batch]
    unet = f", UNet channels {tuple(args.unet_channels)}" if args.unet_channels else ""
    print(f"LDM loop of configs/default.py{unet}, {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"  {'batch':>5} {'host ms':>8} {'step ms':>8} {'loop ms':>8} {'images/s':>9}")
    for row in rows:
        print(f"  {row['batch']:>5} {row['host_ms']:>8.1f} {row['step_ms']:>8.1f} {row['loop_ms']:>8.1f} "
              f"{row['loop_images_per_s']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
