"""Fine-tune modes: each trains exactly its part; frozen params stay bit-identical; LoRA / textual
inversion merge as specified."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_ldm.training import finetune, sharding
from helpers import training as common

LORA_KERNEL = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")


def _flat(tree):
    return {sharding.path_to_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def params():
    return common.tiny_params(common.tiny_models())


def test_split_and_merge_of_full_modes_partition_the_components(params):
    for mode, trained in (("unet", {"unet"}), ("unet+text_encoder", {"unet", "text_encoder"}),
                          ("text_encoder", {"text_encoder"})):
        config = finetune.FinetuneConfig(mode=mode)
        trainable, frozen = finetune.split_params(config, params)
        assert set(trainable) == trained and set(frozen) == {"unet", "text_encoder", "vae"} - trained
        assert finetune.merge_params(config, trainable, frozen) == params


def test_frozen_token_table_leaves_the_trainable_text_encoder_and_merges_back(params):
    config = finetune.FinetuneConfig(mode="unet+text_encoder", train_token_embedding=False)
    trainable, frozen = finetune.split_params(config, params)
    table_key = "embeddings/token_embedding/embedding"
    assert table_key not in _flat(trainable["text_encoder"])
    assert set(_flat(trainable["text_encoder"])) == set(_flat(params["text_encoder"])) - {table_key}
    np.testing.assert_array_equal(frozen[finetune.FROZEN_TOKEN_TABLE], _flat(params["text_encoder"])[table_key])
    assert finetune.merge_params(config, trainable, frozen) == params
    # Modes that do not train the text encoder in full are unchanged by the flag.
    for mode in ("unet", "lora"):
        flagged = finetune.FinetuneConfig(mode=mode, train_token_embedding=False)
        plain = finetune.FinetuneConfig(mode=mode)
        assert set(finetune.split_params(flagged, params, rng=jax.random.PRNGKey(0))[1]) == \
            set(finetune.split_params(plain, params, rng=jax.random.PRNGKey(0))[1])


def test_steps_with_a_frozen_token_table_train_the_rest_of_the_text_encoder():
    _, _, mesh, state, _, step = common.build("unet+text_encoder", ema=False, train_token_embedding=False)
    table0 = np.asarray(state.frozen[finetune.FROZEN_TOKEN_TABLE])
    text0 = _flat(state.trainable["text_encoder"])
    for i in range(2):  # update 0 runs at warmup learning rate 0, update 1 moves
        state, _ = step(state, sharding.global_batch_from_process(common.tiny_batch(i), mesh))
    np.testing.assert_array_equal(state.frozen[finetune.FROZEN_TOKEN_TABLE], table0)
    text1 = _flat(state.trainable["text_encoder"])
    assert [k for k in text0 if np.array_equal(text0[k], text1[k])] == []
    # No optimizer moments for the table: AdamW keeps mu and nu of the trained leaves only.
    opt_sizes = sum(v.size for v in _flat(state.opt_state).values())
    trained_sizes = sum(v.size for v in _flat(state.trainable).values())
    assert opt_sizes <= 2 * trained_sizes + 8 and table0.size > 8


def test_trained_token_rows_split_from_the_table_and_merge_back(params):
    table = _flat(params["text_encoder"])["embeddings/token_embedding/embedding"]
    config = finetune.FinetuneConfig(mode="unet+text_encoder", trained_token_ids=(1, 4, 9))
    trainable, frozen = finetune.split_params(config, params)
    text = _flat(trainable["text_encoder"])
    np.testing.assert_array_equal(text["embeddings/token_embedding/trained_rows"], table[[1, 4, 9]])
    assert "embeddings/token_embedding/embedding" not in text
    np.testing.assert_array_equal(frozen[finetune.FROZEN_TOKEN_TABLE], table)
    jax.tree_util.tree_map(np.testing.assert_array_equal, finetune.merge_params(config, trainable, frozen), params)
    moved = finetune.tree_set(trainable, ("text_encoder",) + config.trained_rows_path,
                              jnp.full((3, table.shape[1]), 7.0))
    merged = _flat(finetune.merge_params(config, moved, frozen)["text_encoder"])["embeddings/token_embedding/embedding"]
    expected = np.array(table)
    expected[[1, 4, 9]] = 7.0
    np.testing.assert_array_equal(merged, expected)
    # The ids are ignored where the table is frozen or not trained in full.
    assert set(finetune.split_params(dataclasses.replace(config, mode="unet"), params)[0]) == {"unet"}
    frozen_table = dataclasses.replace(config, train_token_embedding=False)
    assert "embeddings/token_embedding/trained_rows" not in _flat(finetune.split_params(frozen_table, params)[0])
    with pytest.raises(ValueError, match="outside the text encoder's token table"):
        finetune.split_params(dataclasses.replace(config, trained_token_ids=(2, table.shape[0])), params)
    with pytest.raises(ValueError, match="distinct ascending"):
        finetune.FinetuneConfig(mode="unet+text_encoder", trained_token_ids=(4, 1))


def test_training_only_the_prompts_token_rows_matches_training_the_whole_table():
    """Rows no prompt holds get zero gradients: the whole-table run differs from the rows run only in
    weight decay shrinking those rows, and the rows run keeps no optimizer state for them."""
    num_steps = 3
    used = sorted({int(i) for n in range(num_steps) for i in common.tiny_batch(n)["input_ids"].ravel()})
    assert len(used) < common.VOCAB
    runs = {}
    for name, ids in (("all", None), ("rows", tuple(used))):
        _, config, mesh, state, _, step = common.build("unet+text_encoder", trained_token_ids=ids)
        table0 = np.asarray(finetune.tree_get(state.frozen if ids else state.trainable,
                                              (finetune.FROZEN_TOKEN_TABLE,) if ids else
                                              ("text_encoder",) + finetune.TOKEN_EMBEDDING_PATH))
        for n in range(num_steps):
            state, _ = step(state, sharding.global_batch_from_process(common.tiny_batch(n), mesh))
        runs[name] = (config, state, table0)
    merged = {name: finetune.merge_params(config, state.trainable, state.frozen)
              for name, (config, state, _) in runs.items()}
    full, rows = _flat(merged["all"]), _flat(merged["rows"])
    key = "text_encoder/embeddings/token_embedding/embedding"
    assert set(full) == set(rows)
    for name in full:
        if name != key:
            np.testing.assert_allclose(rows[name], full[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(rows[key][used], full[key][used], rtol=1e-5, atol=1e-6)
    assert not np.allclose(rows[key][used], runs["rows"][2][used])  # the used rows did move
    unused = np.setdiff1d(np.arange(common.VOCAB), used)
    table0 = runs["all"][2]
    np.testing.assert_array_equal(rows[key][unused], table0[unused])
    shrink = full[key][unused] / table0[unused]
    assert 0.99 < shrink.min() and np.allclose(shrink, shrink.flat[0], rtol=1e-5) and shrink.flat[0] < 1
    sizes = {name: sum(v.size for v in _flat(state.opt_state).values()) for name, (_, state, _) in runs.items()}
    assert sizes["all"] - sizes["rows"] == 2 * len(unused) * table0.shape[1]


def test_lora_merge_is_w_plus_scaled_a_b_on_attention_projections_only(params):
    config = finetune.FinetuneConfig(mode="lora", lora_rank=2, lora_alpha=8.0, lora_text_encoder=True)
    trainable, frozen = finetune.split_params(config, params, rng=jax.random.PRNGKey(0))
    assert frozen is not params and frozen == params
    unet_lora = _flat(trainable["unet_lora"])
    assert len(unet_lora) == 2 * 4 * 2 * 4  # (A, B) x (q, k, v, out) x (attn1, attn2) x 4 transformers
    # (1 in the down block, 1 in the mid block, 2 in the up block)
    assert all(("/to_q/" in k or "/to_k/" in k or "/to_v/" in k or "/to_out_0/" in k) for k in unet_lora)
    assert len(_flat(trainable["text_encoder_lora"])) == 2 * 4 * 2  # (A, B) x (q, k, v, out) x 2 layers
    # B starts at zero: the merged model equals the pretrained one.
    merged = finetune.merge_params(config, trainable, frozen)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, params)

    factors = finetune.tree_get(trainable["unet_lora"], LORA_KERNEL[:-1])
    b = np.random.default_rng(0).standard_normal(factors["lora_B"].shape).astype(np.float32)
    trainable = {**trainable, "unet_lora": finetune.tree_set(trainable["unet_lora"], LORA_KERNEL[:-1] + ("lora_B",), b)}
    merged = _flat(finetune.merge_params(config, trainable, frozen)["unet"])
    original = _flat(params["unet"])
    kernel = "/".join(LORA_KERNEL)
    expected = original[kernel] + 4.0 * np.asarray(factors["lora_A"]) @ b
    np.testing.assert_allclose(merged[kernel], expected, rtol=1e-6, atol=1e-6)
    assert [k for k in original if not np.array_equal(merged[k], original[k])] == [kernel]


def test_textual_inversion_appends_rows_initialised_from_given_tokens(params):
    config = finetune.FinetuneConfig(mode="textual_inversion")
    trainable, frozen = finetune.split_params(config, params, init_token_ids=[3, 5])
    table = params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(trainable["new_token_embeddings"], table[[3, 5]])
    merged = finetune.merge_params(config, trainable, frozen)
    new_table = merged["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(new_table, np.concatenate([table, table[[3, 5]]]))
    with pytest.raises(ValueError, match="init_token_ids"):
        finetune.split_params(config, params)


def test_placeholder_tokens_get_the_ids_of_the_appended_rows():
    from cxr_ldm.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    vocab = len(tokenizer)
    new_ids, init_ids = finetune.add_placeholder_tokens(tokenizer, ["<effusion-l>", "<cardio>"], ["fluid", "heart"])
    assert new_ids == [vocab, vocab + 1]
    assert init_ids == [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("fluid", "heart")]
    assert tokenizer("a <cardio> x").input_ids[2] == vocab + 1
    with pytest.raises(ValueError, match="exactly one"):
        finetune.add_placeholder_tokens(tokenizer, ["<z>"], ["pneumothorax effusion"])


# "unet" runs in training/test_steps.py; the other full modes differ from it only in the split.
@pytest.mark.parametrize("mode", [pytest.param("unet+text_encoder", marks=pytest.mark.slow),
                                  pytest.param("text_encoder", marks=pytest.mark.slow),
                                  "textual_inversion", "lora"])
def test_steps_change_only_the_trained_part(mode):
    models, config, mesh, state, _, step = common.build(mode, ema=False)
    frozen0, trainable0 = _flat(state.frozen), _flat(state.trainable)
    merged0 = _flat(finetune.merge_params(config, state.trainable, state.frozen))
    for i in range(2):  # update 0 runs at warmup learning rate 0, update 1 moves
        batch = common.tiny_batch(i)
        if mode == "textual_inversion":
            batch["input_ids"][:, 1:3] = [common.VOCAB, common.VOCAB + 1]
        state, _ = step(state, sharding.global_batch_from_process(batch, mesh))
    frozen1, trainable1 = _flat(state.frozen), _flat(state.trainable)
    assert frozen1.keys() == frozen0.keys() and all(np.array_equal(frozen1[k], frozen0[k]) for k in frozen0)
    assert [k for k in trainable0 if np.array_equal(trainable1[k], trainable0[k])] == []
    opt_leaves = _flat(state.opt_state)
    assert sum(k.endswith(tuple(trainable0)) and "/mu/" in k for k in opt_leaves) == len(trainable0)
    assert sum(v.size for v in opt_leaves.values()) <= 2 * sum(v.size for v in trainable0.values()) + 8

    merged1 = _flat(finetune.merge_params(config, state.trainable, state.frozen))
    changed = {k for k in merged0 if merged0[k].shape != merged1[k].shape or not np.array_equal(merged0[k], merged1[k])}
    if mode == "textual_inversion":
        key = "text_encoder/embeddings/token_embedding/embedding"
        assert changed == {key}
        np.testing.assert_array_equal(merged1[key][: common.VOCAB], merged0[key][: common.VOCAB])
        assert not np.array_equal(merged1[key][common.VOCAB:], merged0[key][common.VOCAB:])
    elif mode == "lora":
        assert changed and all(k.endswith(("to_q/kernel", "to_k/kernel", "to_v/kernel", "to_out_0/kernel",
                                            "q_proj/kernel", "k_proj/kernel", "v_proj/kernel", "out_proj/kernel"))
                               for k in changed)
    else:
        trained = tuple(c + "/" for c in mode.split("+"))
        assert all(k.startswith(trained) for k in changed)
