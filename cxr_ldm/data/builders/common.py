"""Helpers shared by the CXR TFDS builders: features, label encoding, image loading, skip accounting.

Label encoding (the `labels` feature of every builder): int8 vector of length 14 in the order of
`cxr_ldm.data.chexpert.CHEXPERT_LABELS`, with 1 = positive, 0 = negative, -1 = uncertain and
`NOT_MENTIONED` (-2) where the report does not mention the observation (None in a label dict).

Image convention: grayscale uint8 (R, R, 1). A non-square source image is cropped to its centred
square (side = shorter side, no padding) and that square is resized to R x R with PIL's bicubic
filter (antialiased when downscaling). JPEG files are first decoded in PIL draft mode (DCT-domain
downscaling by a power of two that keeps both sides >= R), which makes full-size radiographs cheap to
load. Images with more than 8 bits per pixel are min-max scaled to 0..255.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import gzip
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cxr_ldm.data.chexpert import CHEXPERT_LABELS

NOT_MENTIONED = -2
NUM_LABELS = len(CHEXPERT_LABELS)

_T = TypeVar("_T")
_R = TypeVar("_R")


def encode_labels(labels: Mapping[str, int | None]) -> np.ndarray:
    """{CheXpert name: 1 | 0 | -1 | None} -> int8 (14,); names absent from the mapping are NOT_MENTIONED."""
    unknown = set(labels) - set(CHEXPERT_LABELS)
    if unknown:
        raise ValueError(f"Unknown label names {sorted(unknown)}; expected CheXpert names {CHEXPERT_LABELS}.")
    encoded = np.full((NUM_LABELS,), NOT_MENTIONED, np.int8)
    for i, name in enumerate(CHEXPERT_LABELS):
        value = labels.get(name)
        if value is not None:
            if value not in (1, 0, -1):
                raise ValueError(f"Label {name!r} = {value!r}; expected 1, 0, -1 or None.")
            encoded[i] = value
    return encoded


def decode_labels(encoded: Sequence[int]) -> dict[str, int | None]:
    """Inverse of `encode_labels`: int8 (14,) -> {CheXpert name: 1 | 0 | -1 | None}."""
    if len(encoded) != NUM_LABELS:
        raise ValueError(f"Expected {NUM_LABELS} label values, got {len(encoded)}.")
    return {name: None if int(v) == NOT_MENTIONED else int(v) for name, v in zip(CHEXPERT_LABELS, encoded)}


def cxr_features(resolution: int, **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
    """Features common to all CXR builders (image, report, prompt, labels) plus builder-specific ones."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(resolution, resolution, 1), dtype=np.uint8, encoding_format="png"),
        "report": tfds.features.Text(doc="Full report text."),
        "prompt": tfds.features.Text(doc="Conditioning text (reports.prompt_from_report of the report)."),
        "labels": tfds.features.Tensor(
            shape=(NUM_LABELS,), dtype=np.int8,
            doc=f"CheXpert labels in CHEXPERT_LABELS order: 1, 0, -1, {NOT_MENTIONED} = not mentioned."),
        **extra,
    })


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 1) or (H, W) -> PNG file bytes (lossless; encoding with PIL keeps TensorFlow out of builds)."""
    if image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image, got {image.dtype}.")
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(image.shape[:2])).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_grayscale_uint8(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    return image.convert("L")


def load_square_grayscale(path: os.PathLike[str] | str, resolution: int) -> np.ndarray:
    """Image file -> uint8 (resolution, resolution, 1): centred square crop, bicubic resize (module doc).

    Raises OSError (incl. FileNotFoundError), ValueError or SyntaxError for unreadable files.
    """
    with Image.open(path) as image:
        image.draft("L", (resolution, resolution))
        image = _to_grayscale_uint8(image)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))  # pixels outside never leak into the filter
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8)[:, :, None]


# Exceptions PIL raises for missing, truncated or malformed files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_csv(path: epath.Path) -> list[dict[str, str]]:
    """Rows of a CSV file (optionally gzip-compressed, by the .gz suffix) as dicts keyed by header."""
    with path.open("rb") as raw:
        data = raw.read()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def require_columns(rows: list[dict[str, str]], path: epath.Path, columns: Iterable[str]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(present)}.")


def find_required(manual_dir: epath.Path, dataset: str, required: Mapping[str, Sequence[str]],
                  instructions: str) -> dict[str, epath.Path]:
    """Locates required manual-download files.

    Args:
        manual_dir: the manual download directory.
        dataset: dataset name, for the error message.
        required: {key: alternative paths relative to manual_dir}; the first existing one is used.
        instructions: the builder's MANUAL_DOWNLOAD_INSTRUCTIONS, appended to the error.

    Returns:
        {key: existing path}.

    Raises:
        FileNotFoundError listing every missing entry (with its alternatives) when any is missing.
    """
    found, missing = {}, []
    for key, alternatives in required.items():
        for relative in alternatives:
            if (manual_dir / relative).exists():
                found[key] = manual_dir / relative
                break
        else:
            missing.append(" or ".join(alternatives))
    if missing:
        listing = "\n".join(f"  - {m}" for m in missing)
        raise FileNotFoundError(
            f"{dataset}: manual_dir {manual_dir} is incomplete; missing:\n{listing}\n{instructions}")
    return found


class SkipCounter:
    """Counts examples skipped during generation, by reason, and logs the first few of each reason."""

    def __init__(self, dataset: str, split: str, log_first: int = 5):
        self.dataset, self.split, self.log_first = dataset, split, log_first
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= self.log_first:
            logging.warning("%s/%s: skipping %s (%s) %s", self.dataset, self.split, item, reason, detail)

    def record(self, info: tfds.core.DatasetInfo) -> None:
        """Logs the totals and stores them in the dataset metadata under metadata["skipped"][split]."""
        if self.counts:
            logging.warning("%s/%s: skipped %d example(s): %s", self.dataset, self.split,
                            sum(self.counts.values()), dict(self.counts))
        info.metadata.setdefault("skipped", {})[self.split] = dict(self.counts)


def ordered_parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], num_workers: int,
                         window: int = 256) -> Iterator[_R]:
    """map(fn, items) in input order, on `num_workers` threads with at most `window` results pending.

    PIL releases the GIL while decoding and resizing, so threads give real parallelism for image loads.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending: collections.deque[concurrent.futures.Future[_R]] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


def as_text(value: Any) -> str:
    """A Text feature value as read back by `tfds.data_source` (bytes) -> str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
