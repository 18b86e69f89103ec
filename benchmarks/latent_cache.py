"""LDM train step with the VAE encoder in it vs on cached posterior moments (`config.ldm.cache_latents`).

Builds the default config's LDM stage models (UNet, CLIP text encoder, VAE) from random weights and
times the jitted `make_ldm_train_step` (UNet + text encoder trained, AdamW, EMA) on the same batch
twice: with "image" (the step encodes it) and with "latent_moments" (what the cache feeds). Reports
seconds per step (best of --repeats rounds of --steps steps, the two variants interleaved so load
changes hit both), images/s, the speedup, and XLA's FLOPs per step of each.

    python benchmarks/latent_cache.py [--batch 16] [--steps 5] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from configs import default  # noqa: E402
from cxr_ldm.diffusion.schedules import SchedulerConfig, compute_alphas_cumprod  # noqa: E402
from cxr_ldm.models import autoencoder, text_encoder, unet  # noqa: E402
from cxr_ldm.training import finetune, optimizer, sharding, state, steps  # noqa: E402


def build(config, batch_size: int):
    """(jitted step, initial state, {"image": batch, "cached": batch}) at the config's sizes."""
    c = config.ldm
    models = steps.LDMModels(
        unet.UNet2DConditionModel(unet.UNetConfig.from_dict(c.unet.to_dict())),
        text_encoder.CLIPTextModel(text_encoder.CLIPTextConfig.from_dict({"vocab_size": 49408,
                                                                          **c.text_encoder.to_dict()})),
        autoencoder.AutoencoderKL(autoencoder.AutoencoderConfig.from_dict(config.autoencoder.model.to_dict())))
    rng = jax.random.PRNGKey(0)
    params = {name: jax.jit(module.init)(rng, *dummy(module.config))["params"] for name, module, dummy in (
        ("unet", models.unet, unet.dummy_inputs), ("text_encoder", models.text_encoder, text_encoder.dummy_inputs),
        ("vae", models.vae, autoencoder.dummy_inputs))}
    mode = finetune.FinetuneConfig(mode="unet+text_encoder")
    trainable, frozen = finetune.split_params(mode, params, rng=rng)
    tx = optimizer.make_optimizer(optimizer.OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000))
    mesh = sharding.make_mesh(None, 1)
    train_state, shardings = state.init_train_state(trainable, frozen, tx, rng, mesh, use_ema=True)
    alphas = compute_alphas_cumprod(SchedulerConfig.from_dict(c.scheduler.to_dict()))
    step = steps.make_ldm_train_step(models, mode, steps.LDMLossConfig(), alphas, tx, mesh, shardings,
                                     ema_decay=c.ema_decay)
    data = np.random.default_rng(0)
    size, latent = config.data.resolution, c.unet.sample_size
    ids = data.integers(0, 49408, (batch_size, 77)).astype(np.int32)
    batches = {"image": {"image": data.uniform(-1, 1, (batch_size, size, size, 1)).astype(np.float32),
                         "input_ids": ids},
               "cached": {"latent_moments": data.normal(size=(batch_size, latent, latent,
                                                              2 * c.unet.in_channels)).astype(np.float32),
                          "input_ids": ids}}
    return step, train_state, batches


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    step, train_state, batches = build(default.get_config(), args.batch)
    results = {}
    for name, batch in batches.items():
        cost = step.lower(train_state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        start = time.perf_counter()
        train_state, metrics = step(train_state, batch)
        jax.block_until_ready(metrics)
        results[name] = {"compile_s": round(time.perf_counter() - start, 1), "gflop_per_step": cost["flops"] / 1e9,
                         "rounds_s": []}
    for _ in range(args.repeats):
        for name, batch in batches.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                train_state, metrics = step(train_state, batch)
            jax.block_until_ready(metrics)
            results[name]["rounds_s"].append((time.perf_counter() - start) / args.steps)
    for r in results.values():
        r["s_per_step"] = min(r.pop("rounds_s"))
        r["images_per_s"] = args.batch / r["s_per_step"]
    summary = {"batch": args.batch, "backend": jax.default_backend(), "loadavg": os.getloadavg(), **results,
               "speedup_cached": results["image"]["s_per_step"] / results["cached"]["s_per_step"]}
    print(f"{'step':<8}{'s/step':>9}{'images/s':>10}{'GFLOP/step':>12}")
    for name in ("image", "cached"):
        r = results[name]
        print(f"{name:<8}{r['s_per_step']:>9.3f}{r['images_per_s']:>10.1f}{r['gflop_per_step']:>12.1f}")
    print(f"cached latents: {summary['speedup_cached']:.2f}x the steps per second (load {summary['loadavg']})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
