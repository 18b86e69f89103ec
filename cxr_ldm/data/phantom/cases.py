"""Phantom chest-radiograph cases: which findings a study has.

A case is a tuple of `Finding`s (empty = normal study). `draw_findings` draws one at random and
`parse_findings` builds one from a mapping such as {"Pleural Effusion": {"side": "left", "severity": "small"}}.

Sides are the patient's: "left" is the image right (radiological convention).
An uncertain finding (certainty -1) is hedged in the report ("possible small left pleural effusion") and
is drawn in the image at its mildest grade: the hedge describes a real but subtle finding.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

DEVICES = ("et_tube", "ng_tube", "central_line", "pacemaker", "sternotomy")
LATERAL_DEVICES = ("central_line", "pacemaker")
NORMAL_FRACTION = 0.3
FINDING_COUNT_SHARES = (0.6, 0.3, 0.1)  # of abnormal studies with 1, 2 and 3 drawn findings


@dataclasses.dataclass(frozen=True)
class FindingSpec:
    """What a finding can be: allowed sides, severities (mildest first) and kinds; `weight` = draw frequency."""
    sides: tuple[str | None, ...]
    severities: tuple[str | None, ...]
    kinds: tuple[str | None, ...]
    weight: float
    can_be_uncertain: bool = True


FINDING_SPECS: dict[str, FindingSpec] = {
    "Cardiomegaly": FindingSpec((None,), ("mild", "moderate", "severe"), (None,), 0.14),
    "Pleural Effusion": FindingSpec(("left", "right", "bilateral"), ("small", "moderate", "large"), (None,), 0.15),
    "Pneumothorax": FindingSpec(("left", "right"), ("small", "moderate", "large"), (None,), 0.10),
    # kind = lobe: "middle" is the right middle lobe or the lingula.
    "Consolidation": FindingSpec(("left", "right", "bilateral"), (None,), ("upper", "middle", "lower"), 0.13),
    "Atelectasis": FindingSpec(("left", "right", "bilateral"), ("mild", "moderate"), (None,), 0.12),
    "Edema": FindingSpec(("bilateral",), ("mild", "moderate", "severe"), (None,), 0.08),
    # severity small = nodule, large = mass; kind = lung zone.
    "Lung Lesion": FindingSpec(("left", "right"), ("small", "large"), ("upper", "mid", "lower"), 0.10),
    # side = side of the central line / pacemaker, None when only midline devices are present;
    # kind = route of the central line.
    "Support Devices": FindingSpec((None, "left", "right"), (None,), ("jugular", "subclavian"), 0.11,
                                   can_be_uncertain=False),
    "Fracture": FindingSpec(("left", "right"), (None,), ("rib", "clavicle"), 0.07),
}
FINDING_NAMES = tuple(FINDING_SPECS)
PARENCHYMAL = ("Consolidation", "Atelectasis", "Edema", "Lung Lesion")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding of a case.

    certainty: the label value the report states, 1 (present) or -1 (uncertain).
    kind: lobe (Consolidation), zone (Lung Lesion), "rib"/"clavicle" (Fracture), central line route
        "jugular"/"subclavian" (Support Devices), else None.
    devices: Support Devices only, a subset of DEVICES.
    pneumonia: Consolidation only, the Pneumonia label the report states (1, -1 or None).
    """
    name: str
    side: str | None = None
    severity: str | None = None
    certainty: int = 1
    kind: str | None = None
    devices: tuple[str, ...] = ()
    pneumonia: int | None = None


def random_stream(seed: int, stream: int) -> np.random.Generator:
    """Independent generator for one purpose of one seed (patient, noise, a finding's details, ...)."""
    return np.random.default_rng([stream, seed])


def pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]


def _complete(name: str, rng: np.random.Generator, forced: Mapping, uncertain_rate: float) -> Finding:
    """A Finding with the `forced` fields and the others drawn from `rng`. Raises on invalid values."""
    spec = FINDING_SPECS[name]
    allowed_keys = {"side", "severity", "certainty", "kind"} | {
        "Support Devices": {"devices"}, "Consolidation": {"pneumonia"}}.get(name, set())
    unknown = set(forced) - allowed_keys
    if unknown:
        raise ValueError(f"findings[{name!r}]: unknown keys {sorted(unknown)}; "
                         f"expected some of {sorted(allowed_keys)}.")
    for key, options in (("side", spec.sides), ("severity", spec.severities), ("kind", spec.kinds)):
        if key in forced and forced[key] not in options:
            raise ValueError(f"findings[{name!r}][{key!r}] = {forced[key]!r}; expected one of {options}.")
    mildest = spec.severities[0]
    may_hedge = (spec.can_be_uncertain and forced.get("severity", mildest) == mildest
                 and forced.get("kind") != "clavicle")
    certainty = forced.get("certainty", -1 if may_hedge and rng.random() < uncertain_rate else 1)
    if certainty not in (1, -1) or (certainty == -1 and not may_hedge):
        raise ValueError(f"findings[{name!r}]['certainty'] = {certainty!r}; expected 1, or -1 for a finding that "
                         f"can be uncertain at its mildest grade {mildest!r} (not a clavicle fracture).")
    severity = forced.get("severity", mildest if certainty == -1 else pick(rng, spec.severities))
    side = forced.get("side", pick(rng, spec.sides))
    kind = forced.get("kind", "rib" if name == "Fracture" and certainty == -1 else pick(rng, spec.kinds))
    devices: tuple[str, ...] = ()
    pneumonia = None
    if name == "Support Devices":
        devices, side = _complete_devices(rng, forced)
        if "central_line" not in devices:
            if "kind" in forced:
                raise ValueError(f"findings['Support Devices']['kind'] = {forced['kind']!r} needs a central_line.")
            kind = None
    if name == "Consolidation":
        pneumonia = forced.get("pneumonia", pick(rng, (1, 1, -1, None) if certainty == 1 else (-1, None)))
        if pneumonia not in (1, -1, None):
            raise ValueError(f"findings['Consolidation']['pneumonia'] = {pneumonia!r}; expected 1, -1 or None.")
    return Finding(name, side, severity, certainty, kind, devices, pneumonia)


def _complete_devices(rng: np.random.Generator, forced: Mapping) -> tuple[tuple[str, ...], str | None]:
    """Devices and their side for Support Devices (the side of the central line / pacemaker, if any)."""
    side = forced.get("side")
    if "devices" in forced:
        devices = tuple(forced["devices"])
        bad = [d for d in devices if d not in DEVICES]
        if bad or not devices:
            raise ValueError(f"findings['Support Devices']['devices'] = {forced['devices']!r}; "
                             f"expected a non-empty list from {DEVICES}.")
    else:
        count = 1 + int(rng.random() < 0.35)
        devices = tuple(rng.choice(DEVICES, size=count, replace=False, p=[0.25, 0.15, 0.3, 0.2, 0.1]))
        if side is not None and not set(devices) & set(LATERAL_DEVICES):
            devices += (pick(rng, LATERAL_DEVICES),)
    devices = tuple(d for d in DEVICES if d in devices)
    lateral = set(devices) & set(LATERAL_DEVICES)
    if not lateral:
        if side is not None:
            raise ValueError(f"findings['Support Devices']: side {side!r} needs a central_line or pacemaker.")
        return devices, None
    if side is None:
        side = "left" if "pacemaker" in lateral and rng.random() < 0.85 else pick(rng, ("left", "right"))
    return devices, side


def parse_findings(seed: int, findings: Mapping[str, Mapping | None],
                   uncertain_rate: float = 0.0) -> tuple[Finding, ...]:
    """Forced findings {name: {field: value} or None} -> Findings; unspecified fields are drawn per seed.

    Fields: side, severity, certainty (1 or -1; unless given, -1 with probability `uncertain_rate`), kind,
    devices, pneumonia (see `Finding`). "No Finding" (alone) gives a normal study; "Pneumonia" means
    Consolidation with pneumonia = 1.
    """
    names = dict(findings)
    names.pop("No Finding", None)
    if "Pneumonia" in names:
        pneumonia = dict(names.pop("Pneumonia") or {})
        consolidation = {**pneumonia, **dict(names.pop("Consolidation", None) or {})}
        names["Consolidation"] = {"pneumonia": 1, **consolidation}
    if "No Finding" in findings and names:
        raise ValueError(f"findings: 'No Finding' cannot be combined with {sorted(names)}.")
    unknown = set(names) - set(FINDING_NAMES)
    if unknown:
        raise ValueError(f"findings: unknown names {sorted(unknown)}; expected some of {FINDING_NAMES}, "
                         "'Pneumonia' or 'No Finding'.")
    return tuple(_complete(name, random_stream(seed, 10 + i), names[name] or {}, uncertain_rate)
                 for i, name in enumerate(FINDING_NAMES) if name in names)


def draw_findings(seed: int, count_shares: tuple[float, float, float] = FINDING_COUNT_SHARES) -> tuple[Finding, ...]:
    """Random case: NORMAL_FRACTION normal studies, else 1, 2 or 3 findings (with the probabilities `count_shares`)
    and their clinical associations. Other shares redraw only the number of findings: the same random numbers
    decide all the rest."""
    rng = random_stream(seed, 1)
    if rng.random() < NORMAL_FRACTION:
        return ()
    weights = np.array([spec.weight for spec in FINDING_SPECS.values()])
    count = int(rng.choice([1, 2, 3], p=list(count_shares)))
    names = set(rng.choice(FINDING_NAMES, size=count, replace=False, p=weights / weights.sum()))
    forced: dict[str, dict] = {name: {} for name in names}
    if "Edema" in names:  # congestive failure: big heart, bilateral effusions
        if rng.random() < 0.5:
            forced.setdefault("Cardiomegaly", {})
        if rng.random() < 0.4 and "Pleural Effusion" not in names:
            forced["Pleural Effusion"] = {"side": "bilateral", "severity": "small"}
    return parse_findings(seed, forced, uncertain_rate=0.12)
