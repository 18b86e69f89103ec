"""Bootstrap intervals: calibrated on simulated experiments with a known success probability, degenerate
on constant data, narrower with more prompts, wider than the image-only bootstrap when prompts differ;
the AUROC under bootstrap counts equals the AUROC of the resampled test set."""
import time

import numpy as np
import pytest

from cxr_ldm.evaluation import intervals, metrics

P, K, TRUE_P = 46, 10, 0.8  # the evaluator's prompt set: ~46 prompts x 10 images


def simulate(num_experiments: int, prompts: int, images: int, seed: int, concentration: float | None = None):
    """Success matrices (prompts, images) at TRUE_P: every prompt at TRUE_P (concentration None) or each
    prompt's rate drawn from Beta(TRUE_P c, (1 - TRUE_P) c) (prompt-level heterogeneity, mean TRUE_P)."""
    rng = np.random.default_rng(seed)
    for _ in range(num_experiments):
        rates = (np.full(prompts, TRUE_P) if concentration is None
                 else rng.beta(TRUE_P * concentration, (1 - TRUE_P) * concentration, prompts))
        yield rng.random((prompts, images)) < rates[:, None]


def coverage(experiments, **options) -> tuple[float, float]:
    """(fraction of intervals that contain TRUE_P, mean width)."""
    found = [intervals.hierarchical_bootstrap(s, num_resamples=1000, seed=i, **options)
             for i, s in enumerate(experiments)]
    return float(np.mean([i.contains(TRUE_P) for i in found])), float(np.mean([i.width for i in found]))


def test_interval_covers_a_known_binomial_about_95_percent_of_the_time():
    rate, width = coverage(simulate(200, P, K, seed=1))
    assert 0.90 <= rate <= 0.99
    # The textbook two-stage bootstrap (images drawn from each prompt's own rate) counts the image noise
    # twice: about sqrt(2 - 1/K) = 1.38 times as wide, and over-covers.
    raw_rate, raw_width = coverage(simulate(200, P, K, seed=1), images="raw")
    assert 1.25 < raw_width / width < 1.5
    assert raw_rate >= rate


def test_estimate_is_the_mean_over_prompts_of_the_success_fraction():
    rng = np.random.default_rng(0)
    ragged = [rng.random(n) < 0.6 for n in (3, 10, 7, 1, 10)]
    interval = intervals.hierarchical_bootstrap(ragged)
    assert interval.estimate == pytest.approx(np.mean([r.mean() for r in ragged]))
    assert interval.low <= interval.estimate <= interval.high
    assert (interval.level, interval.num_resamples, interval.method) == (0.95, 2000, "hierarchical/shrunk")
    padded, mask = np.zeros((5, 10), bool), np.zeros((5, 10), bool)
    for p, row in enumerate(ragged):
        padded[p, :len(row)], mask[p, :len(row)] = row, True
    padded[~mask] = True  # masked-out images must not count
    assert intervals.hierarchical_bootstrap(padded, mask) == interval
    assert intervals.hierarchical_bootstrap(ragged, seed=1) != interval  # the seed is the only randomness
    assert intervals.hierarchical_bootstrap(ragged) == interval


@pytest.mark.parametrize("value", [True, False])
def test_interval_of_a_constant_matrix_is_degenerate(value):
    for images in intervals.IMAGE_MODES:
        interval = intervals.hierarchical_bootstrap(np.full((12, 5), value), images=images)
        assert interval.low == interval.high == interval.estimate == float(value)
        assert interval.std_error == 0.0


def test_width_shrinks_with_more_prompts():
    widths = [np.mean([intervals.hierarchical_bootstrap(s, seed=i).width
                       for i, s in enumerate(simulate(20, prompts, K, seed=2))]) for prompts in (20, 80, 320)]
    assert widths[0] > widths[1] > widths[2]
    assert 1.6 < widths[0] / widths[1] < 2.5 and 1.6 < widths[1] / widths[2] < 2.5  # ~ 1 / sqrt(P)


def test_prompt_heterogeneity_widens_the_hierarchical_interval_but_not_the_image_only_one():
    """Prompts whose success rates differ (Beta(4, 1), mean 0.8): the image-only bootstrap (these prompts
    fixed) is blind to the between-prompt spread and misses the mean rate of such prompts, the
    hierarchical one keeps its coverage."""
    hierarchical, width = coverage(simulate(200, P, K, seed=3, concentration=5.0))
    images_only, narrow = coverage(simulate(200, P, K, seed=3, concentration=5.0),
                                   resample_prompts=False, images="raw")
    assert width > 1.5 * narrow
    assert 0.88 <= hierarchical <= 0.99
    assert images_only < 0.8


def test_shrinkage_keeps_only_the_spread_the_image_noise_does_not_explain():
    counts = np.full(4, 10)
    np.testing.assert_allclose(intervals.shrunk_rates(np.array([8, 8, 8, 8]), counts), 0.8)
    np.testing.assert_allclose(intervals.shrunk_rates(np.array([7, 9, 8, 8]), counts), 0.8)  # binomial noise
    far = intervals.shrunk_rates(np.array([0, 10, 0, 10]), counts)  # prompts that differ: nearly kept
    assert far.mean() == pytest.approx(0.5) and 0.45 < far[1] - 0.5 <= 0.5


def test_hierarchical_bootstrap_is_fast():
    success = np.random.default_rng(0).random((460, 10)) < 0.8
    start = time.perf_counter()
    intervals.hierarchical_bootstrap(success, num_resamples=2000)
    assert time.perf_counter() - start < 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no images"):
        intervals.hierarchical_bootstrap([np.ones(3, bool), np.ones(0, bool)])
    with pytest.raises(ValueError, match="mask shape"):
        intervals.hierarchical_bootstrap(np.ones((3, 4), bool), np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="0/1"):
        intervals.hierarchical_bootstrap(np.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="images="):
        intervals.hierarchical_bootstrap(np.ones((3, 4), bool), images="both")


def test_bootstrap_ci_vectorised_and_per_resample_agree():
    values = np.random.default_rng(0).normal(1.0, 2.0, 200)
    fast = intervals.bootstrap_ci(values, seed=3)
    slow = intervals.bootstrap_ci(values, np.mean, vectorized=False, seed=3)
    assert fast.low == pytest.approx(slow.low) and fast.high == pytest.approx(slow.high)
    assert fast.estimate == pytest.approx(values.mean())
    assert fast.std_error == pytest.approx(2.0 / np.sqrt(200), rel=0.2)
    assert fast.contains(1.0)
    median = intervals.bootstrap_ci(values, np.median)
    assert median.estimate == pytest.approx(np.median(values)) and median.contains(median.estimate)


def test_bootstrap_ci_resamples_paired_arrays_together():
    x = np.random.default_rng(0).normal(size=100)
    difference = intervals.bootstrap_ci((x + 0.5, x), lambda a, b, axis: (a - b).mean(axis))
    assert difference.low == difference.high == pytest.approx(0.5)  # paired: x cancels in every resample


def test_weighted_auroc_is_the_auroc_of_the_resampled_set():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # ties
    positive = rng.random(60) < 0.4
    np.testing.assert_allclose(intervals.weighted_auroc(scores, positive, np.ones((1, 60))),
                               metrics.auroc(scores, positive))
    counts = intervals.bootstrap_counts(60, 5, seed=1)
    assert counts.shape == (5, 60) and (counts.sum(1) == 60).all()
    for row, auroc in zip(counts, intervals.weighted_auroc(scores, positive, counts)):
        index = np.repeat(np.arange(60), row)
        assert auroc == pytest.approx(metrics.auroc(scores[index], positive[index]))
    one_class = intervals.weighted_auroc(scores, positive, np.where(positive, 0.0, 1.0)[None])
    assert np.isnan(one_class).all()


def test_spread_over_seeds():
    assert intervals.spread([0.7, 0.8, 0.9]) == pytest.approx(
        {"mean": 0.8, "std": 0.1, "min": 0.7, "max": 0.9, "n": 3, "missing": 0})
    assert intervals.spread([0.5, None]) == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5, "n": 1,
                                             "missing": 1}
    assert intervals.spread([None])["mean"] is None
