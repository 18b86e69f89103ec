"""Counterfactual edits of phantom films, scored against the truth.

A held-out phantom study (the validation split's seeds for `dev`, the test split's for `test`) gets one
finding added or one removed by prompt: the edited case's impression. The phantom renders the same patient
with the edited case (each finding has its own random stream, so the rest of the film is unchanged): the
true counterfactual. Its *region* is the set of pixels it changes by more than MIN_CHANGE gray levels. Each
editing method starts from the study's film:

  sdedit         Pipeline.img2img at `strength`, no mask
  sdedit_masked  Pipeline.inpaint at `strength` with the mask (latent blending from the noised film)
  inpaint        Pipeline.inpaint at strength 1 with the mask (the masked part drawn from noise)
  inversion      Pipeline.invert with the study's own impression, then the edit prompt from those latents

The mask is the region dilated by one latent cell: a user's mask drawn around where the finding goes. Films
are encoded at the VAE posterior mean. Per edit:

  success            the strict judge's verdict on the edit against the edited case (evaluation/conditioning.py)
  preservation_psnr  PSNR (dB) / SSIM outside the mask dilated by one more latent cell, against the study's
  preservation_ssim  film (and `*_vs_vae` against its VAE round trip, what the autoencoder allows)
  fidelity_psnr      PSNR inside the mask against the true counterfactual; fidelity_ssim over the whole film
  judge_agreement    whether the judge's verdict on the edit equals its verdict on the true counterfactual

Each is a mean over edits with a 95 % bootstrap interval over edits. The `unedited` reference scores the
study's own film as the edit (what doing nothing gets) and `true_counterfactual` the truth (the judge's
ceiling for edits).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from cxr_ldm import imaging
from cxr_ldm.data.builders.phantom_cxr import SPLIT_SEED_OFFSETS
from cxr_ldm.data.phantom import render_image
from cxr_ldm.data.phantom.cases import FINDING_NAMES, draw_findings, parse_findings, random_stream
from cxr_ldm.data.phantom.reports import write_report
from cxr_ldm.evaluation import intervals
from cxr_ldm.evaluation.classifier import FindingClassifier, Predictions
from cxr_ldm.evaluation.conditioning import score_prompt
from cxr_ldm.evaluation.prompts import EvalPrompt, prompt_from_case, states_exactly

EDIT_SETS = {"dev": SPLIT_SEED_OFFSETS["validation"], "test": SPLIT_SEED_OFFSETS["test"]}
METHODS = ("sdedit", "sdedit_masked", "inpaint", "inversion")
OPERATIONS = ("add", "remove")
MIN_CHANGE = 10  # gray levels (of 255): a pixel the edit changes
MIN_CHANGED_PIXELS = 15  # an edit changing fewer pixels is not visible on the film (phantom.hidden_findings)
_EDIT_STREAM = 90  # phantom random stream of a study's edit choice, apart from the film's streams


@dataclasses.dataclass(frozen=True)
class EditCase:
    """One edit of one study. image and counterfactual: uint8 (R, R, 1); region: bool (R, R, 1)."""
    seed: int
    operation: str
    finding: str
    source: EvalPrompt  # the study's impression and case
    target: EvalPrompt  # the edited case's impression and case: what the edit prompt states
    image: np.ndarray
    counterfactual: np.ndarray
    region: np.ndarray


def _edit(seed: int, operation: str):
    """(finding, source case, target case) of a study's edit, or None if the study cannot have it."""
    case = draw_findings(seed)
    if any(f.certainty != 1 for f in case):
        return None
    rng = random_stream(seed, _EDIT_STREAM)
    if operation == "remove":
        if not case:
            return None
        removed = case[int(rng.integers(len(case)))]
        return removed.name, case, tuple(f for f in case if f is not removed)
    absent = [name for name in FINDING_NAMES if name not in {f.name for f in case}]
    name = absent[int(rng.integers(len(absent)))]
    added = parse_findings(seed, {name: {"certainty": 1}})[0]
    return name, case, tuple(sorted(case + (added,), key=lambda f: FINDING_NAMES.index(f.name)))


def edit_cases(num: int, resolution: int, edit_set: str = "test") -> list[EditCase]:
    """`num` edits, adding and removing in turn, of the studies of `edit_set` ("dev": validation seeds, "test":
    test seeds) taken in seed order. A study is skipped when it has a hedged finding, when its or the edited
    case's impression does not state exactly its case, or when the edit changes fewer than MIN_CHANGED_PIXELS
    pixels at `resolution` (the film would not show it)."""
    if edit_set not in EDIT_SETS:
        raise ValueError(f"edit set {edit_set!r}: expected one of {sorted(EDIT_SETS)}")
    cases = []
    for seed in itertools.count(EDIT_SETS[edit_set]):
        if len(cases) == num:
            return cases
        operation = OPERATIONS[len(cases) % 2]
        edit = _edit(seed, operation)
        if edit is None:
            continue
        finding, source, target = edit
        source_text, target_text = write_report(seed, source)[1], write_report(seed, target)[1]
        if not (states_exactly(source_text, source) and states_exactly(target_text, target)):
            continue
        image, counterfactual = render_image(seed, source, resolution), render_image(seed, target, resolution)
        region = np.abs(image.astype(np.int16) - counterfactual) > MIN_CHANGE
        if region.sum() >= MIN_CHANGED_PIXELS:
            cases.append(EditCase(seed, operation, finding, prompt_from_case(source_text, source, "template", seed),
                                  prompt_from_case(target_text, target, "template", seed), image, counterfactual,
                                  region))


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """bool (N, H, W, 1) masks grown by `pixels` in every direction (a square neighbourhood)."""
    return ndimage.maximum_filter(masks, size=(1, 2 * pixels + 1, 2 * pixels + 1, 1)) if pixels else masks


def edit_masks(cases: Sequence[EditCase], cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, kept): bool (N, R, R, 1); the mask is each region dilated by `cell` pixels (one latent cell), kept
    the pixels outside the mask dilated by one more cell, where an edit should leave the film as it was."""
    masks = dilate(np.stack([c.region for c in cases]), cell)
    return masks, ~dilate(masks, cell)


def _batches(pipe, cases: Sequence[EditCase], batch_size: int, desc: str):
    """(indices of the batch's cases, the same padded to batch_size by repeating the last, their films float
    (batch_size, S, S, 1) at the pipeline's size S, zero noise of their VAE posterior samples (the mean))."""
    for start in tqdm(range(0, len(cases), batch_size), desc=desc, unit="batch", leave=False):
        chunk = list(range(start, min(start + batch_size, len(cases))))
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        films = _at(np.stack([cases[i].image for i in padded]).astype(np.float32) / 255.0, pipe.default_size())
        latent = films.shape[1] // pipe.vae_scale
        yield chunk, padded, films, np.zeros((batch_size, latent, latent, pipe.latent_channels), np.float32)


def run_edits(pipe, cases: Sequence[EditCase], method: str, *, strength: float, steps: int, guidance: float,
              sampler: str = "ddim", seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """The edited films of `cases` by `method` (module doc): float32 (N, R, R, 1) in [0, 1]. Edit i uses sample
    seed `seed + i`; every call gets exactly batch_size edits (the last batch padded), so each method compiles
    once."""
    if method not in METHODS:
        raise ValueError(f"edit method {method!r}: expected one of {METHODS}")
    resolution = cases[0].image.shape[0]
    masks, _ = edit_masks(cases, pipe.vae_scale)
    outputs = []
    for chunk, padded, films, posterior_mean in _batches(pipe, cases, batch_size, f"editing ({method})"):
        prompts, seeds = [cases[i].target.text for i in padded], [seed + i for i in padded]
        common = dict(num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, seed=seeds)
        if method == "sdedit":
            edited = pipe.img2img(films, prompts, strength=strength, encode_noise=posterior_mean, **common)
        elif method in ("sdedit_masked", "inpaint"):
            mask = _at(masks[padded].astype(np.float32), pipe.default_size()) >= 0.5
            edited = pipe.inpaint(films, mask, prompts, strength=strength if method == "sdedit_masked" else 1.0,
                                  encode_noise=posterior_mean, **common)
        else:
            latents = pipe.invert(films, [cases[i].source.text for i in padded], num_inference_steps=steps,
                                  seed=seeds, encode_noise=posterior_mean)
            edited = pipe(prompts, latents=latents, **{**common, "sampler": "ddim"})
        outputs.append(_gray(_at(edited, resolution))[:len(chunk)])
    return np.concatenate(outputs)


def inversion_redraws(pipe, cases: Sequence[EditCase], *, steps: int, seed: int = 0,
                      batch_size: int = 16) -> np.ndarray:
    """Each study's film inverted with its own impression and redrawn from those latents (no guidance, DDIM):
    float32 (N, R, R, 1) in [0, 1], to compare with the VAE round trip."""
    resolution = cases[0].image.shape[0]
    outputs = []
    for chunk, padded, films, posterior_mean in _batches(pipe, cases, batch_size, "inverting"):
        prompts = [cases[i].source.text for i in padded]
        latents = pipe.invert(films, prompts, num_inference_steps=steps, seed=[seed + i for i in padded],
                              encode_noise=posterior_mean)
        redrawn = pipe(prompts, latents=latents, num_inference_steps=steps, guidance_scale=1.0, sampler="ddim")
        outputs.append(_gray(_at(redrawn, resolution))[:len(chunk)])
    return np.concatenate(outputs)


def _at(images: np.ndarray, size: int) -> np.ndarray:
    return images if images.shape[1] == size else np.asarray(imaging.resize(images, size))


def _gray(images: np.ndarray) -> np.ndarray:
    return images if images.shape[-1] == 1 else images.mean(axis=-1, keepdims=True)


def _row(predictions: Predictions, index: int) -> Predictions:
    return Predictions(*(np.asarray(getattr(predictions, f.name))[index:index + 1]
                         for f in dataclasses.fields(Predictions)))


def verdicts(classifier: FindingClassifier, cases: Sequence[EditCase], images: np.ndarray) -> np.ndarray:
    """bool (N,): the strict judge's verdict on each image against its case's edited case."""
    predictions = classifier.predict(images)
    return np.array([bool(score_prompt(case.target, _row(predictions, i), classifier).success[0])
                     for i, case in enumerate(cases)])


def mean_ci(values: np.ndarray, seed: int) -> dict:
    """{"mean", "ci": 95 % bootstrap interval} of the finite values (both None if there are none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": None, "ci": None}
    interval = intervals.bootstrap_ci(values, seed=seed)
    return {"mean": float(values.mean()), "ci": [interval.low, interval.high]}


def score_edits(cases: Sequence[EditCase], edited: np.ndarray, success: np.ndarray, truth_success: np.ndarray,
                cell: int, vae_round_trip: np.ndarray | None = None, seed: int = 0) -> dict:
    """The metrics of the module doc for edited films (N, R, R, 1) in [0, 1]: for each, {"mean", "ci"} over all
    edits, and success per operation. success and truth_success: the judge's verdicts (`verdicts`) on the edits
    and on the true counterfactuals. PSNRs of identical pixels (infinite) are left out of their means."""
    masks, kept = edit_masks(cases, cell)
    originals = np.stack([c.image for c in cases]).astype(np.float32) / 255.0
    truths = np.stack([c.counterfactual for c in cases]).astype(np.float32) / 255.0
    scores = {
        "success": mean_ci(success, seed),
        "preservation_psnr": mean_ci(imaging.masked_psnr(edited, originals, kept), seed),
        "preservation_ssim": mean_ci(imaging.masked_ssim(edited, originals, kept), seed),
        "fidelity_psnr": mean_ci(imaging.masked_psnr(edited, truths, masks), seed),
        "fidelity_ssim": mean_ci(imaging.ssim(edited, truths), seed),
        "judge_agreement": mean_ci(success == truth_success, seed),
    }
    if vae_round_trip is not None:
        scores["preservation_psnr_vs_vae"] = mean_ci(imaging.masked_psnr(edited, vae_round_trip, kept), seed)
        scores["preservation_ssim_vs_vae"] = mean_ci(imaging.masked_ssim(edited, vae_round_trip, kept), seed)
    operations = np.array([c.operation for c in cases])
    for operation in OPERATIONS:
        if (operations == operation).any():
            scores[f"success_{operation}"] = mean_ci(success[operations == operation], seed)
    return scores
