"""Batches of report section pairs for text-encoder pretraining (the "text_pretrain" stage).

Each training study gives two descriptions of the same image: its impression (the "prompt" feature)
and the sentences of its FINDINGS section that state a finding (`pipeline.FindingsPrompts`, "positive";
a normal study's whole section). Matching one to the other teaches a text encoder that different
phrasings of the same findings mean the same thing. Studies whose films show the same thing share a
`label_group` (`finding_group`: the same findings positive or uncertain, with the same sides and grades
where the data set stores them), so the loss does not treat them as each other's negatives. Reads no images.
"""
from __future__ import annotations

import hashlib
import os

import grain
import numpy as np

from cxr_ldm.data.builders import common
from cxr_ldm.data.input_pipeline import FindingsPrompts, PromptIds, data_source, per_shard_batch_size

PAIR_KEYS = ("impression_ids", "findings_ids", "label_group")


def finding_group(labels: np.ndarray, sides: np.ndarray | None = None,
                  severities: np.ndarray | None = None) -> np.int64:
    """A study's findings -> an int64 equal exactly for studies whose films show the same thing.

    labels: int8 (14,) CheXpert labels (-2 unmentioned, -1 uncertain, 0 negative, 1 positive). Only what
    is stated positive or uncertain counts: a negation ("No pleural effusion.") and silence mean the same
    film, so two normal studies are one group however their reports word the negatives.
    sides: int8 (14,) side codes, severities: (14,) grade texts (phantom_cxr stores both; None where the
    data set does not): the side and grade of each counted finding are part of the group, so "Left
    clavicle fracture." and "Right rib fractures." are each other's negatives.
    """
    labels = np.asarray(labels, np.int64)
    if labels.min(initial=0) < -2 or labels.max(initial=0) > 1:
        raise ValueError(f"labels {labels.tolist()}: expected values in -2..1")
    counted = (labels == 1) | (labels == -1)
    parts = []
    for i in np.flatnonzero(counted):
        side = "" if sides is None else str(int(sides[i]))
        severity = "" if severities is None else common.as_text(severities[i])
        parts.append(f"{i}:{int(labels[i])}:{side}:{severity}")
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest()
    return np.int64(int.from_bytes(digest, "little", signed=True))


class _ReportPair(grain.transforms.Map):
    """TFDS example -> {"impression_ids", "findings_ids": int32 (L,), "label_group": int64 ()}."""

    def __init__(self, tokenizer, max_length: int | None):
        self.prompt_ids = PromptIds(tokenizer, max_length)
        self.findings_prompts = FindingsPrompts(tokenizer, max_length, "positive")

    def map(self, element: dict) -> dict:
        impression = common.as_text(element["prompt"])
        findings = self.findings_prompts(common.as_text(element["report"])) or impression
        return {"impression_ids": self.prompt_ids(impression), "findings_ids": self.prompt_ids(findings),
                "label_group": finding_group(element["labels"], element.get("side"), element.get("severity"))}


def make_report_pair_iterator(builder_or_name, *, split: str, data_dir: str | os.PathLike | None,
                              global_batch_size: int, tokenizer, seed: int, max_length: int | None = None,
                              num_epochs: int | None = None,
                              shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoaderIterator:
    """This process's batches of section pairs (module doc), shuffled every epoch, endless unless
    `num_epochs` is given; arguments as `input_pipeline.make_train_iterator`. A checkpointable Grain iterator."""
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
