"""TFDS builder for the embedded phantom CXR data set (`cxr_ldm.data.phantom`): no download needed.

Every example is `phantom.generate(seed, resolution)`; a split is a fixed range of seeds, so an
example's content depends only on its seed and the resolution:
  train       seeds         0 ..         train_size - 1
  validation  seeds 10_000_000 .. 10_000_000 + validation_size - 1
  test        seeds 20_000_000 .. 20_000_000 + test_size - 1
(the ranges stay disjoint for any split size below ten million). Per observation (CheXpert order)
the builder stores `labels` (see `common.encode_labels`), `side` as int8 codes (`SIDES`) and
`severity` as text ("" where the report gives none).

Configs: "64", "128", "256" (6000 / 500 / 1000 examples) and "tiny" (32 px, 128 / 16 / 16, built
in one process), the data set of the quick recipes and tests.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from cxr_ldm.data import phantom
from cxr_ldm.data.builders import common
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.phantom.cases import FINDING_COUNT_SHARES

SPLIT_SEED_OFFSETS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
# int8 code of a finding's side is its index here; 0 (None) where no side is stated.
SIDES = (None, "left", "right", "bilateral")
_CHUNK_SIZE = 64


def encode_sides(sides: Mapping[str, str | None]) -> np.ndarray:
    """{CheXpert name: "left" | "right" | "bilateral" | None} -> int8 (14,) codes (index in SIDES)."""
    codes = np.zeros((common.NUM_LABELS,), np.int8)
    for i, name in enumerate(CHEXPERT_LABELS):
        side = sides.get(name)
        if side not in SIDES:
            raise ValueError(f"side of {name!r} = {side!r}; expected one of {SIDES}.")
        codes[i] = SIDES.index(side)
    return codes


def decode_sides(codes: np.ndarray) -> dict[str, str | None]:
    """Inverse of `encode_sides`."""
    return {name: SIDES[int(code)] for name, code in zip(CHEXPERT_LABELS, codes)}


@dataclasses.dataclass
class PhantomCxrConfig(tfds.core.BuilderConfig):
    """resolution: image side in pixels; *_size: examples per split; num_workers: generating processes."""

    resolution: int = 64
    train_size: int = 6000
    validation_size: int = 500
    test_size: int = 1000
    num_workers: int = dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}


def make_example(seed: int, resolution: int, count_shares: tuple[float, float, float] = FINDING_COUNT_SHARES) -> dict:
    """phantom.generate(seed, resolution, count_shares=...) as a feature dict of this builder (PNG-encoded image)."""
    sample = phantom.generate(seed, resolution, count_shares=count_shares)
    return {
        "image": common.png_bytes(sample["image"]),
        "report": sample["report"],
        "prompt": sample["prompt"],
        "labels": common.encode_labels(sample["labels"]),
        "side": encode_sides(sample["side"]),
        "severity": np.array([sample["severity"].get(name) or "" for name in CHEXPERT_LABELS], object),
        "seed": seed,
    }


def _make_chunk(seeds: range, resolution: int, count_shares: tuple[float, float, float]) -> list[dict]:
    return [make_example(seed, resolution, count_shares) for seed in seeds]


def generate_examples(seeds: range, resolution: int, num_workers: int,
                      count_shares: tuple[float, float, float] = FINDING_COUNT_SHARES) -> Iterator[tuple[int, dict]]:
    """(seed, example) for every seed, in seed order; chunks of seeds go to `num_workers` processes.
    count_shares: how often an abnormal study has 1, 2 or 3 drawn findings (`phantom.cases.draw_findings`).

    Worker processes are spawned (not forked), so a caller that already initialised JAX or
    TensorFlow is safe.
    """
    chunks = [seeds[i:i + _CHUNK_SIZE] for i in range(0, len(seeds), _CHUNK_SIZE)]
    if num_workers <= 1 or len(chunks) <= 1:
        results = (_make_chunk(chunk, resolution, count_shares) for chunk in chunks)
        yield from ((ex["seed"], ex) for examples in results for ex in examples)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        for examples in pool.map(_make_chunk, chunks, [resolution] * len(chunks), [count_shares] * len(chunks)):
            yield from ((ex["seed"], ex) for ex in examples)


class PhantomCxr(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest radiographs with their reports, prompts and CheXpert-style labels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Pleural fluid adds its own attenuation: an effusion under a lower-lobe "
                              "consolidation is visible (it was not, though the report stated it)."}
    BUILDER_CONFIGS = [
        PhantomCxrConfig(name="64", resolution=64),
        PhantomCxrConfig(name="128", resolution=128),
        PhantomCxrConfig(name="256", resolution=256),
        PhantomCxrConfig(name="tiny", resolution=32, train_size=128, validation_size=16, test_size=16,
                         num_workers=1),
    ]
    DEFAULT_CONFIG_NAME = "64"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.cxr_features(
                self.builder_config.resolution,
                side=tfds.features.Tensor(
                    shape=(common.NUM_LABELS,), dtype=np.int8,
                    doc=f"Side per observation: index in {SIDES}."),
                severity=tfds.features.Tensor(
                    shape=(common.NUM_LABELS,), dtype=np.str_,
                    doc="Severity word per observation as the report states it; empty if none."),
                seed=tfds.features.Scalar(dtype=np.int64, doc="phantom.generate seed."),
            ),
            supervised_keys=None,
        )

    SHOWS_PROGRESS = True  # `builders.prepare` turns TFDS's bars off for this builder's one bar per split

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        return {
            split: self._generate_examples(range(SPLIT_SEED_OFFSETS[split], SPLIT_SEED_OFFSETS[split] + size), split)
            for split, size in self.builder_config.split_sizes().items()
        }

    def _generate_examples(self, seeds: range, split: str = "train"):
        examples = generate_examples(seeds, self.builder_config.resolution, self.builder_config.num_workers)
        yield from tqdm(examples, total=len(seeds), desc=f"phantom {split}", unit="study", leave=False)

    # TFDS announces a build as a download ("Downloading and preparing dataset Unknown size ...", then
    # "... downloaded and prepared to ..."); the phantom is generated, so it says so instead.
    def _log_download_bytes(self) -> None:
        print(f"building the phantom data set {self.name}/{self.builder_config.name}: "
              f"{sum(self.builder_config.split_sizes().values())} studies in {self.data_dir_root}",
              file=sys.stderr, flush=True)

    def _log_download_done(self) -> None:
        """Nothing: `_log_download_bytes` said what is built and where."""
