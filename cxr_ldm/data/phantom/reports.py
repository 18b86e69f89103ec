"""The radiology report of a phantom case: `write_report` turns a case into report text, the impression
(the conditioning prompt) and the CheXpert labels that the report states.

Labels follow CheXpert: 1 = stated present, 0 = stated absent, -1 = stated with uncertainty, None = not
mentioned. Each finding yields a FINDINGS sentence, an IMPRESSION item and the labels they state.
"""
from __future__ import annotations

import dataclasses

from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.phantom.cases import FINDING_NAMES, PARENCHYMAL, Finding, pick, random_stream


@dataclasses.dataclass
class _Statement:
    findings: str
    impression: str | None
    labels: dict[str, int]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_LOBE = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe",
         ("bilateral", "upper"): "bilateral upper lobes", ("bilateral", "middle"): "right middle lobe and lingula",
         ("bilateral", "lower"): "bilateral lower lobes"}
_ZONE = {"upper": ("upper lobe", "upper lung"), "mid": ("mid lung", "mid lung zone"),
         "lower": ("lower lobe", "lung base")}
_DEVICE_SENTENCES = {
    "et_tube": ("Endotracheal tube terminates approximately {cm} cm above the carina.",
                "The endotracheal tube tip is {cm} cm above the carina."),
    "ng_tube": ("A nasogastric tube courses below the diaphragm with the tip in the stomach.",
                "Enteric tube tip is in the stomach."),
    "central_line": ("{Side} {route} central venous catheter terminates in the superior vena cava.",
                     "{Side} {route} line tip is in the mid SVC."),
    "pacemaker": ("{Side}-sided dual-chamber pacemaker with leads in the right atrium and right ventricle.",
                  "{Side} chest wall pacemaker is in place with leads terminating in the right atrium and "
                  "right ventricle."),
    "sternotomy": ("Median sternotomy wires are intact.", "The patient is status post median sternotomy."),
}
_DEVICE_IMPRESSIONS = {"et_tube": "endotracheal tube", "ng_tube": "nasogastric tube",
                       "central_line": "{side} {route} central line", "pacemaker": "{side}-sided pacemaker",
                       "sternotomy": "sternotomy wires"}


def _cardiomegaly(f: Finding, rng) -> _Statement:
    if f.certainty == -1:
        text = pick(rng, ("Heart size is borderline enlarged.", "The cardiac silhouette is borderline enlarged."))
        return _Statement(text, "Borderline enlarged heart size.", {"Cardiomegaly": -1})
    adverb = _ADVERB[f.severity]
    text = pick(rng, (f"The heart is {adverb} enlarged.", f"{_capital(f.severity)} cardiomegaly.",
                       f"Heart size is {adverb} enlarged.", f"There is {f.severity} cardiomegaly."))
    impression = pick(rng, (f"{_capital(f.severity)} cardiomegaly.", f"Cardiomegaly, {f.severity}."))
    return _Statement(text, impression, {"Cardiomegaly": 1})


def _effusion(f: Finding, rng) -> _Statement:
    plural = "s" if f.side == "bilateral" else ""
    what = f"{f.severity} {f.side} pleural effusion{plural}"
    if f.certainty == -1:
        text = pick(rng, (f"Possible {what}.", f"A {what} cannot be excluded."))
        return _Statement(text, f"Possible {what}.", {"Pleural Effusion": -1})
    be, article = ("are", "") if plural else ("is", "a ")
    text = pick(rng, (f"There {be} {article}{what}.", f"{_capital(what)} {be} present.",
                       f"{_capital(what)} with fluid tracking along the lateral chest wall."))
    if f.severity == "small" and f.side != "bilateral" and rng.random() < 0.4:
        text = f"Blunting of the {f.side} costophrenic angle is compatible with a small pleural effusion."
    return _Statement(text, f"{_capital(what)}.", {"Pleural Effusion": 1})


def _pneumothorax(f: Finding, rng) -> _Statement:
    where = "apical " if f.severity == "small" else ""
    what = f"{f.severity} {f.side} {where}pneumothorax"
    if f.certainty == -1:
        text = pick(rng, (f"Possible tiny {f.side} apical pneumothorax.",
                           f"A small {f.side} apical pneumothorax cannot be excluded."))
        return _Statement(text, f"Possible small {f.side} apical pneumothorax.", {"Pneumothorax": -1})
    text = pick(rng, (f"There is a {what}.", f"{_capital(what)} is seen, with the visceral pleural line visible.",
                       f"A {what} is present."))
    return _Statement(text, f"{_capital(what)}.", {"Pneumothorax": 1})


def _consolidation(f: Finding, rng) -> _Statement:
    lobe = _LOBE[(f.side, f.kind)]
    labels = {"Consolidation": f.certainty}
    if f.pneumonia is not None:
        labels["Pneumonia"] = f.pneumonia
    if f.certainty == -1:
        text = pick(rng, (f"Possible early consolidation in the {lobe}.",
                           f"Consolidation in the {lobe} cannot be excluded."))
        impression = f"Possible {lobe} consolidation."
    else:
        text = pick(rng, (f"There is consolidation in the {lobe}.", f"Focal consolidation is present in the {lobe}.",
                           f"Airspace consolidation in the {lobe} with air bronchograms."))
        impression = f"{_capital(lobe)} consolidation."
    if f.pneumonia == 1:
        impression = impression[:-1] + pick(rng, (", compatible with pneumonia.", ", consistent with pneumonia."))
    elif f.pneumonia == -1:
        impression = impression[:-1] + pick(rng, ("; pneumonia cannot be excluded.",
                                                   ", which may represent pneumonia."))
    return _Statement(text, impression, labels)


def _atelectasis(f: Finding, rng) -> _Statement:
    where = "bibasilar" if f.side == "bilateral" else f"{f.side} basilar"
    if f.certainty == -1:
        text = pick(rng, (f"Possible minimal {where} atelectasis.", f"Mild {where} atelectasis cannot be excluded."))
        return _Statement(text, f"Possible mild {where} atelectasis.", {"Atelectasis": -1})
    base = "lung bases" if f.side == "bilateral" else f"{f.side} lung base"
    text = pick(rng, (f"{_capital(f.severity)} {where} atelectasis.",
                       f"Linear opacities at the {base} are consistent with {f.severity} plate-like atelectasis.",
                       f"There is {f.severity} {where} atelectasis."))
    if f.severity == "moderate":
        text += pick(rng, (" There is associated volume loss.", " The hemidiaphragm is mildly elevated."))
    return _Statement(text, f"{_capital(f.severity)} {where} atelectasis.", {"Atelectasis": 1})


def _edema(f: Finding, rng) -> _Statement:
    if f.certainty == -1:
        text = pick(rng, ("Possible mild interstitial pulmonary edema.",
                           "Mild interstitial edema cannot be excluded."))
        return _Statement(text, "Possible mild pulmonary edema.", {"Edema": -1})
    text = {"mild": ("Mild interstitial pulmonary edema with Kerley B lines at the lung bases.",
                     "There is mild pulmonary edema."),
            "moderate": ("Moderate pulmonary edema with perihilar haziness and indistinct pulmonary vessels.",
                         "There is moderate pulmonary edema."),
            "severe": ("Severe pulmonary edema with dense bilateral perihilar opacities.",
                       "Findings are consistent with severe alveolar pulmonary edema.")}[f.severity]
    return _Statement(pick(rng, text), f"{_capital(f.severity)} pulmonary edema.", {"Edema": 1})


def _lung_lesion(f: Finding, rng) -> _Statement:
    zone = f"{f.side} {pick(rng, _ZONE[f.kind])}"
    if f.certainty == -1:
        text = f"Possible nodule in the {zone}; dedicated chest CT is recommended."
        return _Statement(text, f"Possible {zone} nodule.", {"Lung Lesion": -1})
    if f.severity == "small":
        text = pick(rng, (f"There is a rounded nodule in the {zone}.",
                           f"A well-circumscribed nodule projects over the {zone}."))
        impression = pick(rng, (f"{_capital(zone)} nodule.", f"{_capital(zone)} nodule; recommend chest CT."))
    else:
        text = pick(rng, (f"There is a large lobulated mass in the {zone}.", f"A large mass is seen in the {zone}."))
        impression = pick(rng, (f"Large {zone} mass.", f"Large {zone} mass, concerning for malignancy."))
    return _Statement(text, impression, {"Lung Lesion": 1})


def _support_devices(f: Finding, rng) -> _Statement:
    side, route = f.side or "", {"jugular": "internal jugular", "subclavian": "subclavian", None: ""}[f.kind]
    fill = {"cm": int(rng.integers(3, 7)), "side": side, "Side": _capital(side), "route": route}
    text = " ".join(pick(rng, _DEVICE_SENTENCES[d]).format(**fill) for d in f.devices)
    names = [_DEVICE_IMPRESSIONS[d].format(**fill) for d in f.devices]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return _Statement(text, f"{_capital(listed)} in standard position.", {"Support Devices": 1})


def _fracture(f: Finding, rng) -> _Statement:
    if f.certainty == -1:
        text = f"Possible nondisplaced fracture of a {f.side} lateral rib."
        return _Statement(text, f"Possible {f.side} rib fracture.", {"Fracture": -1})
    if f.kind == "rib":
        text = pick(rng, (f"Displaced fractures of several {f.side} lateral ribs with callus formation.",
                           f"There are healing fractures of the {f.side} lateral ribs."))
        return _Statement(text, f"{_capital(f.side)} lateral rib fractures.", {"Fracture": 1})
    text = pick(rng, (f"There is a displaced fracture of the {f.side} mid clavicle.",
                       f"Acute fracture of the {f.side} clavicular shaft with inferior displacement of the "
                       "distal fragment."))
    return _Statement(text, f"{_capital(f.side)} clavicle fracture.", {"Fracture": 1})


_DESCRIBE = {"Cardiomegaly": _cardiomegaly, "Pleural Effusion": _effusion, "Pneumothorax": _pneumothorax,
             "Consolidation": _consolidation, "Atelectasis": _atelectasis, "Edema": _edema,
             "Lung Lesion": _lung_lesion, "Support Devices": _support_devices, "Fracture": _fracture}
# Order of the FINDINGS section (devices, lungs, pleura, heart, bones) and of the IMPRESSION (acute first).
_FINDINGS_ORDER = ("Support Devices", "Consolidation", "Edema", "Atelectasis", "Lung Lesion", "Pleural Effusion",
                   "Pneumothorax", "Cardiomegaly", "Fracture")
_IMPRESSION_ORDER = ("Pneumothorax", "Consolidation", "Edema", "Pleural Effusion", "Lung Lesion", "Atelectasis",
                     "Cardiomegaly", "Fracture", "Support Devices")


def _negatives(present: set[str], rng) -> list[tuple[str, dict[str, int]]]:
    """Explicit negative sentences for observations the case does not have, by section topic."""
    sentences = []
    pleural = {"Pleural Effusion", "Pneumothorax"}
    if not present & (set(PARENCHYMAL) | pleural) and rng.random() < 0.4:
        sentences.append(("No focal consolidation, effusion or pneumothorax.",
                          {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0}))
    else:
        if not present & (set(PARENCHYMAL) | pleural):
            sentences.append(pick(rng, (("The lungs are clear.", {}), ("Lungs are well expanded and clear.", {}),
                                         ("No focal consolidation.", {"Consolidation": 0}))))
        elif "Consolidation" not in present and rng.random() < 0.6:
            sentences.append(("No focal consolidation.", {"Consolidation": 0}))
        absent = [name for name in ("Pleural Effusion", "Pneumothorax") if name not in present]
        if absent:
            listed = " or ".join(name.lower() for name in absent)
            form = pick(rng, ("No {}.", "There is no {}.", "No {} is seen."))
            sentences.append((form.format(listed), {name: 0 for name in absent}))
    if "Edema" not in present and rng.random() < 0.3:
        sentences.append(("No pulmonary edema.", {"Edema": 0}))
    if "Cardiomegaly" not in present:
        sentences.append(pick(rng, (
            ("The heart size is normal.", {"Cardiomegaly": 0}),
            ("Heart size and mediastinal contours are normal.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
            ("The cardiomediastinal silhouette is within normal limits.", {"Enlarged Cardiomediastinum": 0}),
            ("Normal cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": 0}))))
    elif rng.random() < 0.5:
        sentences.append(("The mediastinal contours are normal.", {"Enlarged Cardiomediastinum": 0}))
    if "Fracture" not in present:
        sentences.append(pick(rng, (("No acute osseous abnormality.", {}), ("", {}),
                                     ("No acute fracture is seen.", {"Fracture": 0}),
                                     ("No displaced rib fracture.", {"Fracture": 0}))))
    return [(text, labels) for text, labels in sentences if text]


def _header(findings: tuple[Finding, ...], rng) -> str:
    names = {f.name for f in findings}
    reasons = ["with cough", "with shortness of breath", "with fever and cough", "with chest pain",
               "with dyspnea", "with hypoxia", "for preoperative evaluation", "for follow-up"]
    if "Fracture" in names:
        reasons += ["status post fall", "with chest wall pain after trauma"] * 2
    if "Support Devices" in names:
        reasons += ["after line placement", "after intubation, assess tube position"] * 2
    who = f"___-year-old {pick(rng, ('man', 'woman'))}" if rng.random() < 0.5 else f"___ {pick(rng, ('M', 'F'))}"
    exam = pick(rng, ("EXAMINATION: CHEST (PA AND LAT)", "EXAMINATION: Chest radiograph, PA and lateral views.",
                       "EXAM: CHEST PA AND LATERAL"))
    lines = [exam, f"INDICATION: {who} {pick(rng, tuple(reasons))}."]
    if rng.random() < 0.5:
        lines.append(pick(rng, ("TECHNIQUE: PA and lateral views of the chest.", "TECHNIQUE: Chest PA and lateral.")))
    lines.append("COMPARISON: " + pick(rng, ("___.", "None.", "Chest radiograph from ___.", "Prior study dated ___.")))
    return "\n".join(lines)


def write_report(seed: int, findings: tuple[Finding, ...]) -> tuple[str, str, dict[str, int | None]]:
    """Case -> (report text, impression as one line of sentences, CheXpert labels the report states).

    Labels: positive beats uncertain beats negative across sentences; "Lung Opacity" is 1 when a
    consolidation / atelectasis / edema / lesion / pneumonia is stated present;
    "No Finding" is 1 when no observation other than Support Devices is 1 or -1, else None.
    """
    rng = random_stream(seed, 4)
    by_name = {f.name: f for f in findings}
    statements = {name: _DESCRIBE[name](by_name[name], rng) for name in FINDING_NAMES if name in by_name}
    body = [statements[name].findings for name in _FINDINGS_ORDER if name in statements]
    negatives = _negatives(set(by_name), rng)
    body += [text for text, _ in negatives]
    items = [statements[name].impression for name in _IMPRESSION_ORDER if name in statements]
    if not set(by_name) - {"Support Devices"}:
        normal = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                  "Normal chest radiograph.")
        items.append(pick(rng, normal[:2] if by_name else normal))
    impression = " ".join(items)
    if len(items) > 1 and rng.random() < 0.4:
        section = "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    else:
        section = impression
    if "Pneumothorax" in by_name and rng.random() < 0.5:
        section += "\nFindings were discussed with Dr. ___ by telephone at ___."
    report = f"{_header(findings, rng)}\n\nFINDINGS:\n{' '.join(body)}\n\nIMPRESSION:\n{section}\n"
    labels = _aggregate_labels([s.labels for s in statements.values()] + [labels for _, labels in negatives])
    return report, impression, labels


def _aggregate_labels(stated: list[dict[str, int]]) -> dict[str, int | None]:
    labels: dict[str, int | None] = {name: None for name in CHEXPERT_LABELS}
    for values in stated:
        for name, value in values.items():
            current = labels[name]
            if current is None or (value, current) in ((1, -1), (1, 0), (-1, 0)):
                labels[name] = value
    if any(labels[name] == 1 for name in PARENCHYMAL + ("Pneumonia",)):
        labels["Lung Opacity"] = 1
    abnormal = any(labels[name] in (1, -1) for name in CHEXPERT_LABELS if name not in ("No Finding", "Support Devices"))
    labels["No Finding"] = None if abnormal else 1
    return labels
