"""CLIP BPE tokenizer: the embedded openai/clip-vit-large-patch14 vocabulary, or a checkpoint's own; and the
WordPiece tokenizer of a BERT-family text encoder (`load_wordpiece_tokenizer`).

The embedded files (`cxr_ldm/assets/tokenizer/`) are the vocabulary Stable Diffusion 1.x uses: 49408 entries,
`<|startoftext|>` = 49406, `<|endoftext|>` = 49407 (also the padding token), 77 tokens per prompt.

Prompts are padded to `prompt_length(tokenizer)`, the tokenizer's `model_max_length` (saved in its
`tokenizer_config.json`, and what diffusers pipelines pad to). A text encoder trained from scratch with
fewer positions sets it with `set_prompt_length`, so its exported tokenizer pads to the same length. Longer
prompts are cut to it; `truncation` says what of a text a prompt keeps.
"""
from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

# transformers says "PyTorch was not found. Models won't be available ..." when it is imported without PyTorch
# (once per process): only its tokenizers are used here, which need no PyTorch.
logging.getLogger("transformers").addFilter(
    lambda record: not record.getMessage().startswith("PyTorch was not found."))
import transformers  # noqa: E402

_VOCAB_FILES = ("vocab.json", "merges.txt")
_WORDPIECE_FILES = ("vocab.txt",)


def embedded_tokenizer_dir() -> Path:
    """The folder holding the packaged CLIP vocabulary."""
    return Path(str(resources.files("cxr_ldm") / "assets" / "tokenizer"))


def _tokenizer_dir(path: str | os.PathLike, vocab_files: tuple[str, ...] = _VOCAB_FILES, kind: str = "CLIP") -> Path:
    """`path` itself if it holds tokenizer files (`vocab_files`, or tokenizer.json), else its `tokenizer/`
    subfolder (a pipeline folder); `kind` names the tokenizer in the error."""
    path = Path(path)
    for candidate in (path, path / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or all((candidate / f).is_file() for f in vocab_files):
            return candidate
    raise FileNotFoundError(
        f"no {kind} tokenizer in {path}: expected {' and '.join(vocab_files)} (or tokenizer.json) in {path} "
        f"or in {path / 'tokenizer'}")


def load_tokenizer(path: str | os.PathLike | None = None) -> transformers.CLIPTokenizer:
    """Loads a CLIP tokenizer from local files only.

    Args:
      path: None for the embedded SD 1.x vocabulary; otherwise a tokenizer folder or a diffusers
        pipeline folder with a `tokenizer/` subfolder.
    """
    folder = embedded_tokenizer_dir() if path is None else _tokenizer_dir(path)
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_wordpiece_tokenizer(path: str | os.PathLike) -> transformers.BertTokenizerFast:
    """Loads the WordPiece tokenizer of a BERT-family text encoder (CXR-BERT, PubMedBERT, RadBERT) from local
    files only: a tokenizer folder (vocab.txt, or tokenizer.json, with its tokenizer_config.json) or a folder
    with a `tokenizer/` subfolder."""
    folder = _tokenizer_dir(path, _WORDPIECE_FILES, "WordPiece")
    return transformers.BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


# What transformers sets model_max_length to when a tokenizer folder leaves it out.
_UNSET_MAX_LENGTH = 10**6
CLIP_PROMPT_LENGTH = 77


def prompt_length(tokenizer) -> int:
    """Tokens per padded prompt: the tokenizer's model_max_length, or CLIP's 77 where it is unset."""
    length = int(tokenizer.model_max_length)
    return CLIP_PROMPT_LENGTH if length >= _UNSET_MAX_LENGTH else length


def set_prompt_length(tokenizer, length: int) -> None:
    """Pads (and cuts) prompts of `tokenizer` to `length` tokens from now on, in place; the value is
    saved with the tokenizer (`save_pretrained`), so a pipeline folder keeps it."""
    if length < 2:
        raise ValueError(f"prompt length {length}: a prompt needs at least the start and end tokens")
    tokenizer.model_max_length = int(length)
    tokenizer.init_kwargs["model_max_length"] = int(length)


def tokenize(tokenizer, texts: Sequence[str] | str, max_length: int | None = None) -> np.ndarray:
    """Token ids of `texts`, each `<|startoftext|> ... <|endoftext|>`, padded with the pad token.

    Longer texts are cut to `max_length` tokens (default `prompt_length(tokenizer)`) with the end
    token kept last, as CLIPTokenizer does.

    Returns:
      int32 array (B, max_length).
    """
    if isinstance(texts, str):
        texts = [texts]
    max_length = prompt_length(tokenizer) if max_length is None else max_length
    encoded = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="np")
    return np.asarray(encoded["input_ids"], dtype=np.int32).reshape(len(texts), max_length)


def truncation(tokenizer, text: str, max_length: int | None = None) -> tuple[str, int]:
    """What a prompt of `max_length` tokens (default `prompt_length(tokenizer)`) keeps of `text`, as `tokenize`
    cuts it.

    Returns:
      (kept, num_tokens): the start of `text` up to the end of its last token kept (all of `text` when it fits;
      it may end inside a word of several tokens), and the tokens `text` takes uncut, start and end tokens
      included; `text` was cut when num_tokens > max_length.
    """
    max_length = prompt_length(tokenizer) if max_length is None else max_length
    num_tokens = len(tokenizer(text, verbose=False)["input_ids"])
    if num_tokens <= max_length:
        return text, num_tokens
    offsets = tokenizer(text, max_length=max_length, truncation=True, return_offsets_mapping=True)["offset_mapping"]
    return text[:max(end for _, end in offsets)], num_tokens
