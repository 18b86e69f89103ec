"""Grain input pipeline over a small TFDS data set (`helpers.toy_data`: example i is recognisable by its labels)."""
from __future__ import annotations

import collections
import dataclasses

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cxr_ldm.data import input_pipeline
from cxr_ldm.data.builders import common
from cxr_ldm.data.tokenizer import load_tokenizer, tokenize
from helpers.toy_data import (  # noqa: F401 (builder: the toy data set fixture)
    FRACTURE, NUM_EXAMPLES, SIDE, builder, toy_findings, toy_fracture, toy_image, toy_prompt)

@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _train(builder, tokenizer, **overrides):
    """A train iterator; overrides that are `ExampleConfig` fields go into its `examples`."""
    fields = {f.name for f in dataclasses.fields(input_pipeline.ExampleConfig)}
    examples = input_pipeline.ExampleConfig(**{k: v for k, v in overrides.items() if k in fields})
    kwargs = dict(split="train", data_dir=None, global_batch_size=8, tokenizer=tokenizer, seed=3,
                  shard_options=grain.sharding.NoSharding(), examples=examples)
    kwargs.update({k: v for k, v in overrides.items() if k not in fields})
    return input_pipeline.make_train_iterator(builder, **kwargs)


def _file_order(builder) -> list[int]:
    """Example indices in the order of the array_record files (TFDS shuffles examples when writing)."""
    source = builder.as_data_source(split="train")
    return [int(source[i]["labels"][0]) for i in range(len(source))]


def _ids(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["labels"][:, 0]]


def test_batches_hold_decoded_images_tokens_and_labels(builder, tokenizer):
    batch = next(_train(builder, tokenizer))
    assert batch["image"].shape == (8, SIDE, SIDE, 1) and batch["image"].dtype == np.float32
    assert batch["input_ids"].shape == (8, 77) and batch["input_ids"].dtype == np.int32
    assert batch["labels"].shape == (8, 14) and batch["labels"].dtype == np.int8
    indices = batch["labels"][:, 0].astype(int)
    expected_images = np.stack([toy_image(i) for i in indices]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"], expected_images, atol=1e-6)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["input_ids"], tokenize(tokenizer, [toy_prompt(i) for i in indices]))
    np.testing.assert_array_equal(batch["labels"][:, FRACTURE], [toy_fracture(i) for i in indices])
    assert np.all(np.delete(batch["labels"][:, 1:], FRACTURE - 1, axis=1) == common.NOT_MENTIONED)


def test_epochs_are_shuffled_permutations_fixed_by_seed(builder, tokenizer):
    first = _ids(_train(builder, tokenizer, num_epochs=2))
    assert len(first) == 2 * NUM_EXAMPLES
    for epoch in (first[:NUM_EXAMPLES], first[NUM_EXAMPLES:]):
        assert sorted(epoch) == list(range(NUM_EXAMPLES))
    assert first[:NUM_EXAMPLES] != list(range(NUM_EXAMPLES))
    assert first[:NUM_EXAMPLES] != first[NUM_EXAMPLES:]  # reshuffled every epoch
    assert _ids(_train(builder, tokenizer, num_epochs=2)) == first
    assert _ids(_train(builder, tokenizer, num_epochs=2, seed=4)) != first
    assert _ids(_train(builder, tokenizer, num_epochs=1, shuffle=False)) == _file_order(builder)


def test_two_processes_read_disjoint_halves(builder, tokenizer):
    seen = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        batches = list(_train(builder, tokenizer, num_epochs=1, shard_options=shard))
        assert all(batch["image"].shape[0] == 4 for batch in batches)  # global 8 over 2 processes
        seen.append(_ids(batches))
    assert len(seen[0]) == len(seen[1]) == NUM_EXAMPLES // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_EXAMPLES))
    with pytest.raises(ValueError, match="not divisible"):
        _train(builder, tokenizer, global_batch_size=7,
               shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=2))


def test_findings_prompts_replace_the_impression_at_their_rate(builder, tokenizer):
    batches = list(_train(builder, tokenizer, findings_prompt_rate=0.5, num_epochs=20, include_index=True))
    ids = np.concatenate([batch["input_ids"] for batch in batches])
    index = np.concatenate([batch["labels"][:, 0] for batch in batches])
    impression = tokenize(tokenizer, [toy_prompt(int(i)) for i in index])
    from_findings = ~np.all(ids == impression, axis=1)
    np.testing.assert_array_equal(ids[from_findings],
                                  tokenize(tokenizer, [toy_findings(int(i)) for i in index[from_findings]]))
    assert not from_findings[index % 2 == 0].any()  # no FINDINGS section: the prompt is kept
    assert abs(from_findings[index % 2 == 1].mean() - 0.5) < 0.08  # 400 draws: 5 standard deviations
    all_findings = np.concatenate([b["input_ids"] for b in _train(builder, tokenizer, findings_prompt_rate=1.0,
                                                                   num_epochs=1)])
    assert (~np.all(all_findings == tokenize(tokenizer, [""]), axis=1)).all()


def test_corpus_token_ids_hold_every_token_a_training_prompt_can_have(builder, tokenizer):
    corpus = input_pipeline.corpus_token_ids(builder, "train", None, tokenizer)
    assert corpus.dtype == np.int64 and list(corpus) == sorted(set(corpus.tolist()))
    seen = set()
    for sentences, order in zip(input_pipeline.FINDINGS_PROMPT_SENTENCES, input_pipeline.WORD_ORDERS):
        for rate in (0.0, 0.5, 1.0):
            batches = _train(builder, tokenizer, findings_prompt_rate=rate, findings_prompt_sentences=sentences,
                             prompt_dropout=0.2, word_order_rate=rate, word_order=order, num_epochs=2)
            seen.update(int(i) for batch in batches for i in batch["input_ids"].ravel())
    assert seen <= set(corpus.tolist())
    # Only the reports' words: none of the toy reports says "effusion".
    assert not set(tokenizer.convert_tokens_to_ids(tokenizer.tokenize("effusion"))) & set(corpus.tolist())
    assert len(seen) <= len(corpus) < 100


def test_findings_prompts_are_cut_at_a_sentence_end_to_fit(builder, tokenizer):
    batch = next(_train(builder, tokenizer, findings_prompt_rate=1.0, max_length=20))
    odd = batch["labels"][:, 0] % 2 == 1
    assert odd.any()
    for ids, index in zip(batch["input_ids"][odd], batch["labels"][odd, 0]):
        sentences = [s if s.endswith(".") else s + "." for s in toy_findings(int(index)).split(". ")]
        fitting = [" ".join(sentences[:n]) for n in range(1, 4)
                   if len(tokenizer.tokenize(" ".join(sentences[:n]))) <= 18]  # 20 less start and end
        assert 0 < len(fitting) < 3
        np.testing.assert_array_equal(ids, tokenize(tokenizer, [fitting[-1]], 20)[0])


def test_positive_findings_prompts_keep_the_sentences_stating_findings(tokenizer):
    abnormal = ("FINDINGS:\nThere is a moderate right pleural effusion. No pneumothorax is seen. The heart size is "
                "normal. Possible consolidation in the left lower lobe.\n\nIMPRESSION:\nRight pleural effusion.")
    normal = "FINDINGS:\nThe lungs are clear. There is no effusion.\n\nIMPRESSION:\nNormal chest radiograph."
    positive = input_pipeline.FindingsPrompts(tokenizer, 48, "positive")
    assert positive(abnormal) == ("There is a moderate right pleural effusion. "
                                  "Possible consolidation in the left lower lobe.")
    assert positive(normal) == "The lungs are clear. There is no effusion."  # no finding: the whole section
    assert input_pipeline.FindingsPrompts(tokenizer, 48, "all")(abnormal).count(".") == 4
    assert input_pipeline.FindingsPrompts(tokenizer, 12, "positive")(abnormal) == "There is a moderate right pleural effusion."
    with pytest.raises(ValueError, match="'some'"):
        input_pipeline.FindingsPrompts(tokenizer, 48, "some")


@pytest.mark.parametrize("bad", [{"findings_prompt_rate": 1.5}, {"word_order_rate": -0.1}, {"word_order": "reverse"}])
def test_prompt_options_are_checked(builder, tokenizer, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _train(builder, tokenizer, **bad)


def _words(sentence: str) -> list[str]:
    return sentence.replace(",", " ").replace(";", " ").rstrip(".").split()


_TWO_SENTENCES = ("Right lower lobe consolidation, consistent with pneumonia.", "Small right pleural effusion; loculated.")


@pytest.mark.parametrize("order", input_pipeline.WORD_ORDERS)
def test_reordered_prompts_keep_each_sentence_s_words_together(order):
    originals = [_words(s) for s in _TWO_SENTENCES]
    orders, firsts, seams = set(), set(), set()
    for seed in range(40):
        reordered = input_pipeline.reorder_prompt_words(" ".join(_TWO_SENTENCES), np.random.default_rng(seed), order)
        sentences = reordered[:-1].split(". ")
        assert reordered.endswith(".") and ";" not in reordered
        assert sorted(sorted(_words(s)) for s in sentences) == sorted(sorted(w) for w in originals)  # none moved
        orders.add(tuple(sentences))
        firsts.add(_words(sentences[0]) == originals[0] or sorted(_words(sentences[0])) == sorted(originals[0]))
        if order == "rotate":  # "tail, head": one comma at the seam, the words a cyclic shift
            for sentence in sentences:
                tail, head = sentence.split(", ")
                original = next(w for w in originals if sorted(w) == sorted(_words(sentence)))
                assert head.split() + tail.split() == original
                seams.add(len(head.split()))
    assert firsts == {True, False} and len(orders) > 10  # sentence order and word order both vary
    if order == "rotate":
        assert seams == set(range(1, 7))  # every cut of the 7-word sentence
    assert input_pipeline.reorder_prompt_words("", np.random.default_rng(0), order) == ""
    assert input_pipeline.reorder_prompt_words("Cardiomegaly.", np.random.default_rng(0), order) == "Cardiomegaly."


@pytest.mark.parametrize("order", input_pipeline.WORD_ORDERS)
def test_word_order_rate_reorders_that_share_of_prompts(builder, tokenizer, order):
    batches = list(_train(builder, tokenizer, word_order_rate=0.5, word_order=order, num_epochs=10))
    ids = np.concatenate([batch["input_ids"] for batch in batches])
    index = np.concatenate([batch["labels"][:, 0] for batch in batches])
    reordered = ~np.all(ids == tokenize(tokenizer, [toy_prompt(int(i)) for i in index]), axis=1)
    assert abs(reordered.mean() - 0.5) < 0.12  # 400 draws: 5 standard deviations
    # The same tokens ("." added at the end, "," at a rotation's seam), in another order for most rows.
    added = " ." if order == "shuffle" else " , ."
    ended = tokenize(tokenizer, [toy_prompt(int(i)) + added for i in index[reordered]])
    np.testing.assert_array_equal(np.sort(ids[reordered], axis=1), np.sort(ended, axis=1))
    assert np.mean(np.any(ids[reordered] != ended, axis=1)) > 0.6  # 5 of 6 shuffles of three words differ


def test_prompt_dropout_rate(builder, tokenizer):
    empty = tokenize(tokenizer, [""])[0]
    assert empty[0] == tokenizer.bos_token_id and empty[1] == tokenizer.eos_token_id

    def dropped_fraction(rate):
        batches = list(_train(builder, tokenizer, prompt_dropout=rate, num_epochs=10))
        ids = np.concatenate([batch["input_ids"] for batch in batches])
        dropped = np.all(ids == empty, axis=1)
        kept_ids = np.concatenate([batch["labels"][:, 0] for batch in batches])[~dropped]
        if len(kept_ids):
            expected_kept = tokenize(tokenizer, [toy_prompt(int(i)) for i in kept_ids])
            np.testing.assert_array_equal(ids[~dropped], expected_kept)
        return dropped.mean()

    assert dropped_fraction(0.0) == 0.0 and dropped_fraction(1.0) == 1.0
    assert abs(dropped_fraction(0.3) - 0.3) < 0.07  # 400 draws: 3.1 standard deviations


def test_augmentation_crops_but_never_flips(builder, tokenizer):
    batches = list(_train(builder, tokenizer, augment=True, min_crop_scale=0.6, num_epochs=2))
    images = np.concatenate([batch["image"] for batch in batches])[..., 0]
    indices = np.concatenate([batch["labels"][:, 0] for batch in batches]).astype(int)
    assert images.min() >= -1.0 and images.max() <= 1.0
    original = np.stack([toy_image(i)[..., 0] for i in indices]).astype(np.float32) / 127.5 - 1.0
    changed = np.abs(images - original).max(axis=(1, 2)) > 0.05
    assert changed.mean() > 0.8
    column_means = images.mean(axis=1)
    assert np.all(column_means[:, -1] - column_means[:, 0] > 0.5)  # left stays dark, right bright
    assert np.all(np.diff(column_means, axis=1) > -1e-3)


def test_oversampling_repeats_the_studies_with_named_findings(builder, tokenizer):
    kwargs = dict(num_epochs=1, include_image=False, include_index=True, oversample={"Fracture": 3})
    batches = list(_train(builder, tokenizer, **kwargs))
    ids = _ids(batches)
    # 8 studies with a fracture (4 uncertain) appear 3 times: 40 + 16 records, 7 full batches.
    assert collections.Counter(ids) == {i: 3 if toy_fracture(i) != common.NOT_MENTIONED else 1
                                        for i in range(NUM_EXAMPLES)}
    assert ids[:8] != sorted(ids[:8])  # repeats are shuffled in with the rest
    file_order = _file_order(builder)  # "index" stays the record's position in the split
    assert all(file_order[int(i)] == label for batch in batches
               for i, label in zip(batch["index"], batch["labels"][:, 0]))
    assert _ids(_train(builder, tokenizer, **kwargs)) == ids


def test_oversampling_state_round_trip_and_bad_input(builder, tokenizer):
    original = _train(builder, tokenizer, oversample={"Fracture": 2})
    for _ in range(6):  # past the first epoch of 48 records
        next(original)
    state = original.get_state()
    expected = [next(original) for _ in range(3)]
    restored = _train(builder, tokenizer, oversample={"Fracture": 2})
    restored.set_state(state)
    _assert_same_batches([next(restored) for _ in range(3)], expected)
    with pytest.raises(ValueError, match="does not match"):  # a run resumed with other factors
        _train(builder, tokenizer, oversample={"Fracture": 3}).set_state(state)
    with pytest.raises(ValueError, match="unknown labels.*Fractures"):
        _train(builder, tokenizer, oversample={"Fractures": 2})
    with pytest.raises(ValueError, match="whole numbers"):
        _train(builder, tokenizer, oversample={"Fracture": 1.5})


def _assert_same_batches(a, b):
    for batch_a, batch_b in zip(a, b, strict=True):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key])


def test_state_round_trip_yields_the_same_batches(builder, tokenizer):
    kwargs = dict(prompt_dropout=0.5, augment=True)
    original = _train(builder, tokenizer, **kwargs)
    for _ in range(7):  # past the first epoch
        next(original)
    state = original.get_state()
    expected = [next(original) for _ in range(4)]

    restored = _train(builder, tokenizer, **kwargs)
    restored.set_state(state)
    _assert_same_batches([next(restored) for _ in range(4)], expected)


def test_orbax_checkpoint_of_iterator_state(builder, tokenizer, tmp_path):
    original = _train(builder, tokenizer, prompt_dropout=0.2)
    for _ in range(3):
        next(original)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(original)))
        manager.wait_until_finished()
    expected = [next(original) for _ in range(3)]

    fresh = _train(builder, tokenizer, prompt_dropout=0.2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same_batches([next(restored["data"]) for _ in range(3)], expected)


def test_eval_batches_ordered_padded_and_equal_per_process(builder, tokenizer):
    batches = list(input_pipeline.make_eval_batches(builder, split="train", data_dir=None, global_batch_size=16,
                                              tokenizer=tokenizer, shard_options=grain.sharding.NoSharding()))
    assert [batch["image"].shape[0] for batch in batches] == [16, 16, 16]
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert mask.tolist() == [True] * NUM_EXAMPLES + [False] * 8
    order = _file_order(builder)
    assert _ids(batches)[:NUM_EXAMPLES] == order
    np.testing.assert_array_equal(batches[0]["image"][5], toy_image(order[5]).astype(np.float32) / 127.5 - 1.0)
    assert np.all(batches[-1]["image"][8:] == 0)

    per_process = []
    for index in range(3):  # 13 examples over 3 processes: 4, 4, 5 -> 3 batches of 2 each
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=3, drop_remainder=False)
        per_process.append(list(input_pipeline.make_eval_batches(
            builder, split="train", data_dir=None, global_batch_size=6, tokenizer=tokenizer,
            num_examples=13, shard_options=shard)))
    assert [len(batches) for batches in per_process] == [3, 3, 3]
    for batches, (start, end) in zip(per_process, [(0, 4), (4, 8), (8, 13)]):
        mask = np.concatenate([batch["mask"] for batch in batches])
        assert mask.tolist() == [True] * (end - start) + [False] * (6 - (end - start))
        assert _ids(batches)[:end - start] == order[start:end]
