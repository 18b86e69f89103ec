"""The evaluation's vocabulary of findings: which CheXpert observations count as findings of their own,
which observations a finding implies, and the side codes.

"Major" findings are the observations a radiograph shows directly. The others are left out of the
strict checks (exact match, conditioning accuracy): "No Finding" is the absence of the rest, "Lung
Opacity" and "Enlarged Cardiomediastinum" are parent categories of major findings in the CheXpert
hierarchy, and "Pneumonia" is a clinical diagnosis that an image of a consolidation cannot settle.
"""
from __future__ import annotations

from collections.abc import Iterable

MAJOR_FINDINGS = ("Cardiomegaly", "Lung Lesion", "Edema", "Consolidation", "Atelectasis", "Pneumothorax",
                  "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")

# A finding implies its CheXpert parent categories (and Consolidation/Pneumonia imply each other).
IMPLIED = {
    "Cardiomegaly": ("Enlarged Cardiomediastinum",),
    "Lung Lesion": ("Lung Opacity",),
    "Edema": ("Lung Opacity",),
    "Consolidation": ("Lung Opacity", "Pneumonia"),
    "Pneumonia": ("Lung Opacity", "Consolidation"),
    "Atelectasis": ("Lung Opacity",),
}

# Side codes of the `sides` arrays: 0 = none stated, then SIDES[code - 1].
SIDES = ("left", "right", "bilateral")


def allowed_findings(prompted: Iterable[str]) -> set[str]:
    """The prompted findings plus every observation they imply."""
    prompted = set(prompted)
    return prompted.union(*(IMPLIED.get(name, ()) for name in prompted))


def side_code(side: str | None) -> int:
    """"left" | "right" | "bilateral" | None -> 1 | 2 | 3 | 0."""
    if side is None:
        return 0
    if side not in SIDES:
        raise ValueError(f"side {side!r}; expected one of {SIDES} or None")
    return SIDES.index(side) + 1
