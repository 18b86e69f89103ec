"""Batches of report section pairs for text-encoder pretraining (the "text_encoder" stage).

Each training study gives two descriptions of the same image: its impression (the "prompt" feature)
and the sentences of its FINDINGS section that state a finding (`pipeline.FindingsPrompts`, "positive";
a normal study's whole section). Matching one to the other teaches a text encoder that different
phrasings of the same findings mean the same thing. Studies with equal CheXpert label vectors share a
`label_group`, so the loss does not treat them as each other's negatives. Reads no images.
"""
from __future__ import annotations

import os

import grain
import numpy as np

from cxr_ldm.data.builders import common
from cxr_ldm.data.pipeline import FindingsPrompts, PromptIds, data_source, per_shard_batch_size

PAIR_KEYS = ("impression_ids", "findings_ids", "label_group")


def label_group(labels: np.ndarray) -> np.int64:
    """int8 (14,) CheXpert labels (-2 unmentioned, -1, 0, 1) -> an int64 equal exactly for equal vectors."""
    digits = np.asarray(labels, np.int64) + 2
    if digits.min(initial=0) < 0 or digits.max(initial=0) > 3:
        raise ValueError(f"labels {np.asarray(labels).tolist()}: expected values in -2..1")
    return np.int64(np.sum(digits * 4 ** np.arange(len(digits), dtype=np.int64)))


class _ReportPair(grain.transforms.Map):
    """TFDS example -> {"impression_ids", "findings_ids": int32 (L,), "label_group": int64 ()}."""

    def __init__(self, tokenizer, max_length: int | None):
        self.prompt_ids = PromptIds(tokenizer, max_length)
        self.findings_prompts = FindingsPrompts(tokenizer, max_length, "positive")

    def map(self, element: dict) -> dict:
        impression = common.as_text(element["prompt"])
        findings = self.findings_prompts(common.as_text(element["report"])) or impression
        return {"impression_ids": self.prompt_ids(impression), "findings_ids": self.prompt_ids(findings),
                "label_group": label_group(element["labels"])}


def make_report_pair_iterator(builder_or_name, *, split: str, data_dir: str | os.PathLike | None,
                              global_batch_size: int, tokenizer, seed: int, max_length: int | None = None,
                              num_epochs: int | None = None,
                              shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoaderIterator:
    """This process's batches of section pairs (module doc), shuffled every epoch, endless unless
    `num_epochs` is given; arguments as `pipeline.make_train_iterator`. A checkpointable Grain iterator."""
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    source = data_source(builder_or_name, split, data_dir, decode_images=False)
    sampler = grain.samplers.IndexSampler(len(source), shard_options, shuffle=True, num_epochs=num_epochs,
                                          seed=seed)
    loader = grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=shard_options,
        operations=[_ReportPair(tokenizer, max_length),
                    grain.transforms.Batch(per_shard_batch_size(global_batch_size, shard_options),
                                           drop_remainder=True)])
    return iter(loader)
