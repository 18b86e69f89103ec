"""Real evaluation data: a TFDS split read whole into memory (`tfds` data source, no TensorFlow graph).

Sides come from the data set's `side` feature where it has one (phantom_cxr), else from the side
words of the report (`labeler.label_report_details`). Attribute slots (grade, location, devices, route)
come from the phantom case of the example's `seed` (phantom_cxr); other data sets leave them unknown.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxr_ldm.data.builders import phantom_cxr, synthetic_cxr
from cxr_ldm.data.builders.common import as_text
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.phantom.cases import FINDING_COUNT_SHARES
from cxr_ldm.data.labeler import label_report_details
from cxr_ldm.evaluation.attributes import phantom_slot_codes
from cxr_ldm.evaluation.classifier import LabelledImages
from cxr_ldm.evaluation.findings import side_code


@dataclasses.dataclass
class RealSplit:
    """One split in memory: images uint8 (N, H, W, 1), labels and sides (N, 14), prompts and reports; the
    phantom seed of each example (phantom_cxr only, else None)."""
    data: LabelledImages
    prompts: list[str]
    reports: list[str]
    seeds: list[int] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def concatenate(self, other: "RealSplit") -> "RealSplit":
        """This split followed by `other` (both with seeds, or both without)."""
        data = LabelledImages(*(np.concatenate([getattr(self.data, k), getattr(other.data, k)])
                                for k in ("images", "labels", "sides", "slots")))
        seeds = None if self.seeds is None or other.seeds is None else self.seeds + other.seeds
        return RealSplit(data, self.prompts + other.prompts, self.reports + other.reports, seeds)


def sides_from_report(report: str) -> np.ndarray:
    """int8 (14,) side codes (findings.side_code) of the report's positive mentions."""
    details = label_report_details(report)
    return np.array([side_code(details[name]["side"]) for name in CHEXPERT_LABELS], np.int8)


def load_split(builder, split: str, limit: int | None = None, chunk: int = 256) -> RealSplit:
    """The first `limit` (None: all) examples of `split` of a prepared TFDS builder."""
    source = builder.as_data_source(split=split)
    count = len(source) if limit is None else min(limit, len(source))
    if count == 0:
        raise ValueError(f"{builder.name}/{builder.builder_config.name}: split {split!r} is empty")
    images, labels, sides, prompts, reports, seeds = [], [], [], [], [], []
    for start in tqdm(range(0, count, chunk), desc=f"reading {split}", unit="chunk", leave=False):
        for example in source.__getitems__(list(range(start, min(start + chunk, count)))):
            image = np.asarray(example["image"], np.uint8)
            if image.ndim == 2:
                image = image[:, :, None]
            images.append(image)
            labels.append(np.asarray(example["labels"], np.int8))
            report = as_text(example["report"])
            sides.append(np.asarray(example["side"], np.int8) if "side" in example else sides_from_report(report))
            prompts.append(as_text(example["prompt"]))
            if builder.name == "phantom_cxr":
                seeds.append(int(example["seed"]))
            reports.append(report)
    logging.info("read %d examples of %s/%s", count, builder.name, split)
    slots = phantom_slot_codes(seeds) if seeds else None
    return RealSplit(LabelledImages(np.stack(images), np.stack(labels), np.stack(sides), slots), prompts, reports,
                     seeds or None)


def phantom_split(seeds: range, resolution: int, num_workers: int = 2,
                  count_shares: tuple[float, float, float] = FINDING_COUNT_SHARES) -> RealSplit:
    """The phantom_cxr examples of `seeds`, drawn in memory rather than read from a built data set: the
    same images, labels, sides and slots that `load_split` reads for those seeds (in seed order). Other
    `count_shares` (how often an abnormal study has 1, 2 or 3 drawn findings) draw other studies."""
    images, labels, sides, prompts, reports = [], [], [], [], []
    examples = phantom_cxr.generate_examples(seeds, resolution, num_workers, count_shares)
    for _, example in tqdm(examples, total=len(seeds), desc="drawing phantom studies", unit="study", leave=False):
        images.append(np.asarray(Image.open(io.BytesIO(example["image"])), np.uint8).reshape(resolution, resolution, 1))
        labels.append(example["labels"])
        sides.append(example["side"])
        prompts.append(example["prompt"])
        reports.append(example["report"])
    data = LabelledImages(np.stack(images), np.stack(labels).astype(np.int8), np.stack(sides).astype(np.int8),
                          phantom_slot_codes(seeds, count_shares))
    return RealSplit(data, prompts, reports, list(seeds))


def load_synthetic(folder: str | os.PathLike) -> RealSplit:
    """The rows of a synthetic data set that `python -m cxr_ldm.synthesize --out folder` wrote, in row order.
    FileNotFoundError names the folder when it holds none, ValueError when it holds several resolutions."""
    root = Path(folder).expanduser() / synthetic_cxr.NAME
    configs = sorted(p.name for p in root.glob("*") if (p / str(synthetic_cxr.SyntheticCxr.VERSION)).is_dir())
    if not configs:
        raise FileNotFoundError(f"{folder}: no synthetic data set ({synthetic_cxr.NAME}/<resolution>/"
                                f"{synthetic_cxr.SyntheticCxr.VERSION}/); python -m cxr_ldm.synthesize --out writes one")
    if len(configs) > 1:
        raise ValueError(f"{folder}: synthetic data sets at several resolutions ({', '.join(configs)}); keep one")
    builder = synthetic_cxr.SyntheticCxr(config=configs[0], data_dir=str(Path(folder).expanduser()))
    return load_split(builder, synthetic_cxr.SPLIT)
