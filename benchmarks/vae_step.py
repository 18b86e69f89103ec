"""Autoencoder train-step throughput: cxr_ldm (JAX, the autoencoder stage's step) vs diffusers' AutoencoderKL
(PyTorch), and where the JAX step's time goes.

Both sides run the default recipe's VAE step on the same images: encode, a posterior sample, decode, the
loss of `steps.make_autoencoder_loss_fn` (per-image sums of L1 + L2 + 4 x L1 on finite differences, plus
1e-6 x KL, averaged over the batch), global-norm clipping at 1.0 and AdamW (lr 2e-3, no weight decay).
The JAX side is also timed in parts, each compiled alone: the loss (forward), its value and gradient
(forward + backward), and the whole step (the optimizer update is the rest).

    python benchmarks/vae_step.py                      # the default VAE at 64 px, batch 8, CPU
    python benchmarks/vae_step.py --preset tiny --steps 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import seconds_per_call  # noqa: E402

from configs import default, tiny  # noqa: E402
from cxr_ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, dummy_inputs  # noqa: E402
from cxr_ldm.training import optimizer, sharding, state, steps  # noqa: E402

LOSS = steps.AutoencoderLossConfig(l1_weight=1.0, l2_weight=1.0, gradient_weight=4.0, kl_weight=1e-6)
PRESETS = {"default": default, "tiny": tiny}  # the autoencoder.model of these configs


def make_images(config: AutoencoderConfig, batch: int, seed: int = 0) -> np.ndarray:
    """(batch, side, side, in_channels) float32 images in [-1, 1]."""
    side = config.sample_size
    return np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, config.in_channels)).astype(np.float32)


def bench_jax(config: AutoencoderConfig, images: np.ndarray, steps_to_time: int, warmup: int) -> dict:
    """Seconds per call of the forward loss, its value and gradient, and the whole train step."""
    vae = AutoencoderKL(config)
    params = jax.jit(vae.init)(jax.random.PRNGKey(0), *dummy_inputs(config))["params"]
    tx = optimizer.make_optimizer(optimizer.OptimizerConfig(learning_rate=2e-3, schedule="constant",
                                                            weight_decay=0.0))
    mesh = sharding.make_mesh()
    train_state, shardings = state.init_train_state({"vae": params}, {}, tx, jax.random.PRNGKey(0), mesh)
    step = steps.make_autoencoder_train_step(vae, LOSS, tx, mesh, shardings)
    batch = sharding.global_batch_from_process({"image": images}, mesh)
    loss_fn = steps.make_autoencoder_loss_fn(vae, LOSS)
    rng = jax.random.PRNGKey(1)
    forward = jax.jit(lambda p: loss_fn(p, {}, batch, rng, 0)[0])
    backward = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, {}, batch, rng, 0)[0]))
    trainable = train_state.trainable
    start = time.perf_counter()
    compiled = step.lower(train_state, batch).compile()
    compile_s = time.perf_counter() - start
    result = {name: seconds_per_call(lambda p: (p, fn(p)), trainable, steps_to_time, warmup)[0]
              for name, fn in (("forward_s", forward), ("forward_backward_s", backward))}
    result["step_s"], metrics = seconds_per_call(lambda s: compiled(s, batch), train_state, steps_to_time, warmup)
    return {**result, "compile_s": compile_s, "loss": float(metrics["loss"])}


def torch_loss(model, x, sample_posterior: bool = True):
    """`LOSS` of diffusers AutoencoderKL `model` on NCHW images `x`, as `steps.make_autoencoder_loss_fn`."""
    import torch
    posterior = model.encode(x).latent_dist
    diff = model.decode(posterior.sample() if sample_posterior else posterior.mean).sample - x
    per_image = (LOSS.l1_weight * diff.abs() + LOSS.l2_weight * diff.square()).sum(dim=(1, 2, 3))
    for dim in (2, 3):
        per_image = per_image + LOSS.gradient_weight * torch.diff(diff, dim=dim).abs().sum(dim=(1, 2, 3))
    return per_image.mean() + LOSS.kl_weight * posterior.kl().mean()


def bench_torch(config: AutoencoderConfig, images: np.ndarray, steps_to_time: int, warmup: int) -> dict:
    """Seconds per step of the same step with diffusers' AutoencoderKL (default attention, float32)."""
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    model = TorchAutoencoderKL.from_config(config.to_dict()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def step():
        loss = torch_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps_to_time):
        loss = step()
    return {"step_s": (time.perf_counter() - start) / steps_to_time, "loss": loss.item()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--framework", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed calls of each part")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    model = PRESETS[args.preset].get_config().autoencoder.model.to_dict()
    config = AutoencoderConfig.from_dict(model)
    images = make_images(config, args.batch)
    device = jax.devices()[0]
    results = {"preset": args.preset, "batch": args.batch, "resolution": config.sample_size,
               "device": f"{device.platform}:{device.device_kind}"}
    if args.framework in ("both", "jax"):
        results["jax"] = bench_jax(config, images, args.steps, args.warmup)
    if args.framework in ("both", "torch"):
        results["torch"] = bench_torch(config, images, args.steps, args.warmup)
    if "jax" in results and "torch" in results:
        results["jax_over_torch"] = results["torch"]["step_s"] / results["jax"]["step_s"]

    print(f"VAE train step, preset {args.preset}, batch {args.batch}, {config.sample_size} px, {results['device']}")
    if "jax" in results:
        j = results["jax"]
        print(f"  jax   {j['step_s'] * 1e3:9.1f} ms/step  {args.batch / j['step_s']:8.2f} images/s  loss {j['loss']:.1f}"
              f"  compile {j['compile_s']:.1f} s")
        print(f"        forward {j['forward_s'] * 1e3:.1f} ms, forward + backward {j['forward_backward_s'] * 1e3:.1f} ms, "
              f"optimizer and the rest {(j['step_s'] - j['forward_backward_s']) * 1e3:.1f} ms")
    if "torch" in results:
        t = results["torch"]
        print(f"  torch {t['step_s'] * 1e3:9.1f} ms/step  {args.batch / t['step_s']:8.2f} images/s  loss {t['loss']:.1f}")
    if "jax_over_torch" in results:
        print(f"  throughput ratio jax / torch: {results['jax_over_torch']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
