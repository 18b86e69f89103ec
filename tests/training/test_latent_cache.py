"""Latent cache: the moments equal the VAE's encoding, the cached LDM loss equals the encoding one,
shards, reuse and invalidation of the files, and record indices from the input pipeline."""
import json
import os

import grain
import jax
import numpy as np
import pytest

from cxr_ldm.data import input_pipeline
from cxr_ldm.data.tokenizer import load_tokenizer
from cxr_ldm.training import latent_cache, steps
from helpers import training as common
from helpers.toy_data import NUM_EXAMPLES, builder, toy_image  # noqa: F401 (builder: the toy data set fixture)


@pytest.fixture(scope="module")
def vae():
    models = common.tiny_models()
    return models, common.tiny_params(models)["vae"]


def _encode(models, vae_params, builder, tmp_path, shard=grain.sharding.NoSharding(), **kw):
    return latent_cache.load_or_encode(models.vae, vae_params, builder, split="train", data_dir=None,
                                       cache_dir=str(tmp_path), batch_size=16, shard_options=shard, **kw)


def _example_index(builder, record: int) -> int:
    """The toy example (its label 0) stored as record `record` (TFDS shuffles examples when writing)."""
    return int(builder.as_data_source(split="train")[record]["labels"][0])


def test_moments_equal_the_vae_encoding_of_each_record(builder, vae, tmp_path):
    models, vae_params = vae
    cache = _encode(models, vae_params, builder, tmp_path)
    assert len(cache) == NUM_EXAMPLES
    records = np.array([0, 7, 39, 21])
    images = np.stack([input_pipeline.to_model_range(toy_image(_example_index(builder, r))) for r in records])
    mean, logvar = models.vae.apply({"params": vae_params}, images, method=models.vae.encode)
    np.testing.assert_allclose(cache.lookup(records), np.concatenate([mean, logvar], -1), atol=1e-5)


def test_cached_loss_equals_the_loss_that_encodes_images(vae):
    models, _ = vae
    params = common.tiny_params(models)
    ft = common.finetune.FinetuneConfig(mode="unet")
    trainable, frozen = common.finetune.split_params(ft, params, rng=jax.random.PRNGKey(0))
    batch = common.tiny_batch(0)
    mean, logvar = models.vae.apply({"params": params["vae"]}, batch["image"], method=models.vae.encode)
    cached = {"latent_moments": np.concatenate([mean, logvar], -1), "input_ids": batch["input_ids"]}
    loss_fn = jax.jit(steps.make_ldm_loss_fn(models, ft, steps.LDMLossConfig(latent_scale=0.7),
                                             common.alphas_cumprod()))
    rng = jax.random.PRNGKey(4)
    from_images, _ = loss_fn(trainable, frozen, batch, rng, 0)
    from_cache, _ = loss_fn(trainable, frozen, cached, rng, 0)
    other_rng, _ = loss_fn(trainable, frozen, cached, jax.random.PRNGKey(5), 0)
    np.testing.assert_allclose(float(from_cache), float(from_images), rtol=1e-5)
    assert abs(float(other_rng) - float(from_images)) > 1e-4


def test_each_shard_caches_its_records_and_refuses_others(builder, vae, tmp_path):
    models, vae_params = vae
    full = _encode(models, vae_params, builder, tmp_path / "full")
    second = _encode(models, vae_params, builder, tmp_path / "half",
                     shard=grain.sharding.ShardOptions(shard_index=1, shard_count=2, drop_remainder=True))
    assert (second.start, len(second)) == (NUM_EXAMPLES // 2, NUM_EXAMPLES // 2)
    np.testing.assert_allclose(second.lookup(np.array([20, 39])), full.lookup(np.array([20, 39])), atol=1e-6)
    with pytest.raises(IndexError, match="outside the records 20..39"):
        second.lookup(np.array([3]))


def test_cache_is_reused_for_the_same_vae_and_rebuilt_for_another(builder, vae, tmp_path):
    models, vae_params = vae
    first = _encode(models, vae_params, builder, tmp_path)
    path = first.where
    stamp = os.stat(path).st_mtime_ns
    again = _encode(models, vae_params, builder, tmp_path)
    assert os.stat(path).st_mtime_ns == stamp
    np.testing.assert_array_equal(again.lookup(np.arange(5)), first.lookup(np.arange(5)))
    other_params = common.tiny_params(models, seed=5)["vae"]
    rebuilt = _encode(models, other_params, builder, tmp_path)
    assert np.abs(rebuilt.lookup(np.arange(5)) - first.lookup(np.arange(5))).max() > 1e-3


def test_a_named_data_set_is_cached_under_its_version_and_another_version_is_encoded_again(
        builder, vae, tmp_path, monkeypatch):
    """A data set given by name ("phantom_cxr/64", as the LDM stage does) is keyed by its builder's full
    name, version included: a cache of an earlier version of the same data set is not reused."""
    models, vae_params = vae
    monkeypatch.setattr(latent_cache.builders, "prepare", lambda name, data_dir: builder)
    first = latent_cache.load_or_encode(models.vae, vae_params, "toy/default", split="train", data_dir="unused",
                                        cache_dir=str(tmp_path), batch_size=16,
                                        shard_options=grain.sharding.NoSharding())
    meta_path = first.where[:-len(".npy")] + ".json"
    with open(meta_path) as f:
        meta = json.load(f)
    assert meta["dataset"] == builder.info.full_name and str(builder.info.version) in meta["dataset"]
    meta["dataset"] = meta["dataset"].replace(str(builder.info.version), "0.9.0")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    stamp = os.stat(first.where).st_mtime_ns
    _encode(models, vae_params, builder, tmp_path)
    assert os.stat(first.where).st_mtime_ns != stamp


def test_train_batches_carry_record_indices_and_get_their_latents(builder, vae, tmp_path):
    models, vae_params = vae
    cache = _encode(models, vae_params, builder, tmp_path)
    iterator = input_pipeline.make_train_iterator(
        builder, split="train", data_dir=None, global_batch_size=8, tokenizer=load_tokenizer(), seed=1,
        shard_options=grain.sharding.NoSharding(),
        examples=input_pipeline.ExampleConfig(include_image=False, include_index=True))
    batch = next(iterator)
    assert "image" not in batch
    source = builder.as_data_source(split="train")
    np.testing.assert_array_equal(batch["labels"][:, 0], [source[int(i)]["labels"][0] for i in batch["index"]])
    with_latents = cache.batch_with_latents(batch)
    np.testing.assert_array_equal(with_latents["latent_moments"][2], cache.moments[int(batch["index"][2])])
    with pytest.raises(ValueError, match="include_image=False"):
        input_pipeline.ExampleConfig(augment=True, include_image=False)
