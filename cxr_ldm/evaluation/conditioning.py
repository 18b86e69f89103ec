"""Conditioning accuracy: does a generated CXR show the findings its prompt states, and only those?

N images per evaluation prompt (`prompts`) are generated and classified. An image is *present* when
every prompted finding is detected and no unprompted major finding is (findings a prompted one implies,
e.g. Lung Opacity by Consolidation, are allowed); a normal prompt's image when no major finding is
detected. It *succeeds* (the strict verdict) when it is present and every attribute the prompt states
and the classifier can read is right: the side of each finding, its grade (severity; nodule vs mass),
its location (lobe, zone, rib vs clavicle), the device types (exactly the listed ones) and the central
line's route (`attributes`).

    conditioning_accuracy = mean over prompts of the fraction of successful images (strict)
    presence_accuracy     = the same for present images (finding types only)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from cxr_ldm.data import phantom
from cxr_ldm.data.phantom.cases import draw_findings, parse_findings
from cxr_ldm.evaluation.attributes import ATTRIBUTES, SLOTS, prompted_codes
from cxr_ldm.evaluation.classifier import FindingClassifier, Predictions
from cxr_ldm.evaluation.findings import SIDES, allowed_findings
from cxr_ldm.evaluation.prompts import PHANTOM_REFERENCE_SEED, EvalPrompt

TWIN_SEED = 60_000_000  # first seed of the second renderings of test studies (the fair FID floor)


@dataclasses.dataclass
class PromptResult:
    """Per-image verdicts of one prompt (N images): success (N,) strict, present (N,) finding types only,
    detected {finding: (N,)}, side_correct {finding: (k,) over the images where it is detected},
    unprompted {finding: (N,)} major findings seen, attribute_correct {attribute: [(k,) per stated slot]}
    over the images where the slot's finding is detected."""
    prompt: EvalPrompt
    success: np.ndarray
    detected: dict[str, np.ndarray]
    side_correct: dict[str, np.ndarray]
    unprompted: dict[str, np.ndarray]
    present: np.ndarray
    attribute_correct: dict[str, list[np.ndarray]]


def score_prompt(prompt: EvalPrompt, predictions: Predictions, classifier: FindingClassifier) -> PromptResult:
    """Verdicts for the images of one prompt from the classifier's predictions on them (module doc).

    Side is checked where the prompt states one and the classifier has a side head for the finding;
    an attribute where the prompt states it and the classifier has a head for its slot.
    """
    observations = classifier.observations
    allowed = allowed_findings(prompt.findings)
    detected = {name: predictions.positive[:, observations.index(name)] for name in prompt.findings}
    unprompted = {name: predictions.positive[:, observations.index(name)]
                  for name in classifier.major_findings if name not in allowed}
    n = len(predictions.positive)
    present = np.ones(n, bool)
    for flags in detected.values():
        present &= flags
    for flags in unprompted.values():
        present &= ~flags
    success = present.copy()
    side_correct = {}
    for name, side in prompt.findings.items():
        if side is not None and name in classifier.side_observations:
            right = predictions.side[:, classifier.side_observations.index(name)] == SIDES.index(side) + 1
            side_correct[name] = right[detected[name]]
            success &= right
    attribute_correct: dict[str, list[np.ndarray]] = {}
    for slot_index, value in prompted_codes(prompt.findings, prompt.details).items():
        slot = SLOTS[slot_index]
        if slot.name not in classifier.slots:
            continue
        right = predictions.slot_values[:, classifier.slots.index(slot.name)] == value
        attribute_correct.setdefault(slot.attribute, []).append(right[detected[slot.finding]])
        success &= right
    return PromptResult(prompt, success, detected, side_correct, unprompted, present, attribute_correct)


def usable_prompts(prompts: Sequence[EvalPrompt], classifier: FindingClassifier) -> tuple[list, list]:
    """(prompts whose findings the classifier knows, prompts skipped because it does not)."""
    usable, skipped = [], []
    for prompt in prompts:
        (usable if set(prompt.findings) <= set(classifier.observations) else skipped).append(prompt)
    return usable, skipped


def summarize(results: Sequence[PromptResult]) -> dict:
    """Aggregate verdicts.

    Returns conditioning_accuracy (mean over prompts of the strict success fraction) and the same per
    style; presence_accuracy (the same for finding types only); attribute_accuracy {"side", "grade",
    "location", "device", "route": fraction of detected findings whose stated attribute is right};
    detection_rate {finding: fraction of images of prompts stating it where it is detected};
    side_accuracy {finding: fraction of detected, side-prompted findings on the prompted side} and
    overall; normal_false_positive_rate {finding: fraction of normal-prompt images where it is
    detected} and "any" (some major finding detected); per_prompt details.
    """
    if not results:
        raise ValueError("no prompt results to summarize")
    per_prompt = [{"prompt": r.prompt.text, "style": r.prompt.style, "findings": dict(r.prompt.findings),
                   "details": {k: dict(v) for k, v in r.prompt.details.items()},
                   "num_images": len(r.success), "success_rate": float(r.success.mean()),
                   "presence_rate": float(r.present.mean()),
                   "attribute_accuracy": {k: float(np.concatenate(v).mean()) if np.concatenate(v).size else None
                                          for k, v in r.attribute_correct.items()},
                   "detection_rate": {k: float(v.mean()) for k, v in r.detected.items()},
                   "side_accuracy": {k: float(v.mean()) if v.size else None for k, v in r.side_correct.items()},
                   "unprompted_rate": {k: float(v.mean()) for k, v in r.unprompted.items() if v.any()}}
                  for r in results]
    by_style = {}
    for style in dict.fromkeys(p["style"] for p in per_prompt):
        by_style[style] = float(np.mean([p["success_rate"] for p in per_prompt if p["style"] == style]))
    attributes = {"side": [v for r in results for v in r.side_correct.values()],
                  **{a: [v for r in results for v in r.attribute_correct.get(a, [])] for a in ATTRIBUTES}}
    attribute_accuracy = {a: float(np.concatenate(v).mean()) if v and np.concatenate(v).size else None
                          for a, v in attributes.items()}
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
        "presence_accuracy": float(np.mean([p["presence_rate"] for p in per_prompt])),
        "conditioning_accuracy_by_style": by_style,
        "attribute_accuracy": attribute_accuracy,
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


def _study_seeds(index: int, num_per_prompt: int, seed: int) -> range:
    return range(seed + index * num_per_prompt, seed + (index + 1) * num_per_prompt)


def phantom_studies(prompts: Sequence[EvalPrompt], num_per_prompt: int, resolution: int,
                    seed: int = PHANTOM_REFERENCE_SEED) -> list[np.ndarray]:
    """Real phantom studies that each prompt describes (`phantom.generate` with its findings):
    a list of float32 (N, R, R, 1) in [0, 1]. Scored like generated images they give the conditioning
    accuracy of a perfect generator under the classifier (the metric's ceiling). Seeds start at
    `seed`, outside the phantom_cxr splits."""
    return [np.stack([phantom.generate(s, resolution, prompt.phantom_findings())["image"]
                      for s in _study_seeds(p, num_per_prompt, seed)]).astype(np.float32) / 255.0
            for p, prompt in enumerate(prompts)]


def occluded_studies(prompts: Sequence[EvalPrompt], num_per_prompt: int, resolution: int,
                     seed: int = PHANTOM_REFERENCE_SEED, films: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """For the studies of `phantom_studies` (same arguments): bool (N,) per prompt, True where the film does
    not show a finding the prompt states (`phantom.hidden_findings`: removing it changes fewer than 15 pixels
    by more than 10 gray levels), e.g. an atelectasis with a large effusion. No judge can find such a finding.
    films: `phantom_studies`' output for the same arguments, where the caller has it, so that the studies are
    not rendered again."""
    def flag(p: int, prompt: EvalPrompt, i: int, study_seed: int) -> bool:
        film = None if films is None else np.round(films[p][i] * 255.0).astype(np.uint8)
        findings = parse_findings(study_seed, prompt.phantom_findings())
        return bool(phantom.hidden_findings(study_seed, findings, resolution, film=film))
    return [np.array([flag(p, prompt, i, s) for i, s in enumerate(_study_seeds(p, num_per_prompt, seed))], bool)
            for p, prompt in enumerate(prompts)]


def occlusion_summary(results: Sequence[PromptResult], occluded: Sequence[np.ndarray]) -> dict:
    """How much of a real-studies ceiling the phantom's own occlusions cost: occluded_share (fraction of the
    studies whose film hides a stated finding, `occluded_studies`), conditioning_accuracy_visible (strict
    success fraction over the other studies, pooled; None if there are none)."""
    success = np.concatenate([r.success for r in results])
    hidden = np.concatenate(occluded)
    if success.shape != hidden.shape:
        raise ValueError(f"occlusion flags for {hidden.size} studies, verdicts for {success.size}")
    visible = success[~hidden]
    return {"occluded_share": float(hidden.mean()),
            "conditioning_accuracy_visible": float(visible.mean()) if visible.size else None}


def evaluate_conditioning(classifier: FindingClassifier, images_per_prompt: Sequence[np.ndarray],
                          prompts: Sequence[EvalPrompt]) -> tuple[dict, list[PromptResult]]:
    """Classifies each prompt's images and summarizes (see `summarize`)."""
    results = [score_prompt(prompt, classifier.predict(images), classifier)
               for prompt, images in zip(prompts, images_per_prompt)]
    return summarize(results), results


def twin_studies(seeds: Sequence[int], resolution: int, first_seed: int = TWIN_SEED) -> np.ndarray:
    """uint8 (N, R, R, 1): for each phantom study seed, another patient (seed first_seed + i) with the same
    case (findings, sides, grades, locations, devices, certainty): a second rendering of the same mix."""
    twins = []
    for i, seed in enumerate(seeds):
        case = draw_findings(int(seed))
        forced = {f.name: {k: v for k, v in dataclasses.asdict(f).items() if k != "name" and v not in (None, ())}
                  for f in case} or {"No Finding": None}
        twins.append(phantom.generate(first_seed + i, resolution, forced)["image"])
    return np.stack(twins)
