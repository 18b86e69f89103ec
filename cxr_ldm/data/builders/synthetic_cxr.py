"""TFDS builder of the synthetic data sets that `python -m cxr_ldm.synthesize` writes.

The writer, not TFDS, makes the files: array_record shards of split "train" under
`<out>/synthetic_cxr/<resolution>/<VERSION>/`, whose `<out>` is the TFDS data_dir. This class states
their features, so `tfds.data_source("synthetic_cxr/64", data_dir=out)` (once `cxr_ldm.data.builders`
is imported) and `train.py --config.data.name=synthetic_cxr --config.data.config=64
--config.data.data_dir=out` read them; asking TFDS to build one raises, naming the writer.

Features: those of every CXR builder (`common.cxr_features`; "report" is the prompt, the only text a
synthetic image has), `labels` from `labeler.label_report(prompt)`, `side` (int8 codes, as
`phantom_cxr.encode_sides`) from `labeler.label_report_details(prompt)`, and `seed`, the seed of the
image's starting noise.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from cxr_ldm.data import labeler
from cxr_ldm.data.builders import common, phantom_cxr
from cxr_ldm.data.chexpert import CHEXPERT_LABELS

NAME = "synthetic_cxr"
SPLIT = "train"
RESOLUTIONS = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class SyntheticCxrConfig(tfds.core.BuilderConfig):
    """resolution: image side in pixels."""

    resolution: int = 64


def prompt_labels(prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """The labels (int8 (14,), `common.encode_labels`) and side codes (int8 (14,), `phantom_cxr.SIDES`
    index) that the prompt states, as the labeler reads it."""
    details = labeler.label_report_details(prompt)
    labels = {name: details[name]["label"] for name in CHEXPERT_LABELS}
    return common.encode_labels(labels), phantom_cxr.encode_sides({n: details[n]["side"] for n in CHEXPERT_LABELS})


def make_example(image: np.ndarray, prompt: str, seed: int) -> dict:
    """uint8 (R, R, 1) image, its prompt and noise seed -> a feature dict of this builder."""
    labels, sides = prompt_labels(prompt)
    return {"image": common.png_bytes(image), "report": prompt, "prompt": prompt, "labels": labels,
            "side": sides, "seed": seed}


def shard_name(index: int, count: int) -> str:
    """The file name TFDS expects for shard `index` of `count` of the split."""
    return f"{NAME}-{SPLIT}.array_record-{index:05d}-of-{count:05d}"


class SyntheticCxr(tfds.core.GeneratorBasedBuilder):
    """Generated chest radiographs with the prompts that made them and the labels those prompts state."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [SyntheticCxrConfig(name=str(r), resolution=r) for r in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = "64"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.cxr_features(
                self.builder_config.resolution,
                side=tfds.features.Tensor(shape=(common.NUM_LABELS,), dtype=np.int8,
                                          doc=f"Side per observation: index in {phantom_cxr.SIDES}."),
                seed=tfds.features.Scalar(dtype=np.int64, doc="Seed of the image's starting noise."),
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        raise FileNotFoundError(
            f"{NAME}/{self.builder_config.name}: no data set in {self.data_dir_root}; "
            "python -m cxr_ldm.synthesize writes one there (--out)")

    def _generate_examples(self):
        raise NotImplementedError("written by python -m cxr_ldm.synthesize")

    # TFDS announces a build as a download; there is none to announce, `_split_generators` says why.
    def _log_download_bytes(self) -> None:
        """Nothing."""

    def _log_download_done(self) -> None:
        """Nothing."""

    def write_shard(self, path: str | os.PathLike, examples: Sequence[Mapping]) -> None:
        """Serializes `examples` (feature dicts of `make_example`) into the array_record file `path`."""
        features = self.info.features
        file_adapters.ArrayRecordFileAdapter.write_examples(
            path, [(str(i), features.serialize_example(example)) for i, example in enumerate(examples)])

    def write_info(self, shard_lengths: Sequence[int], num_bytes: int) -> None:
        """Writes dataset_info.json and features.json for the split's shards (all present, in order)."""
        split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=list(shard_lengths), num_bytes=num_bytes,
                                    filename_template=None)
        self.info.set_splits(tfds.core.SplitDict([split]))
        self.info.write_to_directory(self.data_path)
