"""Conditioning accuracy: does a generated CXR show the findings its prompt states, and only those?

The evaluation prompt set has every single finding with side and severity words, common combinations
and normal studies, each phrased like the phantom impressions ("template") and in hand-written
alternates ("alternate"). N images per prompt are generated and classified; an image succeeds when
every prompted finding is detected and no unprompted major finding is (findings a prompted one
implies, e.g. Lung Opacity by Consolidation, are allowed). A normal prompt's image succeeds when no
major finding is detected.

    conditioning_accuracy = mean over prompts of the fraction of successful images.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from cxr_ldm.data import phantom
from cxr_ldm.evaluation.classifier import FindingClassifier, Predictions
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS, SIDES, allowed_findings


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A prompt and the findings it states: {CheXpert name: side or None}; empty = a normal study.

    details: per finding, the other attributes the prompt states in phantom terms (severity, kind,
    devices, pneumonia), so `phantom_findings` can render real phantom studies that match the prompt.
    """
    text: str
    findings: Mapping[str, str | None]
    style: str = "template"  # "template" (phantom impression wording) or "alternate"
    details: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.findings) - set(MAJOR_FINDINGS)
        if unknown:
            raise ValueError(f"prompt {self.text!r}: {sorted(unknown)} are not major findings {MAJOR_FINDINGS}")
        bad = {n: s for n, s in self.findings.items() if s is not None and s not in SIDES}
        if bad:
            raise ValueError(f"prompt {self.text!r}: sides {bad}; expected one of {SIDES} or None")
        if self.style not in ("template", "alternate"):
            raise ValueError(f"prompt {self.text!r}: style {self.style!r}; expected 'template' or 'alternate'")
        if set(self.details) - set(self.findings):
            raise ValueError(f"prompt {self.text!r}: details for findings it does not state: "
                             f"{sorted(set(self.details) - set(self.findings))}")

    def phantom_findings(self) -> dict:
        """The `findings` argument of `phantom.generate` for a study this prompt describes."""
        if not self.findings:
            return {"No Finding": None}
        return {name: {**({"side": side} if side else {}), **self.details.get(name, {})}
                for name, side in self.findings.items()}


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
PHANTOM_REFERENCE_SEED = 30_000_000
PROMPTS: tuple[EvalPrompt, ...] = (
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


@dataclasses.dataclass
class PromptResult:
    """Per-image verdicts of one prompt (N images): success (N,), detected {finding: (N,)},
    side_correct {finding: (N,) or None where not checkable}, unprompted (N, F) major findings seen."""
    prompt: EvalPrompt
    success: np.ndarray
    detected: dict[str, np.ndarray]
    side_correct: dict[str, np.ndarray]
    unprompted: dict[str, np.ndarray]


def score_prompt(prompt: EvalPrompt, predictions: Predictions, classifier: FindingClassifier) -> PromptResult:
    """Verdicts for the images of one prompt from the classifier's predictions on them.

    Side is checked where the prompt states one and the classifier has a side head for the finding,
    on images where the finding is detected.
    """
    observations = classifier.observations
    allowed = allowed_findings(prompt.findings)
    detected = {name: predictions.positive[:, observations.index(name)] for name in prompt.findings}
    unprompted = {name: predictions.positive[:, observations.index(name)]
                  for name in classifier.major_findings if name not in allowed}
    n = len(predictions.positive)
    success = np.ones(n, bool)
    for flags in detected.values():
        success &= flags
    for flags in unprompted.values():
        success &= ~flags
    side_correct = {}
    for name, side in prompt.findings.items():
        if side is not None and name in classifier.side_observations:
            predicted = predictions.side[:, classifier.side_observations.index(name)]
            side_correct[name] = (predicted == SIDES.index(side) + 1)[detected[name]]
    return PromptResult(prompt, success, detected, side_correct, unprompted)


def usable_prompts(prompts: Sequence[EvalPrompt], classifier: FindingClassifier) -> tuple[list, list]:
    """(prompts whose findings the classifier knows, prompts skipped because it does not)."""
    usable, skipped = [], []
    for prompt in prompts:
        (usable if set(prompt.findings) <= set(classifier.observations) else skipped).append(prompt)
    return usable, skipped


def summarize(results: Sequence[PromptResult]) -> dict:
    """Aggregate verdicts.

    Returns conditioning_accuracy (mean over prompts of the success fraction) and the same per style;
    detection_rate {finding: fraction of images of prompts stating it where it is detected};
    side_accuracy {finding: fraction of detected, side-prompted findings on the prompted side} and
    overall; normal_false_positive_rate {finding: fraction of normal-prompt images where it is
    detected} and "any" (some major finding detected); per_prompt details.
    """
    if not results:
        raise ValueError("no prompt results to summarize")
    per_prompt = [{"prompt": r.prompt.text, "style": r.prompt.style, "findings": dict(r.prompt.findings),
                   "num_images": len(r.success), "success_rate": float(r.success.mean()),
                   "detection_rate": {k: float(v.mean()) for k, v in r.detected.items()},
                   "side_accuracy": {k: float(v.mean()) if v.size else None for k, v in r.side_correct.items()},
                   "unprompted_rate": {k: float(v.mean()) for k, v in r.unprompted.items() if v.any()}}
                  for r in results]
    by_style = {}
    for style in ("template", "alternate"):
        rates = [p["success_rate"] for p in per_prompt if p["style"] == style]
        by_style[style] = float(np.mean(rates)) if rates else None
    detection, sides = {}, {}
    for r in results:
        for name, flags in r.detected.items():
            detection.setdefault(name, []).append(flags)
        for name, flags in r.side_correct.items():
            sides.setdefault(name, []).append(flags)
    normal = [r for r in results if not r.prompt.findings]
    false_positive = None
    if normal:
        stacked = {name: np.concatenate([r.unprompted[name] for r in normal]) for name in normal[0].unprompted}
        false_positive = {name: float(v.mean()) for name, v in stacked.items()}
        false_positive["any"] = float(np.mean(np.any(list(stacked.values()), axis=0))) if stacked else 0.0
    single: dict[str, dict[str, list]] = {}
    for r in results:
        if len(r.prompt.findings) == 1:
            (name,) = r.prompt.findings
            for other, flags in r.unprompted.items():
                single.setdefault(name, {}).setdefault(other, []).append(flags)
    unprompted_by_finding = {name: {other: rate for other, flags in others.items()
                                    if (rate := float(np.concatenate(flags).mean())) > 0}
                             for name, others in single.items()}
    all_sides = np.concatenate([np.concatenate(v) for v in sides.values()]) if sides else np.zeros(0)
    return {
        "conditioning_accuracy": float(np.mean([p["success_rate"] for p in per_prompt])),
        "conditioning_accuracy_by_style": by_style,
        "detection_rate": {k: float(np.concatenate(v).mean()) for k, v in detection.items()},
        "side_accuracy": {k: float(np.concatenate(v).mean()) if np.concatenate(v).size else None
                          for k, v in sides.items()},
        "side_accuracy_overall": float(all_sides.mean()) if all_sides.size else None,
        "normal_false_positive_rate": false_positive,
        "unprompted_by_finding": unprompted_by_finding,
        "num_prompts": len(results),
        "per_prompt": per_prompt,
    }


def generate_images(generate: Callable[[list[str], list[int]], np.ndarray], prompts: Sequence[str],
                    num_per_prompt: int, seed: int, batch_size: int) -> list[np.ndarray]:
    """num_per_prompt images for each prompt: a list of (N, H, W, C) float arrays in [0, 1].

    generate(texts, seeds) -> images (B, H, W, C), e.g. a Pipeline call. Image i of prompt p uses seed
    seed + p * num_per_prompt + i, so adding prompts or changing the batch size leaves images unchanged.
    Every call gets exactly batch_size prompts (the last batch is padded by repetition), so a jitted
    generator compiles once.
    """
    jobs = [(p, seed + p * num_per_prompt + i) for p in range(len(prompts)) for i in range(num_per_prompt)]
    outputs: list[list[np.ndarray]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", unit="batch", leave=False):
        chunk = jobs[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        images = generate([prompts[p] for p, _ in padded], [s for _, s in padded])
        for (p, _), image in zip(chunk, images[:len(chunk)]):
            outputs[p].append(image)
    return [np.stack(images) for images in outputs]


def phantom_studies(prompts: Sequence[EvalPrompt], num_per_prompt: int, resolution: int,
                    seed: int = PHANTOM_REFERENCE_SEED) -> list[np.ndarray]:
    """Real phantom studies that each prompt describes (`phantom.generate` with its findings):
    a list of float32 (N, R, R, 1) in [0, 1]. Scored like generated images they give the conditioning
    accuracy of a perfect generator under the classifier (the metric's ceiling). Seeds start at
    `seed`, outside the phantom_cxr splits."""
    return [np.stack([phantom.generate(seed + p * num_per_prompt + i, resolution, prompt.phantom_findings())["image"]
                      for i in range(num_per_prompt)]).astype(np.float32) / 255.0
            for p, prompt in enumerate(prompts)]


def evaluate_conditioning(classifier: FindingClassifier, images_per_prompt: Sequence[np.ndarray],
                          prompts: Sequence[EvalPrompt]) -> tuple[dict, list[PromptResult]]:
    """Classifies each prompt's images and summarizes (see `summarize`)."""
    results = [score_prompt(prompt, classifier.predict(images), classifier)
               for prompt, images in zip(prompts, images_per_prompt)]
    return summarize(results), results
