"""Procedural PA chest radiographs with radiology reports and CheXpert labels (the phantom data set).

`generate(seed, resolution, findings)` returns one study: image, report, prompt (the impression),
labels, side and severity of every finding. Everything is a deterministic function of the seed; the
patient, the pixel noise and each finding's details use independent random streams, so forcing a
finding on a seed changes only that finding's pixels.

CLI:
  python -m cxr_ldm.data.phantom --grid out.png [--resolution 128]   labelled contact sheet
  python -m cxr_ldm.data.phantom --reports 5 [--seed 0]              print reports
  python -m cxr_ldm.data.phantom --audit 3000 --resolution 64        stated findings the film does not show
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np
from PIL import Image

from cxr_ldm.data import phantom_anatomy as anatomy
from cxr_ldm.data import phantom_findings
from cxr_ldm.data.labeler import CHEXPERT_LABELS
from cxr_ldm.data.phantom_reports import (
    FINDING_NAMES,
    PARENCHYMAL,
    Finding,
    draw_findings,
    parse_findings,
    random_stream,
    write_report,
)


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
                    min_change: int = 10) -> tuple[Finding, ...]:
    """The findings of a case that its film does not show: those whose removal (the same patient, the
    other findings kept) changes fewer than `min_pixels` pixels by more than `min_change` gray levels at
    `resolution`, e.g. a lesion behind an enlarged heart. The report states them all the same."""
    film = render_image(seed, findings, resolution).astype(np.int16)
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


def generate(seed: int, resolution: int = 128, findings: Mapping[str, Mapping | None] | None = None) -> dict:
    """One phantom study.

    Args:
      seed: any non-negative int; the study is a deterministic function of (seed, resolution, findings).
      resolution: image side in pixels (>= 16).
      findings: None draws the case at random (NORMAL_FRACTION normal studies); a mapping forces it, e.g.
        {"Pleural Effusion": {"side": "left", "severity": "moderate"}} or {"No Finding": None}; see
        `phantom_reports.parse_findings` for the fields.

    Returns:
      {"image": uint8 (resolution, resolution, 1), "report": str, "prompt": str (the impression),
       "labels": {CheXpert name: 1 | 0 | -1 | None}, "side": {name: "left" | "right" | "bilateral" | None},
       "severity": {name: "mild" | "moderate" | "severe" | "small" | "large" | None}}.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom.generate: seed must be a non-negative int, got {seed!r}.")
    if not isinstance(resolution, (int, np.integer)) or resolution < 16:
        raise ValueError(f"phantom.generate: resolution must be an int >= 16, got {resolution!r}.")
    case = draw_findings(seed) if findings is None else parse_findings(seed, findings)
    report, impression, labels = write_report(seed, case)
    side, severity = _sides_and_severities(case, labels)
    return {"image": render_image(seed, case, int(resolution)), "report": report, "prompt": impression,
            "labels": labels, "side": side, "severity": severity}


# Contact sheet: one row per finding, (label, forced findings) per column.
_L, _R = "left", "right"
GRID_ROWS: tuple[tuple[str, tuple[tuple[str, dict | None], ...]], ...] = (
    ("No Finding", tuple(("normal", None) for _ in range(6))),
    ("Cardiomegaly", tuple((s, {"severity": s}) for s in ("mild", "moderate", "severe") * 2)),
    ("Pleural Effusion", tuple((f"{side[0].upper()} {sev}", {"side": side, "severity": sev}) for side, sev in (
        (_L, "small"), (_R, "small"), (_L, "moderate"), (_R, "moderate"), (_R, "large"), ("bilateral", "large")))),
    ("Pneumothorax", tuple((f"{side[0].upper()} {sev}", {"side": side, "severity": sev}) for side, sev in (
        (_L, "small"), (_R, "small"), (_L, "moderate"), (_R, "moderate"), (_L, "large"), (_R, "large")))),
    ("Consolidation", tuple((f"{side[0].upper()} {lobe}", {"side": side, "kind": lobe}) for side in (_R, _L)
                            for lobe in ("upper", "middle", "lower"))),
    ("Atelectasis", tuple((f"{side[0].upper()} {sev}", {"side": side, "severity": sev}) for side, sev in (
        (_L, "mild"), (_R, "mild"), (_L, "moderate"), (_R, "moderate"), ("bilateral", "mild"),
        ("bilateral", "moderate")))),
    ("Edema", tuple((s, {"severity": s}) for s in ("mild", "mild", "moderate", "moderate", "severe", "severe"))),
    ("Lung Lesion", tuple((f"{side[0].upper()} {sev} {zone}", {"side": side, "severity": sev, "kind": zone})
                          for side, sev, zone in ((_R, "small", "upper"), (_L, "small", "mid"),
                                                  (_R, "small", "lower"), (_L, "large", "upper"),
                                                  (_R, "large", "mid"), (_L, "large", "lower")))),
    ("Support Devices", (("ET+NG", {"devices": ["et_tube", "ng_tube"]}),
                         ("R IJ line", {"devices": ["central_line"], "side": _R, "kind": "jugular"}),
                         ("L subclavian", {"devices": ["central_line"], "side": _L, "kind": "subclavian"}),
                         ("L pacemaker", {"devices": ["pacemaker"], "side": _L}),
                         ("R pacer+ET", {"devices": ["pacemaker", "et_tube"], "side": _R}),
                         ("sternotomy", {"devices": ["sternotomy"]}))),
    ("Fracture", tuple((f"{side[0].upper()} {kind}", {"side": side, "kind": kind}) for side, kind in (
        (_L, "rib"), (_R, "rib"), (_L, "clavicle"), (_R, "clavicle"), (_R, "rib"), (_L, "clavicle")))),
)


def contact_sheet(resolution: int = 128, first_seed: int = 0) -> Image.Image:
    """Grayscale grid: one row per GRID_ROWS finding, its name and variant written in each tile.

    Tiles below 128 px are enlarged (nearest neighbour) to 128 px so that the text fits.
    """
    from PIL import ImageDraw
    tile = max(resolution, 128)
    columns = max(len(variants) for _, variants in GRID_ROWS)
    sheet = Image.new("L", (columns * tile, len(GRID_ROWS) * tile))
    draw = ImageDraw.Draw(sheet)
    for row, (name, variants) in enumerate(GRID_ROWS):
        for column, (variant, spec) in enumerate(variants):
            forced = {"No Finding": None} if spec is None else {name: spec}
            image = generate(first_seed + row * columns + column, resolution, forced)["image"][:, :, 0]
            x, y = column * tile, row * tile
            sheet.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y))
            for line, text in enumerate((name, variant)):
                draw.rectangle((x, y + 11 * line, x + 6 * len(text) + 3, y + 11 * line + 11), fill=0)
                draw.text((x + 2, y + 11 * line), text, fill=255)
    return sheet


def _print_audit(audit: dict, resolution: int) -> None:
    print(f"{audit['studies']} studies at {resolution} px: {audit['hidden']} of {audit['findings']} stated findings "
          f"not shown, in {audit['studies_with_hidden']} studies")
    for name, (stated, hidden) in audit["by_finding"].items():
        print(f"  {name}: {hidden} of {stated}")
    for seed, name, kind, severity, side, others in audit["hidden_cases"]:
        detail = " ".join(str(v) for v in (side, severity, kind) if v)
        print(f"  seed {seed}: {name} ({detail}) under {', '.join(others) or 'nothing'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", help="write a labelled contact sheet (PNG) to this path")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--reports", type=int, default=0, help="print this many random reports")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--audit", type=int, default=0,
                        help="count the stated findings that this many random studies' films do not show")
    args = parser.parse_args(argv)
    if not args.grid and not args.reports and not args.audit:
        parser.error("nothing to do: pass --grid PATH, --reports N and/or --audit N")
    if args.grid:
        contact_sheet(args.resolution, args.seed).save(args.grid)
        print(f"wrote {args.grid}")
    if args.audit:
        _print_audit(audit_visibility(args.audit, args.resolution, args.seed), args.resolution)
    for seed in range(args.seed, args.seed + args.reports):
        study = generate(seed, args.resolution)
        positives = {name: value for name, value in study["labels"].items() if value is not None}
        print(f"=== seed {seed}  labels {positives}\n{study['report']}")


if __name__ == "__main__":
    main()
