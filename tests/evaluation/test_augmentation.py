"""Augmentation experiment end to end at a tiny size: phantom studies as the real splits, a stand-in
generator that renders real phantom studies of each prompt's findings, a tiny classifier recipe; every
(ratio, seed) classifier must see exactly the data its ratio and seed call for.

Compiling a classifier's training step dominates (a few seconds each on a small CPU), so the end-to-end
run trains 2 ratios x 2 seeds and the check that ratios nest reuses one of its classifiers."""
import dataclasses

import numpy as np
import pytest

from cxr_ldm import imaging
from cxr_ldm.data import phantom
from cxr_ldm.data.builders.common import encode_labels
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.labeler import label_report
from cxr_ldm.evaluation import augmentation
from cxr_ldm.evaluation import classifier as clf
from cxr_ldm.evaluation.conditioning import EvalPrompt
from cxr_ldm.evaluation.findings import side_code

SIZE, NUM_REAL, FIRST_SEED = 32, 32, 5000
RATIOS, SEEDS = (0.0, 1.0), (0, 1)
OBSERVATIONS = ("Pleural Effusion",)
PROMPTS = (
    EvalPrompt("Normal chest radiograph.", {}),
    EvalPrompt("Large left pleural effusion.", {"Pleural Effusion": "left"},
               details={"Pleural Effusion": {"severity": "large"}}),
    EvalPrompt("Large right pleural effusion.", {"Pleural Effusion": "right"},
               details={"Pleural Effusion": {"severity": "large"}}),
)
CONFIG = clf.TrainConfig(input_size=SIZE, widths=(8,), stem_layers=0, feature_dim=16, min_positives=4, epochs=2,
                         batch_size=16, warmup_steps=2, seed=7)


def split(n: int, first_seed: int) -> tuple[clf.LabelledImages, list[str]]:
    """n phantom studies cycling through PROMPTS, and their prompts."""
    studies = [(prompt, phantom.generate(first_seed + i, SIZE, prompt.phantom_findings()))
               for i, prompt in ((i, PROMPTS[i % len(PROMPTS)]) for i in range(n))]
    return (clf.LabelledImages(np.stack([s["image"] for _, s in studies]),
                               np.stack([encode_labels(s["labels"]) for _, s in studies]),
                               np.array([[side_code(s["side"][name]) for name in CHEXPERT_LABELS]
                                         for _, s in studies], np.int8)),
            [prompt.text for prompt, _ in studies])


class PhantomGenerator:
    """generate(texts, seeds): the phantom study of each text's findings at that seed, rendered at 16 px
    (the experiment resizes to the real size), float in [0, 1]; records every (text, seed) it draws."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, seeds):
        by_text = {p.text: p for p in PROMPTS}
        self.calls.append(list(zip(texts, seeds)))
        return np.stack([phantom.generate(int(seed), 16, by_text[text].phantom_findings())["image"]
                         for text, seed in zip(texts, seeds)]).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def experiment():
    train, train_prompts = split(NUM_REAL * 2, 0)
    validation, _ = split(24, 1000)
    test, _ = split(30, 2000)
    generator, trained = PhantomGenerator(), []
    original = clf.train_classifier

    def recording(data, validation, config, observations=None):
        model = original(data, validation, config, observations=observations)
        trained.append((data, config, model))
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clf, "train_classifier", recording)
        result = augmentation.augmentation_experiment(
            train, train_prompts, validation, test, generator, OBSERVATIONS, CONFIG, num_real=NUM_REAL,
            seed=FIRST_SEED, batch_size=16, ratios=RATIOS[1:], seeds=SEEDS, num_resamples=200)
    return result, trained, generator, train, train_prompts, (validation, test)


def test_every_ratio_and_seed_is_run_and_scored(experiment):
    result = experiment[0]
    assert result["ratios"] == list(RATIOS)  # ratio 0, the real-only baseline, is always run
    assert result["seeds"] == list(SEEDS)
    assert result["observations"] == list(OBSERVATIONS)
    assert [(r["ratio"], r["seed"]) for r in result["runs"]] == [(r, s) for s in SEEDS for r in RATIOS]
    for run in result["runs"]:
        assert run["num_synthetic"] == round(run["ratio"] * NUM_REAL)
        assert run["num_train"] == NUM_REAL + run["num_synthetic"]
        assert 0.0 <= run["mean_auroc"] <= 1.0 and run["mean_auroc"] == run["auroc"]["Pleural Effusion"]
    assert [row["ratio"] for row in result["by_ratio"]] == list(RATIOS)
    for row in result["by_ratio"]:
        runs = [r["mean_auroc"] for r in result["runs"] if r["ratio"] == row["ratio"]]
        interval = row["mean_auroc"]
        assert interval["estimate"] == pytest.approx(np.mean(runs))
        assert 0.0 <= interval["low"] <= interval["estimate"] <= interval["high"] <= 1.0
        assert interval["num_resamples"] == 200 and interval["level"] == 0.95
        assert interval["method"] == "bootstrap/test-images+seeds"
        assert row["seeds"]["min"] == min(runs) and row["seeds"]["max"] == max(runs)
        difference = row["difference_to_real_only"]
        assert difference["low"] <= difference["estimate"] <= difference["high"]
    header, rows = augmentation.report_rows(result)
    assert len(rows) == len(RATIOS) and all(len(row) == len(header) for row in rows)


def test_ratio_zero_is_the_real_only_baseline_exactly(experiment):
    result, trained, _, train = experiment[:4]
    baseline = result["by_ratio"][0]
    assert baseline["difference_to_real_only"]["estimate"] == 0.0
    assert baseline["difference_to_real_only"]["low"] == baseline["difference_to_real_only"]["high"] == 0.0
    assert baseline["difference_by_seed"]["max"] == baseline["difference_by_seed"]["min"] == 0.0
    real = train.subset(slice(0, NUM_REAL))
    for data, _, _ in trained[::len(RATIOS)]:  # the first classifier of every seed is ratio 0
        assert data.signature() == real.signature()


def test_seeds_draw_disjoint_synthetic_images(experiment):
    _, trained, generator, train, train_prompts, _ = experiment
    most = NUM_REAL  # ratio 1
    drawn = [pair for call in generator.calls for pair in call]
    assert sorted(set(drawn)) == sorted((train_prompts[NUM_REAL + i], FIRST_SEED + s * most + i)
                                        for s in SEEDS for i in range(most))  # one image per prompt and seed
    synthetic = {}
    for (data, config, _), (s, ratio) in zip(trained, [(s, r) for s in SEEDS for r in RATIOS]):
        assert config == dataclasses.replace(CONFIG, seed=CONFIG.seed + s)  # the same for every ratio
        n = round(ratio * NUM_REAL)
        np.testing.assert_array_equal(data.images[:NUM_REAL], train.images[:NUM_REAL])
        for field in dataclasses.fields(data):  # labels, sides, ...: those of the prompts' examples
            if field.name != "images":
                np.testing.assert_array_equal(getattr(data, field.name),
                                              getattr(train, field.name)[:NUM_REAL + n])
        synthetic[s, ratio] = data.images[NUM_REAL:]
    assert synthetic[0, 1.0].shape == (NUM_REAL, SIZE, SIZE, 1) and synthetic[0, 1.0].dtype == np.uint8
    assert not np.array_equal(synthetic[0, 1.0], synthetic[1, 1.0])  # seeds change the synthetic draw


def run_with_trained_models(experiment, seeds=SEEDS, **options) -> tuple[dict, list]:
    """The experiment with each seed's ratio-0 classifier of the fixture standing in for all its ratios
    (no training): (result, the training sets it was given)."""
    _, trained, _, train, train_prompts, (validation, test) = experiment
    models = {config.seed: model for data, config, model in trained if len(data) == NUM_REAL}
    seen = []

    def reuse(data, validation, config, observations=None):
        seen.append(data)
        return models[config.seed]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clf, "train_classifier", reuse)
        options = {"generate": PhantomGenerator(), **options}
        result = augmentation.augmentation_experiment(
            train, train_prompts, validation, test, observations=OBSERVATIONS, config=CONFIG, num_real=NUM_REAL,
            seed=FIRST_SEED, batch_size=16, ratios=(0.5, 1.0), seeds=seeds, num_resamples=300, **options)
    return result, seen


def test_ratios_of_one_seed_nest(experiment):
    """Ratio 0.5 trains on the first half of ratio 1's images."""
    result, seen = run_with_trained_models(experiment)
    assert [len(data) for data in seen] == [NUM_REAL, NUM_REAL * 3 // 2, NUM_REAL * 2] * len(SEEDS)
    for first in (0, 3):
        np.testing.assert_array_equal(seen[first + 1].images, seen[first + 2].images[:NUM_REAL * 3 // 2])
    # one classifier per seed for every ratio: every difference to ratio 0 is exactly 0
    assert [row["difference_to_real_only"]["high"] for row in result["by_ratio"]] == [0.0, 0.0, 0.0]


def test_resampling_seeds_widens_the_interval_by_the_seed_to_seed_spread(experiment):
    with_seeds, _ = run_with_trained_models(experiment)
    test_only, _ = run_with_trained_models(experiment, resample_seeds=False)
    assert experiment[0]["by_ratio"][0]["seeds"]["std"] > 0  # the two seeds' classifiers differ
    wide, narrow = with_seeds["by_ratio"][0]["mean_auroc"], test_only["by_ratio"][0]["mean_auroc"]
    assert wide["estimate"] == narrow["estimate"]
    assert wide["std_error"] > narrow["std_error"]
    assert (wide["method"], narrow["method"]) == ("bootstrap/test-images+seeds", "bootstrap/test-images")
    assert test_only["interval"]["resample_seeds"] is False


def test_too_little_training_data_or_synthetic_budget_is_refused():
    train, prompts = split(40, 0)
    args = (train, prompts, train, train, PhantomGenerator(), OBSERVATIONS, CONFIG)
    with pytest.raises(ValueError, match="need 64 training examples"):
        augmentation.augmentation_experiment(*args, num_real=32, seed=0, batch_size=8, ratios=(1.0,))
    with pytest.raises(ValueError, match="num_synthetic=10"):
        augmentation.augmentation_experiment(*args, num_real=8, seed=0, batch_size=8, ratios=(2.0,),
                                             num_synthetic=10)
    with pytest.raises(ValueError, match="distinct"):
        augmentation.augmentation_experiment(*args, num_real=8, seed=0, batch_size=8, seeds=(1, 1))


def write_synthetic(folder, n: int) -> list[np.ndarray]:
    """A synthetic data set of n rows at 16 px in `folder`, as `python -m cxr_ldm.synthesize` lays it out (two
    shards): phantom studies of PROMPTS cycled, at seeds 7000.. Returns the images."""
    from cxr_ldm.data.builders import synthetic_cxr

    builder = synthetic_cxr.SyntheticCxr(config="16", data_dir=str(folder), file_format="array_record")
    rows = [(PROMPTS[i % len(PROMPTS)].text, phantom.generate(7000 + i, 16, PROMPTS[i % len(PROMPTS)]
                                                              .phantom_findings())["image"]) for i in range(n)]
    halves = (rows[:n // 2], rows[n // 2:])
    path = folder / "synthetic_cxr" / "16" / "1.0.0"
    path.mkdir(parents=True)
    for k, half in enumerate(halves):
        builder.write_shard(path / synthetic_cxr.shard_name(k, 2),
                            [synthetic_cxr.make_example(image, text, 7000 + i) for i, (text, image) in enumerate(half)])
    builder.write_info([len(h) for h in halves], sum(p.stat().st_size for p in path.glob("*array_record*")))
    return [image for _, image in rows]


def test_synthetic_images_can_be_read_from_a_written_data_set(experiment, tmp_path):
    from cxr_ldm.evaluation.data import load_synthetic

    images = write_synthetic(tmp_path, 2 * NUM_REAL)
    synthetic = load_synthetic(tmp_path)
    np.testing.assert_array_equal(synthetic.data.images, np.stack(images))
    assert synthetic.prompts == [PROMPTS[i % len(PROMPTS)].text for i in range(2 * NUM_REAL)]
    np.testing.assert_array_equal(synthetic.data.labels,  # what each prompt states
                                  np.stack([encode_labels(label_report(text)) for text in synthetic.prompts]))
    assert synthetic.data.labels[1, CHEXPERT_LABELS.index("Pleural Effusion")] == 1
    result, seen = run_with_trained_models(experiment, synthetic=synthetic.data, generate=None)
    assert result["synthetic_source"] == "read"
    for k in range(len(SEEDS)):  # seed k: rows [k * M, (k + 1) * M) of the data set, M = NUM_REAL (ratio 1)
        full = seen[3 * k + 2]  # ratio 1 of seed k; its 16 px rows resized to the real 32 px
        assert full.images.shape == (2 * NUM_REAL, SIZE, SIZE, 1)
        np.testing.assert_array_equal(full.labels[NUM_REAL:], synthetic.data.labels[k * NUM_REAL:(k + 1) * NUM_REAL])
        np.testing.assert_array_equal(
            full.images[NUM_REAL:], np.round(np.asarray(imaging.resize(imaging.as_float_images(
                synthetic.data.images[k * NUM_REAL:(k + 1) * NUM_REAL]), SIZE)) * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="need 96 synthetic examples, the synthetic data set has 64"):
        run_with_trained_models(experiment, synthetic=synthetic.data, generate=None, seeds=(0, 1, 2))
    with pytest.raises(FileNotFoundError, match="no synthetic data set"):
        load_synthetic(tmp_path / "empty")
