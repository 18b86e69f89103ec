"""Data augmentation experiment: does adding synthetic images help a classifier trained on little real data?

Two classifiers with the same recipe: one on a small real training set, one on the same set plus one
synthetic image per real example of a disjoint slice of the training split, generated from that
example's prompt and labelled with its labels and sides. Both are scored by AUROC on the real test split.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cxr_ldm import imaging
from cxr_ldm.evaluation import classifier as clf
from cxr_ldm.evaluation.conditioning import generate_images


def _concat(a: clf.LabelledImages, b: clf.LabelledImages) -> clf.LabelledImages:
    return clf.LabelledImages(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]),
                              np.concatenate([a.sides, b.sides]))


def augmentation_experiment(train: clf.LabelledImages, train_prompts: list[str], validation: clf.LabelledImages,
                            test: clf.LabelledImages, generate: Callable, observations: tuple[str, ...],
                            config: clf.TrainConfig, *, num_real: int, num_synthetic: int, seed: int,
                            batch_size: int) -> dict:
    """AUROC on `test` of a classifier on `num_real` real images vs the same plus `num_synthetic` generated.

    generate(texts, seeds) -> images (B, H, W, C) in [0, 1] (resized to the real size if needed).
    Returns {"real_only": {...}, "real_plus_synthetic": {...}} with mean_auroc and per-observation AUROC.
    """
    if num_real + num_synthetic > len(train):
        raise ValueError(f"augmentation experiment: {num_real} real + {num_synthetic} synthetic examples need "
                         f"{num_real + num_synthetic} training examples, the split has {len(train)}")
    real = train.subset(slice(0, num_real))
    source = train.subset(slice(num_real, num_real + num_synthetic))
    prompts = train_prompts[num_real:num_real + num_synthetic]
    images = np.concatenate(generate_images(generate, prompts, 1, seed, batch_size))
    size = real.images.shape[1]
    images = np.asarray(imaging.resize(imaging.as_float_images(images), size))
    synthetic = clf.LabelledImages(np.round(images * 255).astype(np.uint8), source.labels, source.sides)
    out = {}
    for name, data in (("real_only", real), ("real_plus_synthetic", _concat(real, synthetic))):
        model = clf.train_classifier(data, validation, config, observations=observations)
        report = clf.evaluate_classifier(model, test)
        aurocs = {k: v["auroc"] for k, v in report["per_observation"].items()}
        known = [v for v in aurocs.values() if v is not None]
        out[name] = {"num_train": len(data), "mean_auroc": float(np.mean(known)) if known else None,
                     "auroc": aurocs, "exact_match": report["exact_match"]}
    return out
