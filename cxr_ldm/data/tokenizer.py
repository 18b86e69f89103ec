"""CLIP BPE tokenizer: the embedded openai/clip-vit-large-patch14 vocabulary, or a checkpoint's own.

The embedded files (`cxr_ldm/assets/tokenizer/`) are the vocabulary Stable Diffusion 1.x uses: 49408 entries,
`<|startoftext|>` = 49406, `<|endoftext|>` = 49407 (also the padding token), 77 tokens per prompt.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import transformers

_VOCAB_FILES = ("vocab.json", "merges.txt")


def embedded_tokenizer_dir() -> Path:
    """The folder holding the packaged CLIP vocabulary."""
    return Path(str(resources.files("cxr_ldm") / "assets" / "tokenizer"))


def _tokenizer_dir(path: str | os.PathLike) -> Path:
    """`path` itself if it holds tokenizer files, else its `tokenizer/` subfolder (a pipeline folder)."""
    path = Path(path)
    for candidate in (path, path / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or all((candidate / f).is_file() for f in _VOCAB_FILES):
            return candidate
    raise FileNotFoundError(
        f"no CLIP tokenizer in {path}: expected vocab.json and merges.txt (or tokenizer.json) in {path} "
        f"or in {path / 'tokenizer'}")


def load_tokenizer(path: str | os.PathLike | None = None) -> transformers.CLIPTokenizer:
    """Loads a CLIP tokenizer from local files only.

    Args:
      path: None for the embedded SD 1.x vocabulary; otherwise a tokenizer folder or a diffusers
        pipeline folder with a `tokenizer/` subfolder.
    """
    folder = embedded_tokenizer_dir() if path is None else _tokenizer_dir(path)
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str] | str, max_length: int = 77) -> np.ndarray:
    """Token ids of `texts`, each `<|startoftext|> ... <|endoftext|>`, padded with the pad token.

    Longer texts are cut to `max_length` tokens with the end token kept last, as CLIPTokenizer does.

    Returns:
      int32 array (B, max_length).
    """
    if isinstance(texts, str):
        texts = [texts]
    encoded = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="np")
    return np.asarray(encoded["input_ids"], dtype=np.int32).reshape(len(texts), max_length)
