"""Finding classifier: learns trivially separable synthetic findings and their sides, masks uncertain
labels, picks thresholds, round-trips through save/load and the cache."""
import numpy as np
import pytest

from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.evaluation import classifier as clf
from cxr_ldm.evaluation import metrics
from cxr_ldm.evaluation.attributes import SLOT_NAMES, SLOTS

SIZE = 32
EFFUSION, CARDIO, FRACTURE = (CHEXPERT_LABELS.index(n) for n in ("Pleural Effusion", "Cardiomegaly", "Fracture"))
CARDIO_GRADE = SLOT_NAMES.index("Cardiomegaly/grade")
CONFIG = clf.TrainConfig(input_size=SIZE, widths=(8, 16), feature_dim=32, min_positives=10, epochs=4,
                         batch_size=32, learning_rate=3e-3, warmup_steps=10)


def synthetic(n: int, seed: int) -> clf.LabelledImages:
    """Noise images; an effusion is a bright block in the lower image-right (patient left) or image-left
    (patient right) corner, cardiomegaly a bright centre block, dimmer when mild than when severe (its
    grade slot; the other slots unknown). A tenth of the effusion labels are
    uncertain (-1) and their images carry the opposite content: a loss that used them would suffer.
    Fracture has too few positives to be learned."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.05, (n, SIZE, SIZE, 1))
    labels = np.full((n, len(CHEXPERT_LABELS)), -2, np.int8)
    sides = np.zeros_like(labels)
    effusion_side = rng.integers(0, 3, n)  # 0 none, 1 left, 2 right
    cardio = rng.random(n) < 0.4
    severe = rng.random(n) < 0.5
    for i in range(n):
        if effusion_side[i] == 1:
            images[i, 20:30, 20:30] += 0.5
        elif effusion_side[i] == 2:
            images[i, 20:30, 2:12] += 0.5
        if cardio[i]:
            images[i, 10:20, 11:21] += 0.7 if severe[i] else 0.35
    labels[:, EFFUSION] = np.where(effusion_side > 0, 1, 0)
    sides[:, EFFUSION] = effusion_side
    labels[:, CARDIO] = np.where(cardio, 1, -2)
    uncertain = rng.random(n) < 0.1
    labels[uncertain, EFFUSION] = -1
    sides[uncertain, EFFUSION] = 0
    labels[:3, FRACTURE] = 1
    slots = np.full((n, len(SLOTS)), -1, np.int8)
    slots[cardio, CARDIO_GRADE] = np.where(severe[cardio], 2, 0)  # ("mild", "moderate", "severe")
    return clf.LabelledImages(np.clip(images, 0, 1).astype(np.float32), labels, sides, slots)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    train, validation = synthetic(384, 0), synthetic(128, 1)
    model, cached = clf.load_or_train(folder, train, validation, CONFIG)
    assert not cached
    return model, folder, train, validation


def test_separable_findings_and_sides_are_learned(trained):
    model, _, _, _ = trained
    assert model.observations == ("Cardiomegaly", "Pleural Effusion")  # Fracture: 3 positives < 10
    assert model.side_observations == ("Pleural Effusion",)
    report = clf.evaluate_classifier(model, synthetic(256, 2))
    assert report["exact_match"] >= 0.99
    assert report["side_accuracy"] >= 0.99
    assert model.slots == ("Cardiomegaly/grade",)  # the only slot with known values
    assert report["attribute_accuracy"]["grade"] >= 0.95 and report["attribute_accuracy"]["location"] is None
    predicted = model.predict(synthetic(256, 2).images).slot_values[:, 0]
    assert set(np.unique(predicted)) <= {0, 1, 2}
    for name in model.observations:
        assert report["per_observation"][name]["auroc"] >= 0.99


def test_exact_match_counts_an_image_wrong_when_any_major_finding_is(trained):
    model, _, _, _ = trained
    data = synthetic(64, 3)
    predicted = model.predict(data.images).positive
    target = clf.targets(data, model.observations, ())
    known = target["label_mask"].astype(bool)
    expected = np.mean([all(p == t for p, t, k in zip(pi, ti, ki) if k)
                        for pi, ti, ki in zip(predicted, target["label"].astype(bool), known)])
    report = clf.evaluate_classifier(model, data)
    assert report["exact_match"] == pytest.approx(expected)
    per_finding = [np.mean([p == t for p, t, k in zip(predicted[:, j], target["label"][:, j], known[:, j]) if k])
                   for j in range(len(model.observations))]
    assert report["major_accuracy"] == pytest.approx(np.mean(per_finding))  # both observations are major
    grades = data.subset(slice(None))
    grades.slots = data.slots.copy()
    grades.slots[:, CARDIO_GRADE] = np.where(data.slots[:, CARDIO_GRADE] >= 0, 2 - data.slots[:, CARDIO_GRADE], -1)
    assert clf.evaluate_classifier(model, grades)["attribute_accuracy"]["grade"] <= 0.05  # every grade swapped
    flipped = data.subset(slice(None))
    flipped.labels = data.labels.copy()
    flipped.labels[:, CARDIO] = np.where(data.labels[:, CARDIO] == 1, 0, 1)  # every cardiomegaly label wrong
    assert clf.evaluate_classifier(model, flipped)["exact_match"] <= 0.05


def test_save_load_and_cache(trained):
    model, folder, train, validation = trained
    images = synthetic(16, 4).images
    loaded, cached = clf.load_or_train(folder, train, validation, CONFIG)
    assert cached
    np.testing.assert_array_equal(loaded.thresholds, model.thresholds)
    assert loaded.slots == model.slots
    np.testing.assert_array_equal(loaded.predict(images).slot_values, model.predict(images).slot_values)
    np.testing.assert_allclose(loaded.predict(images).probabilities, model.predict(images).probabilities, atol=1e-6)
    assert loaded.data_signature == train.signature() != validation.signature()


def test_predict_accepts_rgb_and_uint8_and_resizes(trained):
    model, _, _, _ = trained
    gray = synthetic(8, 5).images
    reference = model.predict(gray).probabilities
    rgb_uint8 = np.repeat(np.round(gray * 255).astype(np.uint8), 3, axis=-1)
    np.testing.assert_allclose(model.predict(rgb_uint8).probabilities, reference, atol=0.02)
    assert model.predict(np.repeat(np.repeat(gray, 2, 1), 2, 2)).probabilities.shape == reference.shape


def test_thresholds_maximise_validation_accuracy():
    probabilities = np.array([[0.1], [0.3], [0.35], [0.9]])
    target = {"label": np.array([[0], [0], [1], [1]], np.float32), "label_mask": np.ones((4, 1), np.float32)}
    threshold = clf.select_thresholds(probabilities, target)[0]
    assert 0.3 < threshold <= 0.35


def test_augment_never_flips_left_right():
    import jax
    image = np.zeros((1, SIZE, SIZE, 1), np.float32)
    image[0, :, 24:] = 1.0  # bright image-right third
    config = clf.TrainConfig(max_shift=3, brightness=0.0, contrast=0.0, noise_std=0.0)
    out = np.asarray(jax.jit(clf.augment, static_argnums=2)(jax.random.key(0), np.repeat(image, 64, axis=0), config))
    assert (out[:, :, 28:].mean(axis=(1, 2, 3)) > 0.9).all() and (out[:, :, :20].mean(axis=(1, 2, 3)) < 0.1).all()


def test_auroc_known_answers():
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert metrics.auroc([0.5, 0.5], [True, False]) == 0.5
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
