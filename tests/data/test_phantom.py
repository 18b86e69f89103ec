"""Phantom chest radiographs: determinism, images, forced findings in the right place, reports and labels."""
import collections

import numpy as np
import pytest
from PIL import Image

from cxr_ldm.data import phantom
from cxr_ldm.data.phantom import findings as phantom_findings
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.labeler import label_report
from cxr_ldm.data.phantom.cases import FINDING_NAMES, FINDING_SPECS, draw_findings, parse_findings
from cxr_ldm.data.phantom.cli import GRID_ROWS, main
from cxr_ldm.data.phantom.reports import write_report
from cxr_ldm.data.reports import extract_sections, prompt_from_report

RES = 64   # the default training resolution: findings must show here
SEEDS = (0, 1, 2)


def _pair(seed, forced, resolution=RES):
    """(normal image, image with the forced findings) of one patient, float (H, W)."""
    normal = phantom.generate(seed, resolution, {"No Finding": None})["image"][:, :, 0].astype(float)
    study = phantom.generate(seed, resolution, forced)
    return normal, study["image"][:, :, 0].astype(float), study


def _region(image, rows, cols):
    """Mean of the image over fractional (rows, cols) ranges, e.g. rows=(0.6, 0.85)."""
    h, w = image.shape
    return image[int(rows[0] * h):int(rows[1] * h), int(cols[0] * w):int(cols[1] * w)].mean()


def _centroid(weights):
    """(row, col) centroid as fractions of the image size."""
    rows, cols = np.indices(weights.shape)
    total = weights.sum()
    return (rows * weights).sum() / total / weights.shape[0], (cols * weights).sum() / total / weights.shape[1]


def test_deterministic_per_seed_and_seeds_differ():
    a, b, c = phantom.generate(5), phantom.generate(5), phantom.generate(6)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert (a["report"], a["prompt"], a["labels"]) == (b["report"], b["prompt"], b["labels"])
    assert np.abs(a["image"].astype(int) - c["image"].astype(int)).mean() > 2


@pytest.mark.parametrize("resolution", [32, 64, 96, 128, 160])
def test_image_dtype_shape_and_range(resolution):
    image = phantom.generate(3, resolution)["image"]
    assert image.dtype == np.uint8 and image.shape == (resolution, resolution, 1)
    # A film: black background outside the body, dark lungs, bright mediastinum, not saturated everywhere.
    assert image.min() < 30 and image.max() > 170
    assert 60 < image.mean() < 170


def test_normal_anatomy_lungs_dark_mediastinum_bright_heart_to_image_right():
    image = phantom.generate(0, 128, {"No Finding": None})["image"][:, :, 0].astype(float)
    right_lung = _region(image, (0.3, 0.5), (0.15, 0.35))      # patient's right = image left
    left_lung = _region(image, (0.3, 0.5), (0.65, 0.85))
    mediastinum = _region(image, (0.3, 0.5), (0.46, 0.54))
    assert mediastinum > right_lung + 50 and mediastinum > left_lung + 50
    heart_rows = image[int(0.62 * 128):int(0.72 * 128)]
    bright = heart_rows > (mediastinum + (right_lung + left_lung) / 2) / 2
    columns = np.nonzero(bright[:, 30:98].mean(0) > 0.5)[0] + 30
    # The heart extends further to the image right (patient's left) than to the image left.
    assert columns.max() - 64 > 64 - columns.min()


def _heart_width(image, threshold):
    """Mean number of columns brighter than `threshold` (the threshold profile) over rows that cross the
    heart above the diaphragm, between the lateral lung margins (pixels)."""
    h, w = image.shape
    band = image[int(0.45 * h):int(0.62 * h), int(0.2 * w):int(0.88 * w)]
    return (band > threshold).sum(1).mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_cardiomegaly_widens_the_heart(seed):
    normal, _, _ = _pair(seed, {"No Finding": None}, 128)
    threshold = (_region(normal, (0.3, 0.5), (0.15, 0.35)) + _region(normal, (0.6, 0.7), (0.5, 0.6))) / 2
    widths = [_heart_width(normal, threshold)]
    for severity in ("mild", "severe"):
        _, image, study = _pair(seed, {"Cardiomegaly": {"severity": severity}}, 128)
        widths.append(_heart_width(image, threshold))
        assert study["labels"]["Cardiomegaly"] == 1 and study["severity"]["Cardiomegaly"] == severity
    assert widths[0] < widths[1] < widths[2]
    assert widths[2] > 1.35 * widths[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_raises_intensity_at_that_base(seed, side):
    normal, image, _ = _pair(seed, {"Pleural Effusion": {"side": side, "severity": "moderate"}})
    same, other = ((0.6, 0.9), (0.1, 0.4)) if side == "left" else ((0.1, 0.4), (0.6, 0.9))
    diff = image - normal
    assert _region(diff, (0.6, 0.85), same) > 12
    assert abs(_region(diff, (0.6, 0.85), other)) < 1
    assert _region(diff, (0.2, 0.45), same) < 3      # the apex stays aerated


@pytest.mark.parametrize("seed", SEEDS)
def test_small_effusion_blunts_the_costophrenic_angle(seed):
    normal, image, _ = _pair(seed, {"Pleural Effusion": {"side": "right", "severity": "small"}})
    diff = image - normal
    row, col = _centroid(np.maximum(diff, 0))
    assert diff.max() > 40 and row > 0.6 and col < 0.3      # lateral base on the image left


@pytest.mark.parametrize("seed", SEEDS)
def test_small_effusion_shows_under_a_lower_lobe_consolidation(seed):
    """The report states both, so the film must differ from the consolidation alone at that base."""
    consolidation = {"Consolidation": {"side": "right", "kind": "lower"}}
    _, alone, _ = _pair(seed, consolidation)
    _, both, _ = _pair(seed, {**consolidation, "Pleural Effusion": {"side": "right", "severity": "small"}})
    brighter = (both - alone) > 10
    row, col = _centroid(brighter.astype(float))
    assert brighter.sum() >= 25 and row > 0.6 and col < 0.3      # the lateral base on the image left


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_pneumothorax_darkens_the_apex(seed, side):
    normal, image, _ = _pair(seed, {"Pneumothorax": {"side": side, "severity": "small"}})
    cols = (0.55, 0.9) if side == "left" else (0.1, 0.45)
    diff = image - normal
    assert _region(diff, (0.1, 0.35), cols) < -8
    row, col = _centroid(np.maximum(-diff, 0))
    assert row < 0.5 and (col > 0.5) == (side == "left")


@pytest.mark.parametrize(("name", "spec", "rows", "cols", "minimum"), [
    ("Consolidation", {"side": "right", "kind": "lower"}, (0.55, 0.8), (0.1, 0.45), 15),
    ("Consolidation", {"side": "left", "kind": "upper"}, (0.15, 0.45), (0.55, 0.9), 15),
    ("Edema", {"severity": "moderate"}, (0.35, 0.6), (0.15, 0.4), 8),
    ("Edema", {"severity": "moderate"}, (0.35, 0.6), (0.6, 0.85), 8),
])
def test_opacities_raise_intensity_where_expected(name, spec, rows, cols, minimum):
    for seed in SEEDS:
        normal, image, _ = _pair(seed, {name: spec})
        assert _region(image - normal, rows, cols) > minimum


@pytest.mark.parametrize(("name", "spec", "image_right", "upper"), [
    ("Atelectasis", {"side": "left", "severity": "mild"}, True, False),
    ("Atelectasis", {"side": "right", "severity": "mild"}, False, False),
    ("Lung Lesion", {"side": "right", "severity": "small", "kind": "upper"}, False, True),
    ("Lung Lesion", {"side": "left", "severity": "small", "kind": "lower"}, True, False),
    ("Fracture", {"side": "left", "kind": "rib"}, True, None),
    ("Fracture", {"side": "right", "kind": "clavicle"}, False, True),
    ("Support Devices", {"devices": ["pacemaker"], "side": "left"}, True, None),
    ("Support Devices", {"devices": ["central_line"], "side": "right", "kind": "jugular"}, False, None),
])
def test_focal_findings_appear_on_their_side(name, spec, image_right, upper):
    for seed in SEEDS:
        normal, image, study = _pair(seed, {name: spec})
        diff = image - normal
        assert diff.max() > 30, f"{name} {spec} seed {seed}: max change {diff.max()}"
        row, col = _centroid(np.abs(diff) * (np.abs(diff) > 8))
        assert (col > 0.5) == image_right
        if upper is not None:
            assert (row < 0.45) == upper
        assert study["labels"][name] == 1 and study["side"][name] == spec["side"]


def test_forced_finding_changes_nothing_else():
    """Same seed, same patient: outside the finding the pixels are identical."""
    normal, image, _ = _pair(4, {"Lung Lesion": {"side": "right", "severity": "small", "kind": "upper"}})
    changed = np.abs(image - normal) > 0
    rows, cols = np.nonzero(changed)
    assert 0 < changed.sum() < 0.05 * changed.size
    assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16


@pytest.mark.parametrize("name", FINDING_NAMES)
def test_labels_side_and_severity_agree_with_forced_findings(name):
    spec = FINDING_SPECS[name]
    for seed in range(4):
        forced = {"side": spec.sides[-1], "severity": spec.severities[-1]}
        if name == "Support Devices":
            forced = {"devices": ["pacemaker"], "side": "right"}
        study = phantom.generate(seed, 32, {name: forced})
        labels = study["labels"]
        assert labels[name] == 1
        assert study["side"][name] == forced["side"] and study["severity"][name] == forced.get("severity")
        assert labels["No Finding"] is (1 if name == "Support Devices" else None)
        parenchymal = name in ("Consolidation", "Atelectasis", "Edema", "Lung Lesion")
        assert labels["Lung Opacity"] == (1 if parenchymal else None)
        others = [n for n in FINDING_NAMES if n != name]
        assert all(labels[n] in (0, None) for n in others)


def test_uncertain_findings_are_hedged_mildest_and_labelled_minus_one():
    study = phantom.generate(7, 32, {"Pleural Effusion": {"side": "left", "certainty": -1}})
    assert study["labels"]["Pleural Effusion"] == -1 and study["severity"]["Pleural Effusion"] == "small"
    assert "possible" in study["prompt"].lower() or "cannot be excluded" in study["report"]
    with pytest.raises(ValueError, match="certainty"):
        phantom.generate(7, 32, {"Pleural Effusion": {"severity": "large", "certainty": -1}})
    with pytest.raises(ValueError, match="certainty"):
        phantom.generate(7, 32, {"Support Devices": {"certainty": -1}})


def test_pneumonia_alias_and_normal_study():
    study = phantom.generate(2, 32, {"Pneumonia": {"side": "left", "kind": "lower"}})
    assert study["labels"]["Consolidation"] == 1 and study["labels"]["Pneumonia"] == 1
    assert "pneumonia" in study["prompt"].lower() and "left lower lobe" in study["prompt"].lower()
    normal = phantom.generate(2, 32, {"No Finding": None})
    assert normal["labels"]["No Finding"] == 1
    assert all(normal["labels"][n] in (0, None) for n in CHEXPERT_LABELS[1:])


def test_report_sections_prompt_and_phrasing():
    impressions = set()
    for seed in range(60):
        study = phantom.generate(seed, 16)
        report = study["report"]
        assert "FINDINGS:" in report and "IMPRESSION:" in report and "COMPARISON:" in report
        assert "___" in report
        sections = extract_sections(report)
        assert sections["findings"] and sections["impression"]
        assert study["prompt"] == prompt_from_report(report)
        for name, side in study["side"].items():
            stated = study["labels"][name] == 1 and name not in ("Support Devices", "Lung Opacity")
            if side in ("left", "right") and stated:
                assert side in study["prompt"].lower() or "lingula" in study["prompt"].lower(), study["prompt"]
        impressions.add(study["prompt"])
    assert len(impressions) > 30   # varied phrasing


def test_random_draw_statistics():
    counts, uncertain, sides = collections.Counter(), 0, collections.Counter()
    n = 1500
    for seed in range(n):
        case = draw_findings(seed)
        counts["normal"] += not case
        counts["several"] += len(case) > 1
        for finding in case:
            counts[finding.name] += 1
            uncertain += finding.certainty == -1
            sides[finding.side] += 1
    assert 0.25 < counts["normal"] / n < 0.35
    assert 0.15 < counts["several"] / n < 0.4
    for name in FINDING_NAMES:
        assert counts[name] / n > 0.04, name
    total = sum(counts[name] for name in FINDING_NAMES)
    assert 0.04 < uncertain / total < 0.15
    assert sides["left"] > 0.6 * sides["right"] and sides["right"] > 0.6 * sides["left"]


def test_other_count_shares_redraw_only_how_many_findings():
    shares = (0.2, 0.4, 0.4)
    several, n = {"default": 0, "other": 0}, 1500
    for seed in range(n):
        default, other = draw_findings(seed), draw_findings(seed, shares)
        assert (not default) == (not other)  # the same normal studies
        several["default"] += len(default) > 1
        several["other"] += len(other) > 1
    assert several["other"] > 1.5 * several["default"]
    seed = next(s for s in range(n) if len(draw_findings(s, shares)) > len(draw_findings(s)))
    study, drawn = phantom.generate(seed, 32, count_shares=shares), draw_findings(seed, shares)
    np.testing.assert_array_equal(study["image"], phantom.render_image(seed, drawn, 32))
    assert study["report"] == write_report(seed, drawn)[0]


def test_reports_state_their_labels():
    """The repository's rule-based labeler reads the phantom reports back to the phantom labels.

    Lung Opacity is excluded: the phantom sets it from consolidation/atelectasis/edema/lesion as
    CheXpert's data do, while the labeler needs an opacity word.
    """
    disagreements = []
    for seed in range(300):
        case = draw_findings(seed)
        report, _, labels = write_report(seed, case)
        read = label_report(report)
        disagreements += [(seed, name) for name in CHEXPERT_LABELS
                          if name != "Lung Opacity" and read[name] != labels[name]]
    assert len(disagreements) <= 3, disagreements[:10]


@pytest.mark.parametrize(("findings", "message"), [
    ({"Pleural Effusion": {"side": "middle"}}, "side"),
    ({"Pleural Effusion": {"colour": "red"}}, "unknown keys"),
    ({"Cardiomegalie": None}, "unknown names"),
    ({"Support Devices": {"devices": ["toaster"]}}, "devices"),
    ({"No Finding": None, "Edema": None}, "No Finding"),
    ({"Edema": {"pneumonia": 1}}, "unknown keys"),
    ({"Support Devices": {"devices": ["et_tube"], "kind": "jugular"}}, "central_line"),
])
def test_invalid_findings_raise_clear_errors(findings, message):
    with pytest.raises(ValueError, match=message):
        phantom.generate(0, 32, findings)


def test_parse_findings_fills_unspecified_fields_per_seed():
    a = parse_findings(3, {"Lung Lesion": None})
    assert a == parse_findings(3, {"Lung Lesion": {}})
    assert a[0].side in ("left", "right") and a[0].severity in ("small", "large") and a[0].certainty == 1


def test_cli_writes_labelled_contact_sheet(tmp_path, capsys):
    path = tmp_path / "grid.png"
    main(["--grid", str(path), "--resolution", "32", "--reports", "1"])
    sheet = Image.open(path)
    assert sheet.size == (6 * 128, len(GRID_ROWS) * 128)
    assert "IMPRESSION:" in capsys.readouterr().out


def test_hidden_findings_names_what_the_film_does_not_show(monkeypatch):
    """A finding that draws nothing is hidden; drawn findings of the same case are not."""
    case = parse_findings(4, {"Edema": {"severity": "moderate"}, "Pleural Effusion": {"side": "right"}})
    assert phantom.hidden_findings(4, case, RES) == ()
    monkeypatch.setitem(phantom_findings.DRAW, "Edema", lambda *args: None)
    assert [f.name for f in phantom.hidden_findings(4, case, RES)] == ["Edema"]


def test_audit_counts_every_stated_finding_the_film_does_not_show(monkeypatch, capsys):
    monkeypatch.setitem(phantom_findings.DRAW, "Lung Lesion", lambda *args: None)
    audit = phantom.audit_visibility(40, RES)
    lesions = sum(f.name == "Lung Lesion" for seed in range(40) for f in draw_findings(seed))
    assert lesions > 0 and audit["by_finding"]["Lung Lesion"] == [lesions, lesions]
    assert audit["hidden"] == len(audit["hidden_cases"]) == sum(h for _, h in audit["by_finding"].values())
    assert audit["findings"] == sum(len(draw_findings(seed)) for seed in range(40))
    main(["--audit", "40", "--resolution", str(RES)])
    assert f"{audit['hidden']} of {audit['findings']} stated findings not shown" in capsys.readouterr().out
