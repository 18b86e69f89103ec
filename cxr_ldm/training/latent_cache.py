"""VAE posterior moments of the training images, computed once instead of at every LDM step.

The LDM stage's VAE is frozen, so the posterior q(z | x) of an un-augmented image never changes:
its mean and log-variance are encoded once per training record and the step draws the latent
sample from them (`steps.make_ldm_loss_fn` with batch["latent_moments"]), which is the same
distribution as encoding the image at every step, for a fraction of the cost (the VAE encoder at
full resolution costs about as much as the small UNet's forward pass).

Each process caches the records its Grain shard reads (consecutive record indices, see
`shard_range`) in <workdir>/ldm/latent_cache/: a float32 .npy file of shape
(num_records_in_shard, h, w, 2 * latent_channels) = [mean, logvar] and a JSON file naming the data
set (with its version), split, shard range and a fingerprint of the VAE weights. A cache written for other data or
another VAE is recomputed, never reused. The .npy file is memory-mapped, so a large data set's cache
lives on disk rather than in RAM (SD's VAE at 512 px: 128 KiB per image).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cxr_ldm.data import builders
from cxr_ldm.data.input_pipeline import data_source, to_model_range
from cxr_ldm.imaging import match_channels

CACHE_DIRNAME = "latent_cache"


def shard_range(num_records: int, shard_options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of the consecutive records a Grain IndexSampler gives this shard (drop_remainder)."""
    if shard_options.shard_count == 1:
        return 0, num_records
    if not shard_options.drop_remainder:
        raise ValueError("latent caching needs shard options with drop_remainder=True (equal shards)")
    per_shard = num_records // shard_options.shard_count
    return per_shard * shard_options.shard_index, per_shard * (shard_options.shard_index + 1)


def vae_fingerprint(vae_params: Any) -> str:
    """SHA-256 over the VAE weights' names, shapes, dtypes and bytes (host copies)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(vae_params), key=lambda kv: str(kv[0])):
        leaf = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


class LatentCache:
    """Posterior moments of records [start, end) of one split, looked up by record index."""

    def __init__(self, moments: np.ndarray, start: int, where: str):
        self.moments, self.start, self.where = moments, start, where

    def __len__(self) -> int:
        return len(self.moments)

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """float32 (b, h, w, 2c) [mean, logvar] of the records `indices` (int (b,), global record indices)."""
        local = np.asarray(indices, np.int64) - self.start
        if local.size and (local.min() < 0 or local.max() >= len(self.moments)):
            raise IndexError(f"record indices {int(indices.min())}..{int(indices.max())} are outside the "
                             f"records {self.start}..{self.start + len(self.moments) - 1} cached in {self.where}")
        return np.asarray(self.moments[local])

    def batch_with_latents(self, batch: dict) -> dict:
        """A pipeline batch with "index" -> the same batch with "latent_moments" added."""
        return {**batch, "latent_moments": self.lookup(batch["index"])}


def load_or_encode(vae, vae_params: Any, dataset, *, split: str, data_dir: str | None, cache_dir: str,
                   batch_size: int, shard_options: grain.sharding.ShardOptions | None = None) -> LatentCache:
    """The cache of this process's shard of `split`: read from `cache_dir` if it was written for the same
    data set and version, split, shard and VAE weights, else encoded now (in batches of `batch_size` over this
    process's devices) and written there atomically. `dataset`: "name/config" (prepared in data_dir if
    absent) or a TFDS builder."""
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    builder = builders.prepare(dataset, data_dir) if isinstance(dataset, str) else dataset
    source = data_source(builder, split)
    start, end = shard_range(len(source), shard_options)
    if end <= start:
        raise ValueError(f"{dataset} {split!r} has {len(source)} records: none for shard "
                         f"{shard_options.shard_index} of {shard_options.shard_count}")
    meta = {"dataset": builder.info.full_name, "split": split, "num_records": len(source), "start": start, "end": end,
            "vae_sha256": vae_fingerprint(vae_params), "format": "float32 [mean, logvar] on the last axis"}
    name = f"{split.replace('/', '_').replace(':', '_')}-shard{shard_options.shard_index}of{shard_options.shard_count}"
    array_path, meta_path = (os.path.join(cache_dir, name + ext) for ext in (".npy", ".json"))
    if os.path.exists(meta_path) and os.path.exists(array_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return LatentCache(np.load(array_path, mmap_mode="r"), start, array_path)
        print(f"latent cache {array_path} was written for other data or another VAE: encoding again",
              file=sys.stderr, flush=True)
    os.makedirs(cache_dir, exist_ok=True)
    _encode_to_file(vae, vae_params, source, start, end, batch_size, array_path + ".tmp.npy")
    os.replace(array_path + ".tmp.npy", array_path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    return LatentCache(np.load(array_path, mmap_mode="r"), start, array_path)


def _encode_to_file(vae, vae_params, source, start: int, end: int, batch_size: int, path: str) -> None:
    """Encodes records [start, end) of `source` into a new float32 .npy file at `path`."""
    local_mesh = Mesh(np.array(jax.local_devices()), ("batch",))
    batch_size = -(-batch_size // local_mesh.size) * local_mesh.size
    rows = NamedSharding(local_mesh, PartitionSpec("batch"))
    params = jax.device_put(vae_params, NamedSharding(local_mesh, PartitionSpec()))

    @jax.jit
    def moments(params, images):
        mean, logvar = vae.apply({"params": params}, match_channels(images, vae.config.in_channels),
                                 method=vae.encode)
        return jnp.concatenate([mean, logvar], axis=-1).astype(jnp.float32)

    out = None
    for first in range(start, end, batch_size):
        count = min(batch_size, end - first)
        images = np.stack([to_model_range(source[i]["image"]) for i in range(first, first + count)])
        padded = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
        result = np.asarray(moments(params, jax.device_put(padded, rows)))[:count]
        if out is None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(end - start, *result.shape[1:]))
        out[first - start:first - start + count] = result
    out.flush()
    del out
