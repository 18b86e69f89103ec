"""Report sections, sentence splitting and prompts (cxr_ldm/data/reports.py)."""

import pytest

from cxr_ldm.data.reports import (
    SECTION_KEYS, clean_prompt_text, extract_sections, fit_sentences, prompt_from_report, split_sentences)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough and fever, eval for
 pneumonia.

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is a new opacity in the right lower lobe.  There is no pleural
 effusion or pneumothorax.  The heart size is normal.

 IMPRESSION:

 1. Right lower lobe pneumonia.
 2. Findings were discussed with Dr. ___ by telephone at 10:15 on ___.
"""


def test_mimic_report_sections_join_wrapped_lines():
    sections = extract_sections(MIMIC_REPORT)
    assert set(sections) == set(SECTION_KEYS)
    assert sections["examination"] == "CHEST (PA AND LAT)"
    assert sections["indication"] == "___ year old woman with cough and fever, eval for pneumonia."
    assert sections["technique"] == "Chest PA and lateral"
    assert sections["comparison"] == "___"
    assert sections["findings"] == ("There is a new opacity in the right lower lobe. There is no pleural "
                                    "effusion or pneumothorax. The heart size is normal.")
    assert sections["impression"] == ("1. Right lower lobe pneumonia. 2. Findings were discussed with "
                                      "Dr. ___ by telephone at 10:15 on ___.")
    assert sections["history"] == sections["wet_read"] == sections["body"] == ""


def test_headers_in_any_case_and_inline():
    sections = extract_sections("Findings: Lungs are clear. impression: Normal chest. History: cough")
    assert sections["findings"] == "Lungs are clear."
    assert sections["impression"] == "Normal chest."
    assert sections["history"] == "cough"


def test_findings_and_impression_fills_both_and_conclusion_is_impression():
    sections = extract_sections("FINDINGS AND IMPRESSION:\n Small left\n effusion.\n")
    assert sections["findings"] == sections["impression"] == "Small left effusion."
    sections = extract_sections("CLINICAL HISTORY: Dyspnea.\nCONCLUSION: Mild pulmonary edema.")
    assert sections["history"] == "Dyspnea."
    assert sections["impression"] == "Mild pulmonary edema."
    assert sections["findings"] == ""


def test_wet_read_and_colonless_upper_case_headers():
    text = ("WET READ: ___ ___ 2:15 PM\n  Possible small left effusion.\n\n"
            "                                 FINAL REPORT\n PA AND LATERAL CHEST\n\n"
            " IMPRESSION\n No acute process.\n")
    sections = extract_sections(text)
    assert sections["wet_read"] == "___ ___ 2:15 PM Possible small left effusion."
    assert sections["body"] == "PA AND LATERAL CHEST"
    assert sections["impression"] == "No acute process."


def test_header_words_inside_sentences_are_not_headers():
    text = "The findings of the prior study persist. Impression of the trachea is unchanged."
    sections = extract_sections(text)
    assert sections["body"] == text
    assert sections["findings"] == sections["impression"] == ""


def test_repeated_section_is_concatenated():
    sections = extract_sections("IMPRESSION: Small effusion.\nADDENDUM: none\nIMPRESSION: No pneumothorax.")
    assert sections["impression"] == "Small effusion. No pneumothorax."
    assert sections["addendum"] == "none"


def test_report_without_headers_is_body():
    assert extract_sections("Heart size normal.\n Lungs clear.")["body"] == "Heart size normal. Lungs clear."
    with pytest.raises(TypeError, match="extract_sections"):
        extract_sections(None)


def test_split_sentences_keeps_abbreviations_and_decimals():
    text = "1. ET tube ends 2.5 cm above the carina. 2. Compared to Dr. ___ vs. prior, no change.  Effusion?  Yes."
    assert split_sentences(text) == [
        "ET tube ends 2.5 cm above the carina.", "Compared to Dr. ___ vs. prior, no change.", "Effusion?", "Yes."]
    assert split_sentences("  ") == []


def test_clean_prompt_text_drops_numbers_blanks_and_notifications():
    text = "1. Small left effusion, new since ___. 2. Dr. ___ was notified by telephone at 3 pm."
    assert clean_prompt_text(text) == "Small left effusion, new since."


def test_prompt_prefers_impression_then_findings_then_text():
    assert prompt_from_report(MIMIC_REPORT) == "Right lower lobe pneumonia."
    assert prompt_from_report("FINDINGS: Mild cardiomegaly.\nCOMPARISON: ___") == "Mild cardiomegaly."
    assert prompt_from_report("INDICATION: cough\n\nSmall right pneumothorax.") == "INDICATION: cough Small right pneumothorax."
    assert prompt_from_report("Moderate pulmonary edema.") == "Moderate pulmonary edema."


def test_findings_prompt_uses_the_findings_section_only():
    assert prompt_from_report(MIMIC_REPORT, section="findings") == (
        "There is a new opacity in the right lower lobe. There is no pleural effusion or pneumothorax. "
        "The heart size is normal.")
    assert prompt_from_report(MIMIC_REPORT, max_tokens=12, section="findings") == (
        "There is a new opacity in the right lower lobe.")
    assert prompt_from_report("IMPRESSION: Mild cardiomegaly.", section="findings") == ""
    with pytest.raises(ValueError, match="section"):
        prompt_from_report(MIMIC_REPORT, section="history")


def test_prompt_cap_in_words_cuts_at_sentence_end():
    text = "IMPRESSION: Small left effusion. Mild cardiomegaly with pulmonary edema. No pneumothorax."
    assert prompt_from_report(text, max_tokens=9) == "Small left effusion. Mild cardiomegaly with pulmonary edema."
    assert prompt_from_report(text, max_tokens=8) == "Small left effusion. Mild cardiomegaly with pulmonary edema."
    assert prompt_from_report(text, max_tokens=7) == "Small left effusion."
    assert prompt_from_report(text, max_tokens=2) == "Small left"
    with pytest.raises(ValueError, match="max_tokens"):
        prompt_from_report(text, max_tokens=0)


class _CharacterTokenizer:
    """One token per non-space character: makes BPE counts differ from word counts."""

    def tokenize(self, text):
        return [c for c in text if not c.isspace()]


def test_prompt_cap_counts_tokenizer_tokens():
    text = "IMPRESSION: Small effusion. Mild edema. No pneumothorax."
    tokenizer = _CharacterTokenizer()
    assert prompt_from_report(text, max_tokens=24, tokenizer=tokenizer) == "Small effusion. Mild edema."
    assert prompt_from_report(text, max_tokens=23, tokenizer=tokenizer) == "Small effusion."
    assert prompt_from_report(text, max_tokens=13, tokenizer=tokenizer) == "Small"


def test_prompt_cap_with_clip_tokenizer():
    try:
        from cxr_ldm.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer()
    except (ImportError, OSError) as error:
        pytest.skip(f"embedded CLIP tokenizer unavailable: {error}")
    sentence = "Moderate right pleural effusion with adjacent compressive atelectasis."
    text = "IMPRESSION: " + " ".join([sentence] * 12)
    per_sentence = len(tokenizer.tokenize(sentence))
    prompt = prompt_from_report(text, max_tokens=75, tokenizer=tokenizer)
    assert prompt == " ".join([sentence] * (75 // per_sentence))
    assert len(tokenizer(prompt)["input_ids"]) <= 77



def test_long_texts_are_counted_exactly_without_the_too_long_warning():
    """fit_sentences counts CLIP tokens word by word: the count of the whole text, without transformers'
    warning that a text is longer than the model's prompt length (the very length being measured)."""
    from cxr_ldm.data.tokenizer import load_tokenizer, set_prompt_length
    key = "sequence-length-is-longer-than-the-specified-maximum"
    sentence = "Moderate right pleural effusion with adjacent compressive atelectasis."
    measured, fitted = load_tokenizer(), load_tokenizer()
    for tokenizer in (measured, fitted):
        set_prompt_length(tokenizer, 48)
    per_sentence = len(measured.tokenize(sentence))
    assert len(measured.tokenize(" ".join([sentence] * 6))) == 6 * per_sentence > 48
    assert key in measured.deprecation_warnings  # the whole text warned
    assert fit_sentences([sentence] * 6, 48, fitted) == " ".join([sentence] * (48 // per_sentence))
    assert key not in fitted.deprecation_warnings
