"""A small TFDS data set whose example i is recognisable by its labels, image and prompt; `builder` is
its module-scoped pytest fixture (import it into a test module to use it)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from cxr_ldm.data.builders import common
from cxr_ldm.data.chexpert import CHEXPERT_LABELS

NUM_EXAMPLES = 40
SIDE = 16
FRACTURE = CHEXPERT_LABELS.index("Fracture")


def toy_image(index: int) -> np.ndarray:
    """uint8 (16, 16, 1): column c holds 10 + 12 c + index, increasing left to right."""
    row = 10 + 12 * np.arange(SIDE) + index
    return np.broadcast_to(row, (SIDE, SIDE)).astype(np.uint8)[:, :, None]


def toy_prompt(index: int) -> str:
    return f"finding number {index}"


def toy_findings(index: int) -> str | None:
    """The FINDINGS section of odd examples' reports (even ones have none); 3 sentences, 20+ tokens."""
    if index % 2 == 0:
        return None
    return f"Finding {index} is seen on the left. There is no pneumothorax. The heart size is normal."


def toy_fracture(index: int) -> int:
    """The Fracture label of example `index`: 1 every tenth example, -1 (uncertain) five after, else -2."""
    return {0: 1, 5: -1}.get(index % 10, common.NOT_MENTIONED)


def toy_example(index: int) -> dict:
    """Example `index`: toy_image(index), toy_prompt(index), labels[0] = index, Fracture toy_fracture(index)
    and the other labels -2; the report holds toy_findings(index) (if any) and the prompt as the impression."""
    labels = np.full((common.NUM_LABELS,), common.NOT_MENTIONED, np.int8)
    labels[0] = index
    labels[FRACTURE] = toy_fracture(index)
    findings = toy_findings(index)
    report = (f"FINDINGS: {findings}\n\n" if findings else "") + f"IMPRESSION: {toy_prompt(index)}"
    return {"image": common.png_bytes(toy_image(index)), "report": report,
            "prompt": toy_prompt(index), "labels": labels}


class PipelineToyCxr(tfds.core.GeneratorBasedBuilder):
    """NUM_EXAMPLES toy examples in one "train" split."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(__file__).parent  # TFDS otherwise expects builders inside a package

    def _info(self):
        return self.dataset_info_from_configs(features=common.cxr_features(SIDE))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        return ((index, toy_example(index)) for index in range(NUM_EXAMPLES))


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    toy = PipelineToyCxr(data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    toy.download_and_prepare()
    return toy
