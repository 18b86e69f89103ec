"""The "text_pretrain" stage: section-pair batches, the matching loss, training, and the LDM stage starting
from its result (its exact resume after a preemption: tests/training/test_trainer.py)."""
from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_ldm.data.builders import common
from cxr_ldm.data.input_pipeline import FindingsPrompts, data_source
from cxr_ldm.data.report_pairs import finding_group, make_report_pair_iterator
from cxr_ldm.data.tokenizer import load_tokenizer
from cxr_ldm.io.components import load_component, save_component
from cxr_ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from cxr_ldm.models.autoencoder import dummy_inputs as vae_dummy_inputs
from cxr_ldm.training import ldm_stage, trainer
from cxr_ldm.training import text_pretrain_stage as stage
from cxr_ldm.training.sharding import make_mesh
from configs import tiny


def _config(data_dir, **text_pretrain):
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    config.stages = ("text_pretrain",)
    config.text_pretrain.update(text_pretrain)
    config.update(log_every=5, checkpoint_every=1000)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    trainer.prepare_data(_config(path))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _reference_loss(a, b, groups, scale):
    """Symmetric InfoNCE written out row by row, same-group non-partners removed from each softmax."""
    logits = a @ b.T * np.exp(scale)
    losses, hits = [], []
    for matrix in (logits, logits.T):
        for i, row in enumerate(matrix):
            keep = [j for j in range(len(row)) if j == i or groups[j] != groups[i]]
            losses.append(-(row[i] - np.log(np.sum(np.exp(row[keep])))))
            hits.append(groups[keep[int(np.argmax(row[keep]))]] == groups[i])
    return np.mean(losses), np.mean(hits)


def test_matching_loss_matches_a_row_by_row_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 6, 5))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    groups = np.array([0, 1, 0, 2, 3, 1])
    loss, accuracy = stage.section_matching_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(groups), jnp.log(5.0))
    expected_loss, expected_accuracy = _reference_loss(a, b, groups, np.log(5.0))
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    assert float(accuracy) == pytest.approx(expected_accuracy)
    # Without the groups every pair would be the others' negative: a different (higher) loss.
    alone = stage.section_matching_loss(jnp.asarray(a), jnp.asarray(b), jnp.arange(6), jnp.log(5.0))[0]
    np.testing.assert_allclose(float(alone), _reference_loss(a, b, np.arange(6), np.log(5.0))[0], rtol=1e-5)
    assert float(alone) > float(loss)


def test_finding_groups_join_studies_that_show_the_same_and_part_other_sides_and_grades():
    normal_negated = np.array([-2] * 14)
    normal_negated[[1, 9, 10]] = 0  # "No pleural effusion or pneumothorax. Heart size normal."
    effusion = np.full(14, -2)
    effusion[9] = 1
    effusion_with_negatives = effusion.copy()
    effusion_with_negatives[[1, 10]] = 0
    left, right = np.zeros(14, np.int8), np.zeros(14, np.int8)
    left[9], right[9] = 1, 2
    small, large = np.array([""] * 14, object), np.array([""] * 14, object)
    small[9], large[9] = b"small", b"large"
    group = lambda *args: int(finding_group(*args))
    assert group(np.full(14, -2)) == group(normal_negated)
    assert group(effusion, left, small) == group(effusion_with_negatives, left, small)
    assert group(effusion, left, small) != group(effusion, right, small)
    assert group(effusion, left, small) != group(effusion, left, large)
    assert group(effusion) != group(np.where(effusion == 1, -1, effusion))  # stated uncertain
    assert group(effusion) != group(normal_negated)
    # Sides and grades of findings not stated do not count.
    other_side = left.copy()
    other_side[3] = 2
    assert group(effusion, left, small) == group(effusion, other_side, small)
    with pytest.raises(ValueError, match="-2..1"):
        finding_group(np.array([3] + [0] * 13))


def test_pairs_hold_each_study_s_impression_and_findings_sentences(data_dir, tokenizer):
    batch = next(make_report_pair_iterator("phantom_cxr/tiny", split="train", data_dir=str(data_dir),
                                           global_batch_size=8, tokenizer=tokenizer, seed=0, max_length=48))
    source = data_source("phantom_cxr/tiny", "train", str(data_dir), decode_images=False)
    records = [source[i] for i in range(len(source))]
    by_prompt = {}
    for record in records:
        by_prompt.setdefault(common.as_text(record["prompt"]), []).append(record)
    findings_prompts = FindingsPrompts(tokenizer, 48, "positive")
    assert batch["impression_ids"].shape == batch["findings_ids"].shape == (8, 48)
    for impression_ids, findings_ids, group in zip(batch["impression_ids"], batch["findings_ids"], batch["label_group"]):
        impression = tokenizer.decode(impression_ids, skip_special_tokens=True)
        candidates = [r for prompt, rs in by_prompt.items() if _same_text(prompt, impression) for r in rs]
        findings = tokenizer.decode(findings_ids, skip_special_tokens=True)
        partner = [r for r in candidates
                   if _same_text(findings_prompts(common.as_text(r["report"])) or common.as_text(r["prompt"]), findings)]
        assert partner, impression
        assert any(int(finding_group(r["labels"], r["side"], r["severity"])) == int(group) for r in partner)


def _same_text(a: str, b: str) -> bool:
    return a.lower().replace(" ", "") == b.lower().replace(" ", "")


def test_stage_learns_to_match_sections_and_the_ldm_stage_starts_from_it(data_dir, tmp_path, tokenizer):
    config = _config(data_dir, batch_size=8, num_steps=60, warmup_steps=5, learning_rate=3e-3, num_eval_batches=2)
    # The fresh encoder and head the stage starts from, scored on the same validation batches.
    text_encoder, text_params = stage.new_text_encoder(config, len(tokenizer))
    head = stage.SectionProjection(config.text_pretrain.projection_dim)
    head_params = head.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 31),
                            jnp.zeros((1, 1, text_encoder.config.hidden_size)))["params"]
    before = stage.validation_matching(stage.make_matching_loss(text_encoder, head),
                                       {"text_encoder": text_params, "head": head_params}, config, tokenizer,
                                       make_mesh(), text_encoder.config.max_position_embeddings)
    assert trainer.run(config, str(tmp_path))
    done = json.loads((tmp_path / "text_pretrain" / "done.json").read_text())
    assert done["val_match_loss"] < before["val_match_loss"] - 0.1
    assert done["val_match_accuracy"] > before["val_match_accuracy"]

    # The LDM stage (from scratch) takes this text encoder instead of a random one.
    vae_config = AutoencoderConfig.from_dict(config.autoencoder.model.to_dict())
    vae = AutoencoderKL(vae_config)
    save_component(vae, vae.init(jax.random.PRNGKey(0), *vae_dummy_inputs(vae_config))["params"],
                   tmp_path / "autoencoder" / "vae")
    setup = ldm_stage.build_models(config, str(tmp_path), vocab_size=len(tokenizer))
    _, saved = load_component(tmp_path / "text_pretrain" / "text_encoder")
    jax.tree_util.tree_map(np.testing.assert_array_equal, setup.params["text_encoder"], saved)
    changed = jax.tree_util.tree_map(lambda x, y: not np.array_equal(x, y), saved, text_params)
    assert all(jax.tree_util.tree_leaves(changed))


def test_stage_refuses_a_loaded_text_encoder(data_dir, tmp_path):
    config = _config(data_dir)
    config.ldm.init_from = "/models/sd15"
    with pytest.raises(ValueError, match="init_from"):
        trainer.run(config, str(tmp_path))


@pytest.mark.parametrize("finetune", ["unet", "unet+text_encoder"])
def test_a_frozen_text_encoder_without_its_stage_is_warned_about(data_dir, tmp_path, tokenizer, finetune):
    config = _config(data_dir)
    config.ldm.finetune = finetune
    vae_config = AutoencoderConfig.from_dict(config.autoencoder.model.to_dict())
    vae = AutoencoderKL(vae_config)
    save_component(vae, vae.init(jax.random.PRNGKey(0), *vae_dummy_inputs(vae_config))["params"],
                   tmp_path / "autoencoder" / "vae")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ldm_stage.build_models(config, str(tmp_path), vocab_size=len(tokenizer))
    random_text = [w for w in caught if "random text encoder" in str(w.message)]
    assert len(random_text) == (1 if finetune == "unet" else 0)
