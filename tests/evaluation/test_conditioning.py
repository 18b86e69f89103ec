"""Conditioning accuracy arithmetic: a fake generator draws exactly the findings a rule says, a fake
classifier reads them back, and every rate must equal the rule's count."""
import dataclasses

import numpy as np
import pytest

from cxr_ldm.evaluation import conditioning, prompts, report
from cxr_ldm.evaluation.classifier import Predictions
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS, SIDES
from cxr_ldm.evaluation.prompts import EvalPrompt

OBSERVATIONS = ("Cardiomegaly", "Lung Opacity", "Consolidation", "Pneumothorax", "Pleural Effusion")
SIDED = ("Consolidation", "Pleural Effusion")
PROMPTS = (
    EvalPrompt("No acute cardiopulmonary process.", {}),
    EvalPrompt("Large left pleural effusion.", {"Pleural Effusion": "left"}, details={"Pleural Effusion": {"severity": "large"}}),
    EvalPrompt("Right lower lobe consolidation.", {"Consolidation": "right"}, "alternate"),
    EvalPrompt("Moderate left pleural effusion. Moderate cardiomegaly.", {"Pleural Effusion": "left", "Cardiomegaly": None}),
)
N = 12


def shown(prompt: EvalPrompt, seed: int) -> dict[str, str | None]:
    """The rule of the fake generator: the prompted findings, all missing when seed % 4 == 0 (not for
    normal prompts), an unprompted pneumothorax when seed % 5 == 0, the wrong side when seed % 3 == 0,
    and always Lung Opacity with a consolidation (implied, so allowed)."""
    findings = {} if seed % 4 == 0 else dict(prompt.findings)
    findings = {k: ("right" if v == "left" else "left") if v and seed % 3 == 0 else v for k, v in findings.items()}
    if seed % 5 == 0:
        findings["Pneumothorax"] = "left"
    if "Consolidation" in findings:
        findings["Lung Opacity"] = None
    return findings


def fake_generator(texts, seeds):
    """Image row 0 = which observations are shown, row 1 = their side codes."""
    by_text = {p.text: p for p in PROMPTS}
    images = np.zeros((len(texts), 4, len(OBSERVATIONS), 1), np.float32)
    for b, (text, seed) in enumerate(zip(texts, seeds)):
        for name, side in shown(by_text[text], seed).items():
            j = OBSERVATIONS.index(name)
            images[b, 0, j, 0] = 1.0
            images[b, 1, j, 0] = 0 if side is None else SIDES.index(side) + 1
    return images


class FakeClassifier:
    observations, side_observations, slots = OBSERVATIONS, SIDED, ()
    major_findings = tuple(n for n in OBSERVATIONS if n in MAJOR_FINDINGS)

    def predict(self, images):
        positive = images[:, 0, :, 0] > 0.5
        side = images[:, 1, [OBSERVATIONS.index(n) for n in SIDED], 0].astype(int)
        return Predictions(positive.astype(np.float32), positive, np.zeros(side.shape + (3,)), side,
                           np.zeros((len(images), 2)), np.zeros((len(images), 0), int))


def _sided(prompt: EvalPrompt) -> bool:
    return any(side is not None and name in SIDED for name, side in prompt.findings.items())


def test_conditioning_rates_equal_the_generator_rule():
    images = conditioning.generate_images(fake_generator, [p.text for p in PROMPTS], N, seed=0, batch_size=5)
    assert [im.shape[0] for im in images] == [N] * len(PROMPTS)
    summary, _ = conditioning.evaluate_conditioning(FakeClassifier(), images, PROMPTS)

    seeds = {p: [p * N + i for i in range(N)] for p in range(len(PROMPTS))}
    expected_presence = [np.mean([(not prompt.findings or s % 4 != 0) and s % 5 != 0 for s in seeds[p]])
                         for p, prompt in enumerate(PROMPTS)]
    expected_success = [np.mean([(not prompt.findings or s % 4 != 0) and s % 5 != 0
                                 and (not _sided(prompt) or s % 3 != 0) for s in seeds[p]])
                        for p, prompt in enumerate(PROMPTS)]
    assert summary["presence_accuracy"] == pytest.approx(np.mean(expected_presence))
    assert summary["conditioning_accuracy"] == pytest.approx(np.mean(expected_success))
    assert summary["conditioning_accuracy"] < summary["presence_accuracy"]  # the wrong sides fail the strict verdict
    assert summary["conditioning_accuracy_by_style"]["alternate"] == pytest.approx(expected_success[2])
    effusion_seeds = seeds[1] + seeds[3]
    assert summary["detection_rate"]["Pleural Effusion"] == pytest.approx(np.mean([s % 4 != 0 for s in effusion_seeds]))
    detected = [s for s in effusion_seeds if s % 4 != 0]
    assert summary["side_accuracy"]["Pleural Effusion"] == pytest.approx(np.mean([s % 3 != 0 for s in detected]))
    assert "Cardiomegaly" not in summary["side_accuracy"]  # no side stated
    normal_fp = np.mean([s % 5 == 0 for s in seeds[0]])
    assert summary["normal_false_positive_rate"]["Pneumothorax"] == pytest.approx(normal_fp)
    assert summary["normal_false_positive_rate"]["any"] == pytest.approx(normal_fp)
    assert summary["normal_false_positive_rate"]["Cardiomegaly"] == 0.0
    # Only the single-finding prompts count; Lung Opacity is implied by a consolidation, so not unprompted.
    unprompted = summary["unprompted_by_finding"]
    assert set(unprompted) == {"Pleural Effusion", "Consolidation"}
    for name, p in (("Pleural Effusion", 1), ("Consolidation", 2)):
        assert unprompted[name] == pytest.approx({"Pneumothorax": np.mean([s % 5 == 0 for s in seeds[p]])})


def test_generated_images_do_not_depend_on_batch_size():
    a = conditioning.generate_images(fake_generator, [p.text for p in PROMPTS], 3, seed=7, batch_size=4)
    b = conditioning.generate_images(fake_generator, [p.text for p in PROMPTS], 3, seed=7, batch_size=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_prompt_set_covers_every_phantom_finding_in_both_styles():
    for name in MAJOR_FINDINGS:
        if name == "Pleural Other":
            continue
        styles = {p.style for p in prompts.HANDWRITTEN if name in p.findings}
        assert styles == {"template", "alternate"}, name
    assert sum(not p.findings for p in prompts.HANDWRITTEN) >= 2
    assert any(len(p.findings) >= 2 for p in prompts.HANDWRITTEN)


def test_phantom_studies_state_what_each_prompt_states():
    """The phantom renders every prompt's findings, and its report labels them positive on the prompted side."""
    from cxr_ldm.data import phantom

    for i, prompt in enumerate(prompts.HANDWRITTEN):
        study = phantom.generate(prompts.PHANTOM_REFERENCE_SEED + i, 32, prompt.phantom_findings())
        major_positive = {n for n, v in study["labels"].items() if v == 1 and n in MAJOR_FINDINGS}
        assert major_positive == set(prompt.findings), prompt.text
        for name, side in prompt.findings.items():
            if side is not None:
                assert study["side"][name] == side, (prompt.text, name)
    images = conditioning.phantom_studies(prompts.HANDWRITTEN[:2], 3, 32)
    assert [x.shape for x in images] == [(3, 32, 32, 1)] * 2 and 0 <= images[0].min() < images[0].max() <= 1


def test_occluded_studies_flag_the_studies_whose_film_hides_a_stated_finding(monkeypatch):
    """A finding that draws nothing is occluded in every study of its prompt; a drawn one is not."""
    from cxr_ldm.data.phantom import findings as phantom_findings

    edema = EvalPrompt("Moderate pulmonary edema. Large right pleural effusion.",
                       {"Edema": "bilateral", "Pleural Effusion": "right"},
                       details={"Edema": {"severity": "moderate"}, "Pleural Effusion": {"severity": "large"}})
    effusion = EvalPrompt("Large right pleural effusion.", {"Pleural Effusion": "right"},
                          details={"Pleural Effusion": {"severity": "large"}})
    normal = EvalPrompt("Normal chest radiograph.", {})
    prompts = [edema, effusion, normal]
    films = conditioning.phantom_studies(prompts, 2, 32)
    flags = conditioning.occluded_studies(prompts, 2, 32)
    assert [f.tolist() for f in flags] == [[False, False]] * 3
    assert [f.tolist() for f in conditioning.occluded_studies(prompts, 2, 32, films=films)] == [[False, False]] * 3
    monkeypatch.setitem(phantom_findings.DRAW, "Edema", lambda *args: None)
    flags = conditioning.occluded_studies(prompts, 2, 32)
    assert [f.tolist() for f in flags] == [[True, True], [False, False], [False, False]]
    # The films given are the ones judged: those rendered before edema stopped drawing still show it.
    assert [f.tolist() for f in conditioning.occluded_studies(prompts, 2, 32, films=films)] == [[False, False]] * 3


def test_occlusion_summary_scores_the_visible_studies_only():
    def result(success):
        success = np.asarray(success)
        return conditioning.PromptResult(EvalPrompt("x", {}), success, {}, {}, {}, success, {})

    results = [result([True, False, True]), result([False, False])]
    summary = conditioning.occlusion_summary(results, [np.array([False, True, False]), np.array([True, False])])
    assert summary == {"occluded_share": pytest.approx(2 / 5), "conditioning_accuracy_visible": pytest.approx(2 / 3)}
    everything_hidden = conditioning.occlusion_summary(results[1:], [np.array([True, True])])
    assert everything_hidden == {"occluded_share": 1.0, "conditioning_accuracy_visible": None}
    with pytest.raises(ValueError, match="occlusion flags for 2 studies, verdicts for 5"):
        conditioning.occlusion_summary(results, [np.array([True, True])])


def test_prompts_reject_unknown_findings_and_sides():
    with pytest.raises(ValueError, match=r"findings\['Lung Opacity'\] = null: expected a major finding"):
        EvalPrompt("x", {"Lung Opacity": None})
    with pytest.raises(ValueError, match=r"findings\['Pleural Effusion'\] = \"up\": expected \"left\""):
        EvalPrompt("x", {"Pleural Effusion": "up"})


def test_usable_prompts_skips_findings_the_classifier_lacks():
    usable, skipped = conditioning.usable_prompts(prompts.HANDWRITTEN, FakeClassifier())
    assert all(set(p.findings) <= set(OBSERVATIONS) for p in usable)
    assert {p.text for p in skipped} >= {"Left clavicle fracture."}
    assert len(usable) + len(skipped) == len(prompts.HANDWRITTEN)


def test_report_tabulates_unprompted_findings_by_prompted_finding():
    rates = {"Pleural Effusion": {"Consolidation": 0.4, "Edema": 0.1}, "Consolidation": {"Pleural Effusion": 0.6}}
    lines = report.unprompted_section(rates)
    header = lines.index("| prompted finding | Consolidation | Edema | Pleural Effusion |")
    assert lines[header + 2] == "| Pleural Effusion | 0.400 | 0.100 |  |"
    assert lines[header + 3] == "| Consolidation |  |  | 0.600 |"
    assert report.unprompted_section({}) == [] and report.unprompted_section({"Edema": {}}) == []


class FeatureClassifier(FakeClassifier):
    """FakeClassifier whose features are the shown-observation flags plus fixed noise (a domain FID)."""

    def predict(self, images):
        noise = np.random.default_rng(0).normal(0, 0.1, (len(images), len(OBSERVATIONS)))
        return dataclasses.replace(super().predict(images), features=images[:, 0, :, 0] + noise)


def test_guidance_sweep_scores_each_scale_on_the_headline_seeds():
    """A fake generator that misses the prompted findings (seed % 4 == 0) only below guidance 3: each row's
    rates follow that rule on the conditioning seeds, and its FID is the one of the FID seeds' images."""
    from cxr_ldm.evaluation.evaluator import guidance_sweep
    from cxr_ldm.evaluation.metrics import fid_from_features

    def generator_at(scale):
        def generate(texts, seeds):
            images = fake_generator(texts, seeds)
            if scale >= 3:  # redraw the misses with a seed of the same other rules (15 = 3 x 5), not % 4 == 0
                full = fake_generator(texts, [s + 15 if s % 4 == 0 else s for s in seeds])
                misses = np.array([s % 4 == 0 for s in seeds])
                images[misses] = full[misses]
            return images
        return generate

    classifier, seeds = FeatureClassifier(), {"conditioning": 7, "fid": 101}  # residues unlike seed 0's
    fid_prompts = [p.text for p in PROMPTS] * 3
    real = np.random.default_rng(1).normal(0.5, 0.3, (len(fid_prompts), len(OBSERVATIONS)))
    rows = guidance_sweep(generator_at, classifier, PROMPTS, (4.0, 2.0), N, seeds, 5, fid_prompts, real)

    assert [row["guidance"] for row in rows] == [4.0, 2.0]
    first = seeds["conditioning"]
    prompt_seeds = {p: [first + p * N + i for i in range(N)] for p in range(len(PROMPTS))}
    for row, misses in ((rows[0], False), (rows[1], True)):
        presence = [np.mean([(not prompt.findings or not misses or s % 4 != 0) and s % 5 != 0 for s in prompt_seeds[p]])
                    for p, prompt in enumerate(PROMPTS)]
        expected = [np.mean([(not prompt.findings or not misses or s % 4 != 0) and s % 5 != 0
                             and (not _sided(prompt) or s % 3 != 0) for s in prompt_seeds[p]])
                    for p, prompt in enumerate(PROMPTS)]
        assert row["presence_accuracy"] == pytest.approx(np.mean(presence))
        assert row["conditioning_accuracy"] == pytest.approx(np.mean(expected))
        assert row["conditioning_accuracy_by_style"]["alternate"] == pytest.approx(expected[2])
        effusion = prompt_seeds[1] + prompt_seeds[3]
        assert row["detection_rate"]["Pleural Effusion"] == pytest.approx(
            np.mean([not misses or s % 4 != 0 for s in effusion]))
        assert row["normal_false_positive_rate_any"] == pytest.approx(np.mean([s % 5 == 0 for s in prompt_seeds[0]]))
        fid_images = generator_at(row["guidance"])(fid_prompts, [seeds["fid"] + i for i in range(len(fid_prompts))])
        assert row["domain_fid"] == pytest.approx(fid_from_features(classifier.predict(fid_images).features, real))
    assert rows[0]["conditioning_accuracy"] > rows[1]["conditioning_accuracy"]


def test_report_tabulates_the_guidance_sweep():
    row = {"guidance": 3.0, "conditioning_accuracy": 0.8, "presence_accuracy": 0.85,
           "conditioning_accuracy_by_style": {"template": 0.9, "alternate": 0.5},
           "side_accuracy_overall": 0.95, "normal_false_positive_rate_any": 0.0, "domain_fid": 12.5}
    lines = report.guidance_sweep_section([{**row, "guidance": 2.0}, row], 3.0)
    assert "| 2 | 0.800 | 0.850 | template 0.900 / alternate 0.500 | 0.950 | 0.000 | 12.500 |" in lines
    assert "| 3 * | 0.800 | 0.850 | template 0.900 / alternate 0.500 | 0.950 | 0.000 | 12.500 |" in lines
    assert report.guidance_sweep_section(None, 3.0) == []


def test_guidance_sweep_option_parses_scales():
    from cxr_ldm.evaluate import _scales

    assert _scales("2,3,4.5") == (2.0, 3.0, 4.5)
    for bad in ("2,x", "0.5,2"):
        with pytest.raises(Exception, match="guidance|numbers"):
            _scales(bad)
