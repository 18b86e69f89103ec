"""Image quality metrics (cxr_ldm.imaging) on cases with known answers and against TensorFlow's SSIM."""
import numpy as np
import pytest

from cxr_ldm import imaging


def _images(seed, n=3, size=48, channels=1):
    rng = np.random.default_rng(seed)
    smooth = rng.random((n, size // 4, size // 4, channels))
    return np.clip(np.kron(smooth, np.ones((1, 4, 4, 1))) + 0.05 * rng.standard_normal((n, size, size, channels)),
                   0, 1).astype(np.float32)


def test_psnr_and_rmse_closed_form():
    a = np.zeros((2, 8, 8, 1), np.float32)
    b = a + np.array([0.1, 0.5], np.float32)[:, None, None, None]
    np.testing.assert_allclose(imaging.rmse(a, b), [0.1, 0.5], rtol=1e-6)
    np.testing.assert_allclose(imaging.psnr(a, b), [20.0, 10 * np.log10(4.0)], rtol=1e-5)


def test_ssim_is_one_for_identical_images_and_lower_for_noisy():
    a = _images(0)
    assert np.allclose(imaging.ssim(a, a), 1.0, atol=1e-6)
    assert np.allclose(imaging.ms_ssim(a, a), 1.0, atol=1e-6)
    noisy = np.clip(a + 0.2 * np.random.default_rng(1).standard_normal(a.shape), 0, 1)
    assert (np.asarray(imaging.ssim(a, noisy)) < 0.9).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_and_ms_ssim_equal_tensorflow(channels):
    tf = pytest.importorskip("tensorflow")
    a, b = _images(2, channels=channels, size=96), _images(3, channels=channels, size=96)
    expected = tf.image.ssim(a, b, max_val=1.0).numpy()
    np.testing.assert_allclose(imaging.ssim(a, b), expected, atol=1e-4)
    scales = imaging.max_ms_ssim_scales(96)
    assert scales == 4
    weights = np.asarray(imaging.MS_SSIM_WEIGHTS[:scales])
    expected_ms = tf.image.ssim_multiscale(a, b, max_val=1.0, power_factors=weights / weights.sum()).numpy()
    np.testing.assert_allclose(imaging.ms_ssim(a, b), expected_ms, atol=1e-4)


def test_images_smaller_than_window_are_refused():
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        imaging.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))
