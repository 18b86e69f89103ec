"""Full-size Stable Diffusion UNets: parameter counts, and one forward pass timed against diffusers.

Builds the SD 1.5 and SD 2.1 UNet architectures from the configs below (random weights, nothing is
downloaded), checks that the Flax model and diffusers' PyTorch model have the published parameter
counts, converts the PyTorch model's state dict into Flax params, runs both on the same 64x64 latents
and prints a table of timings and output differences.

    python benchmarks/full_size_unet.py                          # both models, float32 and bfloat16
    python benchmarks/full_size_unet.py --counts-only             # parameter counts only (no weights)
    python benchmarks/full_size_unet.py --models sd15 --dtypes bfloat16 --batch 2 --iters 20

On GPU both sides run on the GPU; float32 rows use full float32 matmuls on both sides (no TF32), so
their error column measures conversion fidelity; bfloat16 rows measure speed.

Measured on one NVIDIA H200 (jax 0.11.2, flax 0.12.10, torch 2.11.0+cu130, diffusers 0.42.1; batch 2,
64x64 latents, 77 text tokens; median of 5 forward passes; diffusers eager with its default SDPA attention):

    model  dtype     attention  ours ms  diffusers ms  max|err| (max|ref|)
    sd15   float32   xla           74.4          72.3  4.9e-06 (1.6)
    sd15   bfloat16  xla           14.7          34.4  2.5e-02 (1.6)
    sd15   bfloat16  cudnn         10.5          34.4  3.1e-02 (1.6)
    sd21   float32   xla           70.8          67.8  4.7e-06 (2.1)
    sd21   bfloat16  xla           12.9          25.8  2.5e-02 (2.1)
    sd21   bfloat16  cudnn         10.0          25.8  2.5e-02 (2.1)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr_ldm.io import convert  # noqa: E402
from cxr_ldm.models.unet import UNet2DConditionModel, UNetConfig, dummy_inputs  # noqa: E402

_SD_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
SD15_UNET = {**_SD_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}
SD21_UNET = {**_SD_COMMON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
             "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
             "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default",
             "class_embed_type": None}
MODELS = {"sd15": SD15_UNET, "sd21": SD21_UNET}
# Published parameter counts of the two UNets.
EXPECTED_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724}
TEXT_LENGTH = 77


def flax_param_count(config: dict) -> int:
    """Parameters of the Flax UNet for a diffusers config dict, from shapes only (jax.eval_shape)."""
    cfg = UNetConfig.from_dict(config, source="benchmark config")
    module = UNet2DConditionModel(cfg)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(cfg)))["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def diffusers_param_count(config: dict) -> int:
    """Parameters of diffusers' UNet2DConditionModel for the config, built on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device("meta"):
        model = TorchUNet.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _timed(fn, iters: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `iters` further calls); fn blocks until done."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_model(name: str, variants: list[tuple[str, str | None]], batch: int, latent: int, iters: int) -> list[dict]:
    """Times a random diffusers UNet and its conversion on the same inputs; one result row per variant.

    Args:
      variants: (dtype name, jax attention implementation) pairs; diffusers runs once per dtype.
    PyTorch runs first and its model is freed before the Flax params are made, so at most two copies
    of the weights are alive at once.
    """
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    diffusers.utils.logging.set_verbosity_error()  # model.to(bfloat16) warns about modules kept in fp32: none here
    config = MODELS[name]
    cfg = UNetConfig.from_dict(config, source=name)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, latent, latent, cfg.in_channels)).astype(np.float32)
    context = rng.standard_normal((batch, TEXT_LENGTH, cfg.cross_attention_dim)).astype(np.float32)
    timesteps = rng.integers(0, 1000, batch).astype(np.int32)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device(device):
        model = TorchUNet.from_config(config).eval()
    state = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
    reference = {}  # dtype name -> (first-call seconds, median seconds, output NHWC float32)
    for dtype_name in dict.fromkeys(d for d, _ in variants):  # float32 before bfloat16: .to() casts in place
        model = model.to(getattr(torch, dtype_name))
        tx = torch.from_numpy(sample.transpose(0, 3, 1, 2)).to(device, getattr(torch, dtype_name))
        tc = torch.from_numpy(context).to(device, getattr(torch, dtype_name))
        tt = torch.from_numpy(timesteps).to(device)

        def torch_forward():
            with torch.inference_mode():
                out = model(tx, tt, tc).sample
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        first, step = _timed(torch_forward, iters)
        reference[dtype_name] = (first, step, torch_forward().float().cpu().numpy().transpose(0, 2, 3, 1))
    del model, tx, tc, tt
    if device == "cuda":
        torch.cuda.empty_cache()

    module = UNet2DConditionModel(cfg)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(cfg)))["params"]
    params32 = jax.device_put(convert.state_dict_to_params(state, abstract, source=name))
    del state
    rows = []
    for dtype_name, impl in variants:
        dtype = jnp.dtype(dtype_name)
        module = UNet2DConditionModel(cfg, dtype=dtype, param_dtype=dtype, attention_impl=impl)
        params = jax.tree.map(lambda p: p.astype(dtype), params32)
        x, c, t = (jax.device_put(a) for a in (sample.astype(dtype), context.astype(dtype), timesteps))
        forward = jax.jit(module.apply)
        with jax.default_matmul_precision("highest" if dtype_name == "float32" else "default"):
            first, step = _timed(lambda: forward({"params": params}, x, t, c).block_until_ready(), iters)
            ours = np.asarray(forward({"params": params}, x, t, c), np.float32)
        del params
        torch_first, torch_step, ref = reference[dtype_name]
        rows.append({"model": name, "dtype": dtype_name, "attention": impl or "xla",
                     "device": str(jax.devices()[0].device_kind), "batch": batch, "latent": latent,
                     "ours_compile_s": first, "ours_ms": 1e3 * step, "diffusers_first_s": torch_first,
                     "diffusers_ms": 1e3 * torch_step, "max_abs_err": float(np.abs(ours - ref).max()),
                     "max_abs_ref": float(np.abs(ref).max())})
        _print_row(rows[-1])
    return rows


_HEADER = (f"{'model':6} {'dtype':9} {'attention':9} {'device':20} {'batch':>5} {'latent':>6} {'compile s':>9} "
           f"{'ours ms':>9} {'diffusers ms':>12} {'speedup':>7} {'max|err|':>9} {'max|ref|':>9}")


def _print_row(r: dict) -> None:
    print(f"{r['model']:6} {r['dtype']:9} {r['attention']:9} {r['device'][:20]:20} {r['batch']:>5} {r['latent']:>6} "
          f"{r['ours_compile_s']:>9.1f} {r['ours_ms']:>9.1f} {r['diffusers_ms']:>12.1f} "
          f"{r['diffusers_ms'] / r['ours_ms']:>7.2f} {r['max_abs_err']:>9.2e} {r['max_abs_ref']:>9.2e}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2, help="latents per forward pass (2 = one CFG pair)")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width")
    parser.add_argument("--iters", type=int, default=10, help="timed forward passes after the first")
    parser.add_argument("--attention", nargs="+", choices=("xla", "cudnn"), default=["xla"],
                        help="jax.nn.dot_product_attention implementations to time (cudnn: GPU, bfloat16 only)")
    parser.add_argument("--counts-only", action="store_true", help="check parameter counts and stop")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    ok = True
    print(f"{'model':6} {'params (ours)':>15} {'params (diffusers)':>19} {'expected':>13}")
    counts = {}
    for name in args.models:
        ours, theirs = flax_param_count(MODELS[name]), diffusers_param_count(MODELS[name])
        counts[name] = {"ours": ours, "diffusers": theirs, "expected": EXPECTED_PARAMS[name]}
        ok &= ours == theirs == EXPECTED_PARAMS[name]
        print(f"{name:6} {ours:>15,} {theirs:>19,} {EXPECTED_PARAMS[name]:>13,}", flush=True)

    rows = []
    if not args.counts_only:
        variants = [(d, a) for d in args.dtypes for a in args.attention if not (a == "cudnn" and d == "float32")]
        print("\n" + _HEADER, flush=True)
        for name in args.models:
            rows.extend(run_model(name, variants, args.batch, args.latent, args.iters))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "forward": rows}, indent=2) + "\n")
    if not ok:
        print("parameter counts differ from the published ones", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
