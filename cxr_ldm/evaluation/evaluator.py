"""The evaluator behind `python -m cxr_ldm.evaluate` (see that module for the CLI and the report's sections).

`evaluate` judges a text-to-image checkpoint, `evaluate_autoencoder` an autoencoder alone, `evaluate_edits` its
counterfactual edits of phantom films, `evaluate_judge` the judge itself.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_ldm import imaging
from cxr_ldm.data.builders import BUILDERS, phantom_cxr, prepare
from cxr_ldm.evaluation import classifier as clf
from cxr_ldm.evaluation import conditioning, edits, intervals, memorization, report
from cxr_ldm.evaluation.augmentation import augmentation_experiment
from cxr_ldm.evaluation.data import RealSplit, load_split, load_synthetic, phantom_split
from cxr_ldm.evaluation.metrics import fid_from_features
from cxr_ldm.evaluation.prompts import PROMPT_SETS, EvalPrompt, load_prompt_file, prompt_set, verbatim_in
from cxr_ldm.evaluation.reconstruction import reconstruct, reconstruction_metrics
from cxr_ldm.evaluation.xrv import XRVFeatures
from cxr_ldm.io.components import load_component
from cxr_ldm.io.run_folder import export_dir, vae_dir
from cxr_ldm.io.weights import write_json

DEFAULT_DATASET = "phantom_cxr"
DEFAULT_DATA_DIR = "~/tensorflow_datasets"
DEFAULT_GUIDANCE = 3.0  # when neither --guidance nor the workdir config gives one
JUDGE_TRAIN_FACTOR = 8  # phantom_cxr: the judge trains on this many times the train split (docs/recipes.md)
# The judge's network: full-resolution convolutions before each 2x2 max pool keep thin findings (docs/recipes.md)
JUDGE_NETWORK = {"downsample": "maxpool", "stem_layers": 2}
# How often the judge's extra studies have 1, 2 or 3 drawn findings (the data set's: 0.6, 0.3, 0.1); prompt sets
# stress combinations (docs/recipes.md)
JUDGE_FINDING_COUNT_SHARES = (0.2, 0.3, 0.5)
# The ceilings' image sets: real phantom studies of each prompt, and the same through the VAE
CEILING_SETS = ("real_studies", "vae_reconstructed")
CLASSIFIER_ACCURACY_DEFINITION = (
    "mean over the major findings (the classifier's observations among Cardiomegaly, Lung Lesion, Edema, "
    "Consolidation, Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture, Support Devices) of "
    "the per-finding accuracy on the real test split; uncertain labels skipped, unmentioned = absent. "
    "classifier_exact_match_real is the stricter fraction of test images with every major finding right")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how much. Sample counts trade time for precision."""
    checkpoint: str
    # Data: None = what the train.py workdir's config.json names, else phantom_cxr in ~/tensorflow_datasets
    # at the config whose resolution is the checkpoint's image size.
    dataset: str | None = None
    dataset_config: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    num_samples: int = 10  # images per evaluation prompt
    num_fid: int = 300  # generated and real images per FID set (<= validation and test sizes)
    steps: int = 25
    guidance: float | None = None  # None: the workdir config's sample.guidance_scale, else 3.0
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (Pipeline.__call__); 0 = off
    apg_eta: float | None = None  # adaptive projected guidance (Pipeline.__call__); None = plain guidance
    apg_norm_threshold: float = 0.0
    guidance_sweep: tuple[float, ...] = ()  # more guidance scales to score (`guidance_sweep`); () = none
    sampler: str = "ddim"
    seed: int = 0  # sample seeds of different values do not overlap (see `generation_seeds`)
    seeds: tuple[int, ...] = ()  # more sample seeds for the strict headline: its spread over seeds
    batch_size: int = 32
    inception_weights: str | None = None
    xrv_weights: str | None = None  # torchxrayvision DenseNet-121 as safetensors (cxr_ldm/evaluation/xrv.py)
    classifier_dir: str | None = None  # None: <data_dir>/cxr_ldm_eval/classifier-<dataset>-<config>
    # Studies the judge's classifier trains on. None: JUDGE_TRAIN_FACTOR x the train split on phantom_cxr (the
    # split, then the next seeds of the training range, drawn in memory), the train split elsewhere.
    judge_train_size: int | None = None
    copy_threshold: float = 0.95
    augmentation_experiment: bool = False
    augmentation_real: int = 500
    augmentation_ratios: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # synthetic images per real one
    augmentation_seeds: tuple[int, ...] = (0, 1, 2)
    # A synthetic data set (`python -m cxr_ldm.synthesize --out`) the augmentation experiment reads its synthetic
    # images from; None: it generates them from the training prompts.
    augmentation_data: str | None = None
    # Only the headline: strict and presence conditioning with their intervals; no ceilings, FID, diversity,
    # reconstruction or memorization (their fields are None). For comparing recipes quickly.
    headline_only: bool = False

    def __post_init__(self):
        if self.headline_only and (self.augmentation_experiment or self.guidance_sweep):
            raise ValueError("headline_only skips the optional sections; it cannot run the augmentation "
                             "experiment or a guidance sweep")


def _run_config(checkpoint: str) -> dict:
    """The config.json train.py wrote into the workdir `checkpoint` ({} for a bare pipeline folder)."""
    config_file = Path(checkpoint) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def resolve_guidance(settings: EvalSettings) -> EvalSettings:
    """guidance None -> the guidance scale the run's sample grids used (the recipe's choice), else 3.0."""
    if settings.guidance is not None:
        return settings
    guidance = _run_config(settings.checkpoint).get("sample", {}).get("guidance_scale", DEFAULT_GUIDANCE)
    return dataclasses.replace(settings, guidance=float(guidance))


def resolve_data(settings: EvalSettings, image_size: int) -> EvalSettings:
    """Fills the data fields left None from the workdir's config.json (train.py writes it), else defaults."""
    trained_on = _run_config(settings.checkpoint).get("data", {})
    dataset = settings.dataset or trained_on.get("name") or DEFAULT_DATASET
    same_data = dataset == trained_on.get("name")
    config = settings.dataset_config or (trained_on.get("config") if same_data else None)
    if config is None:
        configs = [c for c in BUILDERS[dataset].BUILDER_CONFIGS if getattr(c, "resolution", None) == image_size]
        if not configs:
            raise ValueError(f"{dataset} has no config at the checkpoint's {image_size} px; pass --dataset-config "
                             f"(one of {[c.name for c in BUILDERS[dataset].BUILDER_CONFIGS]})")
        config = next((c.name for c in configs if c.name == str(image_size)), configs[0].name)
    return dataclasses.replace(
        settings, dataset=dataset, dataset_config=config,
        data_dir=os.path.expanduser(settings.data_dir or (same_data and trained_on.get("data_dir")) or DEFAULT_DATA_DIR),
        manual_dir=settings.manual_dir or (trained_on.get("manual_dir") if same_data else None))


def _generator(pipe, settings: EvalSettings, size: int):
    """(texts, seeds) -> images (B, size, size, C) in [0, 1] from the pipeline at its own resolution."""
    def generate(texts, seeds):
        images = pipe(list(texts), num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                      guidance_rescale=settings.guidance_rescale, apg_eta=settings.apg_eta,
                      apg_norm_threshold=settings.apg_norm_threshold, sampler=settings.sampler, seed=list(seeds))
        if images.shape[1] != size:
            images = np.asarray(imaging.resize(images, size))
        return images
    return generate


def truncated_prompts(pipe, texts: Sequence[str]) -> list[dict]:
    """The prompts longer than the pipeline's text encoder reads, each {"prompt", "prompt_used" (the start of it
    that the encoder reads), "num_tokens" (its length in tokens)}."""
    cuts = {text: pipe.prompt_truncation(text) for text in texts}
    return [{"prompt": text, "prompt_used": cut[0], "num_tokens": cut[1]} for text, cut in cuts.items() if cut]


SEED_BLOCK = 1_000_000  # sample seeds per use; more images than this per use would overlap the next use
GENERATOR_USES = ("conditioning", "fid", "augmentation")


def generation_seeds(seed: int) -> dict[str, int]:
    """The first sample seed of each use of the generator under evaluation seed `seed`. A use draws
    consecutive seeds from its first one, so the blocks of two evaluation seeds are disjoint: --seed 1 draws
    images independent of --seed 0's (seed 0 keeps 0, 1_000_000 and 2_000_000)."""
    return {use: (len(GENERATOR_USES) * seed + i) * SEED_BLOCK for i, use in enumerate(GENERATOR_USES)}


def _real_diversity(test, major_columns, num_pairs: int, seed: int) -> dict:
    """Mean pairwise MS-SSIM of random real test images, and of pairs with identical major findings."""
    rng = np.random.default_rng(seed)
    images = test.data.images
    overall = memorization.mean_pairwise_ms_ssim(images[rng.choice(len(images), min(len(images), 64), replace=False)],
                                                 max_pairs=num_pairs, seed=seed)
    groups = collections.defaultdict(list)
    for i, row in enumerate(test.data.labels[:, major_columns] == 1):
        groups[row.tobytes()].append(i)
    per_group = [memorization.mean_pairwise_ms_ssim(images[idx[:16]], max_pairs=num_pairs, seed=seed)
                 for idx in groups.values() if len(idx) >= 4]
    return {"real_all": overall, "real_same_findings": float(np.mean(per_group)) if per_group else None}


def evaluate(checkpoint: str | os.PathLike, out: str | os.PathLike, *, pipe=None,
             prompts: str | Sequence[EvalPrompt] = "test", classifier_config: clf.TrainConfig | None = None,
             **options) -> dict:
    """Runs the whole evaluation (module doc) and writes `out` (JSON) and the Markdown report beside it.

    prompts: a prompt set's name (`prompts.PROMPT_SETS`), a prompt file's path (*.json) or EvalPrompts.
    options: the fields of EvalSettings. `pipe`: an already loaded Pipeline (default: from checkpoint).
    `classifier_config`: the classifier recipe (default: TrainConfig at the data resolution, <= 128 px).
    Returns the JSON object.
    """
    from cxr_ldm.pipeline import Pipeline  # the pipeline pulls in every model; import when evaluating

    settings = EvalSettings(checkpoint=str(checkpoint), **options)
    prompt_set_name, prompts = resolve_prompts(prompts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    timings, start = {}, time.perf_counter()

    def lap(name):
        nonlocal start
        timings[name] = round(time.perf_counter() - start, 1)
        logging.info("evaluate: %s done in %.1f s", name, timings[name])
        start = time.perf_counter()

    pipe = pipe or Pipeline.from_pretrained(settings.checkpoint)
    truncated = truncated_prompts(pipe, [p.text for p in prompts])
    settings = resolve_guidance(resolve_data(settings, pipe.default_size()))
    judge = _judge(settings, prompts, classifier_config, lap)
    train, validation, test, size = judge.train, judge.validation, judge.test, judge.size
    classifier, classifier_test, usable, skipped = judge.classifier, judge.classifier_test, judge.usable, judge.skipped

    generate = _generator(pipe, settings, size)
    seeds = generation_seeds(settings.seed)
    prompt_images = conditioning.generate_images(generate, [p.text for p in usable], settings.num_samples,
                                                 seeds["conditioning"], settings.batch_size)
    conditioning_summary, prompt_results = conditioning.evaluate_conditioning(classifier, prompt_images, usable)
    by_seed = [_seed_row(settings.seed, conditioning_summary, prompt_results)]
    for seed in dict.fromkeys(s for s in settings.seeds if s != settings.seed):
        images = conditioning.generate_images(generate, [p.text for p in usable], settings.num_samples,
                                              generation_seeds(seed)["conditioning"], settings.batch_size)
        by_seed.append(_seed_row(seed, *conditioning.evaluate_conditioning(classifier, images, usable)))
    lap("conditioning")
    results = {
        "conditioning_accuracy": conditioning_summary["conditioning_accuracy"],
        "conditioning_accuracy_ci": by_seed[0]["conditioning_accuracy_ci"],
        "presence_accuracy": conditioning_summary["presence_accuracy"],
        "presence_accuracy_ci": by_seed[0]["presence_accuracy_ci"],
        "conditioning_by_seed": by_seed,
        "conditioning_accuracy_seed_spread": intervals.spread([row["conditioning_accuracy"] for row in by_seed]),
        "attribute_accuracy": conditioning_summary["attribute_accuracy"],
        "prompt_set": _prompt_set_record(prompt_set_name, usable, train),
        "classifier_accuracy_real": classifier_test["major_accuracy"],
        "classifier_exact_match_real": classifier_test["exact_match"],
        "classifier_attribute_accuracy_real": classifier_test["attribute_accuracy"],
        "classifier_accuracy_real_definition": CLASSIFIER_ACCURACY_DEFINITION,
        "conditioning": conditioning_summary,
        **_ceiling_fields(dict.fromkeys(CEILING_SETS), classifier, usable),
        "skipped_prompts": [p.text for p in skipped],
        "truncated_prompts": truncated,
        "classifier": _classifier_section(judge),
        "fid": None, "diversity": None, "reconstruction": None, "memorization": None,
        "augmentation": None, "guidance_sweep": None,
        "settings": _settings_record(settings, size),
        "timings_s": timings,
    }
    if settings.headline_only:
        write_json(out, results)
        _write_report(out, results, [p.text for p in usable], prompt_images, prompt_results, None, None)
        return results
    results.update(_ceilings(settings, classifier, usable, pipe.vae, pipe.vae_params, size))
    lap("ceilings")

    n = min(settings.num_fid, len(validation), len(test))
    fid_images = np.concatenate(conditioning.generate_images(generate, test.prompts[:n], 1,
                                                             seeds["fid"], settings.batch_size))
    fid_sets = {"generated": fid_images, "validation": validation.data.images[:n], "test": test.data.images[:n]}
    features = {name: classifier.predict(x).features for name, x in fid_sets.items()}
    if test.seeds is not None:  # the fair floor: other patients with the same cases as test[:n]
        fid_sets["test_twins"] = conditioning.twin_studies(test.seeds[:n], size)
        features["test_twins"] = classifier.predict(fid_sets["test_twins"]).features
    fid = {"domain": _fid(features), "inception": None, "xrv": None}
    if settings.inception_weights:
        from cxr_ldm.evaluation.inception import InceptionFeatures

        inception = InceptionFeatures.from_file(settings.inception_weights)
        pool3 = {name: inception(imaging.as_float_images(x)) for name, x in fid_sets.items()}
        fid["inception"] = {**_fid(pool3), "weights": settings.inception_weights}
    if settings.xrv_weights:
        xrv = XRVFeatures.from_file(settings.xrv_weights)
        fid["xrv"] = {**_fid({name: xrv(imaging.as_float_images(x)) for name, x in fid_sets.items()}),
                      "weights": settings.xrv_weights}
    lap("fid")

    major_columns = [clf.CHEXPERT_LABELS.index(name) for name in classifier.major_findings]
    per_prompt_diversity = ([memorization.mean_pairwise_ms_ssim(images) for images in prompt_images]
                            if settings.num_samples >= 2 else [])
    diversity = {"generated_mean": float(np.mean(per_prompt_diversity)) if per_prompt_diversity else None,
                 "generated_per_prompt": dict(zip([p.text for p in usable], per_prompt_diversity)),
                 **_real_diversity(test, major_columns, 120, settings.seed)}
    lap("diversity")

    recon = reconstruction_metrics(pipe.vae, pipe.vae_params, test.data.images, settings.batch_size)
    lap("reconstruction")

    generated_all = np.concatenate(prompt_images + [fid_images])
    generated_nn = memorization.nearest_training_images(generated_all, train.data.images, settings.copy_threshold)
    heldout_nn = memorization.nearest_training_images(fid_sets["test"], train.data.images, settings.copy_threshold)
    memo = memorization.memorization_summary(generated_nn, heldout_nn, settings.copy_threshold)
    lap("memorization")

    augmentation = None
    if settings.augmentation_experiment:
        synthetic = None if settings.augmentation_data is None else load_synthetic(settings.augmentation_data).data
        augmentation = augmentation_experiment(
            train.data, train.prompts, validation.data, test.data, generate if synthetic is None else None,
            classifier.observations, augmentation_recipe(classifier.config), num_real=settings.augmentation_real,
            ratios=settings.augmentation_ratios, seeds=settings.augmentation_seeds,
            seed=seeds["augmentation"], batch_size=settings.batch_size, synthetic=synthetic)
        lap("augmentation")

    sweep = None
    if settings.guidance_sweep:
        at_headline = sweep_row(settings.guidance, conditioning_summary, fid["domain"]["generated_vs_real"])
        others = [scale for scale in dict.fromkeys(settings.guidance_sweep) if scale != settings.guidance]
        sweep = sorted([at_headline] + guidance_sweep(
            lambda scale: _generator(pipe, dataclasses.replace(settings, guidance=scale), size), classifier, usable,
            others, settings.num_samples, seeds, settings.batch_size, test.prompts[:n], features["test"]),
            key=lambda row: row["guidance"])
        lap("guidance_sweep")

    results.update({"fid": fid, "diversity": diversity, "reconstruction": recon, "memorization": memo,
                    "augmentation": augmentation, "guidance_sweep": sweep})
    write_json(out, results)
    _write_report(out, results, [p.text for p in usable], prompt_images, prompt_results, generated_all,
                  train.data.images)
    return results


def augmentation_recipe(judge_config: clf.TrainConfig) -> clf.TrainConfig:
    """The augmentation experiment's classifiers: the judge's network and input size, trained for TrainConfig's
    default epochs (the judge's epochs are scaled to its far larger training set)."""
    return dataclasses.replace(judge_config, epochs=clf.TrainConfig.epochs)


def sweep_row(guidance: float, summary: dict, domain_fid: float) -> dict:
    """One row of the guidance sweep: a conditioning summary's headline figures and the domain FID."""
    false_positive = summary["normal_false_positive_rate"] or {}
    return {"guidance": float(guidance), "conditioning_accuracy": summary["conditioning_accuracy"],
            "presence_accuracy": summary["presence_accuracy"],
            "conditioning_accuracy_by_style": summary["conditioning_accuracy_by_style"],
            "side_accuracy_overall": summary["side_accuracy_overall"],
            "normal_false_positive_rate_any": false_positive.get("any"),
            "detection_rate": summary["detection_rate"], "domain_fid": domain_fid}


def guidance_sweep(generator_at, classifier, prompts, scales, num_samples: int, seeds: dict[str, int],
                   batch_size: int, fid_prompts, real_features: np.ndarray) -> list[dict]:
    """Conditioning accuracy and domain FID at each classifier-free guidance scale in `scales`.

    generator_at(scale) -> generate(texts, seeds) -> images (B, H, W, C) in [0, 1]. At every scale the
    conditioning prompts and the FID prompts are drawn with the seeds the headline uses
    (`generation_seeds`), so rows differ by the guidance alone and the row at the headline's scale would
    repeat the headline. real_features: the classifier features (N, D) of the real images the FID compares
    against, N = len(fid_prompts). Returns one `sweep_row` per scale, in the order given.
    """
    rows = []
    for scale in scales:
        generate = generator_at(scale)
        images = conditioning.generate_images(generate, [p.text for p in prompts], num_samples,
                                              seeds["conditioning"], batch_size)
        summary, _ = conditioning.evaluate_conditioning(classifier, images, prompts)
        fid_images = np.concatenate(conditioning.generate_images(generate, list(fid_prompts), 1, seeds["fid"],
                                                                 batch_size))
        rows.append(sweep_row(scale, summary,
                              fid_from_features(classifier.predict(fid_images).features, real_features)))
    return rows


def evaluate_autoencoder(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                         prompts: str | Sequence[EvalPrompt] = "test",
                         classifier_config: clf.TrainConfig | None = None, variant: str | None = None,
                         allow_pickle: bool = False, **options) -> dict:
    """`--vae-only`: what an autoencoder allows a diffusion model on it, with no diffusion model. Writes `out`
    (JSON: classifier_accuracy_real, reconstruction, and for phantom_cxr conditioning_accuracy_real_studies and
    conditioning_accuracy_vae_reconstructed with their sections, as `evaluate` names them) and a Markdown
    report beside it. variant, allow_pickle: how to read the autoencoder's weights (`load_component`).
    options: the fields of EvalSettings (the sampling ones are unused)."""
    settings = EvalSettings(checkpoint=str(checkpoint), **options)
    prompt_set_name, prompts = resolve_prompts(prompts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    vae, vae_params = load_autoencoder(settings.checkpoint, variant=variant, allow_pickle=allow_pickle)
    settings = resolve_data(settings, vae.config.sample_size)
    judge = _judge(settings, prompts, classifier_config)
    results = {
        "classifier_accuracy_real": judge.classifier_test["major_accuracy"],
        "prompt_set": _prompt_set_record(prompt_set_name, judge.usable, judge.train),
        **_ceilings(settings, judge.classifier, judge.usable, vae, vae_params, judge.size),
        "skipped_prompts": [p.text for p in judge.skipped],
        "reconstruction": reconstruction_metrics(vae, vae_params, judge.test.data.images, settings.batch_size),
        "classifier": _classifier_section(judge),
        "settings": _settings_record(settings, judge.size),
        "timings_s": {"total": round(time.perf_counter() - start, 1)},
    }
    write_json(out, results)
    assets = out.with_name(out.stem + "_assets")
    assets.mkdir(exist_ok=True)
    shown = imaging.as_float_images(judge.test.data.images[:8])
    reconstructed = reconstruct(vae, vae_params, shown, settings.batch_size)
    report.save_pair_grid(assets / "reconstructions.png", shown, reconstructed, ["test image"] * len(shown),
                          [f"VAE, {v:.1f} dB" for v in np.asarray(imaging.psnr(shown, reconstructed))])
    report.write_autoencoder_markdown(out.with_suffix(".md"), results, assets / "reconstructions.png")
    return results


def evaluate_edits(checkpoint: str | os.PathLike, out: str | os.PathLike, *, pipe, edit_set: str = "test",
                   num_edits: int = 100, strength: float = 0.6, methods: Sequence[str] = edits.METHODS,
                   classifier_config: clf.TrainConfig | None = None, **options) -> dict:
    """`--edits`: counterfactual edits of held-out phantom films (evaluation/edits.py), scored with the strict judge
    against the true counterfactuals. Writes `out` (JSON: the `edits` section, with one row per method and the
    `unedited`, `vae_round_trip` and `true_counterfactual` references) and a Markdown report with a grid of the
    first edits beside it. edit_set: "dev" (validation studies; choose strength and guidance on it) or "test".
    options: EvalSettings fields (steps, guidance, sampler, seed, batch_size and the data ones)."""
    settings = resolve_guidance(EvalSettings(checkpoint=str(checkpoint), **options))
    settings = resolve_data(settings, pipe.default_size())
    if settings.dataset != DEFAULT_DATASET:
        raise ValueError(f"--edits needs {DEFAULT_DATASET}: the true counterfactuals are phantom renderings, "
                         f"not {settings.dataset} films")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    judge = _judge(settings, (), classifier_config)
    cases = edits.edit_cases(num_edits, judge.size, edit_set)
    originals = np.stack([c.image for c in cases]).astype(np.float32) / 255.0
    truths = np.stack([c.counterfactual for c in cases]).astype(np.float32) / 255.0
    round_trip = reconstruct(pipe.vae, pipe.vae_params, originals, settings.batch_size)
    truth_success = edits.verdicts(judge.classifier, cases, truths)
    sampling = dict(steps=settings.steps, guidance=settings.guidance, seed=settings.seed,
                    batch_size=min(settings.batch_size, len(cases)))

    def scored(images):
        success = edits.verdicts(judge.classifier, cases, images)
        return edits.score_edits(cases, images, success, truth_success, pipe.vae_scale, round_trip, settings.seed)

    edited = {method: edits.run_edits(pipe, cases, method, strength=strength, sampler=settings.sampler, **sampling)
              for method in methods}
    redrawn = edits.inversion_redraws(pipe, cases, steps=settings.steps, seed=settings.seed,
                                      batch_size=sampling["batch_size"])
    results = {
        "edits": {
            "edit_set": edit_set, "num_edits": len(cases), "strength": strength,
            "num_add": sum(c.operation == "add" for c in cases), "num_remove": sum(c.operation == "remove" for c in cases),
            "methods": {method: scored(images) for method, images in edited.items()},
            "references": {"unedited": scored(originals), "vae_round_trip": scored(round_trip),
                           "true_counterfactual": scored(truths)},
            "inversion_redraw_psnr_vs_vae": edits.mean_ci(np.asarray(imaging.psnr(redrawn, round_trip)),
                                                           settings.seed),
            "cases": [{"seed": c.seed, "operation": c.operation, "finding": c.finding, "prompt": c.target.text,
                       "source_prompt": c.source.text, "region_pixels": int(c.region.sum())} for c in cases],
        },
        "classifier": _classifier_section(judge),
        "settings": _settings_record(settings, judge.size),
        "timings_s": {"total": round(time.perf_counter() - start, 1)},
    }
    write_json(out, results)
    assets = out.with_name(out.stem + "_assets")
    assets.mkdir(exist_ok=True)
    shown = slice(0, min(8, len(cases)))
    columns = {"film": originals[shown], "truth": truths[shown], **{m: x[shown] for m, x in edited.items()}}
    report.save_edit_grid(assets / "edits.png", columns,
                          [f"{c.operation} {c.finding}" for c in cases[shown]])
    report.write_edits_markdown(out.with_suffix(".md"), results, assets / "edits.png")
    return results


def load_autoencoder(checkpoint: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False):
    """(AutoencoderKL module, params) of a train.py workdir (its autoencoder stage's VAE), a diffusers pipeline
    folder (or a workdir's export) or an AutoencoderKL folder itself. variant, allow_pickle: as `load_component`."""
    path = Path(checkpoint)
    candidates = [Path(vae_dir(str(path))), path / "vae", Path(export_dir(str(path))) / "vae", path]
    for folder in candidates:
        config_file = folder / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "AutoencoderKL":
            return load_component(folder, variant=variant, allow_pickle=allow_pickle)
    raise FileNotFoundError(f"no AutoencoderKL folder (config.json with _class_name AutoencoderKL) in "
                            f"{', '.join(str(c) for c in candidates)}")


def _settings_record(settings: EvalSettings, image_size: int) -> dict:
    """The settings as the results JSON holds them (tuples as lists, so that the JSON reads back equal)."""
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    return {**record, "image_size": image_size}


def _load_splits(settings: EvalSettings):
    """(train, validation, test) of the data set the settings name, built first if it is not there."""
    builder = prepare(settings.dataset, settings.data_dir, settings.dataset_config,
                      settings.manual_dir and os.path.expanduser(settings.manual_dir))
    return tuple(load_split(builder, split) for split in ("train", "validation", "test"))


def judge_extra_seeds(settings: EvalSettings, train: RealSplit) -> range:
    """The phantom seeds the judge's classifier trains on beyond the train split (EvalSettings.judge_train_size):
    the next seeds of the training range; empty on other data sets. Never a validation, test, prompt or
    reference seed."""
    if settings.dataset != DEFAULT_DATASET or train.seeds is None:
        if settings.judge_train_size not in (None, len(train)):
            raise ValueError(f"judge_train_size={settings.judge_train_size}: only phantom_cxr studies can be drawn "
                             f"beyond the train split ({len(train)} examples of {settings.dataset})")
        return range(0)
    size = JUDGE_TRAIN_FACTOR * len(train) if settings.judge_train_size is None else settings.judge_train_size
    if size < len(train):
        raise ValueError(f"judge_train_size={size}: below the train split's {len(train)} examples")
    first = max(train.seeds) + 1
    if sorted(train.seeds) != list(range(first)) or size > phantom_cxr.SPLIT_SEED_OFFSETS["validation"]:
        raise ValueError(f"judge_train_size={size}: the train split is not the seed range [0, {len(train)}) or "
                         f"the studies would leave the training seed range")
    return range(first, size)


def judge_training_studies(settings: EvalSettings, train: RealSplit) -> RealSplit:
    """What the judge's classifier trains on: the train split, then the studies of `judge_extra_seeds`, drawn with
    JUDGE_FINDING_COUNT_SHARES (more two- and three-finding studies than the data set has)."""
    extra = judge_extra_seeds(settings, train)
    if not extra:
        return train
    return train.concatenate(phantom_split(extra, train.data.images.shape[1], min(4, os.cpu_count() or 1),
                                           JUDGE_FINDING_COUNT_SHARES))


def _judge_signature(train: RealSplit, extra: range) -> str:
    """Identifies the judge's training studies without drawing the extra ones: the train split's images and
    labels, and the phantom version, seed range and resolution of the rest."""
    if not extra:
        return train.data.signature()
    described = (f"{train.data.signature()}+phantom_cxr {phantom_cxr.PhantomCxr.VERSION} seeds "
                 f"[{extra.start}, {extra.stop}) at {train.data.images.shape[1]} px, finding counts "
                 f"{JUDGE_FINDING_COUNT_SHARES}")
    return hashlib.sha256(described.encode()).hexdigest()


def _classifier(settings: EvalSettings, train: RealSplit, validation: RealSplit,
                classifier_config: clf.TrainConfig) -> tuple[Path, clf.FindingClassifier, bool]:
    """(cache folder, classifier, whether it came from the cache); the extra training studies of
    `judge_extra_seeds` are drawn only when the classifier is trained."""
    classifier_dir = Path(settings.classifier_dir or Path(settings.data_dir) / "cxr_ldm_eval" /
                          f"classifier-{settings.dataset}-{settings.dataset_config}")
    extra = judge_extra_seeds(settings, train)
    classifier, cached = clf.load_or_train(classifier_dir, lambda: judge_training_studies(settings, train).data,
                                           validation.data, classifier_config, _judge_signature(train, extra))
    return classifier_dir, classifier, cached


def _classifier_section(judge: "_Judge") -> dict:
    classifier = judge.classifier
    return {"dir": str(judge.classifier_dir), "cached": judge.cached, "training_studies": judge.training_studies,
            "observations": list(classifier.observations),
            "side_observations": list(classifier.side_observations),
            "thresholds": classifier.thresholds.tolist(), "config": classifier.config.to_dict(),
            "training": classifier.training_report, "test": judge.classifier_test}


def _ceilings(settings: EvalSettings, classifier, usable, vae, vae_params, size: int) -> dict:
    """The results' ceiling fields: conditioning_real_studies (real phantom studies of each prompt, scored as
    generated images are: what a perfect generator would get), conditioning_vae_reconstructed (the same studies
    through the VAE: what a diffusion model that is perfect in latent space could reach with this autoencoder),
    each with its conditioning_accuracy_* and presence_accuracy_* headlines and _ci intervals, and in each
    conditioning_* the share of studies whose film hides a stated finding with the strict accuracy on the others
    (`conditioning.occlusion_summary`); all None unless phantom_cxr (the VAE ones also without a VAE)."""
    sets = dict.fromkeys(CEILING_SETS)
    occluded = None
    if settings.dataset == DEFAULT_DATASET:
        sets["real_studies"] = conditioning.phantom_studies(usable, settings.num_samples, size)
        occluded = conditioning.occluded_studies(usable, settings.num_samples, size, films=sets["real_studies"])
        if vae is not None:
            reconstructed = reconstruct(vae, vae_params, np.concatenate(sets["real_studies"]), settings.batch_size)
            sets["vae_reconstructed"] = np.split(reconstructed, np.cumsum([len(x) for x in sets["real_studies"]])[:-1])
    return _ceiling_fields(sets, classifier, usable, occluded)


def _ceiling_fields(sets: dict, classifier, usable, occluded=None) -> dict:
    """`_ceilings`' fields for {set name: per-prompt images, or None where the set was not made}; occluded: the
    studies' `conditioning.occluded_studies` flags."""
    out = {}
    for name, images in sets.items():
        summary, results = conditioning.evaluate_conditioning(classifier, images, usable) if images else (None, None)
        if summary is not None and occluded is not None:
            summary.update(conditioning.occlusion_summary(results, occluded))
        for key, attribute in (("conditioning_accuracy", "success"), ("presence_accuracy", "present")):
            interval = results and intervals.hierarchical_bootstrap([getattr(r, attribute) for r in results])
            out[f"{key}_{name}"] = summary and summary[key]
            out[f"{key}_{name}_ci"] = interval and [interval.low, interval.high]
        out[f"conditioning_{name}"] = summary
    return out


def evaluate_judge(out: str | os.PathLike, *, prompts: str | Sequence[EvalPrompt] = "test",
                   classifier_config: clf.TrainConfig | None = None, **options) -> dict:
    """`--judge-only`: the judge without a model. Writes `out` (JSON): the classifier's accuracy on the real test
    split (per finding, side and attribute) and, on phantom_cxr, the strict and presence ceilings of the prompt
    set: real phantom studies of each prompt scored as generated images are. options: EvalSettings fields
    (the data ones; the data set config defaults to the one at 64 px)."""
    settings = EvalSettings(checkpoint="", **options)
    prompt_set_name, prompts = resolve_prompts(prompts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = resolve_data(settings, 64)
    judge = _judge(settings, prompts, classifier_config)
    ceilings = _ceilings(settings, judge.classifier, judge.usable, None, None, judge.size)
    results = {
        "classifier_accuracy_real": judge.classifier_test["major_accuracy"],
        "classifier_exact_match_real": judge.classifier_test["exact_match"],
        "classifier_attribute_accuracy_real": judge.classifier_test["attribute_accuracy"],
        "prompt_set": _prompt_set_record(prompt_set_name, judge.usable, judge.train),
        **{k: v for k, v in ceilings.items() if k.endswith("real_studies") or k.endswith("real_studies_ci")},
        "skipped_prompts": [p.text for p in judge.skipped],
        "classifier": _classifier_section(judge),
        "settings": _settings_record(settings, judge.size),
        "timings_s": {"total": round(time.perf_counter() - start, 1)},
    }
    write_json(out, results)
    return results


@dataclasses.dataclass
class _Judge:
    """The real splits, the classifier (with its cache folder, test-split report and training-set size) and the
    usable prompts."""
    train: Any
    validation: Any
    test: Any
    size: int
    classifier_dir: Path
    classifier: clf.FindingClassifier
    cached: bool
    classifier_test: dict
    usable: list
    skipped: list
    training_studies: int  # examples the classifier trained on (judge_training_studies)


def _judge(settings: EvalSettings, prompts, classifier_config: clf.TrainConfig | None,
           lap: Callable[[str], None] = lambda section: None) -> _Judge:
    """Loads the splits of the resolved `settings`, trains or reuses the classifier (default recipe at the data
    resolution, <= 128 px) and keeps the prompts whose findings it knows; lap("data") and lap("classifier")
    mark the end of each part (section timings)."""
    train, validation, test = _load_splits(settings)
    size = train.data.images.shape[1]
    num_training = len(train) + len(judge_extra_seeds(settings, train))
    lap("data")
    # the default recipe's optimizer steps stay those of 24 epochs on the train split, whatever the judge trains on
    epochs = max(1, round(clf.TrainConfig.epochs * len(train) / num_training))
    classifier_config = classifier_config or clf.TrainConfig(input_size=min(size, 128), epochs=epochs, **JUDGE_NETWORK)
    classifier_dir, classifier, cached = _classifier(settings, train, validation, classifier_config)
    classifier_test = clf.evaluate_classifier(classifier, test.data)
    lap("classifier")
    usable, skipped = conditioning.usable_prompts(prompts, classifier)
    return _Judge(train, validation, test, size, classifier_dir, classifier, cached, classifier_test, usable, skipped,
                  num_training)


def _fid(features: dict[str, np.ndarray]) -> dict:
    """Frechet distances of features {"generated", "validation", "test"[, "test_twins"]} (sets of equal size):
    generated vs test; real_vs_real_same_cases, test vs second renderings of the same cases (other patients,
    the same finding mix as the generated set: the fair floor; phantom only); real_vs_real, validation vs
    test (another mix of findings)."""
    twins = features.get("test_twins")
    return {"n": len(features["test"]), "generated_vs_real": fid_from_features(features["generated"], features["test"]),
            "real_vs_real_same_cases": None if twins is None else fid_from_features(twins, features["test"]),
            "real_vs_real": fid_from_features(features["validation"], features["test"])}


def _seed_row(seed: int, summary: dict, results) -> dict:
    """The strict and presence headlines of one sample seed, each with its 95 % hierarchical bootstrap
    interval over prompts and images (`intervals.hierarchical_bootstrap`)."""
    row = {"seed": seed}
    for key, flags in (("conditioning_accuracy", [r.success for r in results]),
                       ("presence_accuracy", [r.present for r in results])):
        interval = intervals.hierarchical_bootstrap(flags, seed=seed)
        row[key], row[f"{key}_ci"] = summary[key], [interval.low, interval.high]
    return row


def resolve_prompts(prompts: str | Sequence[EvalPrompt]) -> tuple[str, tuple[EvalPrompt, ...]]:
    """(name, prompts) of a prompt set's name, a prompt file's path or a sequence of EvalPrompts ("custom")."""
    if isinstance(prompts, (str, os.PathLike)):
        if str(prompts) in PROMPT_SETS:
            return str(prompts), prompt_set(str(prompts))
        return str(prompts), load_prompt_file(prompts)
    return "custom", tuple(prompts)


def _prompt_set_record(name: str, usable: Sequence[EvalPrompt], train) -> dict:
    """The results' prompt_set section: its name, size and how many prompts a training report states word
    for word (in its impression or anywhere in the report)."""
    return {"name": name, "num_prompts": len(usable),
            "verbatim_in_training": verbatim_in(usable, train.prompts + train.reports)}


def _write_report(out: Path, results: dict, prompts: list[str], prompt_images, prompt_results, generated_all,
                  train_images) -> None:
    """The Markdown report beside the JSON, with prompt grids and memorization pairs in <stem>_assets/."""
    assets = out.with_name(out.stem + "_assets")
    assets.mkdir(exist_ok=True)
    grids = report.save_prompt_grids(assets, prompts, prompt_images, [r.success for r in prompt_results])
    pairs = (results["memorization"] or {}).get("worst_pairs")
    pairs_file = None
    if pairs:
        pairs_file = "memorization_pairs.png"
        report.save_pair_grid(assets / pairs_file, generated_all[[p["generated"] for p in pairs]],
                              imaging.as_float_images(train_images[[p["train"] for p in pairs]]),
                              [f"generated, SSIM {p['ssim']:.3f}" for p in pairs],
                              ["nearest training image"] * len(pairs))
    report.write_markdown(out.with_suffix(".md"), results, assets, grids, pairs_file)
