"""The Frechet distance of feature sets on cases with known answers."""
import numpy as np
import pytest

from cxr_ldm.evaluation import metrics


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 6))
    assert abs(metrics.fid_from_features(x, x)) < 1e-6


def test_frechet_distance_of_gaussians_has_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, -1.0, 0.5])
    var1, var2 = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(1)
    a = mu1 + np.sqrt(var1) * rng.standard_normal((200_000, 3))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((200_000, 3))
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, rel=0.02)
