"""Writes a labelled synthetic CXR data set with a text-to-image checkpoint.

    python -m cxr_ldm.synthesize --checkpoint workdir/default --out synth --like phantom_cxr/64:train --num 6000
    python -m cxr_ldm.synthesize --checkpoint W --out synth --prompts prompts.csv --num 512 --format dicom
    python train.py --config.data.name=synthetic_cxr --config.data.config=64 --config.data.data_dir=synth ...

Prompts: the `prompt` column of a CSV (other columns ignored), cycled to --num rows; or (--like
NAME[/CONFIG][:SPLIT], split "train" by default) drawn at random from the prompts of a data set's split.
--balance draws them so that every label some prompt states positive is stated by at least --min-count
rows. Row i's prompt is fixed before any image is drawn; its image starts from the noise of seed
--seed + i (with --filter, draw t >= 1 from --seed + t * --num + i). Its labels and sides are what
`labeler.label_report_details` reads in the prompt.

--out DIR holds
  synthetic_cxr/<R>/1.0.0/  the TFDS data set: split "train" in row order (data/builders/synthetic_cxr.py)
  images/<row>.png|.dcm     each row's image: an 8-bit PNG equal to the data set's, or a 16-bit DICOM whose
                            pixels p give the data set's as (p + 128) // 257
  manifest.csv              a line per row: file, prompt, the 14 CheXpert labels (1, 0, -1, blank: not
                            stated), seed, checkpoint digest, sampler, steps, guidance
  README.md                 the dataset card: what made it, how many, label counts, rejections
  synthesis.json            the run's settings; a run of other settings into the folder is refused
  shards/<k>.json           the rows of finished shard k

Rows are written in shards of --shard-size; process p of a multi-host run (jax.process_index()) writes the
shards k with k % process_count == p, and a --batch-size that divides over its local devices is sampled across
them (`Pipeline`; the images are those one device draws). A shard's files are renamed into place once it is whole, its
array_record file last, so a rerun skips finished shards and redoes the others, and SIGTERM stops after
the batch in progress with exit status 0. The same settings give the same bytes, resumed or not. The
manifest, the card and dataset_info.json are written once every shard is.

--filter keeps an image only when the judge (--judge DIR, a saved `evaluation.classifier.FindingClassifier`)
detects every major finding its prompt states and no other (the evaluation's presence verdict); a rejected
row is drawn again from its next seed, up to --max-tries draws, and left out when none passes.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn, Self

import jax
import numpy as np
from tqdm import tqdm

from cxr_ldm.cli_types import number, positive_int
from cxr_ldm.data import builders
from cxr_ldm.data.builders import common, synthetic_cxr
from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.data.input_pipeline import data_source
from cxr_ldm.evaluation.classifier import FindingClassifier
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS, allowed_findings
from cxr_ldm.io.compilation_cache import NO_CACHE_HELP, enable_compilation_cache
from cxr_ldm.io.dicom import write_dicom
from cxr_ldm.io.run_folder import EXPORT_DIRNAME, folder_digest, write_file_atomically
from cxr_ldm.pipeline import Pipeline

SAMPLERS = ("ddim", "dpmpp_2m")  # deterministic given the start noise
FORMATS = ("png", "dicom")
SETTINGS_FILE, MANIFEST_FILE, CARD_FILE = "synthesis.json", "manifest.csv", "README.md"
SHARDS_DIR, IMAGES_DIR = "shards", "images"


def _fail(message: str) -> NoReturn:
    """Stops on bad input as argparse does: one `error:` line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="diffusers StableDiffusionPipeline folder or a train.py workdir")
    p.add_argument("--out", required=True, help="the data set folder (a rerun resumes it)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="a CSV file with a `prompt` column")
    source.add_argument("--like", help="NAME[/CONFIG][:SPLIT]: draw prompts from that data set's split")
    p.add_argument("--data-dir", default="~/tensorflow_datasets", help="TFDS folder of the --like data set")
    p.add_argument("--num", type=positive_int, required=True, help="rows (images) in all")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--guidance", type=number(1.0, note=" (1 = no guidance)"), default=4.0)
    p.add_argument("--seed", type=int, default=0, help="row i starts from the noise of seed + i")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--balance", action="store_true", help="every stated label in at least --min-count rows")
    p.add_argument("--min-count", type=positive_int, default=None,
                   help="with --balance (default: --num // the number of labels the prompts state)")
    p.add_argument("--filter", action="store_true", help="keep only images the --judge finds the prompt in")
    p.add_argument("--judge", default=None, help="with --filter: a saved FindingClassifier folder")
    p.add_argument("--max-tries", type=positive_int, default=4, help="with --filter: draws per row")
    p.add_argument("--format", choices=FORMATS, default="png", help="image files beside the data set")
    p.add_argument("--shard-size", type=positive_int, default=256, help="rows per shard")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per sampler call")
    p.add_argument("--no-compilation-cache", action="store_true", help=NO_CACHE_HELP)
    args = p.parse_args(argv)
    if args.filter != (args.judge is not None):
        p.error("--filter and --judge go together")
    if args.min_count is not None and not args.balance:
        p.error("--min-count needs --balance")
    return args


def read_csv_prompts(path: str) -> list[str]:
    """The non-blank values of the `prompt` column of a CSV file, in order."""
    file = Path(path)
    if not file.is_file():
        _fail(f"--prompts {file} does not exist")
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "prompt" not in (reader.fieldnames or ()):
            _fail(f"--prompts {file}: expected a `prompt` column, found {reader.fieldnames or []}")
        prompts = [row["prompt"].strip() for row in reader if (row["prompt"] or "").strip()]
    if not prompts:
        _fail(f"--prompts {file}: the `prompt` column is empty")
    return prompts


def dataset_prompts(spec: str, data_dir: str) -> list[str]:
    """The "prompt" feature of every example of NAME[/CONFIG][:SPLIT] (built in data_dir if absent)."""
    name, _, split = spec.partition(":")
    try:
        builder = builders.prepare(name, os.path.expanduser(data_dir))
        source = data_source(builder, split or "train", decode_images=False)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(f"--like {spec}: {e}")
    prompts = [common.as_text(source[i]["prompt"]) for i in range(len(source))]
    if not prompts:
        _fail(f"--like {spec}: the split is empty")
    return prompts


def plan_prompts(pool: list[str], num: int, seed: int, *, draw: bool, min_count: int | None) -> list[str]:
    """The prompts of the `num` rows.

    draw False: `pool` cycled; True: drawn with replacement. With min_count (--balance; 0: --num // the number
    of labels stated positive by some prompt), first, rarest label first, prompts stating each label are
    drawn until it is stated by min_count rows, then the rest as above, and the rows are shuffled.
    """
    rng = np.random.default_rng([seed, 7])
    if min_count is None:
        indices = rng.integers(len(pool), size=num) if draw else np.arange(num) % len(pool)
        return [pool[i] for i in indices]
    positive = np.stack([synthetic_cxr.prompt_labels(p)[0] for p in pool]) == 1  # (P, 14)
    stated = [j for j in np.argsort(positive.sum(0), kind="stable") if positive[:, j].any()]
    min_count = min_count or num // max(len(stated), 1)
    chosen, counts = [], np.zeros(len(CHEXPERT_LABELS), np.int64)
    for j in stated:
        candidates = np.flatnonzero(positive[:, j])
        while counts[j] < min_count:
            k = int(rng.choice(candidates))
            chosen.append(k)
            counts += positive[k]
    if len(chosen) > num:
        _fail(f"--balance: {len(chosen)} rows are needed for every label to reach --min-count {min_count}, "
              f"more than --num {num}")
    rest = num - len(chosen)
    chosen += list(rng.integers(len(pool), size=rest)) if draw else [i % len(pool) for i in range(rest)]
    return [pool[chosen[i]] for i in rng.permutation(num)]


def pipeline_folder(checkpoint: str) -> Path:
    """The diffusers folder of --checkpoint (itself, or a workdir's export)."""
    path = Path(checkpoint)
    for folder in (path, path / EXPORT_DIRNAME):
        if (folder / "model_index.json").is_file():
            return folder
    _fail(f"--checkpoint {path}: " + ("does not exist" if not path.exists() else
                                      "neither a diffusers pipeline folder nor a finished train.py workdir"))


def check_out(out: Path, settings: dict) -> None:
    """Records `settings` in out/synthesis.json, or stops if the folder holds another run (or other files)."""
    file = out / SETTINGS_FILE
    if file.is_file():
        held = json.loads(file.read_text())
        changed = sorted(k for k in settings.keys() | held.keys() if settings.get(k) != held.get(k))
        if changed:
            _fail(f"--out {out} holds another run (different {', '.join(changed)}); give a new --out")
        return
    if out.exists() and any(out.iterdir()):
        _fail(f"--out {out} is not empty and holds no {SETTINGS_FILE}: give a new or empty folder")
    write_file_atomically(str(file), json.dumps(settings, indent=2, sort_keys=True) + "\n")


def judge_accepts(judge: FindingClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int) -> np.ndarray:
    """Presence verdicts: uint8 images (B, R, R, 1) and their prompts' labels int8 (B, 14) -> bool (B,): every
    major finding stated positive that the judge knows is detected, and no other major finding but those the
    stated ones (positive or uncertain) imply."""
    found = judge.predict(images, batch_size=batch_size).positive
    verdicts = []
    for row, detected in zip(labels, found):
        stated = {CHEXPERT_LABELS[j] for j in np.flatnonzero(row == 1)}
        allowed = allowed_findings(stated | {CHEXPERT_LABELS[j] for j in np.flatnonzero(row == -1)})
        seen = {name for name, flag in zip(judge.observations, detected) if flag}
        wanted = {name for name in stated if name in MAJOR_FINDINGS and name in judge.observations}
        verdicts.append(wanted <= seen and not (seen & set(judge.major_findings)) - allowed)
    return np.asarray(verdicts, bool)


class _Stop:
    """SIGTERM sets `requested` (polled between batches); the previous handler is back on exit."""

    def __enter__(self) -> Self:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


class Writer:
    """Draws and writes the shards of one run (module doc)."""

    def __init__(self, args: argparse.Namespace, pipe: Pipeline, prompts: list[str], settings: dict,
                 judge: FindingClassifier | None):
        self.args, self.pipe, self.prompts, self.settings, self.judge = args, pipe, prompts, settings, judge
        self.out = Path(args.out)
        self.builder = synthetic_cxr.SyntheticCxr(config=str(settings["resolution"]), data_dir=str(self.out),
                                                  file_format="array_record")
        self.num_shards = math.ceil(args.num / args.shard_size)
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.width = max(6, len(str(args.num - 1)))

    def rows(self, shard: int) -> range:
        return range(shard * self.args.shard_size, min((shard + 1) * self.args.shard_size, self.args.num))

    def record_path(self, shard: int) -> Path:
        return Path(self.builder.data_path) / synthetic_cxr.shard_name(shard, self.num_shards)

    def _draw(self, rows: list[int], attempt: int) -> tuple[list[int], np.ndarray]:
        """Seeds and uint16 images (B, R, R) of `rows` at draw `attempt`, one batch (padded to --batch-size)."""
        a = self.args
        seeds = [a.seed + attempt * a.num + i for i in rows]
        pad = a.batch_size - len(rows)
        images = self.pipe([self.prompts[i] for i in rows] + [self.prompts[rows[-1]]] * pad,
                           num_inference_steps=a.steps, guidance_scale=a.guidance, sampler=a.sampler,
                           seed=seeds + [seeds[-1]] * pad)
        gray = np.asarray(images, np.float32)[:len(rows)].mean(-1)
        return seeds, np.round(np.clip(gray, 0.0, 1.0) * 65535.0).astype(np.uint16)

    def write_shard(self, shard: int, stop: _Stop, bar: tqdm) -> bool:
        """Draws the rows of `shard` and writes its files; False if stopped first (nothing written)."""
        a = self.args
        labels = {i: synthetic_cxr.prompt_labels(self.prompts[i])[0] for i in self.rows(shard)}
        kept, pending, draws = {}, list(self.rows(shard)), 0
        for attempt in range(a.max_tries if self.judge else 1):
            for start in range(0, len(pending), a.batch_size):
                if stop.requested:
                    return False
                batch = pending[start:start + a.batch_size]
                seeds, images = self._draw(batch, attempt)
                accepted = np.ones(len(batch), bool) if self.judge is None else judge_accepts(
                    self.judge, to_uint8(images)[..., None], np.stack([labels[i] for i in batch]), a.batch_size)
                draws += len(batch)
                kept.update({i: (s, image) for i, s, image, ok in zip(batch, seeds, images, accepted) if ok})
                if attempt == 0:
                    bar.update(len(batch))
            pending = [i for i in pending if i not in kept]
            if not pending:
                break
        entries, examples = [], []
        for i in sorted(kept):
            seed, image = kept[i]
            entries.append({"row": i, "file": self._write_image(i, seed, image), "prompt": self.prompts[i],
                            "seed": seed})
            examples.append(synthetic_cxr.make_example(to_uint8(image)[..., None], self.prompts[i], seed))
        write_file_atomically(str(self.out / SHARDS_DIR / f"{shard:05d}.json"),
                              json.dumps({"rows": entries, "draws": draws}, indent=1) + "\n")
        path = self.record_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self.builder.write_shard(tmp, examples)
        os.replace(tmp, path)
        return True

    def _write_image(self, row: int, seed: int, image: np.ndarray) -> str:
        """Writes row `row`'s image file; returns its path relative to --out."""
        name = f"{IMAGES_DIR}/{row:0{self.width}d}.{'dcm' if self.args.format == 'dicom' else 'png'}"
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.args.format == "dicom":
            write_dicom(path, image, self.prompts[row], f"{self.digest}:{row}:{seed}", self.digest)
        else:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(common.png_bytes(to_uint8(image)))
            os.replace(tmp, path)
        return name

    def finish(self) -> int:
        """Writes dataset_info.json, manifest.csv and README.md from the finished shards; returns the row count."""
        shards = [json.loads((self.out / SHARDS_DIR / f"{k:05d}.json").read_text()) for k in range(self.num_shards)]
        entries = [e for s in shards for e in s["rows"]]
        self.builder.write_info([len(s["rows"]) for s in shards],
                                sum(self.record_path(k).stat().st_size for k in range(self.num_shards)))
        labels = np.stack([synthetic_cxr.prompt_labels(e["prompt"])[0] for e in entries]) if entries else \
            np.zeros((0, len(CHEXPERT_LABELS)), np.int8)
        write_file_atomically(str(self.out / MANIFEST_FILE), self._manifest(entries, labels))
        write_file_atomically(str(self.out / CARD_FILE), self._card(labels, sum(s["draws"] for s in shards)))
        return len(entries)

    def _manifest(self, entries: list[dict], labels: np.ndarray) -> str:
        s = self.settings
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["file", "prompt", *CHEXPERT_LABELS, "seed", "checkpoint", "sampler", "steps", "guidance"])
        for entry, row in zip(entries, labels):
            writer.writerow([entry["file"], entry["prompt"],
                             *("" if v == common.NOT_MENTIONED else int(v) for v in row),
                             entry["seed"], s["checkpoint"], s["sampler"], s["steps"], s["guidance"]])
        return text.getvalue()

    def _card(self, labels: np.ndarray, draws: int) -> str:
        s, a, n = self.settings, self.args, len(labels)
        counts = "\n".join(f"| {name} | {int((labels[:, j] == 1).sum())} | {int((labels[:, j] == -1).sum())} | "
                           f"{int((labels[:, j] == 0).sum())} |" for j, name in enumerate(CHEXPERT_LABELS))
        lines = [
            "# Synthetic chest radiographs", "",
            ("**Every image here is synthetic**: drawn by a text-to-image latent diffusion model (cxr_ldm) from a "
             "text prompt. None is a radiograph of a patient. The labels are what the prompt states "
             "(`cxr_ldm.data.labeler`), not a reading of the image."), "",
            (f"- images: {n} of {s['num']} rows, {s['resolution']} x {s['resolution']} px, grayscale; "
             f"{s['format']} files in `{IMAGES_DIR}/`, one per row of `{MANIFEST_FILE}`"),
            f"- checkpoint: `{a.checkpoint}` ({s['checkpoint']})",
            f"- prompts: {s['source']}" + (f", balanced (min count {s['min_count']})" if s["balance"] else ""),
            (f"- sampler {s['sampler']}, {s['steps']} steps, guidance {s['guidance']}, seed {s['seed']} "
             f"(row i: seed {s['seed']} + i)"),
        ]
        if self.judge is not None:
            rejected = draws - n
            lines.append(f"- filter: judge `{a.judge}` ({s['judge']}); {draws} draws, {rejected} rejected "
                         f"(rejection rate {rejected / max(draws, 1):.1%}), {s['num'] - n} rows left out "
                         f"after {s['max_tries']} draws")
        lines += ["", "## Label counts (rows stating each label)", "",
                  "| label | positive | uncertain | negative |", "|---|---|---|---|", counts, "",
                  "## Reading it", "", "```python",
                  "import cxr_ldm.data.builders, tensorflow_datasets as tfds",
                  (f"source = tfds.data_source(\"synthetic_cxr/{s['resolution']}\", split=\"train\", "
                   f"data_dir=\"{self.out}\")"),
                  "```", "",
                  (f"Training on it: `python train.py --config.data.name=synthetic_cxr "
                   f"--config.data.config={s['resolution']} --config.data.resolution={s['resolution']} "
                   f"--config.data.data_dir={self.out} ...`"), ""]
        return "\n".join(lines)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint16 -> uint8, rounding p / 257 (65535 -> 255)."""
    return ((images.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _settings(args: argparse.Namespace, prompts: list[str], checkpoint: Path, min_count: int | None) -> dict:
    return {
        "checkpoint": folder_digest(str(checkpoint)),
        "source": str(Path(args.prompts).resolve()) if args.prompts else f"like {args.like}",
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16], "num": args.num,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "sampler": args.sampler,
        "format": args.format, "balance": args.balance, "min_count": min_count, "shard_size": args.shard_size,
        "batch_size": args.batch_size, "judge": folder_digest(args.judge) if args.filter else None,
        "max_tries": args.max_tries if args.filter else 1,
    }


def _prepare(args: argparse.Namespace) -> Writer:
    """Checks the inputs and --out (stopping with an `error:` line), loads the models, plans the rows."""
    checkpoint = pipeline_folder(args.checkpoint)
    pool = read_csv_prompts(args.prompts) if args.prompts else dataset_prompts(args.like, args.data_dir)
    min_count = (args.min_count or 0) if args.balance else None
    prompts = plan_prompts(pool, args.num, args.seed, draw=args.like is not None, min_count=min_count)
    judge = None
    if args.filter:
        try:
            judge = FindingClassifier.load(args.judge)
        except (FileNotFoundError, ValueError) as e:
            _fail(f"--judge {args.judge}: {e}")
    enable_compilation_cache(not args.no_compilation_cache)
    try:
        pipe = Pipeline.from_pretrained(checkpoint)
    except (FileNotFoundError, ValueError, OSError) as e:
        _fail(f"--checkpoint {args.checkpoint}: {e}")
    if pipe.default_size() not in synthetic_cxr.RESOLUTIONS:
        _fail(f"--checkpoint {args.checkpoint} draws {pipe.default_size()} px images; the data set takes "
              f"{synthetic_cxr.RESOLUTIONS}")
    settings = {**_settings(args, prompts, checkpoint, min_count), "resolution": pipe.default_size()}
    out = Path(args.out)
    check_out(out, settings)
    return Writer(args, pipe, prompts, settings, judge)


def main(argv=None) -> int:
    args = parse_args(argv)
    with _Stop() as stop:  # from here on a SIGTERM ends the run with status 0, after the batch in progress
        writer = _prepare(args)
        mine = [k for k in range(writer.num_shards) if k % jax.process_count() == jax.process_index()]
        todo = [k for k in mine if not writer.record_path(k).exists()]
        total = sum(len(writer.rows(k)) for k in mine)
        with tqdm(total=total, initial=total - sum(len(writer.rows(k)) for k in todo), desc="synthesizing",
                  unit="image") as bar:
            for shard in todo:
                if not writer.write_shard(shard, stop, bar):
                    break
        if stop.requested:
            print(f"stopped by SIGTERM; rerun the same command to resume {args.out}", file=sys.stderr)
        elif all(writer.record_path(k).exists() for k in range(writer.num_shards)):
            print(f"wrote {args.out}: {writer.finish()} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
