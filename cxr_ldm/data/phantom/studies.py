"""Phantom studies: `generate(seed, resolution, findings)` returns one study: image, report, prompt (the
impression), labels, side and severity of every finding. Everything is a deterministic function of the
seed; the patient, the pixel noise and each finding's details use independent random streams, so forcing
a finding on a seed changes only that finding's pixels. `audit_visibility` counts the stated findings
that the films do not show.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.phantom import anatomy
from cxr_ldm.data.phantom import findings as phantom_findings
from cxr_ldm.data.phantom.cases import (
    FINDING_COUNT_SHARES,
    FINDING_NAMES,
    PARENCHYMAL,
    Finding,
    draw_findings,
    parse_findings,
    random_stream,
)
from cxr_ldm.data.phantom.reports import write_report


def render_image(seed: int, findings: tuple[Finding, ...], resolution: int) -> np.ndarray:
    """The radiograph of a case: uint8 (resolution, resolution, 1).

    Below anatomy.RENDER_MIN px the film is rendered at RENDER_MIN and box-downsampled (antialiasing).
    """
    patient = anatomy.draw_patient(random_stream(seed, 0))
    rngs = {f.name: random_stream(seed, 30 + FINDING_NAMES.index(f.name)) for f in findings}
    thorax = phantom_findings.thorax_with_findings(patient, findings, rngs)
    size = max(resolution, anatomy.RENDER_MIN)
    canvas = anatomy.Canvas(size, patient)
    fractures = [f for f in findings if f.name == "Fracture"]
    layers = anatomy.normal_layers(canvas, thorax, random_stream(seed, 2), fractures, rngs.get("Fracture"))
    phantom_findings.draw_findings(canvas, thorax, layers, findings, rngs)
    intensity = anatomy.film(layers, patient, canvas, random_stream(seed, 3))
    if size != resolution:
        if size % resolution == 0:
            k = size // resolution
            intensity = intensity.reshape(resolution, k, resolution, k).mean((1, 3))
        else:
            intensity = np.asarray(Image.fromarray(intensity).resize((resolution, resolution), Image.BOX))
    return np.round(intensity * 255.0).astype(np.uint8)[:, :, None]


def hidden_findings(seed: int, findings: tuple[Finding, ...], resolution: int, *, min_pixels: int = 15,
                    min_change: int = 10, film: np.ndarray | None = None) -> tuple[Finding, ...]:
    """The findings of a case that its film does not show: those whose removal (the same patient, the
    other findings kept) changes fewer than `min_pixels` pixels by more than `min_change` gray levels at
    `resolution`, e.g. a lesion behind an enlarged heart. The report states them all the same.
    film: the case's `render_image(seed, findings, resolution)` where the caller has it already."""
    film = (render_image(seed, findings, resolution) if film is None else film).astype(np.int16)
    hidden = []
    for finding in findings:
        without = render_image(seed, tuple(f for f in findings if f is not finding), resolution)
        if np.count_nonzero(np.abs(film - without) > min_change) < min_pixels:
            hidden.append(finding)
    return tuple(hidden)


def audit_visibility(num_studies: int, resolution: int, first_seed: int = 0, **thresholds) -> dict:
    """`hidden_findings` over the random studies of seeds [first_seed, first_seed + num_studies).

    Returns {"studies", "findings": findings stated, "hidden": findings not shown, "studies_with_hidden",
    "by_finding": {name: [stated, hidden]}, "hidden_cases": [(seed, name, kind, severity, side,
    (names of the other findings))]}.
    """
    stated = {name: [0, 0] for name in FINDING_NAMES}
    cases = []
    for seed in range(first_seed, first_seed + num_studies):
        findings = draw_findings(seed)
        hidden = hidden_findings(seed, findings, resolution, **thresholds) if findings else ()
        for finding in findings:
            stated[finding.name][0] += 1
        for finding in hidden:
            stated[finding.name][1] += 1
            others = tuple(f.name for f in findings if f is not finding)
            cases.append((seed, finding.name, finding.kind, finding.severity, finding.side, others))
    return {"studies": num_studies, "findings": sum(n for n, _ in stated.values()), "hidden": len(cases),
            "studies_with_hidden": len({case[0] for case in cases}),
            "by_finding": {name: counts for name, counts in stated.items() if counts[0]}, "hidden_cases": cases}


def _sides_and_severities(findings: tuple[Finding, ...], labels: Mapping) -> tuple[dict, dict]:
    """{CheXpert name: side} and {CheXpert name: severity} of the case (None where not applicable)."""
    side = {name: None for name in CHEXPERT_LABELS}
    severity = {name: None for name in CHEXPERT_LABELS}
    for finding in findings:
        side[finding.name], severity[finding.name] = finding.side, finding.severity
        if finding.name == "Consolidation" and labels["Pneumonia"] in (1, -1):
            side["Pneumonia"] = finding.side
    opacity_sides = {f.side for f in findings if f.name in PARENCHYMAL and f.certainty == 1}
    if labels["Lung Opacity"] == 1:
        side["Lung Opacity"] = opacity_sides.pop() if len(opacity_sides) == 1 else "bilateral"
    return side, severity


def generate(seed: int, resolution: int = 128, findings: Mapping[str, Mapping | None] | None = None,
             count_shares: tuple[float, float, float] = FINDING_COUNT_SHARES) -> dict:
    """One phantom study.

    Args:
      seed: any non-negative int; the study is a deterministic function of (seed, resolution, findings).
      resolution: image side in pixels (>= 16).
      findings: None draws the case at random (`cases.draw_findings` with `count_shares`); a mapping forces it, e.g.
        {"Pleural Effusion": {"side": "left", "severity": "moderate"}} or {"No Finding": None}; see
        `cases.parse_findings` for the fields.

    Returns:
      {"image": uint8 (resolution, resolution, 1), "report": str, "prompt": str (the impression),
       "labels": {CheXpert name: 1 | 0 | -1 | None}, "side": {name: "left" | "right" | "bilateral" | None},
       "severity": {name: "mild" | "moderate" | "severe" | "small" | "large" | None}}.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom.generate: seed must be a non-negative int, got {seed!r}.")
    if not isinstance(resolution, (int, np.integer)) or resolution < 16:
        raise ValueError(f"phantom.generate: resolution must be an int >= 16, got {resolution!r}.")
    case = draw_findings(seed, count_shares) if findings is None else parse_findings(seed, findings)
    report, impression, labels = write_report(seed, case)
    side, severity = _sides_and_severities(case, labels)
    return {"image": render_image(seed, case, int(resolution)), "report": report, "prompt": impression,
            "labels": labels, "side": side, "severity": severity}
