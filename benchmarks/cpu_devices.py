"""How to use a CPU's cores for the main job's train step: one XLA CPU device (its intra-op thread pool) vs
several devices of one process (`--xla_force_host_platform_device_count`) with the batch split over the
mesh's `data` axis, with XLA's multithreaded Eigen on or off. Each setting runs in its own process (the XLA
flags are read once, at start-up), side by side in one invocation, and last the same step in PyTorch
(diffusers' UNet, all cores) as the reference; the table gives ms/step, images/s and the throughput ratio to
one device.

    python benchmarks/cpu_devices.py                      # the default UNet, batch 8, 1 and 2 devices
    python benchmarks/cpu_devices.py --preset tiny --steps 3 --devices 1,2,4

The step is `train_step.bench_jax` (`make_train_step`: epsilon MSE, AdamW, the mesh of every device).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _settings(devices: list[int]) -> list[tuple[str, str]]:
    """(name, XLA_FLAGS) per setting: each device count with Eigen's thread pool, and above one device also
    with one thread per device."""
    settings = []
    for n in devices:
        count = f"--xla_force_host_platform_device_count={n}"
        settings.append((f"{n} device{'s' * (n > 1)}", count))
        if n > 1:
            settings.append((f"{n} devices, 1 thread each", f"{count} --xla_cpu_multi_thread_eigen=false "
                                                            "intra_op_parallelism_threads=1"))
    return settings


def _child(preset: str, batch: int, steps: int, warmup: int, framework: str) -> None:
    """Runs in a child process: one timing (under the XLA_FLAGS it was started with); prints a JSON line."""
    sys.path.insert(0, str(HERE))
    import jax
    import train_step

    config, latent, text = (train_step._default_preset() if preset == "default" else train_step.PRESETS[preset])
    inputs = train_step.make_inputs(config, latent, text, batch)
    if framework == "torch":
        result = train_step.bench_torch(config, inputs, "float32", False, steps, warmup)
        print(json.dumps({"devices": 1, "step_s": result["step_s"], "compile_s": 0.0, "loss": result["loss"]}))
        return
    result = train_step.bench_jax(config, inputs, "float32", None, steps, warmup, count_flops=False)
    print(json.dumps({"devices": jax.device_count(), "step_s": result["step_s"], "compile_s": result["compile_s"],
                      "loss": result["loss"]}))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="a train_step.py preset")
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the devices)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--devices", default="1,2", help="comma-separated device counts")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.preset, args.batch, args.steps, args.warmup, args.child)
        return []
    counts = [int(n) for n in args.devices.split(",")]
    if any(args.batch % n for n in counts):
        parser.error(f"--batch {args.batch} must split evenly over {counts} devices")
    rows = []
    runs = [*((name, flags, "jax") for name, flags in _settings(counts)), ("PyTorch (diffusers)", "", "torch")]
    for name, flags, framework in runs:
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
               "JAX_PLATFORMS": "cpu", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        out = subprocess.run([sys.executable, __file__, "--child", framework, "--preset", args.preset, "--batch",
                              str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows.append({"setting": name, "xla_flags": flags, **json.loads(out.strip().splitlines()[-1])})
    base = rows[0]["step_s"]
    print(f"train step, preset {args.preset}, global batch {args.batch}, float32, {os.cpu_count()} CPU cores")
    print(f"  {'setting':28s} {'ms/step':>9s} {'images/s':>9s} {'vs 1 device':>12s} {'compile s':>10s}")
    for row in rows:
        row["images_per_s"] = args.batch / row["step_s"]
        row["speedup"] = base / row["step_s"]
        print(f"  {row['setting']:28s} {row['step_s'] * 1e3:9.1f} {row['images_per_s']:9.1f} "
              f"{row['speedup']:11.2f}x {row['compile_s']:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
