"""A MIMIC-CXR-JPG-shaped manual-download folder written from tables: JPEG files under files/pXX/pXXXXXXXX/sXXXXXXXX/,
the metadata, split and CheXpert CSVs (gzipped) and the reports, zipped or beside the study folders."""
from __future__ import annotations

import csv
import gzip
import io
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from cxr_ldm.data.chexpert import CHEXPERT_LABELS


def write_csv_gz(path: Path, header: Sequence[str], rows) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(gzip.compress(text.getvalue().encode()))


def study_dir(root: Path, subject: str, study: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


def write_mimic_tree(root: Path, images: Sequence[tuple], reports: Mapping[str, str],
                     chexpert: Mapping[str, Mapping[str, str]], reports_as_zip: bool) -> None:
    """Writes the folder under `root`.

    images: (dicom_id, subject, study, view, split, pixels) rows; pixels: a uint8 (H, W) array, an int (an
      80x64 portrait image of that value), None (a truncated, unreadable JPEG) or -1 (no file).
    reports: study -> report text; chexpert: study -> {CheXpert name: CSV text ("1.0", "0.0", "-1.0")}.
    reports_as_zip: mimic-cxr-reports.zip, else the MIMIC-CXR layout (sXXXXXXXX.txt beside the study folder).
    """
    for dicom_id, subject, study, _, _, pixels in images:
        folder = study_dir(root, subject, study)
        folder.mkdir(parents=True, exist_ok=True)
        if pixels is None:
            (folder / f"{dicom_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        elif isinstance(pixels, np.ndarray):
            Image.fromarray(pixels).save(folder / f"{dicom_id}.jpg", quality=95)
        elif pixels >= 0:  # portrait, like most radiographs
            Image.fromarray(np.full((80, 64), pixels, np.uint8)).save(folder / f"{dicom_id}.jpg", quality=95)
    write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                 ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
                 [(d, su, st, view, 80, 64) for d, su, st, view, _, _ in images])
    write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                 [(d, st, su, split) for d, su, st, _, split, _ in images])
    names = sorted(CHEXPERT_LABELS)  # the real file lists them alphabetically
    subject_of = {st: su for _, su, st, _, _, _ in images}
    write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *names],
                 [(subject_of[st], st, *(values.get(n, "") for n in names)) for st, values in chexpert.items()])
    if reports_as_zip:
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as archive:
            for study, text in reports.items():
                subject = subject_of[study]
                archive.writestr(f"files/p{subject[:2]}/p{subject}/s{study}.txt", text)
    else:
        for study, text in reports.items():
            study_dir(root, subject_of[study], study).with_suffix(".txt").write_text(text)
