"""Memorization audit: planted copies (exact, noisy, shifted, brightened) are found at their training
image among all of them, non-copies are not, and the search equals brute force; diversity has its
known extremes."""
import numpy as np
import pytest

from cxr_ldm import imaging
from cxr_ldm.data import phantom
from cxr_ldm.evaluation import memorization

SIZE = 32
THRESHOLD = 0.95


def _blobs(n, seed):
    """Smooth random images (N, SIZE, SIZE, 1) in [0, 1]: distinct from one another."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, SIZE // 8, SIZE // 8, 1))
    return np.clip(np.kron(coarse, np.ones((1, 8, 8, 1))) + 0.03 * rng.standard_normal((n, SIZE, SIZE, 1)),
                   0, 1).astype(np.float32)


def _phantoms(seeds, size):
    """Phantom studies (N, size, size, 1) uint8: different patients of one anatomy, alike at a glance."""
    return np.stack([phantom.generate(seed, size)["image"] for seed in seeds])


def _shifted(image, dy, dx):
    """image (H, W, 1) moved by (dy, dx) pixels, edges repeated: out[y, x] = image[y - dy, x - dx]."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return padded[1 - dy:1 - dy + image.shape[0], 1 - dx:1 - dx + image.shape[1]]


def test_planted_copy_is_found_and_counted():
    train = _blobs(200, 0)
    generated = _blobs(20, 1)
    generated[7] = np.clip(train[123] + 0.01 * np.random.default_rng(2).standard_normal(train[123].shape), 0, 1)
    nn = memorization.nearest_training_images(generated, train, THRESHOLD)
    assert nn.index[7] == 123 and nn.ssim[7] > 0.95
    others = np.delete(nn.ssim, 7)
    assert others.max() < 0.9
    heldout = memorization.nearest_training_images(_blobs(20, 4), train, THRESHOLD)
    summary = memorization.memorization_summary(nn, heldout, copy_threshold=THRESHOLD, worst=3)
    assert summary["generated"]["copy_fraction"] == 1 / 20
    assert summary["heldout_real"]["copy_fraction"] == 0.0
    assert summary["worst_pairs"][0] == {"generated": 7, "train": 123, "ssim": float(nn.ssim[7]), "shift": [0, 0],
                                         "correlation": float(nn.correlation[7])}
    assert [p["ssim"] for p in summary["worst_pairs"]] == sorted((p["ssim"] for p in summary["worst_pairs"]), reverse=True)
    with pytest.raises(ValueError, match="copy threshold"):
        memorization.memorization_summary(nn, heldout, copy_threshold=0.9)


def test_planted_phantom_copies_are_found_among_all_training_images():
    """Copies of training phantoms -- exact, noisy, moved by a pixel, brightened, contrast-changed, moved and
    brightened -- among new phantoms: each copy is found at its training image and shift with SSIM above the
    copy threshold, each new phantom stays below it. 64 training phantoms of 64 px (an evaluation size);
    only 8 candidates go on to SSIM, so the pixel search itself must rank each source among the first."""
    train = _phantoms(range(64), 64)
    floats = imaging.as_float_images(train)
    noise = np.random.default_rng(0).standard_normal(floats[0].shape).astype(np.float32)
    planted = {  # query row: (training row, copy, shift (dy, dx) with query[y, x] ~ train[y + dy, x + dx])
        0: (3, floats[3], (0, 0)),
        2: (17, np.clip(floats[17] + 0.005 * noise, 0, 1), (0, 0)),
        3: (29, _shifted(floats[29], 0, 1), (0, -1)),
        5: (40, _shifted(floats[40], -1, 0), (1, 0)),
        6: (41, np.clip(floats[41] + 0.04, 0, 1), (0, 0)),
        8: (50, 0.9 * floats[50] + 0.05, (0, 0)),
        9: (63, np.clip(_shifted(floats[63], 1, -1) * 1.05 - 0.02, 0, 1), (-1, 1)),
    }
    queries = imaging.as_float_images(_phantoms(range(1000, 1012), 64)).copy()
    for row, (_, copy, _) in planted.items():
        queries[row] = copy
    copies = np.isin(np.arange(len(queries)), list(planted))

    nn = memorization.nearest_training_images(queries, train, THRESHOLD, candidates=8, train_chunk=24)
    for row, (source, _, shift) in planted.items():
        assert (nn.index[row], tuple(nn.shift[row])) == (source, shift), row
        assert nn.ssim[row] >= THRESHOLD and nn.copy[row], (row, nn.ssim[row])
    assert np.all(nn.ssim[~copies] < THRESHOLD - 0.05), nn.ssim[~copies]
    assert np.array_equal(nn.copy, copies)
    summary = memorization.memorization_summary(nn, None, THRESHOLD, worst=len(planted))
    assert summary["generated"]["copy_fraction"] == len(planted) / len(queries)
    assert {p["generated"] for p in summary["worst_pairs"]} == set(planted)


def _brute_force(queries, train, max_shift, candidates=None):
    """For each query: every training image at its shift of highest pixel correlation (np.corrcoef, ties to
    the smaller shift); the `candidates` of highest correlation (None: all), imaging.ssim of each; the one of
    highest SSIM. [(index, ssim, shift, correlation)]."""
    queries, train = imaging.as_float_images(queries)[..., 0], imaging.as_float_images(train)[..., 0]
    s, (h, w) = max_shift, (queries.shape[1] - 2 * max_shift, queries.shape[2] - 2 * max_shift)
    shifts = sorted(((dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)),
                    key=lambda d: (d[0] ** 2 + d[1] ** 2, d))
    out = []
    for query in queries:
        crop = query[s:s + h, s:s + w]
        correlations = np.array([[np.corrcoef(crop.ravel(), image[s + dy:s + dy + h, s + dx:s + dx + w].ravel())[0, 1]
                                  for dy, dx in shifts] for image in train])  # (M, shifts)
        kept = np.argsort(-correlations.max(axis=1), kind="stable")[:candidates]
        moves = [shifts[int(np.argmax(correlations[j]))] for j in kept]
        aligned = np.stack([train[j, s + dy:s + dy + h, s + dx:s + dx + w] for j, (dy, dx) in zip(kept, moves)])
        ssim = np.asarray(imaging.ssim(np.repeat(crop[None, ..., None], len(kept), 0), aligned[..., None]))
        best = int(np.argmax(ssim))
        out.append((int(kept[best]), ssim[best], moves[best], correlations[kept[best]].max()))
    return out


SMALL = {"candidates": 5, "train_chunk": 7, "pair_chunk": 20}  # chunks that do not divide the sets: padding


@pytest.mark.parametrize("max_shift, options", [(0, {"candidates": None}), (1, {"candidates": None}), (1, SMALL)])
def test_search_equals_brute_force(max_shift, options):
    """The search is brute force's over every training image and shift: SSIM against all of them
    (candidates=None; with max_shift 0 plain imaging.ssim of whole images), or against the exact top 5 by
    correlation."""
    train = _phantoms(range(30), 32)
    queries = imaging.as_float_images(_phantoms(range(500, 506), 32)).copy()
    queries[1] = np.clip(_shifted(imaging.as_float_images(train)[12], 1, 0) + 0.03, 0, 1)
    expected = _brute_force(queries, train, max_shift, options["candidates"])
    nn = memorization.nearest_training_images(queries, train, THRESHOLD, max_shift=max_shift, **options)
    for row, (index, ssim, shift, correlation) in enumerate(expected):
        assert nn.index[row] == index and tuple(nn.shift[row]) == shift, row
        assert nn.ssim[row] == pytest.approx(ssim, abs=1e-5)
        assert nn.correlation[row] == pytest.approx(correlation, abs=1e-5)
    if max_shift:  # the moved copy, realigned
        assert (nn.index[1], tuple(nn.shift[1])) == (12, (-1, 0)) and nn.ssim[1] > 0.99


def test_images_larger_than_the_search_size_are_resized():
    train = _phantoms(range(30), 64)
    queries = imaging.as_float_images(np.concatenate([train[[4]], _phantoms(range(900, 905), 64)]))
    nn = memorization.nearest_training_images(queries, train, THRESHOLD, size=32, **SMALL)
    assert nn.index[0] == 4 and nn.ssim[0] == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(nn.copy, np.arange(6) == 0)
    with pytest.raises(ValueError, match="same size"):
        memorization.nearest_training_images(queries[:, :32, :32], train)


def test_diversity_extremes():
    same = np.repeat(_blobs(1, 5), 6, axis=0)
    assert abs(memorization.mean_pairwise_ms_ssim(same) - 1.0) < 1e-5
    distinct = _blobs(6, 6)
    assert memorization.mean_pairwise_ms_ssim(distinct) < 0.6
