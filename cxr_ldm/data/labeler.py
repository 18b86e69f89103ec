"""Rule-based CheXpert labels for chest X-ray reports.

Follows the CheXpert labeler (Irvin et al. 2019, itself built on NegBio) in spirit:

1. mention extraction: phrases per observation found in each sentence;
2. classification of each mention as negative (0), uncertain (-1) or positive (1) from
   negation and uncertainty cues whose scope covers it;
3. aggregation over mentions: positive beats uncertain beats negative; no mention -> None.
   "No Finding" is 1 when no observation other than "Support Devices" (nor any other
   abnormality, e.g. emphysema or calcification) is positive or uncertain, else None.
   As in CheXpert, a positive or uncertain "CHF"/"heart failure" adds an uncertain
   cardiomegaly mention. With `opacity_hierarchy` (default), CheXpert's label hierarchy
   also applies: a positive Consolidation, Pneumonia, Edema, Atelectasis or Lung Lesion is
   a positive "Lung Opacity" (the phantom data set labels this way), except for mentions that
   name no opacity ("vascular congestion", "CHF").

Cue scope (dependency parses replaced by clause rules): a clause ends at ";", ":", "but",
"however", "although", "except", ", and the/there ...", "there is/are"; a forward cue
("no", "without", "may represent", ...) covers the mentions after it in its comma segment
and in following comma segments that continue a list ("No effusion, consolidation, or
pneumothorax"); a backward cue ("has resolved", "cannot be excluded") covers the mentions
before it. Cues that work both ways ("not", "likely", "resolved") look forward when a
mention follows, else backward. Heart and mediastinum mentions ("heart size",
"cardiomediastinal silhouette") need a status word: "enlarged", "widened" -> 1,
"normal", "not enlarged" -> 0, "borderline" -> -1; none -> no mention.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.reports import extract_sections, split_sentences

_OTHER = "Other Finding"  # abnormalities outside the 14 that still rule out "No Finding"
_OPACITY_CHILDREN = ("Consolidation", "Pneumonia", "Edema", "Atelectasis", "Lung Lesion")


def _rx(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# Observation -> phrases naming it (lower-case text).
_MENTIONS: dict[str, re.Pattern] = {
    "Cardiomegaly": _rx(r"\bcardiomegaly\b", r"\bcardiac enlargement\b"),
    "Lung Opacity": _rx(
        r"\bopaci\w*", r"\binfiltrat\w*", r"\bair[- ]?space (?:disease|process)",
        r"\b(?:increased|hazy|patchy|focal|ill-defined|airspace) densit(?:y|ies)\b",
        r"\bhaziness\b", r"\binterstitial (?:markings?|pattern|abnormalit\w*)",
        r"\breticula(?:tion|r (?:markings?|pattern|opacit\w*))", r"\bparenchymal scar\w*",
    ),
    "Lung Lesion": _rx(
        r"\bnodul(?:e|es|ar)\b", r"\bmass(?:es)?\b", r"\blesions?\b", r"\bneoplasms?\b",
        r"\btumou?rs?\b", r"\bcarcinoma\w*", r"\bmalignan\w*", r"\bcavitary\b",
    ),
    "Edema": _rx(
        r"\bedema\b", r"\b(?:pulmonary |vascular |venous )?congestion\b", r"\bchf\b",
        r"\bheart failure\b", r"\bvascular (?:engorgement|redistribution|prominence)",
        r"\bpulmonary venous hypertension\b", r"\bkerley b\b", r"\bfluid overload\b",
    ),
    "Consolidation": _rx(r"\bconsolidat\w*"),
    "Pneumonia": _rx(
        r"\b(?:broncho)?pneumonias?\b", r"\binfectio(?:n|ns|us)\b(?: process)?",
    ),
    "Atelectasis": _rx(r"\batelecta\w*", r"\bcollaps(?:e|ed|es|ing)\b"),
    "Pneumothorax": _rx(r"pneumothora(?:x|ces)\b", r"\bptx\b"),
    "Pleural Effusion": _rx(
        r"\beffusions?\b", r"\bpleural fluid\b", r"\bhydro(?:pneumo)?thorax\b",
        r"\bblunt(?:ing|ed)? (?:of )?(?:the )?(?:\w+ )?costophrenic (?:angles?|sulc\w+)",
        r"\bcostophrenic (?:angle |sulcus )?blunting\b",
    ),
    "Pleural Other": _rx(
        r"\bpleural (?:thickening|plaques?|scar\w*|calcifications?)",
        r"\bpleural[- ]parenchymal (?:scar\w*|thickening|changes)",
        r"\b(?:diaphragmatic|calcified) (?:pleural )?plaques?\b", r"\bfibrothorax\b",
        r"\bapical (?:pleural )?(?:thickening|capping|caps?)\b",
    ),
    "Fracture": _rx(r"\bfractur\w*", r"\bfx\b"),
    "Support Devices": _rx(
        r"\btubes?\b", r"\bcatheters?\b", r"\bpicc\b", r"\bpacer\b", r"\bpacemakers?\b",
        r"\ba?icds?\b", r"\bdefibrillators?\b", r"\bwires?\b", r"\bdevices?\b",
        r"\bstents?\b", r"\bdrains?\b", r"\bcannula\w*", r"\bhardware\b", r"\bprosthe\w+",
        r"\bplates?\b(?![- ]?like)", r"\bscrews?\b", r"\bcoils?\b", r"\barthroplast\w*",
        r"\b(?:port-?a-?cath|mediport|swan[- ]ganz|impella|lvad|iabp|balloon pump|dobhoff)\b",
        r"\b(?:ett|ngt|ogt)\b", r"\bsternotomy\b",
        r"\b(?:central(?: venous)?|picc|midline|arterial|venous|jugular|ij|subclavian|dialysis|"
        r"femoral|pa|access|support|monitoring) lines?\b",
        r"\b(?:lines|tubes) and (?:tubes|lines)\b",
        r"\blines? tips?\b", r"\bline (?:terminat\w*|ends|courses|projects)",
        r"\b(?:pacer|pacemaker|pacing|icd|defibrillator|transvenous|epicardial|ecg|ekg|"
        r"monitoring) leads?\b",
        r"\b(?:chest|chest wall|infusion|power|subcutaneous|access) port\b",
        r"\b(?:valve replacement|prosthetic valve|(?:mitral|aortic) valve (?:replacement|prosthesis))",
    ),
    _OTHER: _rx(
        r"\bemphysema\w*", r"\bhyperinfla\w*", r"\bhyperexpan\w*", r"\bcalcifi\w*",
        r"\bgranulom\w*", r"\bscoliosis\b", r"\bkyphosis\b", r"\bdegenerat\w*", r"\bhernia\w*",
        r"\bpneumomediastinum\b", r"\bpneumoperitoneum\b", r"\bfree (?:intraperitoneal )?air\b",
        r"\bbronchiectasis\b", r"\bfibros\w*", r"\bfibrotic\b", r"\bpericardial effusions?\b",
        r"\bcopd\b", r"\basthma\b", r"\bbronchi(?:tis|olitis)\b", r"\bcuffing\b",
        r"\baspiration\b", r"\bmetasta\w*", r"\bbullae?\b", r"\bbullous\b", r"\bosteopeni\w*",
        r"\bhematoma\b", r"\bhemorrhage\b", r"\bcontusion\b", r"\beventration\b",
        r"\belevat(?:ed|ion)\b", r"\bthickening\b", r"\bprominen\w*", r"\btortu\w*",
        r"\bvolume loss\b", r"\bdeformit\w*", r"\bcephalization\b", r"\bairways? disease\b",
        r"\b(?:lymph)?adenopathy\b", r"\bscar(?:s|ring)?\b",
    ),
}
# Observation -> phrases whose overlap voids a mention ("plate-like", "mass effect").
_UNMENTIONS: dict[str, re.Pattern] = {
    "Lung Lesion": _rx(
        r"\b(?:lytic|blastic|sclerotic|osseous|bony|bone|skeletal|skin|cutaneous|osteolytic|"
        r"osteoblastic|breast|soft tissue|liver|hepatic|renal|adrenal) (?:lesions?|mass(?:es)?)\b",
        r"\bmass effect\b",
    ),
    "Pleural Effusion": _rx(r"\bpericardial effusions?\b"),
    "Support Devices": _rx(r"\bwire[- ]?like\b", r"\b(?:bronchial|eustachian) tubes?\b"),
    "Lung Opacity": _rx(r"\bopacified (?:catheter|tube)\b"),
}
# Heart / mediastinum words: labelled only through a nearby status word.
_ATTRIBUTES: dict[str, re.Pattern] = {
    "Cardiomegaly": _rx(
        r"\bheart\b(?! (?:failure|borders?|valves?|catheter))",
        r"\bcardiac (?:silhouette|size|shadow|contours?|diameter|outline)s?\b",
        r"\bcardiac\b(?= and mediastinal)",
    ),
    "Enlarged Cardiomediastinum": _rx(
        r"\bcardiomediastinal\b",
        r"\bmediastin(?:um|al)\b(?! (?:lymph|nodes?|adenopathy|shift|drains?|clips|emphysema|air|wires|mass))",
    ),
}
_ATTRIBUTE_UNMENTIONS = _rx(
    r"\b(?:over|overlying|overlies|in|into|within|behind|projecting over|projects over) the "
    r"(?:right |left |superior )?(?:heart|cardiac silhouette|mediastinum)\b",
)
_ENLARGED_STATUS = _rx(r"\benlarg\w*", r"\blarge\b", r"\bincreas\w*", r"\bprominen\w*", r"\bwiden\w*",
                       r"\bwide\b", r"\bdilat\w*", r"\bcardiomegaly\b")
_NORMAL_STATUS = _rx(r"\bnormal\b", r"\bunremarkable\b", r"\bnot (?:\w+ )?(?:enlarged|widened|increased|prominent)\b")
_BORDERLINE_STATUS = _rx(r"\bborderline\b")

# Cues. "fwd": covers mentions after it; "bwd": before it; "both": after it if any, else before.
_NEGATION_CUES: tuple[tuple[str, re.Pattern], ...] = (
    ("fwd", _rx(r"\bno\b(?! longer)", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b",
                r"\bclear of\b", r"\babsence of\b", r"\b(?:resolution|removal|clearing|disappearance) of\b",
                r"\bnor\b", r"\bneither\b", r"\brather than\b")),
    ("both", _rx(r"\bnot\b", r"\bno longer\b", r"\bresolved\b", r"\bremoved\b", r"\bcleared\b",
                 r"\bexcluded\b", r"\bruled out\b", r"\babsent\b", r"\bdisappeared\b")),
)
_PSEUDO_NEGATIONS = _rx(
    r"\b(?:no|not|without) (?:\w+ ){0,3}?(?:change[sd]?|increase[sd]?|decrease[sd]?|progression|"
    r"worsening|difference)\b",
    r"\bnot (?:only|necessarily|clear|certain|sure|well (?:seen|visualized|evaluated|assessed))\b",
    r"\b(?:partial(?:ly)?|incomplete(?:ly)?|near(?:ly)?|almost|nearly complete|near complete|"
    r"slowly|not|not yet|not completely|not fully) (?:resol\w+|clear\w*)",
    r"\bgram negative\b",
)
_NEGATED_UNCERTAINTY_CUES = _rx(
    r"\b(?:can ?not|could not|can't|couldn't|unable to|impossible to|difficult to|not) "
    r"(?:be |been )?(?:entirely |completely |definitely |totally |fully )?(?:exclude[ds]?|rule[ds]? out)\b",
)
_UNCERTAINTY_CUES: tuple[tuple[str, re.Pattern], ...] = (
    ("both", _rx(r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossib(?:le|ly|ility)\b", r"\bprobabl[ey]\b",
                 r"\b(?:un)?likely\b", r"\bsuggest\w*", r"\bconcern(?:ing)?(?: for)?\b", r"\bworrisome\b",
                 r"\bsuspicious\b", r"\bsuspect(?:ed)?\b", r"\bquestionabl[ey]\b", r"\bquestion(?:ed| of)\b",
                 r"\bpresum(?:ed|ably|ptive)\b", r"\bequivocal\b", r"\bindeterminate\b", r"\bborderline\b",
                 r"\bunclear\b", r"\buncertain\b", r"\bnot (?:clear|certain|sure)\b", r"\bpotential(?:ly)?\b",
                 r"\bperhaps\b", r"\?", r"\b(?:raises?|raising) (?:the )?(?:possibility|question|concern)\b")),
    ("fwd", _rx(r"\bdifferential(?: diagnosis)?(?: includes?| would include| of)?\b")),
    ("adjacent", _rx(r"\bversus\b", r"\bvs\b\.?")),
)
_ALWAYS_UNCERTAIN = _rx(r"\bpulmonary venous hypertension\b")
_WITHOUT_OPACITY = _rx(r".*\b(?:congestion|chf|heart failure|engorgement|redistribution|prominence|hypertension|overload)\b")
_CHF = _rx(r"\bchf\b", r"\bheart failure\b")

_CLAUSE_END = _rx(
    r";", r":", r"\b(?:but|however|although|though|except|whereas|otherwise)\b",
    r"\b(?:aside|apart) from\b", r"\bother than\b", r",? and (?:there|the|this|these|a|an)\b",
    r"\bthere (?:is|are|was|were|has been|have been)\b",
)
_VERB = _rx(r"\b(?:is|are|was|were|be|been|has|have|had|seen|noted|present|identified|appears?|"
            r"remains?|persists?|demonstrat\w+|shows?|projects?|terminat\w+|measur\w+|extends?)\b")
_LIST_BREAKER = _rx(
    r"^(?:and )?(?:small|mild|moderate|large|severe|minimal|trace|tiny|massive|new|increas\w*|"
    r"decreas\w*|persistent|stable|unchanged|worsen\w*|improv\w*|left|right|bilateral|bibasilar)\b",
)

_SIDES = (("bilateral", _rx(r"\bbilateral\w*", r"\bbi(?:basilar|basal|apical|lateral)\b", r"\bboth\b",
                             r"\b(?:lung )?(?:bases|apices)\b")),
          ("left", _rx(r"\bleft\b", r"\blt\b", r"\bl(?:ll|ul)\b", r"\blingul\w*", r"\bretrocardiac\b")),
          ("right", _rx(r"\bright\b", r"\brt\b", r"\br(?:ll|ml|ul)\b")))
_SEVERITIES = (("small", _rx(r"\bsmall\b", r"\btiny\b", r"\btrace\b", r"\bminimal\w*")),
               ("mild", _rx(r"\bmild\w*", r"\bslight\w*")),
               ("moderate", _rx(r"\bmoderate\w*")),
               ("large", _rx(r"\blarge\b", r"\bmassive\b", r"\bextensive\b", r"\bsizable\b")),
               ("severe", _rx(r"\bsevere\w*", r"\bmarked(?:ly)?\b")))
_SEVERITY_ORDER = [name for name, _ in _SEVERITIES]
_LATERAL = ("Lung Opacity", "Lung Lesion", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
            "Pleural Effusion", "Pleural Other", "Fracture")


@dataclasses.dataclass
class _Mention:
    observation: str
    start: int
    end: int
    label: int = 1
    side: str | None = None
    severity: str | None = None
    without_opacity: bool = False  # names a cause of opacity, not one ("vascular congestion", "CHF")


@dataclasses.dataclass(frozen=True)
class _Cue:
    kind: str  # "negunc" | "neg" | "unc"
    direction: str  # "fwd" | "bwd" | "both" | "adjacent"
    start: int
    end: int


def label_report(text: str, *, opacity_hierarchy: bool = True) -> dict[str, int | None]:
    """CheXpert labels of one report.

    Labels the impression plus the findings when the report has either section, else the
    whole report. Returns {name: 1 | 0 | -1 | None} for every name of `CHEXPERT_LABELS`.
    `opacity_hierarchy=False` keeps "Lung Opacity" to its own mentions, as the CheXpert labeler does.
    """
    details = label_report_details(text, opacity_hierarchy=opacity_hierarchy)
    return {name: detail["label"] for name, detail in details.items()}


def label_report_details(text: str, *, opacity_hierarchy: bool = True) -> dict[str, dict]:
    """Like `label_report`, plus the side and severity stated near positive mentions.

    Returns {name: {"label": 1|0|-1|None, "side": "left"|"right"|"bilateral"|None,
    "severity": "small"|"mild"|"moderate"|"large"|"severe"|None}}; side and severity come from
    the mentions that carry the label (1 or -1) and are None otherwise.
    """
    mentions = [m for sentence in split_sentences(_labelled_text(text)) for m in _sentence_mentions(sentence)]
    if opacity_hierarchy:
        mentions += [_Mention("Lung Opacity", m.start, m.end, 1, m.side) for m in mentions
                     if m.observation in _OPACITY_CHILDREN and m.label == 1 and not m.without_opacity]
    details = {}
    for name in CHEXPERT_LABELS[1:]:
        own = [m for m in mentions if m.observation == name]
        details[name] = _aggregate(own)
    abnormal = any(m.label in (1, -1) for m in mentions if m.observation != "Support Devices")
    no_finding = None if abnormal or not _labelled_text(text).strip() else 1
    return {"No Finding": {"label": no_finding, "side": None, "severity": None}, **details}


def _labelled_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"label_report expects the report as str, got {type(text).__name__}")
    sections = extract_sections(text)
    if sections["impression"] or sections["findings"]:
        return sections["impression"] + "\n" + sections["findings"]
    return text


def _aggregate(mentions: list[_Mention]) -> dict:
    """Positive beats uncertain beats negative; side/severity from the label's mentions."""
    labels = {m.label for m in mentions}
    label = next((value for value in (1, -1, 0) if value in labels), None)
    carrying = [m for m in mentions if m.label == label and label in (1, -1)]
    sides = {m.side for m in carrying if m.side}
    side = "bilateral" if "bilateral" in sides or len(sides) > 1 else next(iter(sides), None)
    severities = [m.severity for m in carrying if m.severity]
    severity = max(severities, key=_SEVERITY_ORDER.index) if severities else None
    return {"label": label, "side": side, "severity": severity}


def _sentence_mentions(sentence: str) -> list[_Mention]:
    """All classified mentions of one sentence (CHF also yields an uncertain cardiomegaly)."""
    text = sentence.lower()
    mentions = _find_mentions(text)
    clauses = _spans_between(text, _CLAUSE_END)
    cues = _find_cues(text)
    for mention in mentions:
        covering = [cue.kind for cue in cues if _covers(cue, mention, mentions, text, clauses)]
        for kind, label in (("negunc", -1), ("neg", 0), ("unc", -1)):
            if kind in covering:
                if mention.label != 0:  # a normal heart stays normal under any cue
                    mention.label = label
                break
        if mention.label == 1 and _ALWAYS_UNCERTAIN.fullmatch(text, mention.start, mention.end):
            mention.label = -1
        mention.side, mention.severity = _side_and_severity(text, mention, mentions, clauses)
    _inherit_sides(mentions, clauses)
    extra = [_Mention("Cardiomegaly", m.start, m.end, -1) for m in mentions
             if m.observation == "Edema" and m.label in (1, -1) and _CHF.fullmatch(text, m.start, m.end)]
    return mentions + extra


def _find_mentions(text: str) -> list[_Mention]:
    found = []
    for name, pattern in _MENTIONS.items():
        voided = _spans(_UNMENTIONS[name], text) if name in _UNMENTIONS else []
        found += [_Mention(name, s, e, without_opacity=bool(_WITHOUT_OPACITY.fullmatch(text, s, e)))
                  for s, e in _spans(pattern, text) if not _overlaps((s, e), voided)]
    voided = _spans(_ATTRIBUTE_UNMENTIONS, text)
    clauses = _spans_between(text, _CLAUSE_END)
    for name, pattern in _ATTRIBUTES.items():
        for span in _spans(pattern, text):
            if _overlaps(span, voided):
                continue
            label = _attribute_status(text, span, clauses)
            if label is not None:
                found.append(_Mention(name, *span, label=label))
    return sorted(found, key=lambda m: m.start)


def _attribute_status(text: str, span: tuple[int, int], clauses: list[tuple[int, int]]) -> int | None:
    """Label from the status word nearest to a heart/mediastinum word in its comma segment."""
    segment = _segment_of(text, span[0], clauses)
    normal = _spans(_NORMAL_STATUS, text)
    statuses = [(s, e, 0) for s, e in normal]
    statuses += [(s, e, 1) for s, e in _spans(_ENLARGED_STATUS, text) if not _overlaps((s, e), normal)]
    statuses += [(s, e, -1) for s, e in _spans(_BORDERLINE_STATUS, text)]
    statuses = [st for st in statuses if segment[0] <= st[0] and st[1] <= segment[1]
                and not _overlaps(st[:2], [span])]
    if not statuses:
        return None
    distance = lambda st: st[0] - span[1] if st[0] >= span[1] else span[0] - st[1]
    return min(statuses, key=distance)[2]


def _find_cues(text: str) -> list[_Cue]:
    cues = [_Cue("negunc", "both", s, e) for s, e in _spans(_NEGATED_UNCERTAINTY_CUES, text)]
    taken = [(c.start, c.end) for c in cues] + _spans(_PSEUDO_NEGATIONS, text)
    for direction, pattern in _NEGATION_CUES:
        cues += [_Cue("neg", direction, s, e) for s, e in _spans(pattern, text) if not _overlaps((s, e), taken)]
    taken = [(c.start, c.end) for c in cues if c.kind == "negunc"]
    for direction, pattern in _UNCERTAINTY_CUES:
        cues += [_Cue("unc", direction, s, e) for s, e in _spans(pattern, text) if not _overlaps((s, e), taken)]
    return cues


def _covers(cue: _Cue, mention: _Mention, mentions: list[_Mention], text: str,
            clauses: list[tuple[int, int]]) -> bool:
    """Whether `mention` lies in the scope of `cue` (see the module docstring)."""
    if _overlaps((cue.start, cue.end), [(mention.start, mention.end)]):
        return False
    forward_end = _forward_scope_end(text, cue.end, clauses)
    backward_start = _backward_scope_start(text, cue.start, clauses)
    after = [m for m in mentions if cue.end <= m.start and m.end <= forward_end]
    before = [m for m in mentions if backward_start <= m.start and m.end <= cue.start]
    if cue.direction == "fwd":
        return mention in after
    if cue.direction == "bwd":
        return mention in before
    if cue.direction == "both":
        return mention in (after if after else before)
    return mention in after[:1] + before[-1:]  # adjacent: "atelectasis versus pneumonia"


def _forward_scope_end(text: str, position: int, clauses: list[tuple[int, int]]) -> int:
    """End of a forward cue's scope: its comma segment plus following list items."""
    clause_end = _clause_of(position, clauses)[1]
    end = _segment_of(text, position, clauses)[1]
    while end < clause_end:
        following = _segment_of(text, end + 1, clauses)
        item = text[end + 1 : following[1]].strip()
        continues = item.startswith(("or ", "nor ")) or (
            not _VERB.search(item) and not _LIST_BREAKER.search(item) and not _has_cue(item))
        if item.startswith("and ") and _LIST_BREAKER.search(item):
            continues = False
        if not continues:
            break
        end = following[1]
    return end


def _backward_scope_start(text: str, position: int, clauses: list[tuple[int, int]]) -> int:
    """Start of a backward cue's scope: its comma segment, plus earlier list items when the
    segment opens with "and"/"or" ("Effusion, consolidation, and pneumothorax have resolved")."""
    clause_start = _clause_of(position, clauses)[0]
    start = _segment_of(text, position, clauses)[0]
    if not text[start:position].strip().startswith(("and ", "or ")):
        return start
    while start > clause_start:
        previous = _segment_of(text, start - 1, clauses)
        item = text[previous[0] : start - 1]
        if _VERB.search(item) or _has_cue(item):
            break
        start = previous[0]
    return start


def _has_cue(text: str) -> bool:
    return bool(_find_cues(text))


def _side_and_severity(text: str, mention: _Mention, mentions: list[_Mention],
                       clauses: list[tuple[int, int]]) -> tuple[str | None, str | None]:
    """Side and severity words in the mention and between it and its neighbouring mentions,
    within the comma segment; after the mention, only up to "and"/"or"/"with"."""
    segment = _segment_of(text, mention.start, clauses)
    earlier = [m.end for m in mentions if m.end <= mention.start and m.observation != mention.observation]
    later = [m.start for m in mentions if m.start >= mention.end and m.observation != mention.observation]
    before = text[max([segment[0]] + earlier) : mention.start]
    after = text[mention.end : min([segment[1]] + later)]
    after = re.split(r"\b(?:and|or|with|while)\b", after, maxsplit=1)[0]
    window = " ".join((before, text[mention.start : mention.end], after))
    sides = {side for side, pattern in _SIDES if pattern.search(window)}
    side = "bilateral" if "bilateral" in sides or {"left", "right"} <= sides else next(iter(sides), None)
    severities = [name for name, pattern in _SEVERITIES if pattern.search(window)]
    return side, (severities[-1] if severities else None)


def _inherit_sides(mentions: list[_Mention], clauses: list[tuple[int, int]]) -> None:
    """A lung or pleural mention without a side takes the side of the nearest earlier mention
    in its clause: "Left lower lobe consolidation, consistent with pneumonia" -> left pneumonia."""
    for index, mention in enumerate(mentions):
        if mention.side or mention.observation not in _LATERAL:
            continue
        clause = _clause_of(mention.start, clauses)
        earlier = [m for m in mentions[:index] if m.side and m.start >= clause[0]]
        if earlier:
            mention.side = earlier[-1].side


def _spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text) if m.end() > m.start()]


def _overlaps(span: tuple[int, int], others: Iterable[tuple[int, int]]) -> bool:
    return any(span[0] < e and s < span[1] for s, e in others)


def _spans_between(text: str, separator: re.Pattern) -> list[tuple[int, int]]:
    """The spans of `text` between matches of `separator`."""
    cuts = [0]
    for start, end in _spans(separator, text):
        cuts += [start, end]
    cuts.append(len(text))
    return [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]


def _clause_of(position: int, clauses: list[tuple[int, int]]) -> tuple[int, int]:
    for start, end in clauses:
        if start <= position <= end:
            return start, end
    # positions inside a separator belong to the clause after it
    return next(((s, e) for s, e in clauses if s >= position), clauses[-1])


def _segment_of(text: str, position: int, clauses: list[tuple[int, int]]) -> tuple[int, int]:
    """The comma-delimited part of the clause holding `position`."""
    clause_start, clause_end = _clause_of(position, clauses)
    start = text.rfind(",", clause_start, position) + 1 or clause_start
    end = text.find(",", position, clause_end)
    return max(start, clause_start), (clause_end if end < 0 else end)
