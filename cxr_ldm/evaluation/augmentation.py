"""Data augmentation experiment: does adding synthetic images help a classifier trained on little real data?

One classifier recipe, trained once per (ratio, seed): on a small real training set (the first `num_real`
examples of the training split) plus round(ratio * num_real) synthetic images, either generated from the
prompts of the training examples that follow and labelled with those examples' labels and sides, or read
from a synthetic data set on disk (`python -m cxr_ldm.synthesize`; labelled with what their prompts state),
seed k of the run taking its rows [k * M, (k + 1) * M). Ratio 0 is the real-only baseline. A seed gives the classifier its initialisation and batch order (TrainConfig.seed +
seed) and the generator its sample seeds; within a seed every ratio uses the same classifier seed and the
first images of the same synthetic draw (ratio 0.5's images are the first half of ratio 1's), so the
ratios of one seed differ by the added images alone.

Every classifier is scored by AUROC on the real test split (mean over the observations whose AUROC the
test split defines). Intervals are percentile bootstraps over test images and seeds: each resample draws
the test images with replacement (scoring every classifier on the same draw) and, independently, as many
seeds as were run with replacement (the same draw for every ratio), and takes the mean over the drawn
seeds. Ratios are thus paired in both test images and seeds: the difference to ratio 0 cancels what they
share. With few seeds the seed part is coarse (3 seeds: 10 distinct draws, and a bootstrap of the mean
of S values has (S - 1) / S of its variance), so the spread over seeds (mean, std, min, max) is reported
beside every interval. resample_seeds=False bootstraps the test images alone: the test set's sampling
error of the mean over these seeds, no training noise.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from cxr_ldm import imaging
from cxr_ldm.evaluation import classifier as clf
from cxr_ldm.evaluation import intervals
from cxr_ldm.evaluation.conditioning import generate_images

DEFAULT_RATIOS = (0.0, 0.5, 1.0, 2.0)  # synthetic images per real image
DEFAULT_SEEDS = (0, 1, 2)
INTERVAL_OVER = {True: "test images and seeds, each resampled with replacement, independently; paired across ratios",
                 False: "test images, resampled with replacement, paired across ratios and seeds; seeds averaged, "
                        "not resampled (their spread is under 'seeds')"}


def _concat(a: clf.LabelledImages, b: clf.LabelledImages) -> clf.LabelledImages:
    """a's examples then b's, every per-example field (images, labels, sides, ...) concatenated."""
    return clf.LabelledImages(**{field.name: np.concatenate([getattr(a, field.name), getattr(b, field.name)])
                                 for field in dataclasses.fields(a)})


def _check_grid(ratios: Sequence[float], seeds: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Sorted distinct ratios with 0 (the baseline) included; the seeds as given, distinct non-negative ints."""
    ratios = tuple(sorted({0.0, *(float(r) for r in ratios)}))
    if ratios[0] < 0 or not np.isfinite(ratios).all():
        raise ValueError(f"augmentation experiment: ratios must be finite and >= 0, got {ratios}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"augmentation experiment: seeds must be distinct non-negative ints, got {seeds}")
    return ratios, seeds


def _synthetic(generate: Callable, prompts: list[str], source: clf.LabelledImages, first_seed: int,
               batch_size: int, size: int) -> clf.LabelledImages:
    """One generated image per prompt (sample seeds first_seed, first_seed + 1, ...) as uint8 at `size`,
    labelled as `source` is (its labels, sides and any other per-example field)."""
    images = np.concatenate(generate_images(generate, prompts, 1, first_seed, batch_size))
    images = np.asarray(imaging.resize(imaging.as_float_images(images), size))
    return dataclasses.replace(source, images=np.round(images * 255).astype(np.uint8))


def _mean_auroc_replicates(probabilities: np.ndarray, target: dict, columns: list[int],
                           counts: np.ndarray) -> np.ndarray:
    """(B,) mean over `columns` of the AUROC on each bootstrap resample (counts (B, N)); uncertain labels
    weigh 0; observations a resample leaves with one class only are left out of its mean."""
    per_observation = np.stack([
        intervals.weighted_auroc(probabilities[:, j], target["label"][:, j] > 0,
                                 counts * target["label_mask"][None, :, j]) for j in columns], axis=1)
    defined = ~np.isnan(per_observation)
    return np.where(defined.any(1), np.nansum(per_observation, 1) / np.maximum(defined.sum(1), 1), np.nan)


def augmentation_experiment(train: clf.LabelledImages, train_prompts: list[str], validation: clf.LabelledImages,
                            test: clf.LabelledImages, generate: Callable | None, observations: tuple[str, ...],
                            config: clf.TrainConfig, *, num_real: int, seed: int, batch_size: int,
                            ratios: Sequence[float] = DEFAULT_RATIOS, seeds: Sequence[int] = DEFAULT_SEEDS,
                            num_synthetic: int | None = None, num_resamples: int = intervals.DEFAULT_RESAMPLES,
                            level: float = intervals.DEFAULT_LEVEL, resample_seeds: bool = True,
                            synthetic: clf.LabelledImages | None = None) -> dict:
    """AUROC on `test` of classifiers on `num_real` real images plus ratio * num_real synthetic ones, for
    every ratio in `ratios` (0 added if missing: the real-only baseline) and every seed in `seeds`.

    generate(texts, seeds) -> images (B, H, W, C) in [0, 1] (resized to the real size if needed); None when
      `synthetic` is given: images read from disk (e.g. `data.load_synthetic`), whose rows [k * M, (k + 1) * M)
      serve the k-th seed of `seeds` (ValueError if it holds fewer than len(seeds) * M rows).
    seed: the first generator sample seed. Seed `s` of `seeds` draws its images with the sample seeds
      seed + s * M + i, i < M = round(max(ratios) * num_real), disjoint for distinct seeds (and inside
      the evaluator's augmentation block, evaluator.generation_seeds, while (max(seeds) + 1) * M <=
      SEED_BLOCK), and trains its classifiers with config.seed + s.
    num_synthetic: optional cap on the synthetic images of one classifier (the single-ratio argument of
      earlier versions); ValueError if a ratio needs more. The training split must hold num_real + M.
    num_resamples, level, resample_seeds: the bootstrap (module doc); it draws test images with
      np.random.default_rng(0) (`intervals.bootstrap_counts`) and seeds with default_rng(1).

    Costs len(ratios) * len(seeds) classifier trainings and len(seeds) * M generated images.

    Returns a JSON-ready dict:
      num_real, ratios, seeds, num_test, synthetic_source ("generated" or "read");
      observations: those whose test AUROC is defined (both classes);
      interval: {level, num_resamples, resample_seeds, over};
      runs: per (ratio, seed): {ratio, seed, num_synthetic, num_train, mean_auroc, auroc {observation:
        AUROC or None}, exact_match};
      by_ratio: per ratio: {ratio, num_synthetic, num_train, mean_auroc: Interval dict (estimate = mean
        over seeds of mean_auroc), seeds: intervals.spread of mean_auroc over seeds,
        difference_to_real_only: Interval dict of (mean over seeds at this ratio) - (at ratio 0),
        difference_by_seed: spread over seeds of that seed's difference, exact_match: spread over seeds}.
      Intervals are None when no observation has a defined AUROC.
    """
    ratios, seeds = _check_grid(ratios, seeds)
    if (generate is None) == (synthetic is None):
        raise ValueError("augmentation experiment: give either a generator or synthetic images, not both or none")
    if not observations:
        raise ValueError("augmentation experiment: no observations (every classifier must learn the same ones)")
    counts = {r: round(r * num_real) for r in ratios}
    most = max(counts.values())
    if num_synthetic is not None and most > num_synthetic:
        raise ValueError(f"augmentation experiment: ratio {max(ratios)} needs {most} synthetic images per "
                         f"classifier, more than num_synthetic={num_synthetic}")
    if num_real + most > len(train):
        raise ValueError(f"augmentation experiment: {num_real} real + {most} synthetic examples need "
                         f"{num_real + most} training examples, the split has {len(train)}")
    if synthetic is not None and len(synthetic) < len(seeds) * most:
        raise ValueError(f"augmentation experiment: {len(seeds)} seeds x {most} synthetic images need "
                         f"{len(seeds) * most} synthetic examples, the synthetic data set has {len(synthetic)}")
    real = train.subset(slice(0, num_real))
    source = train.subset(slice(num_real, num_real + most))
    prompts = list(train_prompts[num_real:num_real + most])
    size = real.images.shape[1]

    def draw(k: int, s: int) -> clf.LabelledImages:
        if generate is not None:
            return _synthetic(generate, prompts, source, seed + s * most, batch_size, size)
        rows = synthetic.subset(slice(k * most, (k + 1) * most))
        if rows.images.shape[1] == size:
            return rows
        resized = np.asarray(imaging.resize(imaging.as_float_images(rows.images), size))
        return dataclasses.replace(rows, images=np.round(resized * 255).astype(np.uint8))

    target = clf.targets(test, observations, ())
    bootstrap = intervals.bootstrap_counts(len(test), num_resamples, seed=0)
    drawn_seeds = (np.random.default_rng(1).integers(0, len(seeds), (num_resamples, len(seeds))) if resample_seeds
                   else np.broadcast_to(np.arange(len(seeds)), (num_resamples, len(seeds))))
    runs, replicates = [], {}
    for k, s in enumerate(seeds):
        drawn = draw(k, s) if most else None
        seed_config = dataclasses.replace(config, seed=config.seed + s)
        for ratio in ratios:
            n = counts[ratio]
            data = _concat(real, drawn.subset(slice(0, n))) if n else real
            model = clf.train_classifier(data, validation, seed_config, observations=observations)
            report = clf.evaluate_classifier(model, test)
            aurocs = {k: v["auroc"] for k, v in report["per_observation"].items()}
            known = [v for v in aurocs.values() if v is not None]
            runs.append({"ratio": ratio, "seed": s, "num_synthetic": n, "num_train": len(data),
                         "mean_auroc": float(np.mean(known)) if known else None, "auroc": aurocs,
                         "exact_match": report["exact_match"]})
            columns = [j for j, name in enumerate(model.observations) if aurocs[name] is not None]
            if columns:
                replicates[ratio, s] = _mean_auroc_replicates(model.predict(test.images).probabilities, target,
                                                              columns, bootstrap)
    defined = [name for name, v in runs[0]["auroc"].items() if v is not None]

    method = "bootstrap/test-images+seeds" if resample_seeds else "bootstrap/test-images"

    def interval(estimate: float, values: np.ndarray) -> dict:
        return intervals.percentile_interval(estimate, values, level=level, seed=0, method=method).to_dict()

    def of(ratio: float, key: str) -> list:
        return [run[key] for run in runs if run["ratio"] == ratio]

    def seed_mean(ratio: float) -> np.ndarray:
        """(B,) mean AUROC over each resample's drawn seeds, on its drawn test images."""
        per_seed = np.stack([replicates[ratio, s] for s in seeds])  # (S, B)
        return per_seed[drawn_seeds, np.arange(num_resamples)[:, None]].mean(1)

    by_ratio = []
    baseline = of(0.0, "mean_auroc")
    for ratio in ratios:
        scores = of(ratio, "mean_auroc")
        row = {"ratio": ratio, "num_synthetic": counts[ratio], "num_train": num_real + counts[ratio],
               "mean_auroc": None, "seeds": intervals.spread(scores), "difference_to_real_only": None,
               "difference_by_seed": intervals.spread([None if a is None or b is None else a - b
                                                       for a, b in zip(scores, baseline)]),
               "exact_match": intervals.spread(of(ratio, "exact_match"))}
        if defined:
            mean, mean_baseline = seed_mean(ratio), seed_mean(0.0)
            row["mean_auroc"] = interval(np.mean(scores), mean)
            row["difference_to_real_only"] = interval(np.mean(scores) - np.mean(baseline), mean - mean_baseline)
        by_ratio.append(row)
    return {"num_real": num_real, "ratios": list(ratios), "seeds": list(seeds), "num_test": len(test),
            "synthetic_source": "generated" if synthetic is None else "read", "observations": defined,
            "interval": {"level": level, "num_resamples": num_resamples, "resample_seeds": resample_seeds,
                         "over": INTERVAL_OVER[resample_seeds]},
            "runs": runs, "by_ratio": by_ratio}


def _with_interval(value: dict | None) -> str:
    if value is None:
        return "-"
    return f"{value['estimate']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def report_rows(result: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of a Markdown table of `augmentation_experiment`'s result: one row per ratio."""
    level = round(100 * result["interval"]["level"])
    header = ["synthetic per real", "synthetic images", "training images",
              f"mean AUROC, mean of {len(result['seeds'])} seeds [{level} % interval]",
              f"difference to real only [{level} % interval]", "AUROC over seeds (min - max)"]
    rows = []
    for row in result["by_ratio"]:
        seeds = row["seeds"]
        over_seeds = "-" if seeds["min"] is None else f"{seeds['min']:.3f} - {seeds['max']:.3f}"
        rows.append([f"{row['ratio']:g}", row["num_synthetic"], row["num_train"], _with_interval(row["mean_auroc"]),
                     _with_interval(row["difference_to_real_only"]), over_seeds])
    return header, rows
