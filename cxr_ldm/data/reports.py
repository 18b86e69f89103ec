"""Free-text chest X-ray reports (MIMIC-CXR style): sections, sentences and prompts.

A MIMIC-CXR report looks like::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     INDICATION:  ___ with cough, eval for pneumonia
     COMPARISON:  ___
     FINDINGS:
     Lungs are clear.  There is no pleural effusion or
     pneumothorax.
     IMPRESSION:  No acute cardiopulmonary process.

Headers may come in any case, with or without the colon when they stand alone on an
upper-case line, or inline after a sentence ("... clear. IMPRESSION: normal").
De-identification blanks ("___") are kept by `extract_sections`.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol

# Header spelling (lower case, single spaces) -> the section keys it fills.
_HEADER_KEYS: dict[str, tuple[str, ...]] = {
    "findings and impression": ("findings", "impression"),
    "impression and findings": ("findings", "impression"),
    "findings/impression": ("findings", "impression"),
    "findings & impression": ("findings", "impression"),
    "findings": ("findings",),
    "finding": ("findings",),
    "impressions": ("impression",),
    "impression": ("impression",),
    "conclusions": ("impression",),
    "conclusion": ("impression",),
    "indications": ("indication",),
    "indication": ("indication",),
    "clinical indication": ("indication",),
    "reason for examination": ("indication",),
    "reason for exam": ("indication",),
    "reason for study": ("indication",),
    "history": ("history",),
    "clinical history": ("history",),
    "clinical information": ("history",),
    "comparisons": ("comparison",),
    "comparison": ("comparison",),
    "technique": ("technique",),
    "examination": ("examination",),
    "type of examination": ("examination",),
    "exam": ("examination",),
    "recommendations": ("recommendation",),
    "recommendation(s)": ("recommendation",),
    "recommendation": ("recommendation",),
    "notification": ("notification",),
    "addendum": ("addendum",),
    "wet read": ("wet_read",),
    "final report": ("body",),
}
# Headers recognised without a following colon anywhere at a line start.
_COLON_OPTIONAL = frozenset({"wet read", "final report", "addendum"})

SECTION_KEYS: tuple[str, ...] = (
    "findings", "impression", "indication", "history", "comparison", "technique",
    "examination", "recommendation", "notification", "addendum", "wet_read", "body",
)
"""Keys of `extract_sections`; "body" holds text under no recognised header."""

_HEADER_RE = re.compile(
    r"(?:^[ \t]*|(?<=[.!?])[ \t]+)(?P<header>"
    + "|".join(
        r"[ \t]+".join(re.escape(word) for word in name.split(" "))
        for name in sorted(_HEADER_KEYS, key=len, reverse=True)
    )
    + r")(?![\w(&/])[ \t]*(?P<colon>:)?",
    re.IGNORECASE | re.MULTILINE,
)

# Abbreviations whose period does not end a sentence.
_ABBREVIATIONS = ("dr", "drs", "mr", "mrs", "ms", "st", "vs", "approx", "e.g", "i.e", "fig")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9_])")
_COMMUNICATION_RE = re.compile(
    r"\b(discussed|communicated|notified|paged|telephoned|telephone|called|conveyed)\b.*"
    r"\b(dr|with|to|by|at)\b",
    re.IGNORECASE,
)
# "1. " or "2) " opening the text or following a sentence end or a colon.
_LIST_NUMBER_RE = re.compile(r"(?:^|(?<=[.!?:] ))\d{1,2}[.)] +(?=\S)")


class Tokenizer(Protocol):
    """Anything with a Hugging Face style `tokenize(text) -> list[str]` (no special tokens)."""

    def tokenize(self, text: str) -> list[str]: ...


def normalize_whitespace(text: str) -> str:
    """Joins wrapped lines and collapses runs of whitespace to one space."""
    return " ".join(text.split())


def extract_sections(text: str) -> dict[str, str]:
    """Splits a report into its sections.

    Args:
      text: the report as free text.

    Returns:
      A dict with every key of `SECTION_KEYS`, each the whitespace-normalised text of that
      section ("" when absent). "FINDINGS AND IMPRESSION" fills both "findings" and
      "impression"; "CONCLUSION" fills "impression"; a section named twice is concatenated.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_sections expects the report as str, got {type(text).__name__}")
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header(m, text)]
    sections = {key: [] for key in SECTION_KEYS}
    starts = [m.start("header") for m in headers] + [len(text)]
    sections["body"].append(text[: starts[0]])
    for match, end in zip(headers, starts[1:]):
        name = " ".join(match.group("header").lower().split())
        for key in _HEADER_KEYS[name]:
            sections[key].append(text[match.end() : end])
    return {key: normalize_whitespace(" ".join(parts)) for key, parts in sections.items()}


def _is_header(match: re.Match, text: str) -> bool:
    """A colon follows, or the header may omit it, or it stands alone on an upper-case line."""
    if match.group("colon"):
        return True
    name = " ".join(match.group("header").lower().split())
    at_line_start = match.start() == 0 or text[match.start() - 1] == "\n"
    if name in _COLON_OPTIONAL and at_line_start:
        return True
    rest_of_line = text[match.end() :].split("\n", 1)[0]
    return at_line_start and match.group("header").isupper() and not rest_of_line.strip()


def split_sentences(text: str) -> list[str]:
    """Splits text at ".", "!" or "?" followed by a capital, digit or blank.

    Whitespace is normalised and list numbers ("1. ", "2) ") are dropped first. Periods of
    common abbreviations ("Dr.", "vs.", "approx.") and decimals do not split.
    """
    text = _LIST_NUMBER_RE.sub("", normalize_whitespace(text))
    if not text:
        return []
    sentences, start = [], 0
    for boundary in _SENTENCE_END_RE.finditer(text):
        last_word = text[start : boundary.start()].rsplit(" ", 1)[-1].rstrip(".!?").lower()
        if last_word in _ABBREVIATIONS and text[boundary.start() - 1] == ".":
            continue
        sentences.append(text[start : boundary.start()])
        start = boundary.end()
    sentences.append(text[start:])
    return [s for s in sentences if s]


def clean_prompt_text(text: str) -> str:
    """Removes list numbers, de-identification blanks and sentences about who was told.

    "1. Small left effusion. 2. Findings discussed with Dr. ___ at 9am." -> "Small left effusion."
    """
    kept = []
    for sentence in split_sentences(text):
        if _COMMUNICATION_RE.search(sentence):
            continue
        sentence = re.sub(r"_{2,}", " ", sentence)
        sentence = re.sub(r"\s+([,.;:!?)])", r"\1", normalize_whitespace(sentence))
        sentence = re.sub(r"([(])\s+", r"\1", sentence).strip(" ,;:")
        if re.search(r"\w", sentence):
            kept.append(sentence)
    return " ".join(kept)


def prompt_from_report(text: str, max_tokens: int = 75, tokenizer: Tokenizer | None = None,
                       section: str = "impression") -> str:
    """The conditioning prompt for one report.

    section "impression" uses the impression, else the findings, else the text under no header,
    else the whole text; section "findings" uses the FINDINGS section only ("" when the report has
    none). The text is cleaned by `clean_prompt_text`, then capped to `max_tokens` tokens: CLIP BPE
    tokens (without the start/end tokens) when `tokenizer` is given, whitespace words otherwise.
    The cut falls at a sentence end unless the first sentence alone is too long.
    """
    if max_tokens < 1:
        raise ValueError(f"prompt_from_report: max_tokens must be >= 1, got {max_tokens}")
    if section not in ("impression", "findings"):
        raise ValueError(f"prompt_from_report: section must be 'impression' or 'findings', got {section!r}")
    sections = extract_sections(text)
    if section == "findings":
        source = sections["findings"]
    else:
        source = sections["impression"] or sections["findings"] or sections["body"] or text
    return fit_sentences(split_sentences(clean_prompt_text(source)), max_tokens, tokenizer)


def fit_sentences(sentences: list[str], max_tokens: int, tokenizer: Tokenizer | None = None) -> str:
    """The leading sentences that fit in `max_tokens` tokens, joined (as in `prompt_from_report`); the
    first sentence cut at a word when it alone is too long."""
    if tokenizer is None:
        count: Callable[[str], int] = lambda s: len(s.split())
    else:
        # Word by word: CLIP's BPE never joins across whitespace, and transformers' tokenize() warns about
        # any text longer than the model's prompt length, which is what is being measured here.
        count = lambda s: sum(len(tokenizer.tokenize(word)) for word in s.split())
    kept: list[str] = []
    used = 0  # both counts add up word by word, so the joined text's count is the sum of its sentences'
    for sentence in sentences:
        used += count(sentence)
        if used > max_tokens:
            break
        kept.append(sentence)
    if kept or not sentences:
        return " ".join(kept)
    return _truncate_words(sentences[0], max_tokens, count)


def _truncate_words(sentence: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest word prefix of `sentence` with at most `max_tokens` tokens (binary search)."""
    words = sentence.split()
    low, high = 0, len(words)  # count(prefix of `low` words) <= max_tokens holds throughout
    while low < high:
        middle = (low + high + 1) // 2
        if count(" ".join(words[:middle])) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])
