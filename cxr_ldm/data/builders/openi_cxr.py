"""TFDS builder for the Indiana University chest X-ray collection (Open-i, NLM; manual download).

One example per image. The report of an image is its study's XML file (ecgen-radiology/<n>.xml),
whose `parentImage id`s name the PNG files; the stored `report` joins the labelled AbstractText
sections ("COMPARISON: ...\\nINDICATION: ...\\nFINDINGS: ...\\nIMPRESSION: ..."), the prompt is
reports.prompt_from_report of it and the labels are labeler.label_report of FINDINGS + IMPRESSION only
(an indication such as "evaluate for pneumonia" states no finding).

Views: the XML does not say which image is frontal. With `indiana_projections.csv` (columns
filename, projection = Frontal | Lateral, as distributed with the Kaggle copy of the collection) in
manual_dir, the default configs keep frontal images only; without it every image is kept with
view "unknown" (logged). Splits (the collection has none): by CRC32 of the study id, 80 % train,
10 % validation, 10 % test, so all images of a study share a split. Images: see `common` (centred
square crop, bicubic resize). Missing or unreadable images and studies with neither findings nor
impression are skipped, logged and counted in `info.metadata["skipped"][split]`.
"""
from __future__ import annotations

import dataclasses
import logging
import xml.etree.ElementTree as ElementTree
import zlib

import tensorflow_datasets as tfds
from etils import epath

from cxr_ldm.data.builders import common, manual
from cxr_ldm.data.labeler import label_report

_INSTRUCTIONS = """\
Download the Indiana University chest X-ray collection from https://openi.nlm.nih.gov/faq
(NLMCXR_png.tgz and NLMCXR_reports.tgz), extract both into manual_dir, laid out as:
  NLMCXR_png/CXR<n>_<k>_IM-<...>.png
  NLMCXR_reports/ecgen-radiology/<n>.xml     (or ecgen-radiology/<n>.xml)
Optional: indiana_projections.csv (columns filename, projection) to keep frontal images only.
"""
_REQUIRED = {
    "images": ("NLMCXR_png",),
    "reports": ("NLMCXR_reports/ecgen-radiology", "ecgen-radiology"),
}
_PROJECTIONS_FILE = "indiana_projections.csv"
_REPORT_SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
_LABELLED_SECTIONS = ("FINDINGS", "IMPRESSION")
# Split of a study: CRC32(study id) % 10 -> split.
_SPLIT_OF_BUCKET = ("train",) * 8 + ("validation", "test")


@dataclasses.dataclass
class OpeniCxrConfig(manual.ManualDownloadConfig):
    """frontal_only: keep frontal images where the projections file says which they are."""

    frontal_only: bool = True


@dataclasses.dataclass(frozen=True)
class Study:
    """One report XML: its id ("CXR<n>"), sections {label: text} and image ids (PNG stems)."""

    study_id: str
    sections: dict[str, str]
    image_ids: tuple[str, ...]

    def report(self, labels: tuple[str, ...] = _REPORT_SECTIONS) -> str:
        return "\n".join(f"{label}: {self.sections[label]}" for label in labels if self.sections.get(label))


def parse_report(path: epath.Path) -> Study:
    """One ecgen-radiology XML file -> Study. Raises ValueError naming the file when it is malformed."""
    try:
        root = ElementTree.fromstring(path.read_bytes())
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: not well-formed XML ({error}).") from error
    sections = {}
    for element in root.iter("AbstractText"):
        label = (element.get("Label") or "").upper()
        text = " ".join("".join(element.itertext()).split())
        if label and text:
            sections[label] = text
    image_ids = tuple(element.get("id") for element in root.iter("parentImage") if element.get("id"))
    uid = root.find("uId")
    study_id = uid.get("id") if uid is not None and uid.get("id") else f"CXR{path.stem}"
    return Study(study_id, sections, image_ids)


def split_of(study_id: str) -> str:
    return _SPLIT_OF_BUCKET[zlib.crc32(study_id.encode("utf-8")) % len(_SPLIT_OF_BUCKET)]


def _image_id_of_projection_filename(filename: str) -> str:
    """"1_IM-0001-4001.dcm.png" (Kaggle naming) or "CXR1_1_IM-0001-4001.png" -> "CXR1_1_IM-0001-4001"."""
    stem = filename.removesuffix(".png").removesuffix(".dcm")
    return stem if stem.startswith("CXR") else f"CXR{stem}"


def read_projections(path: epath.Path) -> dict[str, str]:
    """indiana_projections.csv -> {image id: "frontal" | "lateral" | ...} (lower case)."""
    rows = common.read_csv(path)
    common.require_columns(rows, path, ("filename", "projection"))
    return {_image_id_of_projection_filename(row["filename"]): row["projection"].strip().lower() for row in rows}


class OpeniCxr(manual.ManualDownloadBuilder):
    """Open-i (Indiana University) chest radiographs with their reports at a fixed square resolution."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    REQUIRED_FILES = _REQUIRED
    HOMEPAGE = "https://openi.nlm.nih.gov/faq"
    BUILDER_CONFIGS = manual.resolution_configs(OpeniCxrConfig)

    def _own_features(self):
        return {
            "image_id": tfds.features.Text(doc="PNG file stem, e.g. CXR1_1_IM-0001-4001."),
            "study_id": tfds.features.Text(doc="Report id, e.g. CXR1."),
            "view": tfds.features.Text(doc="frontal, lateral or unknown (no projections file)."),
        }

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir, paths = self._find_required(dl_manager)
        xml_files = sorted(paths["reports"].glob("*.xml"))
        if not xml_files:
            raise FileNotFoundError(f"{self.name}: no *.xml report in {paths['reports']}.\n{_INSTRUCTIONS}")
        projections = None
        if (manual_dir / _PROJECTIONS_FILE).exists():
            projections = read_projections(manual_dir / _PROJECTIONS_FILE)
        elif self.builder_config.frontal_only:
            logging.warning("%s: no %s in %s; views unknown, keeping every image.",
                            self.name, _PROJECTIONS_FILE, manual_dir)
        studies = {split: [] for split in _SPLIT_OF_BUCKET}
        for path in xml_files:
            study = parse_report(path)
            studies[split_of(study.study_id)].append(study)

        def parts_of(item):
            study, image_id, view = item
            return manual.ExampleParts(
                key=image_id,
                image_path=paths["images"] / f"{image_id}.png",
                report=study.report(),
                labels=label_report(study.report(_LABELLED_SECTIONS)),
                features={"image_id": image_id, "study_id": study.study_id, "view": view},
            )

        return {split: self._generate_examples(split, self._items(items, projections), parts_of)
                for split, items in studies.items()}

    def _items(self, studies: list[Study], projections: dict[str, str] | None) -> list:
        """A Skip per study without findings or impression (one however many images it has), then
        (study, image id, view) per image kept."""
        keep_views = ("frontal",) if self.builder_config.frontal_only and projections is not None else None
        skipped, items = [], []
        for study in studies:
            if not study.report(_LABELLED_SECTIONS):
                skipped.append(manual.Skip(study.study_id, "empty_report", "no FINDINGS or IMPRESSION"))
                continue
            for image_id in study.image_ids:
                view = "unknown" if projections is None else projections.get(image_id, "unknown")
                if keep_views is None or view in keep_views:
                    items.append((study, image_id, view))
        return skipped + items
