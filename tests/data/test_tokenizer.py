"""The embedded CLIP vocabulary tokenizes as openai/clip-vit-large-patch14 (Stable Diffusion 1.x); a BERT
text encoder's WordPiece vocabulary loads from its folder and tokenizes as BERT's algorithm says."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import regex

from cxr_ldm.data.tokenizer import (
    embedded_tokenizer_dir,
    load_tokenizer,
    load_wordpiece_tokenizer,
    prompt_length,
    set_prompt_length,
    tokenize,
    truncation,
)

SENTENCES = [
    "moderate right pleural effusion. mild cardiomegaly.",
    "no acute cardiopulmonary process; lungs are clear bilaterally.",
    "interval placement of a right internal jugular central venous catheter with tip at the cavoatrial junction",
    "small left apical pneumothorax (approximately 1.5 cm), unchanged since 03/12/2019!",
    "it's pt's 2nd film: ett 4 cm above the carina, ng tube's tip isn't visualized.",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    """CLIP's SimpleTokenizer algorithm (lowercase text, no ftfy), built from merges.txt alone."""

    def __init__(self, merges_file):
        lines = merges_file.read_text(encoding="utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        self.merges = [tuple(line.split()) for line in lines]
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.byte_table = _bytes_to_unicode()
        symbols = list(self.byte_table.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in self.merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)

    def _bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = [self.encoder["<|startoftext|>"]]
        for word in self.pattern.findall(" ".join(text.split()).lower()):
            word = "".join(self.byte_table[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(word))
        return ids + [self.encoder["<|endoftext|>"]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return ReferenceBPE(embedded_tokenizer_dir() / "merges.txt")


def test_vocab_file_follows_clip_construction(reference):
    vocab = json.loads((embedded_tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab == reference.encoder


def test_known_prompt_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_radiology_sentences_match_reference_bpe(tokenizer, reference):
    for text in SENTENCES:
        assert tokenizer(text).input_ids == reference.encode(text), text


def test_tokenize_pads_and_truncates_keeping_eos(tokenizer, reference):
    long_text = " ".join(SENTENCES * 3)
    ids = tokenize(tokenizer, [SENTENCES[0], long_text], max_length=77)
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    short = reference.encode(SENTENCES[0])
    np.testing.assert_array_equal(ids[0], short + [49407] * (77 - len(short)))
    full = reference.encode(long_text)
    assert len(full) > 77
    np.testing.assert_array_equal(ids[1], full[:76] + [49407])
    np.testing.assert_array_equal(tokenize(tokenizer, SENTENCES[1], max_length=16)[0],
                                  reference.encode(SENTENCES[1])[:15] + [49407])


def test_truncation_gives_the_start_of_a_text_that_a_prompt_holds(tokenizer):
    text = SENTENCES[2]
    assert truncation(tokenizer, text) == (text, 24)  # it fits in 77 tokens
    kept, num_tokens = truncation(tokenizer, text, max_length=8)
    assert (kept, num_tokens) == ("interval placement of a right internal", 24)
    np.testing.assert_array_equal(tokenize(tokenizer, kept, 8), tokenize(tokenizer, text, 8))  # what the prompt holds
    assert truncation(tokenizer, "Mild cardiomegaly.", 8) == ("Mild cardiomegaly.", 8)  # exactly full: not cut
    assert truncation(tokenizer, "Mild cardiomegaly.", 7) == ("Mild cardiomegaly", 8)


def test_load_from_pipeline_folder(tmp_path, tokenizer):
    shutil.copytree(embedded_tokenizer_dir(), tmp_path / "tokenizer")
    loaded = load_tokenizer(tmp_path)
    assert loaded("effusion").input_ids == tokenizer("effusion").input_ids


def test_missing_files_error_names_folder(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_prompt_length_is_saved_with_the_tokenizer_and_used_by_default(tmp_path, reference):
    short = load_tokenizer()
    set_prompt_length(short, 24)
    ids = tokenize(short, SENTENCES[2])
    assert ids.shape == (1, 24)
    np.testing.assert_array_equal(ids[0], reference.encode(SENTENCES[2])[:23] + [49407])
    short.save_pretrained(tmp_path / "tokenizer")
    reloaded = load_tokenizer(tmp_path)
    assert prompt_length(reloaded) == 24 and tokenize(reloaded, SENTENCES[2]).tolist() == ids.tolist()
    assert prompt_length(load_tokenizer()) == 77  # the embedded files are untouched
    with pytest.raises(ValueError, match="at least the start and end"):
        set_prompt_length(short, 1)


def test_a_tokenizer_folder_without_a_length_pads_to_77(tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(embedded_tokenizer_dir(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(folder)
    assert loaded.model_max_length > 10**6 and prompt_length(loaded) == 77
    assert tokenize(loaded, "effusion").shape == (1, 77)


WORDPIECE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ";", "mild", "moderate", "right", "left",
                   "pleural", "eff", "##usion", "card", "##io", "##me", "##gal", "##y", "no", "acute", "process",
                   "tube", "lung", "##s", "are", "clear", "bi", "##lateral", "##ly", "small", "pneumo", "##thorax"]


def reference_wordpiece(text: str) -> list[int]:
    """BERT's uncased tokenization written out for ASCII text: lowercase, split on whitespace and punctuation,
    greedy longest-match-first pieces ("##" inside a word), [UNK] for a word that does not split."""
    index = {token: i for i, token in enumerate(WORDPIECE_VOCAB)}
    ids = [index["[CLS]"]]
    for word in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower()):
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and ("##" * bool(start) + word[start:end]) not in index:
                end -= 1
            if end == start:
                pieces = [index["[UNK]"]]
                break
            pieces.append(index["##" * bool(start) + word[start:end]])
            start = end
        ids += pieces
    return ids + [index["[SEP]"]]


def test_wordpiece_tokenizer_loads_from_a_text_encoder_folder(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB) + "\n")
    tokenizer = load_wordpiece_tokenizer(tmp_path)
    tokenizer.save_pretrained(tmp_path / "saved")  # the tokenizer.json layout
    saved = load_wordpiece_tokenizer(tmp_path / "saved")
    sentences = SENTENCES[:2] + ["Moderate right pleural effusion. Mild Cardiomegaly, NG-tube; small pneumothorax."]
    for text in sentences:
        assert tokenizer(text).input_ids == saved(text).input_ids == reference_wordpiece(text), text
    ids = tokenize(tokenizer, sentences, max_length=24)  # padded with [PAD] = 0
    for row, text in zip(ids, sentences):
        want = reference_wordpiece(text)
        np.testing.assert_array_equal(row, want + [0] * (24 - len(want)))


def test_missing_wordpiece_files_error_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no WordPiece tokenizer .*vocab\.txt \(or tokenizer\.json\)"):
        load_wordpiece_tokenizer(tmp_path)


def test_importing_the_tokenizers_without_pytorch_prints_nothing():
    """transformers' "PyTorch was not found. Models won't be available ..." is not for us: we use its tokenizers."""
    hide_torch = "import sys\nsys.modules['torch'] = None  # as if PyTorch were not installed\n"
    result = subprocess.run([sys.executable, "-c", hide_torch + "import cxr_ldm.data.tokenizer"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "PyTorch was not found" not in result.stderr + result.stdout
