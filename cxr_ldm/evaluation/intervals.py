"""Bootstrap intervals for the evaluator's headline numbers, and the spread of a number over sample seeds.

Every interval is a percentile bootstrap interval: the (1 - level) / 2 and (1 + level) / 2 quantiles
(numpy's default linear interpolation) of the statistic over `num_resamples` resamples drawn from
`np.random.default_rng(seed)`, so a call is a deterministic function of its arguments. `estimate` is the
statistic of the data as given, not a bootstrap mean.

`hierarchical_bootstrap`  the conditioning accuracy: P prompts x K images of success flags, resampled
                          prompts first, then images within each resampled prompt.
`bootstrap_ci`            any statistic of N independent units (images, prompts), resampled with replacement.
`bootstrap_counts`, `weighted_auroc`
                          the same resampling as per-unit counts, and AUROC under such counts: paired
                          bootstraps of several classifiers scored on one test set.
`spread`                  mean, std, min and max of a number over sample seeds.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
_CHUNK_ELEMENTS = 1 << 23  # resampled elements held at once by bootstrap_ci (64 MiB of float64)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A bootstrap interval: estimate (the statistic of the data), [low, high] at `level`, std_error (the
    standard deviation of the bootstrap replicates) and how it was drawn."""
    estimate: float
    low: float
    high: float
    level: float
    num_resamples: int
    seed: int
    method: str
    std_error: float

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def percentile_interval(estimate: float, replicates: np.ndarray, *, level: float, seed: int,
                        method: str) -> Interval:
    """The percentile interval of bootstrap `replicates` (B,); replicates that are NaN (a resample on which
    the statistic is undefined) are left out, and an interval with none left is NaN."""
    _check_level(level)
    replicates = np.asarray(replicates, np.float64)
    finite = replicates[~np.isnan(replicates)]
    if finite.size:
        low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
        std_error = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    else:
        low = high = std_error = float("nan")
    return Interval(float(estimate), float(low), float(high), float(level), int(replicates.size), int(seed),
                    method, std_error)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _check_resamples(num_resamples: int) -> None:
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")


def prompt_counts(success, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (successes, images), both int64 (P,), of success flags given as
      - a (P, K) matrix (bool or 0/1), with an optional (P, K) bool `mask` of the images that count, or
      - a sequence of P 1-D arrays (ragged: prompt p has its own number of images; `mask` must be None).
    Every prompt needs at least one image."""
    if isinstance(success, np.ndarray) and success.ndim == 2 or mask is not None:
        success = np.asarray(success)
        if success.ndim != 2:
            raise ValueError(f"success: expected a (P, K) matrix with a mask, got shape {success.shape}")
        mask = np.ones(success.shape, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != success.shape:
            raise ValueError(f"mask shape {mask.shape} differs from success shape {success.shape}")
        flags = _as_flags(success)
        successes, images = (flags & mask).sum(1), mask.sum(1)
    else:
        rows = [_as_flags(np.asarray(row)) for row in success]
        if any(row.ndim != 1 for row in rows):
            raise ValueError("success: expected a (P, K) matrix or a sequence of 1-D arrays")
        successes = np.array([row.sum() for row in rows], np.int64)
        images = np.array([row.size for row in rows], np.int64)
    if images.size == 0:
        raise ValueError("success: no prompts")
    if (images == 0).any():
        raise ValueError(f"success: prompts {np.flatnonzero(images == 0).tolist()} have no images")
    return successes.astype(np.int64), images.astype(np.int64)


def _as_flags(values: np.ndarray) -> np.ndarray:
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise ValueError("success: expected booleans or 0/1 values")
    return values.astype(bool)


def shrunk_rates(successes: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per-prompt success rates pulled toward their mean so that their spread is the between-prompt
    spread alone: r~_p = mean(r) + c (r_p - mean(r)) with c^2 = max(0, s_b^2 - mean_p(v_p / n_p)) / s_0^2,
    where r_p = successes_p / n_p, s_b^2 and s_0^2 are the variance of r over prompts with ddof 1 and 0,
    and v_p = r_p (1 - r_p) n_p / (n_p - 1) estimates the image-level (binomial) variance of prompt p
    (0 where n_p = 1). c = 0 (every prompt at the mean rate) when the observed spread is no more than the
    image noise explains. (Davison & Hinkley 1997, "Bootstrap methods and their application", section 3.8,
    adapted to success flags.)"""
    images = images.astype(np.float64)
    rates = successes / images
    if rates.size < 2:
        return rates
    within = np.where(images > 1, rates * (1 - rates) * images / np.maximum(images - 1, 1), 0.0)
    between = max(0.0, rates.var(ddof=1) - float(np.mean(within / images)))
    observed = rates.var()
    shrink = min(1.0, np.sqrt(between / observed)) if observed > 0 else 0.0
    return rates.mean() + shrink * (rates - rates.mean())


IMAGE_MODES = ("shrunk", "raw", "fixed")


def hierarchical_bootstrap(success, mask=None, *, resample_prompts: bool = True, images: str = "shrunk",
                           num_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                           seed: int = 0) -> Interval:
    """Bootstrap interval of the conditioning accuracy, the mean over prompts of each prompt's fraction of
    successful images: estimate = (1 / P) sum_p successes_p / n_p.

    success: P prompts' success flags as a (P, K) matrix with an optional (P, K) bool mask of the images
      that count, or a sequence of P 1-D arrays (ragged), e.g. [r.success for r in prompt_results]
      (see `prompt_counts`).
    resample_prompts: each resample draws P prompts with replacement (True), or keeps the P prompts (False).
    images: how each (resampled) prompt p then gets its n_p images:
      "shrunk" (default): n_p flags drawn with the prompt's `shrunk_rates` success rate;
      "raw": n_p flags drawn with replacement from its own flags (success rate r_p);
      "fixed": its own flags unchanged.
      A draw of n_p flags with replacement has Binomial(n_p, rate) successes, which is how it is sampled.

    Which to use: the default (prompts, then images at the shrunk rate) estimates the accuracy on prompts
    like these, the prompt set being one draw of many; its variance matches the estimate's, sigma_b^2 / P +
    mean_p(sigma_w,p^2 / n_p) / P (between- and within-prompt variance). "raw" with resampled prompts
    (the textbook two-stage bootstrap) counts the image noise twice, since the spread of r_p over prompts
    already holds it: about (2 - 1/K) times the variance when prompts do not differ, 99 % coverage for a
    nominal 95 %. "fixed" with resampled prompts (the cluster bootstrap) is right for many prompts and a
    little narrow for few. resample_prompts=False with images="raw" is the image-only bootstrap: the
    accuracy on exactly these prompts, only the sample seeds being random; it ignores how prompts differ.

    Returns an Interval (method "hierarchical/<images>" or "images-only/<images>"). Vectorised: one
    (num_resamples, P) binomial draw; P=460, K=10, 2000 resamples take a few tens of ms.
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"images={images!r}; expected one of {IMAGE_MODES}")
    _check_resamples(num_resamples)
    successes, counts = prompt_counts(success, mask)
    rates = successes / counts
    rng = np.random.default_rng(seed)
    p = len(counts)
    index = (rng.integers(0, p, (num_resamples, p)) if resample_prompts
             else np.broadcast_to(np.arange(p), (num_resamples, p)))
    if images == "fixed":
        replicates = rates[index].mean(1)
    else:
        draw_rates = shrunk_rates(successes, counts) if images == "shrunk" else rates
        n = counts[index]
        replicates = (rng.binomial(n, draw_rates[index]) / n).mean(1)
    method = ("hierarchical/" if resample_prompts else "images-only/") + images
    return percentile_interval(rates.mean(), replicates, level=level, seed=seed, method=method)


def bootstrap_ci(values, statistic: Callable = np.mean, *, vectorized: bool = True,
                 num_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """Bootstrap interval of statistic(values) over N independent units resampled with replacement.

    values: an array (N, ...) whose first axis indexes the units (images, prompts, ...), or a tuple of
      such arrays of one length N resampled together (paired: the same units in each).
    statistic: with vectorized=True it is called as statistic(*resampled, axis=1) on arrays
      (B, N, ...) and returns (B,) (numpy reductions such as np.mean, np.median do); the estimate is
      statistic(*values, axis=0). With vectorized=False it is called once per resample,
      statistic(*resampled) -> float, and the estimate is statistic(*values).
    Resamples on which the statistic is NaN are left out of the quantiles.
    """
    _check_resamples(num_resamples)
    arrays = tuple(np.asarray(v) for v in values) if isinstance(values, tuple) else (np.asarray(values),)
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError(f"values: expected arrays of one non-zero length, got {[len(a) for a in arrays]}")
    index = np.random.default_rng(seed).integers(0, n, (num_resamples, n))
    if vectorized:
        estimate = statistic(*arrays, axis=0)
        per_resample = n * max(int(np.prod(a.shape[1:], dtype=np.int64)) for a in arrays)
        chunk = max(1, _CHUNK_ELEMENTS // max(per_resample, 1))
        replicates = np.concatenate([np.asarray(statistic(*(a[index[i:i + chunk]] for a in arrays), axis=1),
                                                np.float64).reshape(-1)
                                     for i in range(0, num_resamples, chunk)])
        if replicates.shape != (num_resamples,):
            raise ValueError(f"statistic(..., axis=1) must return one value per resample, got "
                             f"{replicates.size} values for {num_resamples} resamples")
    else:
        estimate = statistic(*arrays)
        replicates = np.array([statistic(*(a[i] for a in arrays)) for i in index], np.float64)
    return percentile_interval(float(estimate), replicates, level=level, seed=seed, method="bootstrap")


def bootstrap_counts(n: int, num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """int64 (num_resamples, n): how often each of n units is drawn in each resample of n draws with
    replacement (the resamples `bootstrap_ci` draws with the same seed, as counts). Scoring several
    classifiers on the same counts gives a paired bootstrap of their differences."""
    _check_resamples(num_resamples)
    index = np.random.default_rng(seed).integers(0, n, (num_resamples, n))
    offsets = (np.arange(num_resamples) * n)[:, None]
    return np.bincount((index + offsets).ravel(), minlength=num_resamples * n).reshape(num_resamples, n)


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of scores (N,) for bool labels positive (N,), with each image counted weights[b, i] times:
    (B, N) non-negative weights -> (B,) AUROC, NaN where a row has no positive or no negative weight.

    AUROC_b = sum_{i pos, j neg} w_bi w_bj ([s_i > s_j] + [s_i = s_j] / 2) / (W_b,pos W_b,neg); with unit
    weights it is `metrics.auroc` (the Mann-Whitney statistic), with `bootstrap_counts` the AUROC of each
    resampled test set. Images to leave out (uncertain labels) get weight 0. O(B N) after one sort."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    if scores.ndim != 1 or positive.shape != scores.shape or weights.shape[1:] != scores.shape:
        raise ValueError(f"weighted_auroc: scores {scores.shape}, positive {positive.shape}, weights "
                         f"{weights.shape}; expected (N,), (N,), (B, N)")
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_positive, w = scores[order], positive[order], weights[:, order]
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    group = np.cumsum(new_group) - 1
    negative_weight = w * ~sorted_positive
    per_group = np.add.reduceat(negative_weight, np.flatnonzero(new_group), axis=1)  # (B, G)
    credit = np.cumsum(per_group, axis=1) - per_group / 2  # negatives below + half of those tied
    positive_weight = w * sorted_positive
    pairs = positive_weight.sum(1) * negative_weight.sum(1)
    wins = (positive_weight * credit[:, group]).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def spread(values: Sequence[float | None]) -> dict:
    """Mean, std (ddof=1; None for one value), min and max of a number over sample seeds, and n; None
    entries (undefined for that seed) are left out and counted in "missing". All None: every statistic None."""
    known = np.array([v for v in values if v is not None], np.float64)
    missing = len(values) - known.size
    if not known.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "missing": missing}
    return {"mean": float(known.mean()), "std": float(known.std(ddof=1)) if known.size > 1 else None,
            "min": float(known.min()), "max": float(known.max()), "n": int(known.size), "missing": missing}
