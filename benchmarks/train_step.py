"""UNet train-step throughput: cxr_ldm (JAX, `make_train_step`) vs diffusers' UNet2DConditionModel (PyTorch).

Both sides run the same step on the same shapes: epsilon-MSE of the UNet on random noisy latents,
global-norm clipping at 1.0 and AdamW (lr 1e-4, weight decay 1e-2). Prints one table with images/s for
each framework and their ratio; on a GPU also the model FLOPs per step from XLA's cost analysis of the
step (the step lowered for CPU, see `step_flops`) and the MFU (achieved FLOP/s over the chip's dense
bf16 peak; with --remat the recomputed forward is counted too, so it is then a hardware-FLOPs
utilisation). `gpu.py` runs these functions over a batch sweep with an analytic FLOP count.

    python benchmarks/train_step.py                                   # small UNet, float32, CPU
    python benchmarks/train_step.py --preset sd15 --dtype bfloat16 --batch 8   # on a GPU
    python benchmarks/train_step.py --preset sd15 --dtype bfloat16 --remat dots_saveable --framework jax

bfloat16 means float32 params and bfloat16 compute on both sides (JAX: module dtype; PyTorch: autocast).
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

from configs import default  # noqa: E402
from cxr_ldm.models.layers import REMAT_POLICIES  # noqa: E402
from cxr_ldm.models.unet import UNet2DConditionModel, UNetConfig, dummy_inputs  # noqa: E402
from cxr_ldm.training import optimizer, sharding, state, steps  # noqa: E402


def _default_preset() -> tuple[UNetConfig, int, int]:
    """The UNet of configs/default.py with its latent size and prompt length on this backend (on CPU:
    16 x 16 latents, 48 tokens)."""
    c = default.get_config()
    return (UNetConfig.from_dict(c.ldm.unet.to_dict()), c.ldm.unet.sample_size,
            c.ldm.text_encoder.max_position_embeddings)


# (UNet config, latent size, text length) per preset; sd15 is runwayml/stable-diffusion-v1-5's UNet.
# "default" (the main job's UNet) is built when chosen: its config depends on the backend.
PRESETS = {
    "tiny": (UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                        cross_attention_dim=32, sample_size=16), 16, 16),
    "small": (UNetConfig(block_out_channels=(64, 128, 256), layers_per_block=2,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                         attention_head_dim=8, cross_attention_dim=256, sample_size=32), 32, 77),
    "sd15": (UNetConfig(cross_attention_dim=768, sample_size=64), 64, 77),
}
# Dense bf16 peak TFLOP/s of accelerators, by jax device_kind prefix (for MFU).
PEAK_TFLOPS = {"NVIDIA H100": 989.4, "NVIDIA H200": 989.4, "NVIDIA A100": 312.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v4": 275.0}


def make_inputs(config: UNetConfig, latent: int, text: int, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, latent, latent, config.in_channels), np.float32),
            "noise": rng.standard_normal((batch, latent, latent, config.out_channels), np.float32),
            "t": rng.integers(0, 1000, (batch,)).astype(np.int32),
            "context": rng.standard_normal((batch, text, config.cross_attention_dim), np.float32)}


def random_params(config: UNetConfig, seed: int = 0) -> dict:
    """N(0, 0.02^2) numpy params of the UNet's shapes (no initializer compiled)."""
    shapes = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.PRNGKey(0), *dummy_inputs(config))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: 0.02 * rng.standard_normal(s.shape, np.float32), shapes)


def bench_jax(config, inputs, dtype, remat, steps_to_time, warmup, count_flops=True, params=None,
              attention="auto", parts=False) -> dict:
    """Times make_train_step on `inputs`; remat: None (keep every activation) or a REMAT_POLICIES key.
    Returns step_s, compile_s, loss, xla_bytes (the executable's arguments + temporaries + outputs less the
    donated buffers), peak_bytes (the device's peak so far, where it reports one) and, with count_flops,
    flops (`step_flops`). params: `random_params(config)` unless given; attention: the UNet's attention_impl.
    With parts, also forward_s and forward_backward_s: the loss, and its value and gradient, each jitted alone."""
    module = UNet2DConditionModel(config, dtype=jnp.dtype(dtype), remat=remat is not None,
                                  remat_policy=remat or "full", attention_impl=attention)
    params = random_params(config) if params is None else params
    shapes = jax.eval_shape(lambda p: p, params)
    tx = optimizer.make_optimizer(optimizer.OptimizerConfig(learning_rate=1e-4, schedule="constant"))
    mesh = sharding.make_mesh()
    train_state, shardings = state.init_train_state({"unet": params}, {}, tx, jax.random.PRNGKey(0), mesh)
    step = steps.make_train_step(unet_loss_fn(module), tx, mesh, shardings)
    batch = sharding.global_batch_from_process(inputs, mesh)
    start = time.perf_counter()
    compiled = step.lower(train_state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    seconds, metrics = seconds_per_call(lambda s: compiled(s, batch), train_state, steps_to_time, warmup)
    stats = jax.devices()[0].memory_stats() or {}
    result = {"step_s": seconds, "compile_s": compile_s, "loss": float(metrics["loss"]),
              **(_part_seconds(module, params, batch, steps_to_time, warmup) if parts else {}),
              "xla_bytes": memory and (memory.argument_size_in_bytes + memory.temp_size_in_bytes
                                       + memory.output_size_in_bytes - memory.alias_size_in_bytes),
              "peak_bytes": stats.get("peak_bytes_in_use")}
    if count_flops:
        result["flops"] = step_flops(module, tx, shapes, inputs)
    return result


def seconds_per_call(fn, carry, steps_to_time: int, warmup: int):
    """(mean seconds per call, last output) of `carry, output = fn(carry)` called `steps_to_time` times after
    `warmup` calls, each timing ended by waiting for the output (JAX dispatches asynchronously)."""
    for _ in range(warmup):
        carry, out = fn(carry)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps_to_time):
        carry, out = fn(carry)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps_to_time, out


def _part_seconds(module, params, batch, steps_to_time, warmup) -> dict:
    """Seconds per call of the step's loss and of its value and gradient, each jitted alone."""
    loss = lambda p: unet_loss_fn(module)({"unet": p}, {}, batch, None, 0)[0]
    return {name: seconds_per_call(lambda p: (p, fn(p)), params, steps_to_time, warmup)[0]
            for name, fn in (("forward_s", jax.jit(loss)), ("forward_backward_s", jax.jit(jax.value_and_grad(loss))))}


def unet_loss_fn(module):
    """The benchmark's loss in make_train_step's form: epsilon MSE of the UNet on the batch."""
    def loss_fn(trainable, frozen, batch, rng, update_index):
        del frozen, rng, update_index
        prediction = module.apply({"params": trainable["unet"]}, batch["x"], batch["t"], batch["context"])
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - batch["noise"])), {}
    return loss_fn


def step_flops(module, tx, param_shapes, inputs) -> float:
    """FLOPs of one train step by XLA's cost analysis of the step lowered for one CPU device (abstract
    shapes, nothing allocated). On CPU convolutions and matmuls are still HLO ops that the analysis
    counts; after GPU compilation they are library calls that it does not. Attention is lowered as XLA's
    (a cuDNN or Pallas kernel is a custom call that the analysis does not see into)."""
    module = module.clone(attention_impl="xla")
    mesh = sharding.make_mesh(devices=jax.devices("cpu")[:1])
    abstract = jax.eval_shape(lambda p: state.create_train_state({"unet": p}, {}, tx, jax.random.PRNGKey(0)),
                              param_shapes)
    step = steps.make_train_step(unet_loss_fn(module), tx, mesh, state.train_state_shardings(abstract, mesh))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
    return float(step.lower(abstract, batch).cost_analysis()["flops"])


def bench_torch(config, inputs, dtype, remat, steps_to_time, warmup) -> dict:
    """Times the same step in PyTorch (diffusers' default SDPA attention, autocast for bfloat16); remat:
    gradient checkpointing. Returns step_s, loss and on CUDA peak_bytes (torch's allocator)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = TorchUNet.from_config(config.to_dict()).train()
    if remat:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    x = as_torch(inputs["x"].transpose(0, 3, 1, 2))
    noise = as_torch(inputs["noise"].transpose(0, 3, 1, 2))
    t, context = as_torch(inputs["t"]).long(), as_torch(inputs["context"])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            prediction = model(x, t, context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps_to_time):
        loss = step()
    sync()
    return {"step_s": (time.perf_counter() - start) / steps_to_time, "loss": loss.item(),
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted([*PRESETS, "default"]), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", choices=("none", *REMAT_POLICIES), default="none",
                        help="rematerialise blocks keeping this (PyTorch: gradient checkpointing)")
    parser.add_argument("--framework", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--parts", action="store_true",
                        help="also time the JAX forward and forward + backward alone (the optimizer is the rest)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    config, latent, text = _default_preset() if args.preset == "default" else PRESETS[args.preset]
    inputs = make_inputs(config, latent, text, args.batch)
    device = jax.devices()[0]
    results = {"preset": args.preset, "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
               "device": f"{device.platform}:{device.device_kind}"}
    timings = {}
    if args.framework in ("both", "jax"):
        remat = None if args.remat == "none" else args.remat
        timings["jax"] = bench_jax(config, inputs, args.dtype, remat, args.steps, args.warmup, parts=args.parts)
    if args.framework in ("both", "torch"):
        timings["torch"] = bench_torch(config, inputs, args.dtype, args.remat != "none", args.steps, args.warmup)
    for name, t in timings.items():
        t["images_per_s"] = args.batch / t["step_s"]
    if "jax" in timings:
        peak = next((v for k, v in PEAK_TFLOPS.items() if device.device_kind.startswith(k)), None)
        achieved = timings["jax"]["flops"] / timings["jax"]["step_s"] / 1e12
        timings["jax"].update(achieved_tflops=achieved, mfu=achieved / peak if peak else None)
    if len(timings) == 2:
        results["jax_over_torch"] = timings["jax"]["images_per_s"] / timings["torch"]["images_per_s"]
    results.update(timings)

    print(f"UNet train step, preset {args.preset}, batch {args.batch}, {args.dtype}, remat {args.remat}, "
          f"{results['device']}")
    for name, t in timings.items():
        extra = ""
        if name == "jax":
            extra = (f"  compile {t['compile_s']:.1f} s  {t['flops'] / 1e12:.3g} TFLOP/step  "
                     f"{t['achieved_tflops']:.3g} TFLOP/s")
        if t.get("mfu") is not None:
            extra += f"  MFU {100 * t['mfu']:.1f}%"
        print(f"  {name:5s} {t['step_s'] * 1e3:9.1f} ms/step  {t['images_per_s']:8.2f} images/s  "
              f"loss {t['loss']:.4f}{extra}")
        if "forward_s" in t:
            print(f"        forward {t['forward_s'] * 1e3:.1f} ms, forward + backward {t['forward_backward_s'] * 1e3:.1f} "
                  f"ms, optimizer and the rest {(t['step_s'] - t['forward_backward_s']) * 1e3:.1f} ms")
    if "jax_over_torch" in results:
        print(f"  throughput ratio jax / torch: {results['jax_over_torch']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
