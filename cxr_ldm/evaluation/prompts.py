"""Evaluation prompts: what a prompt states (findings, sides, grades, locations, devices), prompt files, and
the held-out `dev` and `test` sets drawn from phantom studies.

A prompt file is a JSON list of
  {"text": str, "findings": {CheXpert name: "left" | "right" | "bilateral" | null},
   "details": {CheXpert name: {"severity": str, "kind": str, "devices": [str], "pneumonia": 0 | 1}}}
with `details` optional and an empty `findings` for a normal study. The vocabularies are the phantom's
(`phantom.cases.FINDING_SPECS`): severity is the grade ("small" nodule vs "large" mass for Lung Lesion);
kind is the location (the lobe for Consolidation, the zone for Lung Lesion, "rib" or "clavicle" for
Fracture) or the central line's route for Support Devices, whose `devices` lists the device types.

`dev` and `test` are drawn from phantom studies of seeds no data set split uses (train 0.., validation
10M.., test 20M.., the ceiling's reference studies 30M..): dev from 40M, test from 50M. Each prompt is a
study's impression or its FINDINGS sentences that state a finding, and its truth is that study's case.
Studies with a hedged finding are skipped, and so is a text whose labels (`labeler.label_report`) do not
name exactly the case's findings. A set holds normal studies, one-, two- and three-or-more-finding
prompts in the shares `LEVEL_SHARES`; within each, prompts are taken round-robin over the finding
combinations, so rare combinations are not crowded out, preferring texts that no training study of the
standard splits (seeds below 6000) states word for word. Recipes are chosen on `dev`; `test` is reported, never tuned on.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence

from cxr_ldm.data import reports
from cxr_ldm.data.labeler import label_report
from cxr_ldm.data.phantom.cases import DEVICES, FINDING_SPECS, Finding, draw_findings
from cxr_ldm.data.phantom.reports import write_report
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS, SIDES

DETAIL_KEYS = ("severity", "kind", "devices", "pneumonia")
PHANTOM_REFERENCE_SEED = 30_000_000  # first seed of the real studies that give the conditioning ceilings
PROMPT_SET_SEEDS = {"dev": 40_000_000, "test": 50_000_000}
PROMPT_SET_SIZE = 240
# Shares of a prompt set by the number of findings stated: normal studies, one, two, three or more.
LEVEL_SHARES = (0.1, 0.35, 0.35, 0.2)
TRAINING_SEEDS = range(6000)  # the phantom_cxr training split of the standard configs ("64", "128", "256")
STYLES = ("template", "findings", "alternate", "file")


class PromptFileError(ValueError):
    """A prompt file or entry that does not follow the schema; the message is one line naming the entry."""


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A prompt and what it states: findings {CheXpert name: side or None} (empty = a normal study) and,
    per finding, details {"severity", "kind", "devices", "pneumonia"} in the phantom's vocabulary.

    style: "template" (a phantom impression), "findings" (phantom FINDINGS sentences), "alternate"
    (written in other words than the phantom's templates) or "file" (read from a prompt file); seed: the
    phantom study the prompt was drawn from, if any.
    """
    text: str
    findings: Mapping[str, str | None]
    style: str = "template"
    details: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        _check(self.text, self.findings, self.style, self.details, where=f"prompt {self.text!r}")

    def phantom_findings(self) -> dict:
        """The `findings` argument of `phantom.generate` for a study this prompt describes."""
        if not self.findings:
            return {"No Finding": None}
        return {name: {**({"side": side} if side else {}), **self.details.get(name, {})}
                for name, side in self.findings.items()}

    def to_json(self) -> dict:
        details = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
                   for name, d in self.details.items() if d}
        return {"text": self.text, "findings": dict(self.findings), **({"details": details} if details else {})}


def _fail(where: str, key: str, value, expected: str) -> None:
    raise PromptFileError(f"{where}: {key} = {json.dumps(value, default=str)}: expected {expected}")


def _check(text, findings, style, details, where: str) -> None:
    """Raises PromptFileError (one line: where, the key, the bad value, what was expected)."""
    if not isinstance(text, str) or not text.strip():
        _fail(where, "text", text, "a non-empty string")
    if style not in STYLES:
        _fail(where, "style", style, f"one of {STYLES}")
    if not isinstance(findings, Mapping):
        _fail(where, "findings", findings, "an object {CheXpert name: side}")
    for name, side in findings.items():
        if name not in MAJOR_FINDINGS:
            _fail(where, f"findings[{name!r}]", side, f"a major finding ({', '.join(MAJOR_FINDINGS)})")
        if side is not None and side not in SIDES:
            _fail(where, f"findings[{name!r}]", side, '"left", "right", "bilateral" or null')
        if name in FINDING_SPECS and side not in FINDING_SPECS[name].sides:
            allowed = ", ".join("null" if s is None else f'"{s}"' for s in FINDING_SPECS[name].sides)
            _fail(where, f"findings[{name!r}]", side, f"one of {allowed} for {name}")
    if not isinstance(details, Mapping):
        _fail(where, "details", details, "an object {CheXpert name: {...}}")
    for name, detail in details.items():
        key = f"details[{name!r}]"
        if name not in findings:
            _fail(where, key, detail, "details only for findings the prompt states")
        if not isinstance(detail, Mapping):
            _fail(where, key, detail, f"an object with some of {DETAIL_KEYS}")
        spec = FINDING_SPECS.get(name)
        for field, value in detail.items():
            if field not in DETAIL_KEYS:
                _fail(where, f"{key}[{field!r}]", value, f"one of the keys {DETAIL_KEYS}")
            if field == "severity" and (spec is None or value not in spec.severities or value is None):
                _fail(where, f"{key}['severity']", value, _vocabulary(spec, "severities", name))
            if field == "kind" and (spec is None or value not in spec.kinds or value is None):
                _fail(where, f"{key}['kind']", value, _vocabulary(spec, "kinds", name))
            if field == "devices" and (name != "Support Devices" or not isinstance(value, (list, tuple))
                                       or not value or not set(value) <= set(DEVICES)):
                _fail(where, f"{key}['devices']", value, f"for Support Devices, a non-empty list of {DEVICES}")
            if field == "pneumonia" and (name != "Consolidation" or value not in (0, 1)):
                _fail(where, f"{key}['pneumonia']", value, "0 or 1, for Consolidation")


def _vocabulary(spec, attribute: str, name: str) -> str:
    values = [v for v in getattr(spec, attribute, ()) if v is not None] if spec else []
    return f"one of {values} for {name}" if values else f"nothing: {name} has no {attribute}"


def prompt_from_json(entry, index: int, source: str = "prompts") -> EvalPrompt:
    """One entry of a prompt file -> EvalPrompt; PromptFileError names the entry (index and text)."""
    text = entry.get("text") if isinstance(entry, Mapping) else None
    where = f"{source}: entry {index}" + (f" ({text!r})" if isinstance(text, str) else "")
    if not isinstance(entry, Mapping):
        _fail(where, "entry", entry, 'an object {"text", "findings", "details"}')
    unknown = sorted(set(entry) - {"text", "findings", "details"})
    if unknown:
        _fail(where, f"key {unknown[0]!r}", entry[unknown[0]], 'only "text", "findings" and "details"')
    for key in ("text", "findings"):
        if key not in entry:
            _fail(where, key, None, "present" + (" (an empty object for a normal study)" if key == "findings" else ""))
    details = entry.get("details", {})
    if isinstance(details, Mapping):
        details = {name: ({k: tuple(v) if k == "devices" and isinstance(v, list) else v for k, v in d.items()}
                          if isinstance(d, Mapping) else d) for name, d in details.items()}
    _check(text, entry["findings"], "file", details, where)
    return EvalPrompt(text, dict(entry["findings"]), "file", details)


def load_prompt_file(path: str | os.PathLike) -> tuple[EvalPrompt, ...]:
    """Reads and validates a prompt file (module doc); raises PromptFileError (one line) on any problem."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise PromptFileError(f"{path}: expected a non-empty JSON list of prompts")
    return tuple(prompt_from_json(entry, i, str(path)) for i, entry in enumerate(entries))


def write_prompt_file(prompts: Iterable[EvalPrompt], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump([p.to_json() for p in prompts], f, indent=1)


def prompt_from_case(text: str, case: Sequence[Finding], style: str, seed: int | None = None) -> EvalPrompt:
    """The prompt `text` stating a phantom case (certain findings only), drawn from study `seed`."""
    findings, details = {}, {}
    for f in case:
        findings[f.name] = f.side
        detail = {"severity": f.severity, "kind": f.kind, "devices": f.devices or None,
                  "pneumonia": f.pneumonia if f.name == "Consolidation" and f.pneumonia is not None else None}
        details[f.name] = {k: v for k, v in detail.items() if v is not None}
    return EvalPrompt(text, findings, style, {k: v for k, v in details.items() if v}, seed)


def _positive_findings_sentences(report: str) -> str:
    """The report's FINDINGS sentences that state an observation present (as `label_report` reads them)."""
    sentences = reports.split_sentences(reports.clean_prompt_text(reports.extract_sections(report)["findings"]))
    stated = [s for s in sentences if any(v == 1 and k != "No Finding" for k, v in label_report(s).items())]
    return " ".join(stated)


def states_exactly(text: str, case: Sequence[Finding]) -> bool:
    """Whether the labeler reads in `text` exactly the case's findings as present, and nothing hedged."""
    labels = label_report(text)
    if any(v == -1 for v in labels.values()):
        return False
    positive = {name for name, value in labels.items() if value == 1 and name in MAJOR_FINDINGS}
    return positive == {f.name for f in case}


@functools.lru_cache(maxsize=1)
def training_texts() -> frozenset[str]:
    """Impressions and positive FINDINGS sentences of the phantom training studies (`TRAINING_SEEDS`)."""
    texts = set()
    for seed in TRAINING_SEEDS:
        report, impression, _ = write_report(seed, draw_findings(seed))
        texts.add(impression)
        texts.add(_positive_findings_sentences(report))
    return frozenset(texts)


@functools.lru_cache(maxsize=4)
def draw_prompt_set(name: str, size: int = PROMPT_SET_SIZE, candidates_per_prompt: int = 12) -> tuple[EvalPrompt, ...]:
    """The held-out prompt set `name` ("dev" or "test"): `size` prompts from the studies of its seed range
    (module doc), in a fixed order; a pure function of its arguments."""
    if name not in PROMPT_SET_SEEDS:
        raise ValueError(f"prompt set {name!r}: expected one of {sorted(PROMPT_SET_SEEDS)}")
    first = PROMPT_SET_SEEDS[name]
    seen_in_training = training_texts()
    strata: dict[tuple[str, ...], list[tuple[bool, EvalPrompt]]] = {}
    used: set[str] = set()
    for seed in range(first, first + size * candidates_per_prompt):
        case = draw_findings(seed)
        if any(f.certainty != 1 or f.pneumonia == -1 for f in case):
            continue
        report, impression, _ = write_report(seed, case)
        sources = (("template", impression), ("findings", _positive_findings_sentences(report)))
        style, text = sources[seed % 2] if case else sources[0]
        if not text or text in used or not states_exactly(text, case):
            continue
        used.add(text)
        strata.setdefault(tuple(sorted(f.name for f in case)), []).append(
            (text in seen_in_training, prompt_from_case(text, case, style, seed)))
    for candidates in strata.values():
        candidates.sort(key=lambda c: c[0])  # stable: unseen texts first, then seed order
    chosen: list[EvalPrompt] = []
    for level, share in enumerate(LEVEL_SHARES):
        quota = size - len(chosen) if level == len(LEVEL_SHARES) - 1 else round(size * share)
        queues = [list(c) for key, c in sorted(strata.items()) if min(len(key), len(LEVEL_SHARES) - 1) == level]
        taken = 0
        while taken < quota and any(queues):
            for queue in queues:
                if queue and taken < quota:
                    chosen.append(queue.pop(0)[1])
                    taken += 1
    if len(chosen) < size:
        raise ValueError(f"prompt set {name!r}: only {len(chosen)} usable studies among "
                         f"{size * candidates_per_prompt} seeds; raise candidates_per_prompt")
    return tuple(chosen)


def verbatim_in(prompts: Iterable[EvalPrompt], texts: Iterable[str]) -> int:
    """How many prompts occur word for word (after whitespace normalisation) in any of `texts`."""
    normalized = [" ".join(t.split()) for t in texts]
    return sum(any(" ".join(p.text.split()) in t for t in normalized) for p in prompts)


_NAMES = {"effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax", "consolidation": "Consolidation",
          "atelectasis": "Atelectasis", "edema": "Edema", "lesion": "Lung Lesion", "cardiomegaly": "Cardiomegaly",
          "fracture": "Fracture", "devices": "Support Devices"}


def _p(text: str, style: str = "template", **findings: Mapping) -> EvalPrompt:
    """findings: short name -> {"side": ..., other phantom attributes}."""
    named = {_NAMES[k]: dict(v) for k, v in findings.items()}
    return EvalPrompt(text, {name: v.pop("side", None) for name, v in named.items()}, style,
                      {name: v for name, v in named.items() if v})


def _f(side=None, severity=None, **other) -> dict:
    return {k: v for k, v in dict(side=side, severity=severity, **other).items() if v is not None}


ALT = "alternate"
# Written by hand: every single finding with side and severity words, common combinations and normal
# studies, phrased like the phantom impressions ("template") and in other words ("alternate").
HANDWRITTEN: tuple[EvalPrompt, ...] = (
    # Normal studies.
    _p("No acute cardiopulmonary process."),
    _p("Normal chest radiograph."),
    _p("The lungs are clear. Heart size is normal. No effusion or pneumothorax.", ALT),
    # Pleural effusion: every side, severities.
    _p("Small left pleural effusion.", effusion=_f("left", "small")),
    _p("Moderate right pleural effusion.", effusion=_f("right", "moderate")),
    _p("Large left pleural effusion.", effusion=_f("left", "large")),
    _p("Moderate bilateral pleural effusions.", effusion=_f("bilateral", "moderate")),
    _p("Left pleural effusion, large.", ALT, effusion=_f("left", "large")),
    _p("There is a moderate effusion on the right.", ALT, effusion=_f("right", "moderate")),
    # Pneumothorax.
    _p("Small right apical pneumothorax.", pneumothorax=_f("right", "small")),
    _p("Large left pneumothorax.", pneumothorax=_f("left", "large")),
    _p("Moderate right pneumothorax.", pneumothorax=_f("right", "moderate")),
    _p("Pneumothorax on the left, large in size.", ALT, pneumothorax=_f("left", "large")),
    # Consolidation (lobes), with and without the pneumonia wording.
    _p("Right lower lobe consolidation.", consolidation=_f("right", kind="lower")),
    _p("Left upper lobe consolidation.", consolidation=_f("left", kind="upper")),
    _p("Right middle lobe consolidation, compatible with pneumonia.",
       consolidation=_f("right", kind="middle", pneumonia=1)),
    _p("Bilateral lower lobes consolidation.", consolidation=_f("bilateral", kind="lower")),
    _p("Pneumonia in the left lower lobe.", ALT, consolidation=_f("left", kind="lower", pneumonia=1)),
    # Atelectasis.
    _p("Moderate left basilar atelectasis.", atelectasis=_f("left", "moderate")),
    _p("Mild bibasilar atelectasis.", atelectasis=_f("bilateral", "mild")),
    _p("Moderate right basilar atelectasis.", atelectasis=_f("right", "moderate")),
    _p("Atelectasis at the right lung base, moderate.", ALT, atelectasis=_f("right", "moderate")),
    # Edema (always bilateral).
    _p("Mild pulmonary edema.", edema=_f("bilateral", "mild")),
    _p("Moderate pulmonary edema.", edema=_f("bilateral", "moderate")),
    _p("Severe pulmonary edema.", edema=_f("bilateral", "severe")),
    _p("Findings of severe interstitial and alveolar edema.", ALT, edema=_f("bilateral", "severe")),
    # Lung lesions.
    _p("Large right upper lobe mass.", lesion=_f("right", "large", kind="upper")),
    _p("Left lung base nodule.", lesion=_f("left", "small", kind="lower")),
    _p("Large left mid lung mass.", lesion=_f("left", "large", kind="mid")),
    _p("A large mass is seen in the right upper lung.", ALT, lesion=_f("right", "large", kind="upper")),
    # Cardiomegaly.
    _p("Mild cardiomegaly.", cardiomegaly=_f(severity="mild")),
    _p("Severe cardiomegaly.", cardiomegaly=_f(severity="severe")),
    _p("The heart is markedly enlarged.", ALT, cardiomegaly=_f(severity="severe")),
    # Fractures.
    _p("Left clavicle fracture.", fracture=_f("left", kind="clavicle")),
    _p("Right lateral rib fractures.", fracture=_f("right", kind="rib")),
    _p("Acute fracture of the right clavicle.", ALT, fracture=_f("right", kind="clavicle")),
    # Support devices.
    _p("Endotracheal tube in standard position.", devices=_f(devices=("et_tube",))),
    _p("Left-sided pacemaker in standard position.", devices=_f("left", devices=("pacemaker",))),
    _p("Right internal jugular central line in standard position.",
       devices=_f("right", devices=("central_line",), kind="jugular")),
    _p("Lines and tubes: a pacemaker in the left chest wall.", ALT, devices=_f("left", devices=("pacemaker",))),
    # Combinations.
    _p("Moderate left pleural effusion. Moderate cardiomegaly.",
       effusion=_f("left", "moderate"), cardiomegaly=_f(severity="moderate")),
    _p("Moderate pulmonary edema. Small bilateral pleural effusions. Moderate cardiomegaly.",
       edema=_f("bilateral", "moderate"), effusion=_f("bilateral", "small"), cardiomegaly=_f(severity="moderate")),
    _p("Right lower lobe consolidation, consistent with pneumonia. Small right pleural effusion.",
       consolidation=_f("right", kind="lower", pneumonia=1), effusion=_f("right", "small")),
    _p("Large right pneumothorax. Right lateral rib fractures.",
       pneumothorax=_f("right", "large"), fracture=_f("right", kind="rib")),
    _p("Mild bibasilar atelectasis. Endotracheal tube and nasogastric tube in standard position.",
       atelectasis=_f("bilateral", "mild"), devices=_f(devices=("et_tube", "ng_tube"))),
    _p("Enlarged heart with pulmonary edema and effusions on both sides.", ALT,
       cardiomegaly=_f(), edema=_f("bilateral"), effusion=_f("bilateral")),
)


PROMPT_SETS = ("test", "dev", "handwritten", "reworded")


def prompt_set(name: str) -> tuple[EvalPrompt, ...]:
    """A named prompt set: the held-out "test" (report it) or "dev" (choose recipes on it), the "handwritten"
    set, or its "reworded" part (the prompts written in other words than the phantom's templates)."""
    if name in PROMPT_SET_SEEDS:
        return draw_prompt_set(name)
    if name == "handwritten":
        return HANDWRITTEN
    if name == "reworded":
        return tuple(p for p in HANDWRITTEN if p.style == "alternate")
    raise ValueError(f"prompt set {name!r}: expected one of {PROMPT_SETS} (or a prompt file)")
