"""Rule-based CheXpert labels (cxr_ldm/data/labeler.py) on hand-written report sentences."""

import pytest

from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.labeler import label_report, label_report_details

NF, ECM, CM, LO, LL, ED = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                           "Lung Lesion", "Edema")
CO, PNA, ATX, PTX, EFF, PO, FX, SD = ("Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                                      "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")

# (report text, every label that is not None)
CASES = [
    # negation and its scope
    ("No pleural effusion or pneumothorax.", {NF: 1, EFF: 0, PTX: 0}),
    ("There is no focal consolidation, pleural effusion, or pneumothorax.", {NF: 1, CO: 0, EFF: 0, PTX: 0}),
    ("Lungs are clear without focal consolidation, effusion, or pneumothorax.", {NF: 1, CO: 0, EFF: 0, PTX: 0}),
    ("There is no evidence of pneumothorax or fracture.", {NF: 1, PTX: 0, FX: 0}),
    ("Neither pneumothorax nor effusion is present.", {NF: 1, PTX: 0, EFF: 0}),
    ("Pleural effusion is not seen.", {NF: 1, EFF: 0}),
    ("The lungs are free of consolidation.", {NF: 1, CO: 0}),
    ("Negative for pneumothorax.", {NF: 1, PTX: 0}),
    ("Previously seen right pneumothorax has resolved.", {NF: 1, PTX: 0}),
    ("Effusion, consolidation, and pneumothorax have resolved.", {NF: 1, EFF: 0, CO: 0, PTX: 0}),
    ("Interval resolution of the left pleural effusion.", {NF: 1, EFF: 0}),
    ("No new consolidation to suggest pneumonia.", {NF: 1, CO: 0, PNA: 0}),
    ("No pneumothorax, but there is a small left effusion.", {PTX: 0, EFF: 1}),
    ("No focal consolidation; however, there is mild bibasilar atelectasis.", {CO: 0, ATX: 1, LO: 1}),
    ("No pneumothorax, and the heart is enlarged.", {PTX: 0, CM: 1}),
    ("No pleural effusion, moderate cardiomegaly.", {EFF: 0, CM: 1}),
    ("There is no pneumothorax. Right lower lobe consolidation.", {PTX: 0, CO: 1, LO: 1}),
    # pseudo-negations: the finding is still there
    ("Left pleural effusion has not yet resolved.", {EFF: 1}),
    ("No significant change in moderate cardiomegaly.", {CM: 1}),
    ("Near complete resolution of the right pleural effusion.", {EFF: 1}),
    ("Left pleural effusion is unchanged in size, without change since the prior study.", {EFF: 1}),
    # uncertainty
    ("Right lower lobe opacity may represent atelectasis or pneumonia.", {LO: 1, ATX: -1, PNA: -1}),
    ("Pneumonia cannot be excluded.", {PNA: -1}),
    ("Cannot exclude a small left apical pneumothorax.", {PTX: -1}),
    ("Bibasilar opacities likely reflect atelectasis.", {LO: 1, ATX: -1}),
    ("Retrocardiac opacity, likely atelectasis, though pneumonia is not excluded.", {LO: 1, ATX: -1, PNA: -1}),
    ("Atelectasis versus pneumonia in the left lower lobe.", {ATX: -1, PNA: -1}),
    ("Increased opacity in the right upper lobe concerning for pneumonia.", {LO: 1, PNA: -1}),
    ("Possible small left pleural effusion.", {EFF: -1}),
    ("Questionable nondisplaced fracture of the right seventh rib.", {FX: -1}),
    ("Differential includes edema and infection.", {ED: -1, PNA: -1}),
    ("Findings could be due to aspiration; pneumonia is possible.", {PNA: -1}),
    ("No large pleural effusion, though a small effusion cannot be excluded.", {EFF: -1}),
    ("No pneumothorax on this supine study; a small anterior one would be difficult to exclude.", {NF: 1, PTX: 0}),
    ("The previously noted left effusion is no longer seen.", {NF: 1, EFF: 0}),
    # heart and mediastinum
    ("Heart size is normal. Lungs are clear.", {NF: 1, CM: 0}),
    ("The heart is not enlarged.", {NF: 1, CM: 0}),
    ("Normal heart size with widened mediastinum.", {CM: 0, ECM: 1}),
    ("The cardiomediastinal silhouette is within normal limits.", {NF: 1, ECM: 0}),
    ("Heart size may be mildly enlarged.", {CM: -1}),
    ("Borderline cardiomegaly.", {CM: -1}),
    ("The heart is moderately enlarged. Mild pulmonary edema.", {CM: 1, ED: 1, LO: 1}),
    ("Tip of the right PICC line projects over the cardiac silhouette.", {NF: 1, SD: 1}),
    # CHF implies an uncertain big heart (CheXpert); venous hypertension is an uncertain edema
    ("Mild CHF.", {CM: -1, ED: 1}),
    ("Mild pulmonary vascular congestion without frank edema.", {ED: 1}),
    ("Findings suggestive of pulmonary venous hypertension.", {ED: -1}),
    # several findings in one sentence
    ("Moderate right pleural effusion with adjacent compressive atelectasis and a 2 cm right upper lobe nodule.",
     {EFF: 1, ATX: 1, LL: 1, LO: 1}),
    ("Large left pneumothorax with mediastinal shift, left chest tube in place.", {PTX: 1, SD: 1}),
    ("Calcified pleural plaques and old healed left rib fractures.", {PO: 1, FX: 1}),
    # support devices and "No Finding"
    ("Endotracheal tube terminates 4 cm above the carina. No pneumothorax.", {NF: 1, SD: 1, PTX: 0}),
    ("Interval removal of the right chest tube without pneumothorax.", {NF: 1, SD: 0, PTX: 0}),
    ("Left-sided pacemaker with leads in the right atrium and right ventricle.", {NF: 1, SD: 1}),
    ("Sternotomy wires are intact. Plate-like atelectasis at the left base.", {SD: 1, ATX: 1, LO: 1}),
    ("No acute cardiopulmonary process.", {NF: 1}),
    ("Status post median sternotomy. ETT and Dobhoff in place.", {NF: 1, SD: 1}),
    ("Left line tip is in the mid SVC.", {NF: 1, SD: 1}),
    ("Hyperinflated lungs consistent with emphysema. No focal consolidation.", {CO: 0}),
    ("Blunting of the left costophrenic angle.", {EFF: 1}),
]


@pytest.mark.parametrize("text, expected", CASES, ids=[case[0][:48] for case in CASES])
def test_sentence_labels(text, expected):
    labels = label_report(text)
    assert list(labels) == list(CHEXPERT_LABELS)
    assert {name: value for name, value in labels.items() if value is not None} == expected


def test_chexpert_names_and_order():
    assert CHEXPERT_LABELS == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices")


def test_lung_opacity_hierarchy():
    text = "Left lower lobe consolidation. Possible right upper lobe nodule."
    assert label_report(text)[LO] == 1
    assert label_report_details(text)[LO]["side"] == "left"
    assert label_report(text, opacity_hierarchy=False)[LO] is None
    assert label_report("Possible left lower lobe pneumonia.")[LO] is None


def test_positive_beats_uncertain_beats_negative_across_mentions():
    labels = label_report("No pneumonia on the right. Possible pneumonia at the left base. Left pleural effusion. "
                          "Effusion may be loculated. No effusion on the right.")
    assert labels[PNA] == -1
    assert labels[EFF] == 1
    assert labels[NF] is None


def test_impression_and_findings_are_labelled_not_indication():
    report = ("INDICATION: Evaluate for pneumonia and pneumothorax.\n"
              "FINDINGS: Mild cardiomegaly. Lungs are clear.\n"
              "IMPRESSION: No acute process.")
    labels = label_report(report)
    assert labels[PNA] is None and labels[PTX] is None
    assert labels[CM] == 1
    assert labels[NF] is None


def test_empty_report_has_no_labels():
    assert all(value is None for value in label_report("").values())
    with pytest.raises(TypeError, match="label_report"):
        label_report(b"No effusion.")


@pytest.mark.parametrize("text, name, side, severity", [
    ("Moderate right pleural effusion.", EFF, "right", "moderate"),
    ("Small left and moderate right pleural effusions.", EFF, "bilateral", "moderate"),
    ("Persistent small bilateral pleural effusions.", EFF, "bilateral", "small"),
    ("Blunting of the left costophrenic angle.", EFF, "left", None),
    ("Large left apical pneumothorax.", PTX, "left", "large"),
    ("The heart is severely enlarged.", CM, None, "severe"),
    ("Mild to moderate pulmonary edema.", ED, None, "moderate"),
    ("Right upper lobe consolidation and left basilar atelectasis.", CO, "right", None),
    ("Right upper lobe consolidation and left basilar atelectasis.", ATX, "left", None),
    ("Possible small left pleural effusion.", EFF, "left", "small"),
    ("Bibasilar opacities.", LO, "bilateral", None),
    ("Patchy opacities in the lung bases.", LO, "bilateral", None),
    ("Left upper lobe consolidation, consistent with pneumonia.", PNA, "left", None),
    ("Right basilar opacity may represent atelectasis.", ATX, "right", None),
])
def test_side_and_severity(text, name, side, severity):
    detail = label_report_details(text)[name]
    assert detail["label"] in (1, -1)
    assert (detail["side"], detail["severity"]) == (side, severity)


def test_no_side_or_severity_for_negative_findings():
    details = label_report_details("No large left pleural effusion. Mild left basilar atelectasis.")
    assert details[EFF] == {"label": 0, "side": None, "severity": None}
    assert details[ATX] == {"label": 1, "side": "left", "severity": "mild"}
    assert details[NF] == {"label": None, "side": None, "severity": None}


def test_recovers_phantom_labels_sides_and_severities():
    from cxr_ldm.data import phantom

    pairs, mismatches = 0, []
    stated = {"side": ("Pleural Effusion", "Pneumothorax", "Consolidation", "Pneumonia", "Atelectasis",
                       "Lung Lesion", "Fracture", "Support Devices"),
              "severity": ("Pleural Effusion", "Pneumothorax", "Atelectasis", "Edema", "Cardiomegaly")}
    agreement = {"side": [], "severity": []}
    for seed in range(300):
        study = phantom.generate(seed, resolution=16)
        details = label_report_details(study["report"])
        for name in CHEXPERT_LABELS:
            pairs += 1
            if details[name]["label"] != study["labels"][name]:
                mismatches.append((seed, name, study["labels"][name], details[name]["label"]))
        for field, names in stated.items():
            agreement[field] += [details[name][field] == study[field][name] for name in names
                                 if study["labels"][name] == 1 and study[field][name] is not None]
    assert len(mismatches) <= 0.01 * pairs, mismatches[:10]
    for field, agrees in agreement.items():
        assert len(agrees) > 50 and sum(agrees) >= 0.97 * len(agrees), (field, sum(agrees), len(agrees))
