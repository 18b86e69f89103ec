"""The attributes the strict judge scores besides presence and side: grade, location, device types, route.

Each attribute is a slot with a few values (the phantom's vocabularies, `phantom.cases.FINDING_SPECS`):

  grade     the severity of Cardiomegaly, Pleural Effusion, Pneumothorax, Atelectasis and Edema, and
            "small" (nodule) vs "large" (mass) for Lung Lesion;
  location  the lobe of a Consolidation, the zone of a Lung Lesion, "rib" or "clavicle" for a Fracture;
  device    one slot per device type of Support Devices: "absent" or "present";
  route     the central line's route ("jugular" or "subclavian").

A study's slot holds the index of its value, or -1 where the study has no such finding, states it with
uncertainty, or the data set does not record it. The codes come from a phantom case (`slot_codes`); other
data sets have no codes, and their strict score checks presence and side only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from cxr_ldm.data.phantom.cases import DEVICES, FINDING_COUNT_SHARES, FINDING_SPECS, Finding, draw_findings

ATTRIBUTES = ("grade", "location", "device", "route")
UNKNOWN = -1


@dataclasses.dataclass(frozen=True)
class Slot:
    finding: str
    attribute: str  # one of ATTRIBUTES
    values: tuple[str, ...]
    device: str | None = None  # the device type of a "device" slot

    @property
    def name(self) -> str:
        return f"{self.finding}/{self.device or self.attribute}"


def _slots() -> tuple[Slot, ...]:
    slots = []
    for name, spec in FINDING_SPECS.items():
        severities = tuple(s for s in spec.severities if s is not None)
        kinds = tuple(k for k in spec.kinds if k is not None)
        if severities:
            slots.append(Slot(name, "grade", severities))
        if kinds:
            slots.append(Slot(name, "route" if name == "Support Devices" else "location", kinds))
    slots += [Slot("Support Devices", "device", ("absent", "present"), device) for device in DEVICES]
    return tuple(slots)


SLOTS: tuple[Slot, ...] = _slots()
MAX_VALUES = max(len(slot.values) for slot in SLOTS)
SLOT_NAMES = tuple(slot.name for slot in SLOTS)


def slot_codes(case: Sequence[Finding]) -> np.ndarray:
    """int8 (len(SLOTS),): a phantom case's value index per slot, UNKNOWN where it does not apply."""
    codes = np.full(len(SLOTS), UNKNOWN, np.int8)
    by_name = {f.name: f for f in case if f.certainty == 1}
    for i, slot in enumerate(SLOTS):
        finding = by_name.get(slot.finding)
        if finding is None:
            continue
        if slot.attribute == "device":
            codes[i] = int(slot.device in finding.devices)
        else:
            value = finding.severity if slot.attribute == "grade" else finding.kind
            if value in slot.values:
                codes[i] = slot.values.index(value)
    return codes


def phantom_slot_codes(seeds: Sequence[int], count_shares: tuple[float, float, float] = FINDING_COUNT_SHARES
                       ) -> np.ndarray:
    """int8 (N, len(SLOTS)) of the phantom studies of `seeds` drawn with `count_shares` (`cases.draw_findings`; the
    cases only: no image is drawn)."""
    return np.stack([slot_codes(draw_findings(int(seed), count_shares)) for seed in seeds]) if len(seeds) else \
        np.zeros((0, len(SLOTS)), np.int8)


def prompted_codes(findings: Mapping[str, str | None], details: Mapping[str, Mapping]) -> dict[int, int]:
    """{slot index: value index} of what a prompt states (prompts.EvalPrompt fields): the grade, location and
    route it names, and for every device slot of a prompt that lists devices, present or absent."""
    stated = {}
    for i, slot in enumerate(SLOTS):
        if slot.finding not in findings:
            continue
        detail = details.get(slot.finding, {})
        if slot.attribute == "device":
            if detail.get("devices"):
                stated[i] = int(slot.device in detail["devices"])
        else:
            value = detail.get("severity" if slot.attribute == "grade" else "kind")
            if value in slot.values:
                stated[i] = slot.values.index(value)
    return stated
