"""Memorization audit and diversity.

Memorization, by pixels: for each query image (generated, or held-out real), its nearest training
image over the whole training split, at the evaluation resolution (images larger than `size` are
first resized to it), allowing a small translation so that a copy moved by a pixel is still found.
Nothing learned takes part: the evaluation classifier is trained to ignore who the patient is, so
its features are the wrong place to look for a copy of one patient's image. Two stages:

1. Exact pixel search. Pearson's correlation between the pixels of the query's central crop and
   those of every training image's crop at every shift (dy, dx), |dy|, |dx| <= `max_shift` -- all M
   training images and all (2 max_shift + 1)^2 shifts, as matrix products in jitted chunks of
   training images; no index, no sampling, no approximation. Correlation ignores brightness and
   contrast, so a brightened or contrast-stretched copy ranks as high as an exact one. Each query
   keeps the `candidates` training images of highest correlation, each at its best shift.
2. SSIM (`imaging.ssim`'s definition, on the aligned crops) of each candidate; the nearest training
   image is the candidate of highest SSIM.

A query whose SSIM to its nearest training image reaches the copy threshold is a copy. The same
search for held-out real images (which cannot be copies) gives the reference: their
nearest-neighbour SSIM is what two different patients reach.

SSIM of the best 32 candidates, not of all M, by measurement (phantom studies, two shared CPU
cores): N = 460 queries against M = 6000 training images of 64 px take about 5 s with the
defaults (stage 1 about 4 s; about 15 s with max_shift=2), 22 s at 128 px. SSIM against all M
(`candidates=None`) takes about 6 minutes for the same queries at 64 px. What the candidates cost:
a copy correlates with its source far above any other patient (64 px phantoms: a noisy copy still
at SSIM 0.95 correlates 0.996 with its source; the most correlated pair of different patients among
460 x 6000 reaches 0.984), so the source of a copy is always a candidate. Among non-copies the
SSIM-best training image is often not among the 32 most correlated (28 of 100 queries), so their
nearest-neighbour SSIM comes out lower by 0.004 on average (0.06 at most), but not at all for the
10 % of queries nearest the training set: the 99th percentile and the maximum, which decide copies,
were exact. With `max_shift=0` and `candidates=None` the search is plain whole-image SSIM against
every training image.

Diversity: mean pairwise MS-SSIM among the images of one prompt (lower = more diverse), beside the
same number for real images.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from cxr_ldm import imaging
from cxr_ldm.imaging import as_float_images, resize

SSIM_WINDOW = 11  # imaging.ssim's defaults: 11x11 Gaussian window, sigma 1.5, data range 1
SSIM_SIGMA = 1.5


@dataclasses.dataclass
class NearestNeighbours:
    """For N query images, the nearest training image (module doc).

    index (N,): its row in the training images; ssim (N,): SSIM, aligned at shift; copy (N,): ssim >=
    copy_threshold; shift (N, 2): the (dy, dx) of highest pixel correlation, query[y, x] ~ train[y + dy, x + dx];
    correlation (N,): that correlation (stage 1).
    """
    index: np.ndarray
    ssim: np.ndarray
    copy: np.ndarray
    shift: np.ndarray
    correlation: np.ndarray
    copy_threshold: float


def _pixels(images: np.ndarray, size: int | None, chunk: int = 512) -> np.ndarray:
    """Float (N, H, W) in [0, 1], resized (antialiased) to `size` when larger."""
    images = as_float_images(images)
    if size is not None and images.shape[1] > size:
        images = np.concatenate([np.asarray(resize(jnp.asarray(images[i:i + chunk]), size))
                                 for i in range(0, len(images), chunk)])
    return images.mean(axis=-1)


def _shifts(max_shift: int) -> np.ndarray:
    """(S, 2) every (dy, dx) with |dy|, |dx| <= max_shift, nearest the identity first (ties go to it)."""
    r = range(-max_shift, max_shift + 1)
    return np.array(sorted(((dy, dx) for dy in r for dx in r), key=lambda d: (d[0] ** 2 + d[1] ** 2, d)), np.int32)


def _crop(images: jax.Array, dy: int, dx: int, s: int) -> jax.Array:
    """The (H - 2s, W - 2s) window of (..., H, W) displaced by (dy, dx) from the centre."""
    h, w = images.shape[-2:]
    return images[..., s + dy:h - s + dy, s + dx:w - s + dx]


def _standardize(x: jax.Array) -> jax.Array:
    """Rows (..., D) to zero mean and unit norm (a constant row stays zero), so dot products are correlations."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


@functools.partial(jax.jit, static_argnames=("max_shift", "k"))
def _search_chunk(queries: jax.Array, train: jax.Array, offset: jax.Array, num_train: jax.Array,
                  best: tuple[jax.Array, jax.Array, jax.Array], max_shift: int, k: int):
    """Stage 1 on one chunk of training images: queries (n, D) standardized central crops, train (m, H, W),
    rows offset.. of the training split (rows >= num_train are padding). Merges the chunk's correlations
    (max over shifts) into the running top k, best = (correlation, training row, shift number), each (n, k)."""
    m, height, width = train.shape
    shifts = jnp.asarray(_shifts(max_shift))

    def one_shift(carry, number):
        correlation, shift = carry
        dy, dx = shifts[number]
        crops = jax.lax.dynamic_slice(train, (0, max_shift + dy, max_shift + dx),
                                      (m, height - 2 * max_shift, width - 2 * max_shift))
        value = queries @ _standardize(crops.reshape(m, -1)).T
        better = value > correlation  # ties keep the earlier shift, nearer the identity
        return (jnp.where(better, value, correlation), jnp.where(better, number, shift)), None

    start = (jnp.full((queries.shape[0], m), -jnp.inf, jnp.float32), jnp.zeros((queries.shape[0], m), jnp.int32))
    (correlation, shift), _ = jax.lax.scan(one_shift, start, jnp.arange(len(shifts)))
    rows = jnp.broadcast_to(offset + jnp.arange(m), correlation.shape)
    correlation = jnp.where(rows < num_train, correlation, -jnp.inf)
    merged = [jnp.concatenate(pair, axis=1) for pair in zip(best, (correlation, rows, shift))]
    values, pick = jax.lax.top_k(merged[0], k)  # ties: the earlier column, i.e. the lower training row
    return values, jnp.take_along_axis(merged[1], pick, axis=1), jnp.take_along_axis(merged[2], pick, axis=1)


def _filter_matrix(size: int) -> jax.Array:
    """(size - window + 1, size): the 'valid' Gaussian filter of imaging.ssim as a banded matrix."""
    window = imaging._gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
    offset = jnp.arange(size)[None, :] - jnp.arange(size - SSIM_WINDOW + 1)[:, None]
    inside = (offset >= 0) & (offset < SSIM_WINDOW)
    return jnp.where(inside, window[jnp.clip(offset, 0, SSIM_WINDOW - 1)], 0.0)


def _filter(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Separable Gaussian filtering of (..., h, w) as two matrix products."""
    return jnp.swapaxes(jnp.swapaxes(x @ cols.T, -1, -2) @ rows.T, -1, -2)


@jax.jit
def _ssim_candidates(queries: jax.Array, candidates: jax.Array) -> jax.Array:
    """Stage 2: SSIM of queries (n, h, w) against their aligned candidates (n, k, h, w): (n, k). The value of
    imaging.ssim (K1 = 0.01, K2 = 0.03, data range 1), its filtering done as matrix products."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    rows, cols = _filter_matrix(queries.shape[1]), _filter_matrix(queries.shape[2])
    a, b = queries[:, None], candidates
    mu_a, mu_b = _filter(a, rows, cols), _filter(b, rows, cols)
    var_a = _filter(a * a, rows, cols) - mu_a ** 2
    var_b = _filter(b * b, rows, cols) - mu_b ** 2
    cov = _filter(a * b, rows, cols) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(axis=(-2, -1))


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    return np.pad(x, ((0, size - len(x)),) + ((0, 0),) * (x.ndim - 1))


def nearest_training_images(query_images: np.ndarray, train_images: np.ndarray, copy_threshold: float = 0.95,
                            size: int | None = 128, max_shift: int = 1, candidates: int | None = 32,
                            train_chunk: int = 1024, pair_chunk: int = 512) -> NearestNeighbours:
    """Nearest training image of each query image by exact pixel search over all training images (module doc).

    Args:
      query_images (N, H, W, C), train_images (M, H, W, C): uint8 or float in [0, 1], the same size.
      copy_threshold: SSIM from which a query counts as a copy.
      size: images larger than this are resized to it first (None: native size).
      max_shift: the largest translation (pixels, each axis) searched.
      candidates: training images per query kept from the correlation search for SSIM (None: all of them).
      train_chunk, pair_chunk: training images per jitted correlation step, (query, candidate) pairs per
        jitted SSIM step, at least one query's candidates (memory, not results).
    """
    if query_images.shape[1:3] != train_images.shape[1:3]:
        raise ValueError(f"query images {query_images.shape[1:3]} and training images {train_images.shape[1:3]} "
                         "must have the same size")
    if len(query_images) == 0 or len(train_images) == 0:
        raise ValueError(f"need query and training images, got {len(query_images)} and {len(train_images)}")
    queries, train = _pixels(query_images, size), _pixels(train_images, size)
    s = max_shift
    height, width = queries.shape[1] - 2 * s, queries.shape[2] - 2 * s
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"images of {queries.shape[1]}x{queries.shape[2]} px are too small for SSIM with shifts "
                         f"up to {max_shift} px")
    num_queries, num_train = len(queries), len(train)
    k = num_train if candidates is None else min(candidates, num_train)

    # Stage 1: exact correlation search over every training image and shift.
    crops = queries[:, s:s + height, s:s + width]
    standardized = _standardize(jnp.asarray(crops.reshape(num_queries, -1)))
    best = (jnp.full((num_queries, k), -jnp.inf, jnp.float32), jnp.zeros((num_queries, k), jnp.int32),
            jnp.zeros((num_queries, k), jnp.int32))
    train_chunk = min(train_chunk, num_train)
    for start in range(0, num_train, train_chunk):
        block = _padded(train[start:start + train_chunk], train_chunk)
        best = _search_chunk(standardized, jnp.asarray(block), jnp.int32(start), jnp.int32(num_train), best,
                             max_shift=max_shift, k=k)
    correlation, index, shift = (np.asarray(x) for x in best)
    shift = _shifts(max_shift)[shift]  # (N, k, 2)

    # Stage 2: SSIM of each candidate, aligned at its shift of highest correlation.
    y = s + shift[..., 0, None, None] + np.arange(height)[:, None]  # (N, k, h, 1)
    x = s + shift[..., 1, None, None] + np.arange(width)  # (N, k, 1, w)
    query_chunk = min(max(1, pair_chunk // k), num_queries)
    scores = []
    for start in range(0, num_queries, query_chunk):
        part = slice(start, start + query_chunk)
        aligned = train[index[part, :, None, None], y[part], x[part]]  # (n, k, h, w)
        scores.append(np.asarray(_ssim_candidates(jnp.asarray(_padded(crops[part], query_chunk)),
                                                  jnp.asarray(_padded(aligned, query_chunk))))[:len(aligned)])
    scores = np.concatenate(scores)  # (N, k)
    pick = scores.argmax(axis=1)  # ties: the candidate of higher correlation
    rows = np.arange(num_queries)
    ssim = scores[rows, pick].astype(np.float32)
    return NearestNeighbours(index=index[rows, pick].astype(np.int64), ssim=ssim, copy=ssim >= copy_threshold,
                             shift=shift[rows, pick], correlation=correlation[rows, pick].astype(np.float32),
                             copy_threshold=float(copy_threshold))


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
    [{generated: i, train: j, ssim, shift: [dy, dx], correlation}]."""
    for name, nn in (("generated", generated), ("heldout", heldout)):
        if nn is not None and nn.copy_threshold != copy_threshold:
            raise ValueError(f"{name} images were searched with copy threshold {nn.copy_threshold}, "
                             f"summarised with {copy_threshold}")
    order = np.argsort(-generated.ssim, kind="stable")[:worst]

    def stats(nn: NearestNeighbours) -> dict:
        return {"copy_fraction": float(nn.copy.mean()), "ssim_median": float(np.median(nn.ssim)),
                "ssim_p99": float(np.quantile(nn.ssim, 0.99)), "ssim_max": float(nn.ssim.max())}

    return {"copy_threshold": copy_threshold, "generated": stats(generated),
            "heldout_real": stats(heldout) if heldout is not None else None,
            "worst_pairs": [{"generated": int(i), "train": int(generated.index[i]), "ssim": float(generated.ssim[i]),
                             "shift": [int(v) for v in generated.shift[i]],
                             "correlation": float(generated.correlation[i])} for i in order]}


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
