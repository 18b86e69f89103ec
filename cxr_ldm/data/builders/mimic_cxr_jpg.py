"""TFDS builder for MIMIC-CXR-JPG (PhysioNet, credentialed access; manual download).

One example per image (dicom_id). Splits follow the official split CSV (train / validate -> validation
/ test). Views: frontal (ViewPosition PA or AP) by default; the `*_all_views` configs keep every image.
Images: grayscale, centred square crop + bicubic resize (see `common`). Prompt:
reports.prompt_from_report of the study's free-text report (impression first, at most 75 CLIP
tokens). Labels: the study's row of the CheXpert CSV (blank -> not mentioned, encoded -2; see
`common`). Images that are missing or unreadable, and studies without a report file, are skipped,
logged and counted in `info.metadata["skipped"][split]`.
"""
from __future__ import annotations

import dataclasses
import math
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cxr_ldm.data.builders import common, manual
from cxr_ldm.data.chexpert import CHEXPERT_LABELS

FRONTAL_VIEWS = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}

_INSTRUCTIONS = """\
Download MIMIC-CXR-JPG 2.x from https://physionet.org/content/mimic-cxr-jpg/ (credentialed access)
and the free-text reports from MIMIC-CXR (https://physionet.org/content/mimic-cxr/), then point
manual_dir at the version folder, laid out as:
  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
  mimic-cxr-2.0.0-metadata.csv.gz     (or .csv)
  mimic-cxr-2.0.0-split.csv.gz        (or .csv)
  mimic-cxr-2.0.0-chexpert.csv.gz     (or .csv)
  mimic-cxr-reports.zip holding files/pXX/pXXXXXXXX/sXXXXXXXX.txt
    (or those .txt files under mimic-cxr-reports/files/ or next to the study folders under files/)
"""


def _csv_names(stem: str) -> tuple[str, str]:
    return (f"{stem}.csv.gz", f"{stem}.csv")


_REQUIRED = {
    "images": ("files",),
    "metadata": _csv_names("mimic-cxr-2.0.0-metadata"),
    "split": _csv_names("mimic-cxr-2.0.0-split"),
    "chexpert": _csv_names("mimic-cxr-2.0.0-chexpert"),
    # The last alternative is the MIMIC-CXR (DICOM) layout: reports next to the study folders.
    "reports": ("mimic-cxr-reports.zip", "mimic-cxr-reports/files", "files"),
}
# How many metadata rows are probed for a report before the reports location is declared wrong.
_REPORT_PROBE_ROWS = 20


@dataclasses.dataclass
class MimicCxrJpgConfig(manual.ManualDownloadConfig):
    """views: ViewPosition values kept (None = all)."""

    views: tuple[str, ...] | None = FRONTAL_VIEWS


def _config(name: str, resolution: int, frontal_only: bool) -> MimicCxrJpgConfig:
    return MimicCxrJpgConfig(name=name, resolution=resolution, views=FRONTAL_VIEWS if frontal_only else None)


def _study_path(subject_id: str, study_id: str) -> str:
    return f"p{subject_id[:2]}/p{subject_id}/s{study_id}"


class _Reports:
    """Report texts from the folder layout or the zip archive, keyed by (subject_id, study_id).

    `read` may be called from several threads (zipfile serialises reads of the shared archive).
    """

    def __init__(self, location: epath.Path):
        self._folder, self._zip, self._members = None, None, {}
        if location.name.endswith(".zip"):
            self._zip = zipfile.ZipFile(location.open("rb"))
            for name in self._zip.namelist():
                parts = name.split("/")
                if name.endswith(".txt") and len(parts) >= 3:
                    self._members["/".join(parts[-3:])] = name
        else:
            self._folder = location

    def read(self, subject_id: str, study_id: str) -> str | None:
        relative = _study_path(subject_id, study_id) + ".txt"
        if self._zip is not None:
            member = self._members.get(relative)
            return None if member is None else self._zip.read(member).decode("utf-8")
        path = self._folder / relative
        return path.read_text() if path.exists() else None


def _chexpert_labels(row: dict[str, str], path: epath.Path) -> dict[str, int | None]:
    """One CheXpert CSV row ("1.0", "0.0", "-1.0" or blank per observation) -> label dict."""
    labels = {}
    for name in CHEXPERT_LABELS:
        text = (row.get(name) or "").strip()
        try:
            value = None if not text or math.isnan(float(text)) else int(float(text))
        except ValueError:
            value = text
        if value not in (None, 1, 0, -1):
            raise ValueError(f"{path}: study s{row['study_id']} column {name!r} = {text!r}; "
                             "expected 1.0, 0.0, -1.0 or blank.")
        labels[name] = value
    return labels


def _study_key(row: dict[str, str]) -> tuple[int, int]:
    return int(row["subject_id"]), int(row["study_id"])


class MimicCxrJpg(manual.ManualDownloadBuilder):
    """MIMIC-CXR-JPG image/report pairs at a fixed square resolution."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    REQUIRED_FILES = _REQUIRED
    HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
    BUILDER_CONFIGS = manual.resolution_configs(_config)

    def _own_features(self):
        return {
            "dicom_id": tfds.features.Text(),
            "study_id": tfds.features.Scalar(dtype=np.int64),
            "subject_id": tfds.features.Scalar(dtype=np.int64),
            "view": tfds.features.Text(doc="DICOM ViewPosition (PA, AP, LATERAL, LL, ...)."),
        }

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        _, paths = self._find_required(dl_manager)
        metadata = common.read_csv(paths["metadata"])
        common.require_columns(metadata, paths["metadata"], ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        split_rows = common.read_csv(paths["split"])
        common.require_columns(split_rows, paths["split"], ("dicom_id", "split"))
        chexpert_rows = common.read_csv(paths["chexpert"])
        common.require_columns(chexpert_rows, paths["chexpert"], ("subject_id", "study_id", *CHEXPERT_LABELS))

        split_of = {row["dicom_id"]: row["split"] for row in split_rows}
        labels_of = {_study_key(row): _chexpert_labels(row, paths["chexpert"]) for row in chexpert_rows}
        views = self.builder_config.views
        records = {split: [] for split in _SPLITS.values()}
        for row in metadata:
            split = _SPLITS.get(split_of.get(row["dicom_id"], ""))
            if split is not None and (views is None or row["ViewPosition"] in views):
                records[split].append(row)
        report_store = _Reports(paths["reports"])
        probe = metadata[:_REPORT_PROBE_ROWS]
        if probe and all(report_store.read(row["subject_id"], row["study_id"]) is None for row in probe):
            raise FileNotFoundError(
                f"{self.name}: no report found at {paths['reports']} for the first {len(probe)} studies of "
                f"{paths['metadata']} (e.g. {_study_path(probe[0]['subject_id'], probe[0]['study_id'])}.txt)."
                f"\n{_INSTRUCTIONS}")

        def parts_of(row):
            text = report_store.read(row["subject_id"], row["study_id"])
            if text is None:
                return manual.Skip(row["dicom_id"], "missing_report", f"study s{row['study_id']}")
            study_dir = paths["images"] / _study_path(row["subject_id"], row["study_id"])
            return manual.ExampleParts(
                key=row["dicom_id"],
                image_path=study_dir / f"{row['dicom_id']}.jpg",
                report=text,
                labels=labels_of.get(_study_key(row), {}),
                features={"dicom_id": row["dicom_id"], "study_id": int(row["study_id"]),
                          "subject_id": int(row["subject_id"]), "view": row["ViewPosition"]},
            )

        return {split: self._generate_examples(split, rows, parts_of) for split, rows in records.items()}
