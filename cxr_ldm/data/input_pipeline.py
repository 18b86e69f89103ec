"""Grain input pipeline over the TFDS array_record data sets (`tfds.data_source`, no TensorFlow).

Each process reads its own shard (default: `grain.sharding.ShardByJaxProcess`) and gets batches of
global_batch_size // shard_count examples, as numpy dicts:
  "image"      float32 (b, H, W, 1) in [-1, 1]
  "input_ids"  int32 (b, max_length) CLIP token ids of the prompt ("" for dropped prompts: CFG); with
               `ExampleConfig.findings_prompt_rate` > 0 some prompts are the report's FINDINGS section
               instead; with `word_order_rate` > 0 some have their words reordered within each sentence
  "labels"     int8 (b, 14) (see builders/common.py)
Randomness (shuffle order, prompt drop, prompt source, word order, crop) comes from the seed and the example's
position in the sampler only, so a run is reproducible and an iterator restored from `get_state()` (or with
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` in an Orbax CheckpointManager) yields
exactly the batches the original would have. With worker processes (worker_count > 0) each worker
batches its own share of the examples, so the batch sequence depends on worker_count as well; a
restored iterator must use the same worker_count. Images are never flipped left-right (that would
contradict the laterality a prompt states).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from cxr_ldm.data import builders, labeler, reports
from cxr_ldm.data.builders import common
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.tokenizer import prompt_length, tokenize

# Prompts whose token ids are kept per loader (or per worker process), after the first tokenization.
_MAX_CACHED_PROMPTS = 500_000
FINDINGS_PROMPT_SENTENCES = ("all", "positive")


class PromptIds:
    """Text -> int32 (max_length,) CLIP token ids, cached per distinct text (max_length None: the
    tokenizer's `prompt_length`)."""

    def __init__(self, tokenizer, max_length: int | None):
        self.tokenizer, self.max_length = tokenizer, max_length
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            ids = tokenize(self.tokenizer, [text], self.max_length)[0]
            if len(self._cache) < _MAX_CACHED_PROMPTS:
                self._cache[text] = ids
        return ids


class FindingsPrompts:
    """Report text -> its FINDINGS section as prompt text, cut at a sentence end to fit the prompt
    length ("" when the report has none), cached per report.

    sentences "all": the whole section (`reports.prompt_from_report(section="findings")`); "positive":
    only the sentences that state an observation present or uncertain (`labeler.label_report`), so that
    the prompt restates the study's findings in other words without the negatives; a study without
    any (a normal one) keeps its whole section.
    """

    def __init__(self, tokenizer, max_length: int | None, sentences: str = "all"):
        if sentences not in FINDINGS_PROMPT_SENTENCES:
            raise ValueError(f"findings prompt sentences {sentences!r}: expected one of {FINDINGS_PROMPT_SENTENCES}")
        self.tokenizer, self.sentences = tokenizer, sentences
        self.max_tokens = (max_length or prompt_length(tokenizer)) - 2  # less the start and end tokens
        self._cache: dict[str, str] = {}

    def __call__(self, report: str) -> str:
        text = self._cache.get(report)
        if text is None:
            text = self._prompt(report)
            if len(self._cache) < _MAX_CACHED_PROMPTS:
                self._cache[report] = text
        return text

    def _prompt(self, report: str) -> str:
        if self.sentences == "all":
            return reports.prompt_from_report(report, self.max_tokens, self.tokenizer, section="findings")
        sentences = reports.split_sentences(reports.clean_prompt_text(reports.extract_sections(report)["findings"]))
        positive = [s for s in sentences if _states_a_finding(s)]
        return reports.fit_sentences(positive or sentences, self.max_tokens, self.tokenizer)


def _states_a_finding(sentence: str) -> bool:
    """Whether the labeler reads an observation other than "No Finding" as present or uncertain."""
    labels = labeler.label_report(sentence)
    return any(value in (1, -1) for name, value in labels.items() if name != "No Finding")


_CLAUSE_PUNCTUATION_RE = re.compile(r"[,;:]")
_INSERTED_PUNCTUATION = (",", ".")  # what `reorder_prompt_words` may add to a prompt (`corpus_token_ids` holds it)
WORD_ORDERS = ("shuffle", "rotate")


def reorder_prompt_words(prompt: str, rng: np.random.Generator, order: str = "shuffle") -> str:
    """The prompt with its sentences in random order and the words within each sentence reordered.

    order "shuffle": each sentence's words in a random order. "rotate": a random cyclic shift of them, the
    seam marked by a comma ("Large left pneumothorax" -> "pneumothorax, Large left" or "left pneumothorax,
    Large"), which keeps every pair of neighbours but one. Clause punctuation (",", ";", ":") is dropped
    and every sentence ends with ".". Words never move from one sentence to another, so a side or a grade
    stays with the finding its sentence names. Training on some reordered prompts shows the text encoder a
    finding, its side and its grade in other places than the impressions' word order.
    """
    if order not in WORD_ORDERS:
        raise ValueError(f"word order {order!r}: expected one of {WORD_ORDERS}")
    sentences = reports.split_sentences(prompt)
    reordered = []
    for i in rng.permutation(len(sentences)):
        words = _CLAUSE_PUNCTUATION_RE.sub(" ", sentences[i]).rstrip(".!?").split()
        if not words:
            continue
        if order == "shuffle":
            reordered.append(" ".join(words[j] for j in rng.permutation(len(words))) + ".")
        else:
            seam = int(rng.integers(1, len(words))) if len(words) > 1 else len(words)
            reordered.append(", ".join(" ".join(part) for part in (words[seam:], words[:seam]) if part) + ".")
    return " ".join(reordered)


def random_crop_resize(image: np.ndarray, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """Random square crop of side U(min_scale, 1) * H at a uniform position, resized back to H x W.

    Args:
      image: uint8 (H, W, 1). rng: the example's generator. min_scale: smallest crop side / image side.
    Returns:
      uint8 (H, W, 1), bicubic. Orientation is kept (no flips, no rotation).
    """
    height, width = image.shape[:2]
    scale = rng.uniform(min_scale, 1.0)
    crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = Image.fromarray(image[top:top + crop_h, left:left + crop_w, 0])
    resized = crop.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.uint8)[:, :, None]


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, C) in 0..255 -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    """How training examples are made of a data set's records (a run config's `data` section).

    prompt_dropout: probability that an example's prompt is replaced by "" (classifier-free guidance).
    findings_prompt_rate: probability that an example's prompt is its report's FINDINGS section (cut at a
      sentence end to fit max_length) instead of its "prompt" feature (the impression); reports without
      findings keep the prompt. Findings sentences teach the text encoder other phrasings and negations.
    findings_prompt_sentences: "all" (the whole section) or "positive" (only the sentences stating a
      finding present or uncertain; a normal study's whole section), see `FindingsPrompts`.
    word_order_rate: probability that a prompt (impression or findings) has its sentences shuffled and the
      words within each sentence reordered, by `word_order` "shuffle" or "rotate" (`reorder_prompt_words`).
    augment: random square crop (side >= min_crop_scale of the image) resized back; never flips.
    oversample: {CheXpert label: factor}: every epoch repeats the studies positive (1 or -1) for a label
      that many times (`oversampled_records`), so rare findings get more of the training steps.
    max_length: tokens per prompt; None: the tokenizer's `prompt_length`.
    include_image: False leaves "image" out of the batches (and undecoded): for cached latents.
    include_index: adds "index", int64 (b,): each example's record index in the split.
    """

    prompt_dropout: float = 0.0
    findings_prompt_rate: float = 0.0
    findings_prompt_sentences: str = "all"
    word_order_rate: float = 0.0
    word_order: str = "shuffle"
    augment: bool = False
    min_crop_scale: float = 0.85
    oversample: Mapping[str, int] | None = None
    max_length: int | None = None
    include_image: bool = True
    include_index: bool = False

    def __post_init__(self):
        for name in ("prompt_dropout", "findings_prompt_rate", "word_order_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.word_order not in WORD_ORDERS:
            raise ValueError(f"word_order {self.word_order!r}: expected one of {WORD_ORDERS}.")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}.")
        if self.augment and not self.include_image:
            raise ValueError("augment=True crops the images, but include_image=False leaves them out.")

    @classmethod
    def from_config(cls, section: Mapping, **overrides) -> "ExampleConfig":
        """The fields that `section` (e.g. a run config's `data`) has, then `overrides`; other keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: section[k] for k in section.keys() if k in fields}, **overrides})


class _TrainExample(grain.transforms.RandomMap):
    """TFDS example -> {"image", "input_ids", "labels"} with prompt drop, prompt source, word order and
    optional crop (`ExampleConfig`); with `include_image` False no "image" (it was not decoded either); with
    `include_index` its record index."""

    def __init__(self, prompt_ids: PromptIds, config: ExampleConfig):
        self.prompt_ids, self.config = prompt_ids, config
        self.findings_prompts = FindingsPrompts(prompt_ids.tokenizer, prompt_ids.max_length,
                                                config.findings_prompt_sentences)

    def _prompt(self, element: dict, rng: np.random.Generator) -> str:
        # Source and word order are drawn only when their rates are > 0, so the defaults keep the random stream.
        c = self.config
        prompt = common.as_text(element["prompt"])
        if c.findings_prompt_rate > 0 and rng.random() < c.findings_prompt_rate:
            prompt = self.findings_prompts(common.as_text(element["report"])) or prompt
        if c.word_order_rate > 0 and rng.random() < c.word_order_rate:
            prompt = reorder_prompt_words(prompt, rng, c.word_order)
        return prompt

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        c = self.config
        drop = rng.random() < c.prompt_dropout
        prompt = self._prompt(element, rng)
        example = {
            "input_ids": self.prompt_ids("" if drop else prompt),
            "labels": np.asarray(element["labels"], np.int8),
        }
        if c.include_image:
            image = element["image"]
            if c.augment:
                image = random_crop_resize(image, rng, c.min_crop_scale)
            example["image"] = to_model_range(image)
        if c.include_index:
            example["index"] = np.int64(element["index"])
        return example


class _RecordView:
    """A data source over `records` (indices into `source`, repeats allowed); with `with_index` each record
    carries its index in `source` as "index". description: how records were chosen; None: all, in order."""

    def __init__(self, source, records: np.ndarray, with_index: bool, description: str | None):
        self.source, self.records, self.with_index = source, records, with_index
        self.description = description

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        index = int(self.records[position])
        record = self.source[index]
        return {**record, "index": index} if self.with_index else record

    def __repr__(self) -> str:
        # Grain checkpoints compare the data source's repr on restore; the plain indexed view keeps the
        # repr that checkpoints written before oversampling existed hold.
        if self.description is None:
            return f"IndexedSource({self.source!r})"
        return f"RecordView({self.source!r}, {self.description})"


def oversampled_records(labels: np.ndarray, factors: Mapping[str, int]) -> np.ndarray:
    """Record indices of one epoch in which a study positive (1 or -1) for a label of `factors` appears
    that label's factor times (the largest one where several apply) and every other study once.

    labels: int8 (n, 14) in CHEXPERT_LABELS order. Returns int64 (n + extra copies,), ascending.
    """
    unknown = set(factors) - set(CHEXPERT_LABELS)
    if unknown:
        raise ValueError(f"oversample names unknown labels {sorted(unknown)}; known: {list(CHEXPERT_LABELS)}.")
    bad = {name: factor for name, factor in factors.items() if int(factor) != factor or factor < 1}
    if bad:
        raise ValueError(f"oversample factors must be whole numbers >= 1, got {bad}.")
    copies = np.ones(len(labels), np.int64)
    for name, factor in factors.items():
        positive = np.isin(labels[:, CHEXPERT_LABELS.index(name)], (1, -1))
        copies = np.where(positive, np.maximum(copies, int(factor)), copies)
    return np.repeat(np.arange(len(labels)), copies)


def _labels_of(source) -> np.ndarray:
    """int8 (n, 14): the "labels" feature of every record of an undecoded data source."""
    return np.stack([np.asarray(source[i]["labels"], np.int8) for i in range(len(source))])


def corpus_token_ids(builder_or_name, split: str, data_dir: str | os.PathLike | None, tokenizer) -> np.ndarray:
    """int64 (k,), ascending: every token id a training prompt of `split` can hold: the tokens of each
    record's "prompt" (impression) and of its report, as written and cleaned (`reports.clean_prompt_text`:
    findings prompts are sentences of it), the punctuation `reorder_prompt_words` inserts, and the start, end
    and pad tokens. Reads no images."""
    source = data_source(builder_or_name, split, data_dir, decode_images=False)
    words: set[str] = set()  # CLIP's BPE never joins across whitespace: a word's tokens do not depend on context
    for index in range(len(source)):
        record = source[index]
        report = common.as_text(record["report"])
        for text in (common.as_text(record["prompt"]), report, reports.clean_prompt_text(report)):
            words.update(text.split())
    words.update(_INSERTED_PUNCTUATION)
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for word in words:
        ids.update(vocab.get(token, tokenizer.unk_token_id) for token in tokenizer.tokenize(word))
    return np.asarray(sorted(i for i in ids if i is not None), np.int64)


class _EvalExample(grain.transforms.Map):
    """TFDS example -> {"image", "input_ids", "labels", "mask"} (mask True: a real example)."""

    def __init__(self, prompt_ids: PromptIds):
        self.prompt_ids = prompt_ids

    def map(self, element: dict) -> dict:
        return {
            "image": to_model_range(element["image"]),
            "input_ids": self.prompt_ids(common.as_text(element["prompt"])),
            "labels": np.asarray(element["labels"], np.int8),
            "mask": np.bool_(True),
        }


def data_source(builder_or_name, split: str, data_dir: str | os.PathLike | None = None, *,
                decode_images: bool = True):
    """`tfds` data source of `split`; a name ("phantom_cxr/64") is prepared (built if absent) first.
    With decode_images False "image" stays the encoded file bytes (for readers that do not use it)."""
    if isinstance(builder_or_name, str):
        if data_dir is None:
            raise ValueError(f"data_dir is required to find data set {builder_or_name!r}.")
        builder_or_name = builders.prepare(builder_or_name, data_dir)
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    return builder_or_name.as_data_source(split=split, decoders=decoders)


def per_shard_batch_size(global_batch_size: int, shard_options: grain.sharding.ShardOptions) -> int:
    if global_batch_size % shard_options.shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the number of "
                         f"data shards (processes) {shard_options.shard_count}.")
    return global_batch_size // shard_options.shard_count


def _allow_worker_processes(worker_count: int) -> None:
    """Grain worker processes read absl flags; outside an absl app (notebooks, tests) take their defaults."""
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(builder_or_name, *, split: str, data_dir: str | os.PathLike | None,
                        global_batch_size: int, tokenizer, seed: int, examples: ExampleConfig = ExampleConfig(),
                        num_epochs: int | None = None, shuffle: bool = True,
                        shard_options: grain.sharding.ShardOptions | None = None,
                        worker_count: int = 0) -> grain.DataLoaderIterator:
    """Training batches of this process's shard (module doc), endless unless num_epochs is given.

    Args:
      builder_or_name: a TFDS builder, or "name/config" of `cxr_ldm.data.builders` (built if absent).
      split: TFDS split ("train", "validation", "test" or a slice such as "train[:90%]").
      data_dir: TFDS data folder (used with a name).
      global_batch_size: examples per step over all processes.
      tokenizer: a CLIPTokenizer (`cxr_ldm.data.tokenizer.load_tokenizer()`).
      seed: 0 <= seed < 2**32; fixes shuffle order, prompt drops, prompt sources and crops.
      examples: how examples are made (prompt sources, dropout, crops, oversampling; `ExampleConfig`).
      num_epochs: None repeats forever. shuffle: reshuffle every epoch.
      shard_options: default ShardByJaxProcess(drop_remainder=True).
      worker_count: Grain worker processes (0 = in this process).
    Returns:
      A `grain.DataLoaderIterator`; the final partial batch of a finite run is dropped.
    """
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    batch_size = per_shard_batch_size(global_batch_size, shard_options)
    _allow_worker_processes(worker_count)
    source = data_source(builder_or_name, split, data_dir, decode_images=examples.include_image)
    if examples.oversample:
        oversample = dict(examples.oversample)
        labels = _labels_of(data_source(builder_or_name, split, data_dir, decode_images=False))
        records = oversampled_records(labels, oversample)
        source = _RecordView(source, records, examples.include_index,
                             f"oversample={dict(sorted(oversample.items()))}")
    elif examples.include_index:
        source = _RecordView(source, np.arange(len(source)), True, None)
    sampler = grain.samplers.IndexSampler(len(source), shard_options, shuffle=shuffle,
                                          num_epochs=num_epochs, seed=seed)
    loader = grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=shard_options, worker_count=worker_count,
        operations=[
            _TrainExample(PromptIds(tokenizer, examples.max_length), examples),
            grain.transforms.Batch(batch_size, drop_remainder=True),
        ])
    return iter(loader)


def make_eval_batches(builder_or_name, *, split: str, data_dir: str | os.PathLike | None,
                      global_batch_size: int, tokenizer, num_examples: int | None = None,
                      max_length: int | None = None, shard_options: grain.sharding.ShardOptions | None = None,
                      worker_count: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `split` (or its first `num_examples`), this process's shard, no dropout.

    Shard i of n holds the contiguous examples [i * N // n, (i + 1) * N // n). Every process yields
    the same number of batches of global_batch_size // n; the last ones are padded with zero
    examples whose "mask" is False (real examples have mask True), so jitted evaluation steps see
    one shape and all processes step together.
    """
    shard_options = shard_options or grain.sharding.ShardByJaxProcess()
    batch_size = per_shard_batch_size(global_batch_size, shard_options)
    _allow_worker_processes(worker_count)
    source = data_source(builder_or_name, split, data_dir)
    total = len(source) if num_examples is None else min(num_examples, len(source))
    count, index = shard_options.shard_count, shard_options.shard_index
    if total < count:
        raise ValueError(f"split {split!r} has {total} examples to evaluate, fewer than the {count} processes.")
    start, end = index * total // count, (index + 1) * total // count
    shard = grain.MapDataset.source(source)[start:end]
    no_sharding = grain.sharding.NoSharding()
    loader = grain.DataLoader(
        data_source=shard, sampler=grain.samplers.IndexSampler(len(shard), no_sharding, num_epochs=1),
        shard_options=no_sharding, worker_count=worker_count,
        operations=[_EvalExample(PromptIds(tokenizer, max_length)),
                    grain.transforms.Batch(batch_size, drop_remainder=False)])
    num_batches = math.ceil(math.ceil(total / count) / batch_size)
    return _padded(iter(loader), batch_size, num_batches)


def _padded(batches: Iterator[dict], batch_size: int, num_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """Pads every batch to batch_size rows (zeros, mask False) and appends empty batches up to num_batches."""
    template = None
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            batch = {key: value[:0] for key, value in template.items()}
        template = batch
        missing = batch_size - len(batch["mask"])
        if missing:
            batch = {key: np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
                     for key, value in batch.items()}
        yield batch
