"""Real evaluation data: phantom studies drawn in memory equal the built data set's, and the judge's training
studies extend the train split with training-range seeds only."""
import dataclasses

import numpy as np
import pytest

from cxr_ldm.data.builders import phantom_cxr, prepare
from cxr_ldm.data.phantom.cases import FINDING_COUNT_SHARES
from cxr_ldm.evaluation import evaluator
from cxr_ldm.evaluation.data import load_split, phantom_split


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    builder = prepare("phantom_cxr", tmp_path_factory.mktemp("tfds"), "tiny")
    return load_split(builder, "train")


def _in_seed_order(split):
    order = np.argsort(split.seeds)
    return split.data.subset(order), [split.prompts[i] for i in order], [split.reports[i] for i in order]


def test_phantom_split_draws_what_the_data_set_holds(tiny_train):
    data, prompts, reports = _in_seed_order(tiny_train)
    drawn = phantom_split(range(len(tiny_train)), 32, num_workers=1)
    assert drawn.seeds == list(range(len(tiny_train)))
    for name in ("images", "labels", "sides", "slots"):
        np.testing.assert_array_equal(getattr(drawn.data, name), getattr(data, name), err_msg=name)
    assert drawn.prompts == prompts and drawn.reports == reports
    assert (drawn.data.labels == 1).sum() > 0 and (drawn.data.slots >= 0).sum() > 0


def test_judge_trains_on_the_train_split_and_the_next_training_seeds(tiny_train):
    settings = evaluator.EvalSettings(checkpoint="", dataset="phantom_cxr", dataset_config="tiny")
    extended = evaluator.judge_training_studies(settings, tiny_train)
    n = len(tiny_train)
    assert len(extended) == evaluator.JUDGE_TRAIN_FACTOR * n
    assert extended.seeds[:n] == tiny_train.seeds and extended.seeds[n:] == list(range(n, len(extended)))
    np.testing.assert_array_equal(extended.data.images[:n], tiny_train.data.images)
    enriched = phantom_split(range(n, n + 8), 32, 1, evaluator.JUDGE_FINDING_COUNT_SHARES)
    for name in ("images", "labels", "sides", "slots"):  # drawn with the judge's shares of finding counts
        np.testing.assert_array_equal(getattr(extended.data, name)[n:n + 8], getattr(enriched.data, name))
    assert evaluator.JUDGE_FINDING_COUNT_SHARES != FINDING_COUNT_SHARES
    assert max(extended.seeds) < phantom_cxr.SPLIT_SEED_OFFSETS["validation"]

    exact = evaluator.judge_training_studies(dataclasses.replace(settings, judge_train_size=n), tiny_train)
    assert exact is tiny_train
    with pytest.raises(ValueError, match="below the train split"):
        evaluator.judge_training_studies(dataclasses.replace(settings, judge_train_size=n - 1), tiny_train)
    with pytest.raises(ValueError, match="leave the training seed range"):
        evaluator.judge_training_studies(dataclasses.replace(settings, judge_train_size=10_000_001), tiny_train)
    other = dataclasses.replace(settings, dataset="mimic_cxr_jpg", judge_train_size=2 * n)
    with pytest.raises(ValueError, match="only phantom_cxr"):
        evaluator.judge_training_studies(other, dataclasses.replace(tiny_train, seeds=None))
    assert evaluator.judge_training_studies(dataclasses.replace(other, judge_train_size=None), tiny_train) is tiny_train
