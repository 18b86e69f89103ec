"""TFDS builders: small MIMIC-CXR-JPG- and Open-i-shaped trees written here, the phantom "tiny" config.

Everything is read back with `tfds.data_source` and checked value by value (pixels, labels, prompts).
"""
from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import mimic
from PIL import Image

from cxr_ldm.data import phantom
from cxr_ldm.data.builders import builder_class, common, manual, mimic_cxr_jpg, openi_cxr, phantom_cxr, prepare
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.labeler import label_report


def _text(value) -> str:
    return common.as_text(value)


def _by(source, key: str) -> dict[str, dict]:
    return {_text(example[key]): example for example in source}


# ---------------------------------------------------------------- common

def test_label_encoding_round_trip_and_errors():
    labels = {"Cardiomegaly": 1, "Edema": 0, "Pneumonia": -1, "Fracture": None}
    encoded = common.encode_labels(labels)
    assert encoded.dtype == np.int8 and encoded.shape == (14,)
    assert encoded[CHEXPERT_LABELS.index("Cardiomegaly")] == 1
    assert encoded[CHEXPERT_LABELS.index("Pneumonia")] == -1
    assert encoded[CHEXPERT_LABELS.index("Fracture")] == common.NOT_MENTIONED
    assert (encoded == common.NOT_MENTIONED).sum() == 11
    assert common.decode_labels(encoded) == {name: labels.get(name) for name in CHEXPERT_LABELS}
    with pytest.raises(ValueError, match="Cardiomegally"):
        common.encode_labels({"Cardiomegally": 1})
    with pytest.raises(ValueError, match="Edema"):
        common.encode_labels({"Edema": 2})


def _landscape_gradient(height: int = 64, width: int = 96) -> np.ndarray:
    """Dark-left / bright-right border bands around a centred square whose column c holds 40 + c."""
    image = np.zeros((height, width), np.uint8)
    left = (width - height) // 2
    image[:, left + height:] = 255
    image[:, left:left + height] = 40 + np.arange(height, dtype=np.uint8)
    return image


def test_load_square_grayscale_crops_centre_and_scales_16_bit(tmp_path):
    Image.fromarray(_landscape_gradient()).save(tmp_path / "wide.png")
    square = common.load_square_grayscale(tmp_path / "wide.png", 64)
    assert square.shape == (64, 64, 1) and square.dtype == np.uint8
    np.testing.assert_array_equal(square[:, :, 0], np.broadcast_to(40 + np.arange(64), (64, 64)))

    half = common.load_square_grayscale(tmp_path / "wide.png", 32)[:, :, 0]
    assert np.all(np.diff(half.astype(int), axis=1) > 0)  # still increasing left to right: no flip
    assert abs(int(half[0, 0]) - 41) <= 1 and abs(int(half[0, -1]) - 102) <= 1

    deep = np.array([[1000, 3000], [2000, 1000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    scaled = common.load_square_grayscale(tmp_path / "deep.png", 2)[:, :, 0]
    np.testing.assert_array_equal(scaled, [[0, 255], [128, 0]])


# ---------------------------------------------------------------- manual-download builders

_MANUAL_BUILDERS = (mimic_cxr_jpg.MimicCxrJpg, openi_cxr.OpeniCxr)
_SHARED_FEATURES = ("image", "report", "prompt", "labels")


def _feature_spec(feature) -> tuple:
    return feature.to_json(), feature.doc


def test_manual_builders_share_configs_and_features(tmp_path):
    names = [f"{res}{suffix}" for res in (64, 128, 256, 512) for suffix in ("", "_all_views")]
    for cls in _MANUAL_BUILDERS:
        assert issubclass(cls, manual.ManualDownloadBuilder)
        assert [c.name for c in cls.BUILDER_CONFIGS] == names and cls.DEFAULT_CONFIG_NAME == "256"
        assert [c.resolution for c in cls.BUILDER_CONFIGS] == [int(name.split("_")[0]) for name in names]
        assert cls.MANUAL_DOWNLOAD_INSTRUCTIONS and str(cls.VERSION) == "1.0.0"
    assert [c.views for c in mimic_cxr_jpg.MimicCxrJpg.BUILDER_CONFIGS[:2]] == [mimic_cxr_jpg.FRONTAL_VIEWS, None]
    assert [c.frontal_only for c in openi_cxr.OpeniCxr.BUILDER_CONFIGS[:2]] == [True, False]

    for config in ("64", "512_all_views"):
        infos = [cls(config=config, data_dir=tmp_path).info for cls in _MANUAL_BUILDERS]
        resolution = int(config.split("_")[0])
        expected = common.cxr_features(resolution)
        for info in infos:
            assert info.features["image"].shape == (resolution, resolution, 1)
            assert {key: _feature_spec(info.features[key]) for key in _SHARED_FEATURES} == {
                key: _feature_spec(expected[key]) for key in _SHARED_FEATURES}
            assert info.homepage and isinstance(info.metadata, tfds.core.MetadataDict)
        mimic, openi = (set(info.features) - set(_SHARED_FEATURES) for info in infos)
        assert mimic == {"dicom_id", "study_id", "subject_id", "view"}
        assert openi == {"image_id", "study_id", "view"}
    phantom_features = phantom_cxr.PhantomCxr(config="64", data_dir=tmp_path).info.features
    assert {key: _feature_spec(phantom_features[key]) for key in _SHARED_FEATURES} == {
        key: _feature_spec(common.cxr_features(64)[key]) for key in _SHARED_FEATURES}


def test_manual_download_base_is_not_a_data_set():
    assert tfds.builder_cls("mimic_cxr_jpg") is mimic_cxr_jpg.MimicCxrJpg
    assert tfds.builder_cls("openi_cxr") is openi_cxr.OpeniCxr
    with pytest.raises(tfds.core.registered.DatasetNotFoundError):
        tfds.builder_cls(manual.ManualDownloadBuilder.name)
    with pytest.raises(TypeError):  # abstract: it has no files of its own to read
        manual.ManualDownloadBuilder(config="64")


# ---------------------------------------------------------------- MIMIC-CXR-JPG

_MIMIC_IMAGES = [  # dicom_id, subject, study, view, split, pixel value (None: corrupt, -1: no file)
    ("d1", "10000001", "50000001", "PA", "train", 60),
    ("d2", "10000001", "50000001", "LATERAL", "train", 70),
    ("d3", "10000001", "50000002", "AP", "validate", 120),
    ("d4", "11000002", "50000003", "PA", "test", 200),
    ("d5", "11000002", "50000004", "PA", "train", None),
    ("d6", "11000002", "50000004", "PA", "train", -1),
    ("d7", "11000002", "50000005", "PA", "train", 30),
    ("d8", "10000001", "50000006", "PA", "train", 90),
]
_MIMIC_REPORTS = {  # study -> text; s50000005 has none
    "50000001": ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n"
                 " INDICATION:  ___ with cough, eval for pneumonia\n\n FINDINGS:\n Small left pleural\n"
                 " effusion.\n\n IMPRESSION:  Small left pleural effusion.  Mild cardiomegaly.\n"),
    "50000002": "IMPRESSION: No acute cardiopulmonary process.\n",
    "50000003": "FINDINGS: Large right pneumothorax.\nIMPRESSION: 1. Large right pneumothorax.\n",
    "50000004": "IMPRESSION: Normal.\n",
    "50000006": "FINDINGS: Clear lungs.\n",
}
_MIMIC_CHEXPERT = {  # study -> {name: CSV text}; s50000006 has no row
    "50000001": {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0", "Pneumothorax": "0.0"},
    "50000002": {"No Finding": "1.0"},
    "50000003": {"Pneumothorax": "1.0", "Pleural Effusion": "0.0"},
    "50000004": {"No Finding": "1.0"},
    "50000005": {"No Finding": "1.0"},
}


def _write_mimic_tree(root, reports_as_zip: bool):
    mimic.write_mimic_tree(root, _MIMIC_IMAGES, _MIMIC_REPORTS, _MIMIC_CHEXPERT, reports_as_zip)


@pytest.mark.parametrize("reports_as_zip", [True, False])
def test_mimic_cxr_jpg_from_manual_dir(tmp_path, reports_as_zip):
    manual_dir = tmp_path / "manual"
    _write_mimic_tree(manual_dir, reports_as_zip)
    builder = prepare("mimic_cxr_jpg", tmp_path / "data", "64", manual_dir=manual_dir)
    splits = {split: tfds.data_source("mimic_cxr_jpg/64", split=split, data_dir=tmp_path / "data",
                                      download=False) for split in ("train", "validation", "test")}
    by_id = {split: _by(source, "dicom_id") for split, source in splits.items()}
    # d2 is lateral; d5 corrupt, d6 missing, d7 without report: skipped.
    assert {split: sorted(ids) for split, ids in by_id.items()} == {
        "train": ["d1", "d8"], "validation": ["d3"], "test": ["d4"]}

    d1 = by_id["train"]["d1"]
    assert d1["image"].shape == (64, 64, 1) and d1["image"].dtype == np.uint8
    assert np.abs(d1["image"].astype(int) - 60).max() <= 2
    assert np.abs(by_id["test"]["d4"]["image"].astype(int) - 200).max() <= 2
    assert _text(d1["prompt"]) == "Small left pleural effusion. Mild cardiomegaly."
    assert _text(d1["report"]) == _MIMIC_REPORTS["50000001"]
    assert _text(d1["view"]) == "PA" and int(d1["study_id"]) == 50000001 and int(d1["subject_id"]) == 10000001
    expected = {name: None for name in CHEXPERT_LABELS}
    expected.update({"Pleural Effusion": 1, "Cardiomegaly": -1, "Pneumothorax": 0})
    assert common.decode_labels(d1["labels"]) == expected
    assert _text(by_id["test"]["d4"]["prompt"]) == "Large right pneumothorax."
    assert common.decode_labels(by_id["train"]["d8"]["labels"]) == {name: None for name in CHEXPERT_LABELS}

    skipped = tfds.builder_from_directory(builder.data_dir).info.metadata["skipped"]
    assert skipped["train"] == {"corrupt_image": 1, "missing_image": 1, "missing_report": 1}
    assert skipped["validation"] == {} and skipped["test"] == {}


def test_mimic_cxr_jpg_incomplete_manual_dir_lists_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv.gz"):
        prepare("mimic_cxr_jpg", tmp_path / "data", "64")
    manual_dir = tmp_path / "manual"
    _write_mimic_tree(manual_dir, reports_as_zip=True)
    (manual_dir / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    (manual_dir / "mimic-cxr-reports.zip").unlink()
    with pytest.raises(FileNotFoundError) as error:
        prepare("mimic_cxr_jpg", tmp_path / "data", "64", manual_dir=manual_dir)
    assert "mimic-cxr-2.0.0-chexpert.csv.gz or mimic-cxr-2.0.0-chexpert.csv" in str(error.value)
    assert "no report found" not in str(error.value)

    manual_dir = tmp_path / "manual_without_reports"
    _write_mimic_tree(manual_dir, reports_as_zip=True)
    (manual_dir / "mimic-cxr-reports.zip").unlink()
    with pytest.raises(FileNotFoundError, match="no report found"):  # no zip, no .txt beside the studies
        prepare("mimic_cxr_jpg", tmp_path / "data", "64", manual_dir=manual_dir)


# ---------------------------------------------------------------- Open-i

def _openi_xml(study_id: str, sections: dict[str, str], image_ids: list[str]) -> str:
    abstract = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>' for label, text in sections.items())
    images = "".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>'
                     f"</parentImage>" for i in image_ids)
    return textwrap.dedent(f"""\
        <?xml version="1.0" encoding="utf-8"?>
        <eCitation><meta type="rr"/><uId id="{study_id}"/>
        <MedlineCitation><Article><Abstract>{abstract}</Abstract></Article></MedlineCitation>
        <MeSH><major>normal</major></MeSH>{images}</eCitation>
        """)


def _study_ids_by_split() -> dict[str, str]:
    """The first "CXR<n>" study id falling in each split."""
    found = {}
    for n in range(1, 1000):
        found.setdefault(openi_cxr.split_of(f"CXR{n}"), f"CXR{n}")
        if len(found) == 3:
            return found
    raise AssertionError("CRC32 buckets do not cover all splits")


_OPENI_FINDINGS = "The heart is normal in size. Small right pleural effusion."
_OPENI_IMPRESSION = "Small right pleural effusion."


def _write_openi_tree(root, with_projections: bool) -> dict[str, str]:
    ids = _study_ids_by_split()
    train, validation, test = ids["train"], ids["validation"], ids["test"]
    png_dir, xml_dir = root / "NLMCXR_png", root / "NLMCXR_reports" / "ecgen-radiology"
    png_dir.mkdir(parents=True)
    xml_dir.mkdir(parents=True)
    studies = {
        train: ({"COMPARISON": "None.", "INDICATION": "Evaluate for pneumonia",
                 "FINDINGS": _OPENI_FINDINGS, "IMPRESSION": _OPENI_IMPRESSION},
                [f"{train}_1_IM-0001-3001", f"{train}_1_IM-0001-4001", f"{train}_2_IM-0002-1001",
                 f"{train}_3_IM-0003-1001"]),
        "CXR9999": ({"INDICATION": "Chest pain", "FINDINGS": "", "IMPRESSION": ""}, ["CXR9999_1_IM-0009-1001"]),
        validation: ({"IMPRESSION": "No acute cardiopulmonary abnormality."}, [f"{validation}_1_IM-0005-1001"]),
        test: ({"FINDINGS": "Heart size is enlarged. Cardiomegaly."}, [f"{test}_1_IM-0006-1001"]),
    }
    for study_id, (sections, image_ids) in studies.items():
        (xml_dir / f"{study_id[3:]}.xml").write_text(_openi_xml(study_id, sections, image_ids))
    Image.fromarray(_landscape_gradient()).save(png_dir / f"{train}_1_IM-0001-3001.png")
    Image.fromarray(np.full((64, 64), 10, np.uint8)).save(png_dir / f"{train}_1_IM-0001-4001.png")
    (png_dir / f"{train}_2_IM-0002-1001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # {train}_3_IM-0003-1001.png is missing.
    Image.fromarray(np.full((64, 64), 10, np.uint8)).save(png_dir / "CXR9999_1_IM-0009-1001.png")
    Image.fromarray(np.full((70, 64), 150, np.uint8)).save(png_dir / f"{validation}_1_IM-0005-1001.png")
    Image.fromarray(np.full((64, 64), 220, np.uint8)).save(png_dir / f"{test}_1_IM-0006-1001.png")
    if with_projections:  # Kaggle naming: no "CXR" prefix, ".dcm.png"
        rows = [("1", f"{train[3:]}_1_IM-0001-3001.dcm.png", "Frontal"),
                ("1", f"{train[3:]}_1_IM-0001-4001.dcm.png", "Lateral"),
                ("1", f"{train[3:]}_2_IM-0002-1001.dcm.png", "Frontal"),
                ("1", f"{train[3:]}_3_IM-0003-1001.dcm.png", "Frontal"),
                ("2", f"{validation[3:]}_1_IM-0005-1001.dcm.png", "Frontal"),
                ("3", f"{test[3:]}_1_IM-0006-1001.dcm.png", "Frontal")]
        with open(root / "indiana_projections.csv", "w", newline="") as file:
            csv.writer(file).writerows([("uid", "filename", "projection"), *rows])
    return ids


def test_openi_cxr_frontal_images_with_reports(tmp_path):
    manual_dir = tmp_path / "manual"
    ids = _write_openi_tree(manual_dir, with_projections=True)
    builder = prepare("openi_cxr/64", tmp_path / "data", manual_dir=manual_dir)
    by_id = {split: _by(tfds.data_source("openi_cxr/64", split=split, data_dir=tmp_path / "data",
                                         download=False), "image_id")
             for split in ("train", "validation", "test")}
    train = ids["train"]
    assert {split: sorted(examples) for split, examples in by_id.items()} == {
        "train": [f"{train}_1_IM-0001-3001"], "validation": [f"{ids['validation']}_1_IM-0005-1001"],
        "test": [f"{ids['test']}_1_IM-0006-1001"]}

    frontal = by_id["train"][f"{train}_1_IM-0001-3001"]
    np.testing.assert_array_equal(frontal["image"][:, :, 0], np.broadcast_to(40 + np.arange(64), (64, 64)))
    assert _text(frontal["view"]) == "frontal" and _text(frontal["study_id"]) == train
    assert _text(frontal["report"]) == (f"COMPARISON: None.\nINDICATION: Evaluate for pneumonia\n"
                                        f"FINDINGS: {_OPENI_FINDINGS}\nIMPRESSION: {_OPENI_IMPRESSION}")
    assert _text(frontal["prompt"]) == _OPENI_IMPRESSION
    expected = label_report(f"FINDINGS: {_OPENI_FINDINGS}\nIMPRESSION: {_OPENI_IMPRESSION}")
    assert common.decode_labels(frontal["labels"]) == expected
    assert expected["Pleural Effusion"] == 1 and expected["Pneumonia"] is None  # indication not labelled
    assert np.all(by_id["validation"][f"{ids['validation']}_1_IM-0005-1001"]["image"] == 150)
    assert _text(by_id["test"][f"{ids['test']}_1_IM-0006-1001"]["prompt"]) == "Heart size is enlarged. Cardiomegaly."

    skipped = tfds.builder_from_directory(builder.data_dir).info.metadata["skipped"]
    totals = {}
    for counts in skipped.values():
        for reason, count in counts.items():
            totals[reason] = totals.get(reason, 0) + count
    assert skipped["train"]["corrupt_image"] == 1 and skipped["train"]["missing_image"] == 1
    assert totals == {"corrupt_image": 1, "missing_image": 1, "empty_report": 1}


def test_openi_cxr_without_projections_keeps_all_views(tmp_path):
    manual_dir = tmp_path / "manual"
    ids = _write_openi_tree(manual_dir, with_projections=False)
    prepare("openi_cxr", tmp_path / "data", "64", manual_dir=manual_dir)
    train = _by(tfds.data_source("openi_cxr/64", split="train", data_dir=tmp_path / "data", download=False),
                "image_id")
    assert sorted(train) == [f"{ids['train']}_1_IM-0001-3001", f"{ids['train']}_1_IM-0001-4001"]
    assert {_text(example["view"]) for example in train.values()} == {"unknown"}


def test_openi_cxr_missing_reports_folder(tmp_path):
    (tmp_path / "manual" / "NLMCXR_png").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="NLMCXR_reports/ecgen-radiology or ecgen-radiology"):
        prepare("openi_cxr", tmp_path / "data", "64", manual_dir=tmp_path / "manual")


# ---------------------------------------------------------------- phantom

@pytest.fixture(scope="module")
def phantom_tiny_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("phantom_data")
    prepare("phantom_cxr", data_dir, "tiny")
    return data_dir


def test_phantom_cxr_tiny_matches_generator(phantom_tiny_dir):
    config = phantom_cxr.PhantomCxr.builder_configs["tiny"]
    seeds = {}
    for split, size in config.split_sizes().items():
        source = tfds.data_source("phantom_cxr/tiny", split=split, data_dir=phantom_tiny_dir, download=False)
        assert len(source) == size
        seeds[split] = sorted(int(source[i]["seed"]) for i in range(len(source)))
        offset = phantom_cxr.SPLIT_SEED_OFFSETS[split]
        assert seeds[split] == list(range(offset, offset + size))
        for index in (0, len(source) - 1):
            example = source[index]
            expected = phantom.generate(int(example["seed"]), config.resolution)
            np.testing.assert_array_equal(example["image"], expected["image"])
            assert _text(example["report"]) == expected["report"]
            assert _text(example["prompt"]) == expected["prompt"]
            assert common.decode_labels(example["labels"]) == {
                name: expected["labels"].get(name) for name in CHEXPERT_LABELS}
            assert phantom_cxr.decode_sides(example["side"]) == {
                name: expected["side"].get(name) for name in CHEXPERT_LABELS}
            assert [_text(s) for s in example["severity"]] == [
                expected["severity"].get(name) or "" for name in CHEXPERT_LABELS]


@pytest.mark.slow
def test_phantom_parallel_generation_equals_serial(monkeypatch):
    monkeypatch.setattr(phantom_cxr, "_CHUNK_SIZE", 2)
    seeds = range(5, 11)
    serial = list(phantom_cxr.generate_examples(seeds, 32, num_workers=1))
    parallel = list(phantom_cxr.generate_examples(seeds, 32, num_workers=2))
    assert [key for key, _ in parallel] == [key for key, _ in serial] == list(seeds)
    for (_, a), (_, b) in zip(serial, parallel):
        assert a["image"] == b["image"] and a["report"] == b["report"]
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_data_source_reads_without_tensorflow(phantom_tiny_dir, tmp_path):
    """A process in which `import tensorflow` fails reads the array_record files."""
    site = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "grain")))
    no_tf = tmp_path / "site_without_tensorflow"
    no_tf.mkdir()
    for entry in os.listdir(site):
        if not (entry == "tensorflow" or entry.startswith(("tensorflow-", "tensorflow_cpu", "tensorflow_io"))):
            os.symlink(os.path.join(site, entry), no_tf / entry)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("tensorflow") is None
        import tensorflow_datasets as tfds
        import cxr_ldm.data.builders
        source = tfds.data_source("phantom_cxr/tiny", split="validation", data_dir={str(phantom_tiny_dir)!r},
                                  download=False)
        example = source[3]
        assert example["image"].shape == (32, 32, 1) and example["labels"].shape == (14,)
        assert "tensorflow" not in sys.modules
        print("ok", len(source))
        """)
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{no_tf}{os.pathsep}{repo}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "16"]


def test_unknown_data_sets_and_configs_are_named(tmp_path):
    assert builder_class("phantom_cxr") is phantom_cxr.PhantomCxr
    with pytest.raises(ValueError, match=r"Unknown data set 'phantom'; expected one of \['mimic_cxr_jpg', "):
        prepare("phantom/tiny", tmp_path)
    with pytest.raises(ValueError, match=r"Unknown config '32' of phantom_cxr; expected one of \['64', "):
        prepare("phantom_cxr", tmp_path, config="32")
    assert list(tmp_path.iterdir()) == []


def test_tfds_opencv_notice_is_dropped_and_other_warnings_kept(caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        logging.getLogger("absl").warning("OpenCV is not installed. We recommend using OpenCV ...")
        logging.getLogger("absl").warning("a shard is missing")
    assert [r.getMessage() for r in caplog.records] == ["a shard is missing"]
