"""Counterfactual edits: the edit cases are held-out phantom studies with their true counterfactuals, the masked
image metrics, and `evaluate --edits` end to end on a tiny random pipeline and the "tiny" phantom data set."""
import json

import numpy as np
import pytest

from cxr_ldm import evaluate, imaging
from cxr_ldm.data import phantom
from cxr_ldm.data.builders.phantom_cxr import SPLIT_SEED_OFFSETS
from cxr_ldm.data.labeler import label_report
from cxr_ldm.evaluation import edits, evaluator
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS
from tests.evaluation.test_evaluator import tiny_pipeline


def _stated(text: str) -> set[str]:
    return {name for name, value in label_report(text).items() if value == 1 and name in MAJOR_FINDINGS}


def test_edit_cases_are_held_out_studies_with_their_true_counterfactuals():
    cases = edits.edit_cases(6, 32, "test")
    assert [c.operation for c in cases] == ["add", "remove"] * 3
    seeds = [c.seed for c in cases]
    assert seeds == sorted(set(seeds)) and seeds[0] >= SPLIT_SEED_OFFSETS["test"]
    for case in cases:
        study = phantom.generate(case.seed, 32)
        np.testing.assert_array_equal(case.image, study["image"])  # the test split's film of that seed
        source, target = set(case.source.findings), set(case.target.findings)
        assert target == (source | {case.finding} if case.operation == "add" else source - {case.finding})
        assert _stated(case.source.text) == source and _stated(case.target.text) == target
        for kept in source & target:  # the other findings keep their side, grade and location
            assert case.target.findings[kept] == case.source.findings[kept]
            assert case.target.details.get(kept) == case.source.details.get(kept)
        # the same patient rendered with the edited case, forced through the public API
        forced = case.target.phantom_findings()
        np.testing.assert_array_equal(case.counterfactual, phantom.generate(case.seed, 32, forced)["image"])
        changed = np.abs(case.image.astype(int) - case.counterfactual) > edits.MIN_CHANGE
        np.testing.assert_array_equal(case.region, changed)
        assert changed.sum() >= edits.MIN_CHANGED_PIXELS
    dev = edits.edit_cases(2, 32, "dev")
    assert all(SPLIT_SEED_OFFSETS["validation"] <= c.seed < SPLIT_SEED_OFFSETS["test"] for c in dev)
    with pytest.raises(ValueError, match="edit set 'train'"):
        edits.edit_cases(1, 32, "train")


def test_masked_metrics_count_only_the_masked_pixels():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(2, 24, 24, 1)).astype(np.float32)
    b = a.copy()
    b[:, :, 12:] += 0.1  # the right half differs by 0.1: 20 dB there
    left = np.zeros((2, 24, 24, 1), bool)
    left[:, :, :12] = True
    np.testing.assert_allclose(imaging.masked_psnr(a, b, ~left), 20.0, rtol=1e-4)
    assert np.all(np.asarray(imaging.masked_psnr(a, b, left)) > 100)  # identical pixels
    everywhere = np.ones_like(left)
    np.testing.assert_allclose(imaging.masked_psnr(a, b, everywhere), imaging.psnr(a, b), rtol=1e-5)
    np.testing.assert_allclose(imaging.masked_ssim(a, b, everywhere), imaging.ssim(a, b), rtol=1e-5)
    centres = np.zeros_like(left)
    centres[:, :, 17:19] = True  # the 11x11 windows centred on columns 17, 18 are those of the right half's SSIM
    np.testing.assert_allclose(imaging.masked_ssim(a, b, centres), imaging.ssim(a[:, :, 12:], b[:, :, 12:]), rtol=1e-5)
    assert np.isnan(imaging.masked_psnr(a, b, np.zeros_like(left))).all()


def test_masks_grow_by_latent_cells():
    region = np.zeros((16, 16, 1), bool)
    region[8, 8] = True
    case = edits.EditCase(0, "add", "Edema", None, None, None, None, region)
    mask, kept = edits.edit_masks([case], 2)
    assert mask.sum() == 25 and mask[0, 6:11, 6:11].all()
    assert (~kept).sum() == 81 and not kept[0, 4:13, 4:13].any()


def test_evaluate_edits_end_to_end(tmp_path, capsys):
    from cxr_ldm.evaluation import classifier as clf
    from cxr_ldm.pipeline import Pipeline

    checkpoint = tiny_pipeline(tmp_path / "pipe")
    pipe = Pipeline.from_pretrained(checkpoint)
    recipe = clf.TrainConfig(input_size=32, widths=(8, 16), feature_dim=32, min_positives=5, epochs=1, batch_size=32,
                             warmup_steps=2)
    out = tmp_path / "edits" / "e.json"
    options = dict(dataset_config="tiny", data_dir=str(tmp_path / "tfds"), steps=2, batch_size=4, judge_train_size=128)
    # two of the methods, at guidance 1, so that the inversion and its redraw share one compiled sampler
    results = evaluator.evaluate_edits(checkpoint, out, pipe=pipe, num_edits=4, strength=0.5,
                                       methods=("sdedit_masked", "inversion"), classifier_config=recipe,
                                       guidance=1.0, **options)
    assert json.loads(out.read_text()) == results
    section = results["edits"]
    assert section["num_edits"] == 4 and section["num_add"] == section["num_remove"] == 2
    assert list(section["methods"]) == ["sdedit_masked", "inversion"]
    cases = edits.edit_cases(4, 32, "test")
    assert [c["seed"] for c in section["cases"]] == [c.seed for c in cases]
    # the references, recomputed from the judge the run cached
    classifier = clf.FindingClassifier.load(results["classifier"]["dir"])
    truths = np.stack([c.counterfactual for c in cases])
    truth_success = edits.verdicts(classifier, cases, truths)
    assert section["references"]["true_counterfactual"]["success"]["mean"] == pytest.approx(truth_success.mean())
    assert section["references"]["true_counterfactual"]["judge_agreement"]["mean"] == 1.0
    unedited = section["references"]["unedited"]
    assert unedited["preservation_psnr"]["mean"] is None  # the film itself: identical outside the region
    originals = np.stack([c.image for c in cases]).astype(np.float32) / 255.0
    mask, _ = edits.edit_masks(cases, pipe.vae_scale)
    assert unedited["fidelity_psnr"]["mean"] == pytest.approx(float(np.mean(imaging.masked_psnr(
        originals, truths.astype(np.float32) / 255.0, mask))), rel=1e-5)
    for method, row in section["methods"].items():
        assert 0.0 <= row["success"]["mean"] <= 1.0 and len(row["success"]["ci"]) == 2, method
        low, high = row["preservation_psnr"]["ci"]
        assert low <= row["preservation_psnr"]["mean"] <= high, method
    round_trip = section["references"]["vae_round_trip"]
    assert round_trip["preservation_psnr_vs_vae"]["mean"] is None  # identical to itself
    assert round_trip["preservation_psnr"]["mean"] == pytest.approx(unedited["preservation_psnr_vs_vae"]["mean"])
    assert section["inversion_redraw_psnr_vs_vae"]["mean"] > 0
    report = out.with_suffix(".md").read_text()
    assert "| inversion |" in report and "| (true_counterfactual) |" in report
    assert (tmp_path / "edits" / "e_assets" / "edits.png").is_file()

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.json"), "--edits",
                       "--prompts", "handwritten"])
    assert exit_info.value.code == 2
    assert "--edits takes --prompts dev or test" in capsys.readouterr().err
