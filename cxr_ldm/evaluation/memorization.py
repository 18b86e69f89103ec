"""Memorization audit and diversity.

Memorization: for each generated image, its nearest training image -- the top-k training images by
cosine similarity of classifier features, then the one of highest pixel SSIM among them. An image
whose SSIM to its nearest training image reaches the copy threshold counts as a copy. The same search
for held-out real images (which cannot be copies) gives the reference: their nearest-neighbour SSIM
is what two different patients reach.

Diversity: mean pairwise MS-SSIM among the images of one prompt (lower = more diverse), beside the
same number for real images.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

from cxr_ldm import imaging
from cxr_ldm.imaging import as_float_images, resize


@dataclasses.dataclass
class NearestNeighbours:
    """For N query images: index (N,) of the nearest training image, its ssim (N,) and feature cosine (N,)."""
    index: np.ndarray
    ssim: np.ndarray
    cosine: np.ndarray


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _pixels(images: np.ndarray, size: int | None) -> np.ndarray:
    images = as_float_images(images)
    if size is None or images.shape[1] <= size:
        return images
    return np.asarray(resize(jnp.asarray(images), size))


def nearest_training_images(query_features: np.ndarray, query_images: np.ndarray, train_features: np.ndarray,
                            train_images: np.ndarray, top_k: int = 10, ssim_size: int | None = 128,
                            chunk: int = 256) -> NearestNeighbours:
    """Nearest training image of each query image (module doc).

    Args:
      query_features (N, D), train_features (M, D): classifier features.
      query_images (N, H, W, C), train_images (M, H, W, C): uint8 or float in [0, 1], same size.
      top_k: candidates per query kept from the feature search for the SSIM comparison.
      ssim_size: images larger than this are resized to it for SSIM (None: native size).
    """
    if query_images.shape[1:3] != train_images.shape[1:3]:
        raise ValueError(f"query images {query_images.shape[1:3]} and training images {train_images.shape[1:3]} "
                         "must have the same size")
    top_k = min(top_k, len(train_features))
    train_unit = _unit(train_features)
    query_unit = _unit(query_features)
    candidates, cosines = [], []
    for start in range(0, len(query_unit), chunk):
        similarity = query_unit[start:start + chunk] @ train_unit.T  # (n, M)
        best = np.argpartition(-similarity, top_k - 1, axis=1)[:, :top_k]
        candidates.append(best)
        cosines.append(np.take_along_axis(similarity, best, axis=1))
    candidates, cosines = np.concatenate(candidates), np.concatenate(cosines)
    query_pixels = _pixels(query_images, ssim_size)
    train_pixels = _pixels(train_images[np.unique(candidates)], ssim_size)
    position = {index: i for i, index in enumerate(np.unique(candidates))}
    pairs_a = np.repeat(query_pixels, top_k, axis=0)
    pairs_b = train_pixels[[position[i] for i in candidates.reshape(-1)]]
    scores = paired(imaging.ssim, pairs_a, pairs_b, chunk).reshape(-1, top_k)
    pick = scores.argmax(axis=1)
    rows = np.arange(len(scores))
    return NearestNeighbours(candidates[rows, pick], scores[rows, pick], cosines[rows, pick])


def paired(metric, a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """metric(a, b) -> (N,) evaluated in chunks of one fixed size (the last one padded), so a jitted
    metric compiles once."""
    chunk = min(chunk, len(a))
    out = []
    for start in range(0, len(a), chunk):
        x, y = a[start:start + chunk], b[start:start + chunk]
        pad = ((0, chunk - len(x)),) + ((0, 0),) * (x.ndim - 1)
        out.append(np.asarray(metric(np.pad(x, pad), np.pad(y, pad)))[:len(x)])
    return np.concatenate(out)


def memorization_summary(generated: NearestNeighbours, heldout: NearestNeighbours | None,
                         copy_threshold: float, worst: int = 8) -> dict:
    """copy_fraction (generated images with SSIM >= copy_threshold to their nearest training image),
    the same for held-out real images, SSIM quantiles of both, and the `worst` pairs (highest SSIM):
    [{generated: i, train: j, ssim, cosine}]."""
    order = np.argsort(-generated.ssim)[:worst]

    def stats(nn: NearestNeighbours) -> dict:
        return {"copy_fraction": float((nn.ssim >= copy_threshold).mean()), "ssim_median": float(np.median(nn.ssim)),
                "ssim_p99": float(np.quantile(nn.ssim, 0.99)), "ssim_max": float(nn.ssim.max())}

    return {"copy_threshold": copy_threshold, "generated": stats(generated),
            "heldout_real": stats(heldout) if heldout is not None else None,
            "worst_pairs": [{"generated": int(i), "train": int(generated.index[i]), "ssim": float(generated.ssim[i]),
                             "cosine": float(generated.cosine[i])} for i in order]}


def mean_pairwise_ms_ssim(images: np.ndarray, max_pairs: int = 256, seed: int = 0) -> float:
    """Mean MS-SSIM over pairs of distinct images (N, H, W, C) (all pairs, or `max_pairs` random ones)."""
    images = as_float_images(images)
    pairs = list(itertools.combinations(range(len(images)), 2))
    if not pairs:
        raise ValueError(f"diversity needs at least 2 images, got {len(images)}")
    if len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in np.sort(chosen)]
    a, b = (np.stack([images[p[k]] for p in pairs]) for k in (0, 1))
    return float(np.mean(paired(imaging.ms_ssim, a, b)))
