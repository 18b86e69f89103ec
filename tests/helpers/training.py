"""Tiny real models and a few-step LDM run shared by the training tests (also run as a subprocess
worker, e.g. with 8 simulated CPU devices: `python tests/helpers/training.py '{"data": 4, ...}'`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np

from cxr_ldm.diffusion.schedules import SchedulerConfig, compute_alphas_cumprod
from cxr_ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from cxr_ldm.models.text_encoder import CLIPTextConfig, CLIPTextModel
from cxr_ldm.models.unet import UNet2DConditionModel, UNetConfig
from cxr_ldm.training import finetune, optimizer, sharding, state, steps

VOCAB, SEQ, IMAGE = 64, 8, 16
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_models(levels: int = 1) -> steps.LDMModels:
    """Real UNet / VAE / CLIP at the smallest sizes that keep every layer type: a cross-attention UNet
    with block_out_channels (32,) (levels=1) or (32, 64) on 16x16x4 latents, a VAE with downsampling
    factor 2 ** (levels - 1) for 1-channel images, a 2-layer CLIP text encoder with a 64-token vocabulary."""
    down = ("CrossAttnDownBlock2D", "DownBlock2D")[:levels]
    up = ("UpBlock2D", "CrossAttnUpBlock2D")[-levels:] if levels == 2 else ("CrossAttnUpBlock2D",)
    unet = UNetConfig(sample_size=16, block_out_channels=(32, 64)[:levels], layers_per_block=1, norm_num_groups=8,
                      down_block_types=down, up_block_types=up, attention_head_dim=8, cross_attention_dim=32)
    vae = AutoencoderConfig(in_channels=1, out_channels=1, block_out_channels=(32,) * levels, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, sample_size=16 * 2 ** (levels - 1))
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=SEQ, projection_dim=32)
    return steps.LDMModels(UNet2DConditionModel(unet), CLIPTextModel(text), AutoencoderKL(vae))


def random_params(module, *args, seed: int = 0) -> dict:
    """numpy params of `module.init(rng, *args)`'s shapes: kernels/embeddings N(0, 0.05^2), norm scales
    1, biases 0 (random values from numpy: compiling the Flax init is slow on CPU)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def one(path, s):
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(s.shape, np.float32)
        if name == "bias":
            return np.zeros(s.shape, np.float32)
        return (0.05 * rng.standard_normal(s.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, shapes)


def tiny_params(models: steps.LDMModels, seed: int = 0) -> dict:
    from cxr_ldm.models import autoencoder, text_encoder, unet
    return {"unet": random_params(models.unet, *unet.dummy_inputs(models.unet.config), seed=seed),
            "text_encoder": random_params(models.text_encoder,
                                          *text_encoder.dummy_inputs(models.text_encoder.config), seed=seed + 1),
            "vae": random_params(models.vae, *autoencoder.dummy_inputs(models.vae.config), seed=seed + 2)}


def noisy_regression(width: int = 3, total_steps: int = 10):
    """(state, jitted step) of a small model whose step uses everything a real one does: rng draws, AdamW +
    warmup/cosine, EMA, frozen params, the NaN/Inf guard. Batches: `numbered_batches`."""
    def loss_fn(trainable, frozen, batch, rng, update_index):
        del update_index
        x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
        return jnp.mean((jnp.tanh(x @ trainable["w"]) @ frozen["v"] - batch["y"]) ** 2), {}
    config = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=total_steps)
    tx = optimizer.make_optimizer(config)
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    trainable = {"w": rng.standard_normal((4, width)).astype(np.float32)}
    frozen = {"v": rng.standard_normal((width, 2)).astype(np.float32)}
    st, shardings = state.init_train_state(trainable, frozen, tx, jax.random.PRNGKey(1), mesh, use_ema=True)
    step = steps.make_train_step(loss_fn, tx, mesh, shardings, ema_decay=0.9,
                                 learning_rate_fn=optimizer.learning_rate_schedule(config))
    return st, step


def numbered_batches(nan_from: int | None = None):
    """A Grain iterator of numbered batches {"x": (4, 4), "y": (4, 2)} (NaN from batch `nan_from` on, if
    given); its position is checkpointable."""
    def make(i):
        rng = np.random.default_rng(int(i))
        batch = {"x": rng.standard_normal((4, 4)).astype(np.float32),
                 "y": rng.standard_normal((4, 2)).astype(np.float32)}
        if nan_from is not None and i >= nan_from:
            batch["x"][:] = np.nan
        return batch
    return iter(grain.MapDataset.range(100).map(make).to_iter_dataset())


def tiny_batch(index: int, batch_size: int = 8) -> dict:
    """A deterministic global batch: images in [-1, 1] (B, 16, 16, 1), token ids (B, 8)."""
    rng = np.random.default_rng(1000 + index)
    return {"image": rng.uniform(-1, 1, (batch_size, IMAGE, IMAGE, 1)).astype(np.float32),
            "input_ids": rng.integers(0, VOCAB, (batch_size, SEQ)).astype(np.int32)}


def alphas_cumprod():
    return compute_alphas_cumprod(SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012))


def build(mode: str = "unet", data: int | None = None, fsdp: int = 1, num_devices: int | None = None,
          ema: bool = True, grad_accum_steps: int = 1, learning_rate: float = 1e-3, seed: int = 0,
          train_token_embedding: bool = True, trained_token_ids: tuple[int, ...] | None = None):
    """(models, finetune config, mesh, state, state_shardings, step) for a tiny LDM run on the first
    `num_devices` devices (all by default)."""
    models = tiny_models()
    ft = finetune.FinetuneConfig(mode=mode, lora_rank=2, lora_alpha=4.0, lora_text_encoder=True,
                                 train_token_embedding=train_token_embedding, trained_token_ids=trained_token_ids)
    params = tiny_params(models, seed)
    init_ids = [3, 5] if mode == "textual_inversion" else None
    if init_ids:
        models = steps.LDMModels(models.unet, finetune.with_vocab_size(models.text_encoder, VOCAB + 2), models.vae)
    trainable, frozen = finetune.split_params(ft, params, rng=jax.random.PRNGKey(7), init_token_ids=init_ids)
    opt_config = optimizer.OptimizerConfig(learning_rate=learning_rate, warmup_steps=2, total_steps=20)
    tx = optimizer.make_optimizer(opt_config)
    mesh = sharding.make_mesh(data, fsdp, jax.devices()[:num_devices])
    train_state, shardings = state.init_train_state(trainable, frozen, tx, jax.random.PRNGKey(seed), mesh,
                                                    use_ema=ema, min_fsdp_size=256)
    step = steps.make_ldm_train_step(models, ft, steps.LDMLossConfig(), alphas_cumprod(), tx, mesh, shardings,
                                     grad_accum_steps=grad_accum_steps, ema_decay=0.99 if ema else None,
                                     learning_rate_fn=optimizer.learning_rate_schedule(opt_config))
    return models, ft, mesh, train_state, shardings, step


def run_steps(num_steps: int, **build_options) -> dict:
    """Losses of `num_steps` steps and the final trainable params (numpy), from any process count."""
    _, _, mesh, train_state, _, step = build(**build_options)
    losses = []
    for i in range(num_steps):
        batch = tiny_batch(i)
        rows = sharding.process_batch_rows(mesh, len(batch["image"]))
        local = {k: v[rows] for k, v in batch.items()}
        train_state, metrics = step(train_state, sharding.global_batch_from_process(local, mesh))
        losses.append(float(metrics["loss"]))
    from jax.experimental import multihost_utils
    trainable = multihost_utils.process_allgather(train_state.trainable, tiled=True)
    return {"losses": losses, "trainable": jax.tree_util.tree_map(np.asarray, trainable)}


def run_train_py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py *args` from the repository root on the CPU, its output captured."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def run_worker(runs: list[dict], workdir: str, devices: int = 8, distributed: dict | None = None) -> tuple:
    """Starts `run_steps(**options)` for each options dict of `runs` in a fresh Python with `devices`
    simulated CPU devices (optionally as one process of a jax.distributed job). Its results (losses,
    flattened trainable leaves) and log go to files in `workdir` (pipes could fill up and block it)."""
    name = f"worker{distributed['process_id'] if distributed else ''}_{len(os.listdir(workdir))}"
    result_path, log_path = os.path.join(workdir, name + ".json"), os.path.join(workdir, name + ".log")
    cmd = [sys.executable, os.path.abspath(__file__),
           json.dumps({"runs": runs, "distributed": distributed, "out": result_path})]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, result_path, log_path


def worker_results(worker: tuple, timeout: float = 900) -> list[dict]:
    process, result_path, log_path = worker
    if process.wait(timeout=timeout):
        with open(log_path) as log:
            raise RuntimeError(f"worker failed ({process.returncode}):\n{log.read()[-4000:]}")
    with open(result_path) as f:
        return json.load(f)


def _worker_main(job: dict) -> None:
    distributed = job["distributed"]
    if distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=distributed["address"],
                                   num_processes=distributed["num_processes"], process_id=distributed["process_id"])
    results = []
    for options in job["runs"]:
        result = run_steps(**options)
        results.append({"losses": result["losses"], "devices": jax.device_count(),
                        "leaves": [leaf.ravel().tolist() for leaf in jax.tree_util.tree_leaves(result["trainable"])]})
    if jax.process_index() == 0 or distributed:
        with open(job["out"], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
