"""`python -m cxr_ldm.synthesize`: the data set TFDS reads back, manifest, card, DICOM files, resume after
SIGTERM, --balance, --filter with a real classifier, --like, bad input, and train.py on the written set;
all on a tiny random pipeline (16 px, 2 steps)."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("tensorflow")

import tensorflow_datasets as tfds  # noqa: E402
from absl import flags  # noqa: E402
from helpers import pipelines, scripts  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cxr_ldm import synthesize  # noqa: E402
from cxr_ldm.data.builders import common, phantom_cxr, synthetic_cxr  # noqa: E402
from cxr_ldm.data.chexpert import CHEXPERT_LABELS  # noqa: E402
from cxr_ldm.data.labeler import label_report, label_report_details  # noqa: E402
from cxr_ldm.evaluation import classifier  # noqa: E402
from cxr_ldm.training import trainer  # noqa: E402

EFFUSION, CARDIOMEGALY, NORMAL = ("Large left pleural effusion.", "Moderate cardiomegaly.",
                                  "No acute cardiopulmonary process.")
NUM, SEED = 4, 5


def _csv(path: Path, prompts, column: str = "prompt") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", column])
        writer.writerows([i, p] for i, p in enumerate(prompts))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipelines.tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory) -> Path:
    return _csv(tmp_path_factory.mktemp("prompts") / "prompts.csv", [EFFUSION, CARDIOMEGALY, NORMAL])


def _args(checkpoint: Path, out: Path, prompts: Path, *extra: str, num: int = NUM) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--prompts", str(prompts), "--num", str(num),
            "--steps", "2", "--seed", str(SEED), "--shard-size", "2", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def full_run(checkpoint, prompts_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "synth"
    assert synthesize.main(_args(checkpoint, out, prompts_csv)) == 0
    return out


def _records(out: Path, resolution: int = 16) -> list[dict]:
    source = tfds.data_source(f"synthetic_cxr/{resolution}", split="train", data_dir=str(out))
    return [source[i] for i in range(len(source))]


def _manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_data_set_holds_each_row_with_its_image_prompt_labels_sides_and_seed(full_run):
    records, manifest = _records(full_run), _manifest(full_run)
    expected_prompts = [(EFFUSION, CARDIOMEGALY, NORMAL)[i % 3] for i in range(NUM)]
    assert [common.as_text(r["prompt"]) for r in records] == expected_prompts
    assert [int(r["seed"]) for r in records] == [SEED + i for i in range(NUM)]
    assert [row["file"] for row in manifest] == [f"images/{i:06d}.png" for i in range(NUM)]
    for record, row in zip(records, manifest):
        prompt = common.as_text(record["prompt"])
        assert common.as_text(record["report"]) == prompt == row["prompt"]
        assert common.decode_labels(record["labels"]) == label_report(prompt)
        sides = {name: d["side"] for name, d in label_report_details(prompt).items()}
        assert phantom_cxr.decode_sides(record["side"]) == sides
        with Image.open(full_run / row["file"]) as image:
            np.testing.assert_array_equal(np.asarray(image)[..., None], record["image"])
        assert record["image"].shape == (16, 16, 1)
    images = np.stack([r["image"] for r in records])
    assert len({im.tobytes() for im in images}) == NUM  # seeds and prompts differ
    assert phantom_cxr.decode_sides(records[0]["side"])["Pleural Effusion"] == "left"


def test_manifest_columns_and_the_card(full_run, checkpoint):
    manifest = _manifest(full_run)
    assert list(manifest[0]) == ["file", "prompt", *CHEXPERT_LABELS, "seed", "checkpoint", "sampler", "steps",
                                 "guidance"]
    for row in manifest:
        labels = label_report(row["prompt"])
        assert {name: row[name] for name in CHEXPERT_LABELS} == {
            name: "" if v is None else str(v) for name, v in labels.items()}
        assert (row["sampler"], row["steps"], row["guidance"]) == ("ddim", "2", "4.0")
        assert row["checkpoint"].startswith("sha256:")
    assert [p.name for p in full_run.rglob("*.csv")] == ["manifest.csv"]
    assert not list(full_run.rglob("*.tmp"))
    card = (full_run / "README.md").read_text()
    assert "synthetic" in card.lower() and f"{NUM} of {NUM} rows" in card
    assert "| Pleural Effusion | 2 | 0 | 0 |" in card and "| Cardiomegaly | 1 | 0 | 0 |" in card


def test_a_run_stopped_by_sigterm_resumes_over_two_processes_to_the_same_bytes(full_run, checkpoint, prompts_csv,
                                                                              tmp_path, monkeypatch):
    out = tmp_path / "synth"
    write_shard = synthesize.Writer.write_shard

    def then_sigterm(self, shard, stop, bar):
        written = write_shard(self, shard, stop, bar)
        os.kill(os.getpid(), signal.SIGTERM)
        return written
    with monkeypatch.context() as patch:
        patch.setattr(synthesize.Writer, "write_shard", then_sigterm)
        assert synthesize.main(_args(checkpoint, out, prompts_csv)) == 0
    data = out / "synthetic_cxr" / "16" / "1.0.0"
    assert sorted(p.name for p in data.iterdir()) == ["synthetic_cxr-train.array_record-00000-of-00002"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert not (out / "manifest.csv").exists() and not list(out.rglob("*.tmp"))
    for process in (0, 1):  # process p of 2 writes the shards k with k % 2 == p; the last to finish assembles
        with monkeypatch.context() as patch:
            patch.setattr(jax, "process_count", lambda: 2)
            patch.setattr(jax, "process_index", lambda p=process: p)
            assert synthesize.main(_args(checkpoint, out, prompts_csv)) == 0
        assert (out / "manifest.csv").exists() == (process == 1)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes().replace(str(root).encode(), b"OUT")
                for p in root.rglob("*") if p.is_file()}
    assert files(out) == files(full_run)


def test_dicom_files_are_marked_synthetic_and_balance_reaches_the_minimum(checkpoint, tmp_path):
    import pydicom
    pool = _csv(tmp_path / "pool.csv", [EFFUSION, EFFUSION, EFFUSION, CARDIOMEGALY])
    cycled = synthesize.plan_prompts([EFFUSION] * 3 + [CARDIOMEGALY], NUM, SEED, draw=False, min_count=None)
    assert cycled.count(CARDIOMEGALY) == 1
    out = tmp_path / "synth"
    assert synthesize.main(_args(checkpoint, out, pool, "--format", "dicom", "--balance", "--min-count", "2")) == 0
    manifest = _manifest(out)
    assert sum(row["Cardiomegaly"] == "1" for row in manifest) >= 2
    assert sum(row["Pleural Effusion"] == "1" for row in manifest) >= 2
    for row, record in zip(manifest, _records(out)):
        assert row["file"].endswith(".dcm")
        ds = pydicom.dcmread(out / row["file"])
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "synthetic" in ds.SeriesDescription.lower()
        assert "synthetic" in ds.ImageComments.lower() and row["prompt"] in ds.ImageComments
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16
        np.testing.assert_array_equal(((pixels.astype(np.int64) + 128) // 257)[..., None], record["image"])
    assert len({pydicom.dcmread(out / row["file"]).SOPInstanceUID for row in manifest}) == NUM


def _effusion_judge(folder: Path) -> Path:
    """A real FindingClassifier whose logits ignore the image: Pleural Effusion always found, Cardiomegaly never."""
    config = classifier.TrainConfig(input_size=16, widths=(4,), feature_dim=4)
    net = classifier.make_net(config, 2, 0)
    variables = jax.tree_util.tree_map(np.asarray, net.init(jax.random.key(0), np.zeros((1, 16, 16, 1))))
    head = variables["params"]["Dense_1"]
    head["kernel"] = np.zeros_like(head["kernel"])
    head["bias"] = np.array([-10.0, 10.0], np.float32)
    classifier.FindingClassifier(("Cardiomegaly", "Pleural Effusion"), (), [0.5, 0.5], variables, config).save(folder)
    return folder


def test_filter_keeps_only_images_the_judge_finds_the_prompt_in(checkpoint, tmp_path):
    judge = _effusion_judge(tmp_path / "judge")
    loaded = classifier.FindingClassifier.load(judge)
    labels = np.stack([synthetic_cxr.prompt_labels(p)[0] for p in (EFFUSION, CARDIOMEGALY, NORMAL)])
    verdicts = synthesize.judge_accepts(loaded, np.zeros((3, 16, 16, 1), np.uint8), labels, 2)
    assert verdicts.tolist() == [True, False, False]  # cardiomegaly missed; effusion unprompted in a normal study
    out = tmp_path / "synth"
    prompts = _csv(tmp_path / "p.csv", [EFFUSION, CARDIOMEGALY])
    assert synthesize.main(_args(checkpoint, out, prompts, "--filter", "--judge", str(judge), "--max-tries", "2",
                                 num=2)) == 0
    assert [row["prompt"] for row in _manifest(out)] == [EFFUSION]
    assert len(_records(out)) == 1
    assert "3 draws, 2 rejected (rejection rate 66.7%), 1 rows left out" in (out / "README.md").read_text()


def test_like_draws_prompts_from_a_data_sets_split(full_run):
    pool = synthesize.dataset_prompts("synthetic_cxr/16:train", str(full_run))
    assert pool == [row["prompt"] for row in _manifest(full_run)]
    drawn = synthesize.plan_prompts(pool, 10, 0, draw=True, min_count=None)
    assert len(drawn) == 10 and set(drawn) <= set(pool)
    assert drawn == synthesize.plan_prompts(pool, 10, 0, draw=True, min_count=None)


@pytest.mark.parametrize("change, message", [
    ({"--checkpoint": "missing"}, "--checkpoint"),
    ({"--prompts": "no_prompt_column"}, "expected a `prompt` column"),
    ({"--num": "0"}, "--num: expected an integer >= 1, got '0'"),
    ({"--like": "no_such_data_set"}, "--like no_such_data_set"),
    ({"--steps": "3"}, "holds another run (different steps)"),
])
def test_bad_input_is_one_error_line_with_exit_status_2(full_run, checkpoint, prompts_csv, tmp_path, capsys,
                                                        change, message):
    bad_csv = _csv(tmp_path / "bad.csv", [EFFUSION], column="text")
    values = {"--checkpoint": str(checkpoint), "--out": str(full_run), "--prompts": str(prompts_csv),
              "--num": str(NUM), "--steps": "2", "--seed": str(SEED), "--shard-size": "2", "--batch-size": "2"}
    values.update({k: {"missing": str(tmp_path / "missing"), "no_prompt_column": str(bad_csv)}.get(v, v)
                   for k, v in change.items()})
    if "--like" in change:
        values.pop("--prompts")
        values["--data-dir"] = str(tmp_path / "tfds")
    with pytest.raises(SystemExit) as exit_info:
        synthesize.main([word for item in values.items() for word in item])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "error:" in line] == err[-1:] and message in err[-1]


def test_train_py_fine_tunes_on_the_written_data_set(full_run, checkpoint, tmp_path):
    """configs/tiny.py's LDM stage, from the pipeline that drew the set, for 2 steps on it (flags parsed as
    train.py parses them)."""
    workdir = tmp_path / "workdir"
    argv = ["train.py", f"--config={scripts.REPO_ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
            "--config.stages=('ldm',)", f"--config.ldm.init_from={checkpoint}",
            "--config.data.name=synthetic_cxr", "--config.data.config=16", "--config.data.resolution=16",
            f"--config.data.data_dir={full_run}", "--config.ldm.batch_size=2", "--config.ldm.num_steps=2",
            "--config.ldm.warmup_steps=1", "--config.ldm.cache_latents=False", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.sample.prompts=()",
            "--config.export=False"]
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder.", flag_values=values)
    values(argv)
    assert trainer.run(config.value, workdir_flag.value)
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if m.get("stage") == "ldm" and "loss" in m]
    assert len(losses) == 2 and all(np.isfinite(losses))
