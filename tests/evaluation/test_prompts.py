"""Evaluation prompts: the held-out sets are drawn from unused phantom seeds with their studies' truth, prompt
files are validated with one-line errors, and the strict verdict fails on each wrong attribute."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cxr_ldm.data.builders.phantom_cxr import SPLIT_SEED_OFFSETS
from cxr_ldm.data.labeler import label_report
from cxr_ldm.data.phantom.cases import draw_findings
from cxr_ldm.evaluation import conditioning, prompts
from cxr_ldm.evaluation.attributes import SLOT_NAMES, SLOTS, prompted_codes, slot_codes
from cxr_ldm.evaluation.classifier import Predictions
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS
from cxr_ldm.evaluation.prompts import EvalPrompt, PromptFileError

SIZE = 60


@pytest.fixture(scope="module")
def dev_set():
    return prompts.draw_prompt_set("dev", SIZE)


def test_held_out_sets_come_from_seeds_no_split_uses_and_state_their_study(dev_set):
    first = prompts.PROMPT_SET_SEEDS["dev"]
    used = [range(offset, offset + 10_000_000) for offset in SPLIT_SEED_OFFSETS.values()]
    used += [range(prompts.PHANTOM_REFERENCE_SEED, prompts.PHANTOM_REFERENCE_SEED + 10_000_000),
             range(conditioning.TWIN_SEED, conditioning.TWIN_SEED + 10_000_000),
             range(prompts.PROMPT_SET_SEEDS["test"], prompts.PROMPT_SET_SEEDS["test"] + 10_000_000)]
    assert len(dev_set) == SIZE
    for prompt in dev_set:
        assert first <= prompt.seed < first + SIZE * 12
        assert not any(prompt.seed in r for r in used)
        case = draw_findings(prompt.seed)
        assert prompt.findings == {f.name: f.side for f in case}
        assert prompted_codes(prompt.findings, prompt.details) == {
            i: int(v) for i, v in enumerate(slot_codes(case)) if v >= 0}
        positive = {k for k, v in label_report(prompt.text).items() if v == 1 and k in MAJOR_FINDINGS}
        assert positive == set(prompt.findings)
    assert {p.seed for p in dev_set}.isdisjoint({p.seed for p in prompts.draw_prompt_set("test", SIZE)})


def test_held_out_sets_are_stratified_and_deterministic(dev_set):
    levels = [min(len(p.findings), 3) for p in dev_set]
    counts = np.bincount(levels, minlength=4)
    assert counts[1] == round(SIZE * prompts.LEVEL_SHARES[1]) and counts[2] == round(SIZE * prompts.LEVEL_SHARES[2])
    assert counts[0] >= 1 and counts[3] >= 1
    assert len({p.text for p in dev_set}) == SIZE
    assert prompts.draw_prompt_set("dev", SIZE) == dev_set


def test_prompt_file_round_trip(tmp_path, dev_set):
    path = tmp_path / "p.json"
    prompts.write_prompt_file(dev_set[:10], path)
    loaded = prompts.load_prompt_file(path)
    assert [(p.text, dict(p.findings), {k: dict(v) for k, v in p.details.items()}) for p in loaded] == \
        [(p.text, dict(p.findings), {k: dict(v) for k, v in p.details.items()}) for p in dev_set[:10]]


GOOD = {"text": "Small left pleural effusion.", "findings": {"Pleural Effusion": "left"},
        "details": {"Pleural Effusion": {"severity": "small"}}}


@pytest.mark.parametrize("entry, message", [
    ({"text": "Big heart.", "findings": {"Big Heart": None}},
     r"entry 1 \('Big heart.'\): findings\['Big Heart'\] = null: expected a major finding"),
    ({"text": "Effusion.", "findings": {"Pleural Effusion": "up"}},
     r"entry 1 \('Effusion.'\): findings\['Pleural Effusion'\] = \"up\": expected \"left\", \"right\", \"bilateral\""),
    ({"text": "Edema.", "findings": {"Edema": "left"}},
     r"findings\['Edema'\] = \"left\": expected one of \"bilateral\" for Edema"),
    ({"text": "Effusion.", "findings": {"Pleural Effusion": "left"}, "details": {"Pleural Effusion": {"severity": "huge"}}},
     r"details\['Pleural Effusion'\]\['severity'\] = \"huge\": expected one of \['small', 'moderate', 'large'\]"),
    ({"text": "Tube.", "findings": {"Support Devices": None}, "details": {"Support Devices": {"devices": ["drain"]}}},
     r"details\['Support Devices'\]\['devices'\] = \[\"drain\"\]"),
    ({"text": "Mass.", "findings": {"Lung Lesion": "left"}, "details": {"Lung Lesion": {"kind": "lingula"}}},
     r"details\['Lung Lesion'\]\['kind'\] = \"lingula\": expected one of \['upper', 'mid', 'lower'\]"),
    ({"text": "Normal.", "findings": {}, "colour": "grey"}, r"entry 1 \('Normal.'\): key 'colour'"),
    ({"text": "Normal."}, r"entry 1 \('Normal.'\): findings = null: expected present"),
    ("Normal.", r"entry 1: entry = \"Normal.\": expected an object"),
])
def test_malformed_prompt_files_name_entry_key_and_value(tmp_path, entry, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([GOOD, entry]))
    with pytest.raises(PromptFileError, match=message) as err:
        prompts.load_prompt_file(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_cli_refuses_a_malformed_prompt_file_before_any_work(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([GOOD, {"text": "x", "findings": {"Pneumothorax": "bilateral"}}]))
    result = subprocess.run([sys.executable, "-m", "cxr_ldm.evaluate", "--checkpoint", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "r.json"), "--prompts", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "entry 1 ('x'): findings['Pneumothorax'] = \"bilateral\"" in result.stderr
    assert not (tmp_path / "r.json").exists()


class StrictClassifier:
    """Every finding detected and nothing else; sides and attribute slots as `wrong` says."""
    observations = side_observations = tuple(MAJOR_FINDINGS)
    major_findings = tuple(MAJOR_FINDINGS)
    slots = SLOT_NAMES

    def __init__(self, prompt: EvalPrompt, wrong: str | None):
        self.prompt, self.wrong = prompt, wrong

    def predict(self, images):
        n, p = len(images), self.prompt
        positive = np.array([[name in p.findings for name in self.observations]] * n)
        side = np.array([[("left", "right", "bilateral").index(p.findings.get(name) or "left") + 1
                          for name in self.observations]] * n)
        codes = np.zeros(len(SLOTS), int)
        for i, value in prompted_codes(p.findings, p.details).items():
            codes[i] = value
            if SLOTS[i].attribute == self.wrong:
                codes[i] = (value + 1) % len(SLOTS[i].values)
        if self.wrong == "side":
            j = self.observations.index(next(k for k, v in p.findings.items() if v))
            side[:, j] = side[:, j] % 3 + 1
        return Predictions(positive.astype(float), positive, np.zeros(side.shape + (3,)), side,
                           np.zeros((n, 2)), np.repeat(codes[None], n, 0))


STRICT_CASES = {
    "side": EvalPrompt("Small left pleural effusion.", {"Pleural Effusion": "left"}, details={"Pleural Effusion": {"severity": "small"}}),
    "grade": EvalPrompt("Severe cardiomegaly.", {"Cardiomegaly": None}, details={"Cardiomegaly": {"severity": "severe"}}),
    "location": EvalPrompt("Left upper lobe consolidation.", {"Consolidation": "left"}, details={"Consolidation": {"kind": "upper"}}),
    "device": EvalPrompt("Endotracheal tube.", {"Support Devices": None}, details={"Support Devices": {"devices": ("et_tube",)}}),
    "route": EvalPrompt("Right jugular line.", {"Support Devices": "right"},
                        details={"Support Devices": {"devices": ("central_line",), "kind": "jugular"}}),
}


@pytest.mark.parametrize("attribute", list(STRICT_CASES))
def test_each_wrong_attribute_fails_the_strict_verdict_only(attribute):
    prompt, images = STRICT_CASES[attribute], np.zeros((4, 8, 8, 1))
    right = conditioning.score_prompt(prompt, StrictClassifier(prompt, None).predict(images), StrictClassifier(prompt, None))
    assert right.success.all() and right.present.all()
    classifier = StrictClassifier(prompt, attribute)
    wrong = conditioning.score_prompt(prompt, classifier.predict(images), classifier)
    assert wrong.present.all() and not wrong.success.any()
    summary = conditioning.summarize([wrong])
    assert summary["presence_accuracy"] == 1.0 and summary["conditioning_accuracy"] == 0.0
    assert summary["attribute_accuracy"][attribute] == 0.0
