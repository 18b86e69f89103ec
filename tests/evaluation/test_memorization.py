"""Memorization audit finds a planted copy of a training image; diversity has its known extremes."""
import numpy as np

from cxr_ldm.evaluation import memorization

SIZE = 32


def _blobs(n, seed):
    """Smooth random images (N, SIZE, SIZE, 1) in [0, 1]: distinct from one another."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, SIZE // 8, SIZE // 8, 1))
    return np.clip(np.kron(coarse, np.ones((1, 8, 8, 1))) + 0.03 * rng.standard_normal((n, SIZE, SIZE, 1)),
                   0, 1).astype(np.float32)


def test_planted_copy_is_found_and_counted():
    train = _blobs(200, 0)
    generated = _blobs(20, 1)
    generated[7] = np.clip(train[123] + 0.01 * np.random.default_rng(2).standard_normal(train[123].shape), 0, 1)
    # Features that find the copy only among its top-k: the copy's cosine is high but not the highest.
    rng = np.random.default_rng(3)
    train_features = rng.standard_normal((200, 16))
    generated_features = rng.standard_normal((20, 16))
    generated_features[7] = train_features[123] + 0.5 * rng.standard_normal(16)
    nn = memorization.nearest_training_images(generated_features, generated, train_features, train, top_k=20)
    assert nn.index[7] == 123 and nn.ssim[7] > 0.95
    others = np.delete(nn.ssim, 7)
    assert others.max() < 0.9
    heldout = memorization.nearest_training_images(rng.standard_normal((10, 16)), _blobs(10, 4), train_features,
                                                   train, top_k=20)
    summary = memorization.memorization_summary(nn, heldout, copy_threshold=0.95, worst=3)
    assert summary["generated"]["copy_fraction"] == 1 / 20
    assert summary["heldout_real"]["copy_fraction"] == 0.0
    assert summary["worst_pairs"][0] == {"generated": 7, "train": 123, "ssim": float(nn.ssim[7]),
                                         "cosine": float(nn.cosine[7])}
    assert [p["ssim"] for p in summary["worst_pairs"]] == sorted((p["ssim"] for p in summary["worst_pairs"]), reverse=True)


def test_diversity_extremes():
    same = np.repeat(_blobs(1, 5), 6, axis=0)
    assert abs(memorization.mean_pairwise_ms_ssim(same) - 1.0) < 1e-5
    distinct = _blobs(6, 6)
    assert memorization.mean_pairwise_ms_ssim(distinct) < 0.6
