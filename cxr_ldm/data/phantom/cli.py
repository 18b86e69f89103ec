"""The phantom's command line.

  python -m cxr_ldm.data.phantom --grid out.png [--resolution 128]   labelled contact sheet
  python -m cxr_ldm.data.phantom --reports 5 [--seed 0]              print reports
  python -m cxr_ldm.data.phantom --audit 3000 --resolution 64        stated findings the film does not show
"""
from __future__ import annotations

import argparse

from PIL import Image

from cxr_ldm.data.phantom.studies import audit_visibility, generate

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
