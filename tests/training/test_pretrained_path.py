"""The pretrained-SD path end to end, as README.md's "Use a Stable Diffusion or RoentGen checkpoint you downloaded"
writes it: tiny random SD 1.x (epsilon) and SD 2.x (v-prediction) downloads, a MIMIC-CXR-JPG-shaped manual folder,
the README's train.py command once per fine-tune mode, a preempted run that resumes, and what the runs export
(pipeline/ and adapter/) in diffusers. The README's commands are read from README.md, their placeholder paths
replaced by this test's folders, so that they cannot drift from what is tested.

One run is `python train.py` as the README writes it, beside it the preempted run and its rerun (which read
what the first compiled from the session's compilation cache, tests/conftest.py); the other modes run
meanwhile in this process, their arguments parsed as train.py parses them. All share one data folder."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from absl import flags  # noqa: E402
from helpers import mimic, pipelines  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import cxr_ldm  # noqa: E402
from cxr_ldm.io import adapters  # noqa: E402
from cxr_ldm.training import trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Use a Stable Diffusion or RoentGen checkpoint you downloaded"
# The README's placeholders: the SD 1.x download, the MIMIC-CXR-JPG download, the run folder.
INIT_FROM, MANUAL_DIR, WORKDIR = "sd15", "/data/mimic-cxr-jpg", "runs/roentgen"
# configs/mimic_sd15.py at 64 px (the smallest MIMIC-CXR-JPG builder config), 3 steps of 2 images, logged at every
# step. The first step runs at warmup rate 0; a rate of 1e-2 makes the next two move a LoRA well beyond float error.
# bfloat16 and remat save accelerator memory; on a CPU they only make the step slower to compile.
TINY_FLAGS = ("--config.data.config=64", "--config.data.resolution=64", "--config.ldm.batch_size=2",
              "--config.ldm.num_steps=3", "--config.ldm.warmup_steps=1", "--config.ldm.learning_rate=1e-2",
              "--config.log_every=1", "--config.checkpoint_every=2", "--config.sample.steps=2",
              "--config.compute_dtype=float32", "--config.remat=False")
TOKEN, INITIALIZER = "<cxr-opacity>", "lung"  # textual inversion: the new token and the word that starts it
MODES = {  # run name -> (download, train.py flags)
    "unet": ("sd1", ()),
    "textual_inversion": ("sd1", ("--config.ldm.finetune=textual_inversion",
                                  f"--config.ldm.placeholder_tokens={TOKEN}",
                                  f"--config.ldm.initializer_tokens={INITIALIZER}")),
    "lora": ("sd1", ("--config.ldm.finetune=lora",)),
    "unet+text_encoder": ("sd2", ("--config.ldm.finetune=unet+text_encoder",)),
    "text_encoder": ("sd2", ("--config.ldm.finetune=text_encoder",)),
}
TRAINED = {"unet": {"unet"}, "textual_inversion": {"text_encoder"}, "lora": {"unet"},
           "unet+text_encoder": {"unet", "text_encoder"}, "text_encoder": {"text_encoder"}}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
TOKEN_TABLE = "embeddings.token_embedding.weight"
VOCAB = 49408  # the CLIP tokenizer's
LORA_KEY = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")  # finetune.UNET_LORA_TARGETS
PROMPTS = ["Right <cxr-opacity> in the lower lobe.", "Small left pleural effusion."]
ATOL = 2e-4


# ---------------------------------------------------------------- README.md's commands

def readme_section() -> str:
    """README.md's section on downloaded checkpoints, its ### subsections included."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    return text[start:text.find("\n## ", start + len(SECTION))]


def readme_blocks(language: str) -> list[str]:
    """The ```language code blocks of `readme_section()`."""
    return re.findall(rf"```{language}\n(.*?)```", readme_section(), re.S)


def readme_python(marker: str, replacements: dict[str, str]) -> str:
    """The README's Python block holding `marker`, each quoted placeholder path replaced by a real one."""
    (block,) = [b for b in readme_blocks("python") if marker in b]
    for placeholder, path in replacements.items():
        assert f'"{placeholder}' in block, f"README.md's block no longer loads {placeholder!r}:\n{block}"
        block = block.replace(f'"{placeholder}', f'"{path}')
    return block


def readme_train_args(config: str, init_from: Path, manual_dir: Path, workdir: Path) -> list[str]:
    """The arguments of README.md's train.py command for `init_from`, `manual_dir` and `workdir`, with
    configs/mimic_sd15.py replaced by `config`."""
    (block,) = readme_blocks("bash")
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["python", "train.py"], block
    values = {INIT_FROM: str(init_from), MANUAL_DIR: str(manual_dir), WORKDIR: str(workdir),
              "configs/mimic_sd15.py": config}
    found, args = set(), []
    for word in words[2:]:
        flag, eq, value = word.rpartition("=")
        if not eq:
            flag, value = "", word
        if value in values:
            found.add(value)
            word = f"{flag}={values[value]}" if flag else values[value]
        args.append(word)
    assert found == set(values), f"README.md's train.py command lacks {set(values) - found}:\n{block}"
    return args


# ---------------------------------------------------------------- the downloads and the data

@dataclasses.dataclass(frozen=True)
class Downloads:
    """The tiny pipelines (64 px) saved as a download holds them."""

    sd1: pipelines.Downloads  # SD 1.x saved as safetensors, pickles and with an fp16 variant
    sd2: Path  # SD 2.x, safetensors

    def folder(self, name: str) -> Path:
        return self.sd1.safetensors if name == "sd1" else self.sd2


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Downloads:
    root = tmp_path_factory.mktemp("downloads")
    sd1 = pipelines.save_downloads(root / "sd1", resolution=64)
    pipelines.tiny_sd_pipeline(64, sd2=True).save_pretrained(root / "sd2")
    return Downloads(sd1, root / "sd2")


REPORTS = ["IMPRESSION: Right <cxr-opacity> in the lower lobe.", "IMPRESSION: Small left pleural effusion.",
           "FINDINGS: Clear lungs.\n\nIMPRESSION: No acute cardiopulmonary process."]


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> Path:
    """Six training studies (two of each report; the placeholder token in a third of the prompts), one validation
    and one test study, one random 64x64 frontal image each."""
    root = tmp_path_factory.mktemp("mimic-cxr-jpg")
    rng = np.random.default_rng(0)
    images, reports = [], {}
    for i, split in enumerate(["train"] * 6 + ["validate", "test"]):
        subject, study = f"1{i:07d}", f"5{i:07d}"
        images.append((f"d{i}", subject, study, "PA", split, rng.integers(0, 256, (64, 64), dtype=np.uint8)))
        reports[study] = REPORTS[i % len(REPORTS)] + "\n"
    mimic.write_mimic_tree(root, images, reports, {s: {"No Finding": "1.0"} for s in reports}, reports_as_zip=True)
    return root


# ---------------------------------------------------------------- the train.py runs

@dataclasses.dataclass
class Stopped:
    """What the preempted run left before its rerun: its output, metrics.jsonl's (stage, step) pairs and the
    files of its workdir."""

    output: str
    steps: list[tuple[str, int]]
    files: list[str]


@dataclasses.dataclass
class Runs:
    workdirs: dict[str, Path]  # mode (and "preempted") -> workdir of its run
    stopped: Stopped


def _metrics(workdir: Path) -> list[tuple[str, int, float]]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in lines if "loss" in r]


class _Subprocesses:
    """Starts train.py commands with their output in a log file each."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def start(self, argv: list[str], name: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "w") as log:
            return subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)

    def finish(self, process: subprocess.Popen, name: str) -> str:
        try:
            status = process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        output = (self.root / f"{name}.log").read_text()
        assert status == 0, f"train.py ({name}) exited with {status}:\n{output[-6000:]}"
        return output


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    """Returns once `path` exists; fails if `process` ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"train.py ended (status {process.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _train_in_process(argv: list[str]) -> None:
    """What `python train.py *argv` does, in this process: its flags parsed as train.py parses them (absl and
    ml_collections' config_flags), then the trainer's run, which must end the run."""
    argv = ["train.py", *argv]
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "Run folder.", flag_values=values)
    values(argv)
    assert trainer.run(config.value, workdir.value)


@pytest.fixture(scope="module")
def runs(downloads, manual_dir, tmp_path_factory) -> Runs:
    """Every mode's run of the README command (+ TINY_FLAGS and one shared data folder): the "unet" run as a
    subprocess, which builds the data set from the manual folder, the others then in this process. Beside them,
    the README's SD 1.x run again as a subprocess from the pickled download (`--config.ldm.init_allow_pickle=True`),
    stopped by a SIGTERM while its LDM stage sets up (so after its first step), then rerun to the end."""
    root = tmp_path_factory.mktemp("runs")
    subprocesses = _Subprocesses(root)
    data_dir = root / "tensorflow_datasets"
    workdirs = {mode: root / mode.replace("+", "_") for mode in [*MODES, "preempted"]}

    def argv(mode: str) -> list[str]:
        download, mode_flags = MODES.get(mode, ("sd1", ()))
        config = "configs/mimic_sd15.py" if download == "sd1" else "configs/mimic_sd21.py"
        init_from = downloads.sd1.pickle if mode == "preempted" else downloads.folder(download)
        extra = ("--config.ldm.init_allow_pickle=True",) if mode == "preempted" else ()
        return [*readme_train_args(config, init_from, manual_dir, workdirs[mode]),
                f"--config.data.data_dir={data_dir}", *TINY_FLAGS, *mode_flags, *extra]

    data_ready, stopped, failures = threading.Event(), [], []

    def subprocess_lane():
        try:
            process = subprocesses.start(argv("unet"), "unet")
            _wait_for(workdirs["unet"] / "ldm" / "fingerprint.json", process)  # the data set is built
            data_ready.set()
            subprocesses.finish(process, "unet")
            process = subprocesses.start(argv("preempted"), "preempted")
            _wait_for(workdirs["preempted"] / "ldm" / "fingerprint.json", process)  # its LDM stage set up
            process.send_signal(signal.SIGTERM)
            output = subprocesses.finish(process, "preempted")
            stopped.append(Stopped(output, [(stage, step) for stage, step, _ in _metrics(workdirs["preempted"])],
                                   sorted(str(p.relative_to(workdirs["preempted"]))
                                          for p in workdirs["preempted"].rglob("*"))))
            subprocesses.finish(subprocesses.start(argv("preempted"), "resumed"), "resumed")
        except BaseException as error:  # noqa: BLE001 (raised again in the test's thread)
            failures.append(error)
            data_ready.set()

    lane = threading.Thread(target=subprocess_lane)
    lane.start()
    try:
        data_ready.wait()
        for mode in ("lora", "textual_inversion", "unet+text_encoder", "text_encoder"):
            if not failures:
                _train_in_process(argv(mode))
    finally:
        lane.join()
    if failures:
        raise failures[0]
    return Runs(workdirs, stopped[0])


# ---------------------------------------------------------------- weights

def _weights(folder: Path, component: str) -> dict[str, np.ndarray]:
    """A component's tensors by key (a CLIP text encoder's without "text_model.": transformers writes either)."""
    tensors = load_file(folder / component / WEIGHT_FILES[component])
    return {key.removeprefix("text_model."): value for key, value in tensors.items()}


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    assert sorted(before) == sorted(after)
    assert {k: (v.shape, v.dtype) for k, v in before.items()} == {k: (v.shape, v.dtype) for k, v in after.items()}
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_changes_what_its_mode_trains_and_keeps_the_rest_bit_equal(runs, downloads, mode):
    """The exported pipeline/ against the download it started from, tensor by tensor: the full modes change every
    tensor of what they train, lora exactly the attention projections it adapts, textual_inversion only its new
    token's row (also in adapter/); all else is bit-equal to the download."""
    download = downloads.folder(MODES[mode][0])
    export = runs.workdirs[mode] / "pipeline"
    for component in ("unet", "text_encoder", "vae"):
        before, after = _weights(download, component), _weights(export, component)
        if mode == "textual_inversion" and component == "text_encoder":
            continue  # its token table grew by a row: below
        changed = _changed(before, after)
        if component not in TRAINED[mode]:
            assert changed == set(), f"{mode}: the frozen {component} changed: {sorted(changed)[:5]}"
        elif mode == "lora":  # exactly the attention projections that carry a LoRA, merged
            expected = {k for k in before if LORA_KEY.search(k)}
            assert expected and changed == expected
        else:
            assert changed == set(before), f"{mode}: {component} tensors not trained: {set(before) - changed}"
    if mode == "textual_inversion":
        before, after = _weights(download, "text_encoder"), _weights(export, "text_encoder")
        table = after.pop(TOKEN_TABLE)
        assert _changed({k: v for k, v in before.items() if k != TOKEN_TABLE}, after) == set()
        np.testing.assert_array_equal(table[:VOCAB], before[TOKEN_TABLE])
        tokenizer = cxr_ldm.Pipeline.from_pretrained(export).tokenizer
        (start,) = tokenizer.encode(INITIALIZER, add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(TOKEN) == VOCAB == len(table) - 1
        assert np.abs(table[VOCAB] - before[TOKEN_TABLE][start]).max() > 1e-3  # trained from the initializer's row
        (learned,) = adapters.read_embeddings(runs.workdirs[mode] / "adapter")
        assert learned[0] == TOKEN
        np.testing.assert_array_equal(learned[1], table[VOCAB:])
    elif mode != "lora":
        assert not (runs.workdirs[mode] / "adapter").exists()  # the full modes train no adapter


def test_a_preempted_run_resumes_to_the_weights_of_the_run_never_stopped(runs):
    """The README's SD 1.x run, again from the pickled download: a SIGTERM while its LDM stage set up stopped it
    after step 1 with exit status 0 and nothing exported; the same command then restored step 1 and ran steps 2
    and 3 (logged once each), to the losses and exported weights of the README's run from the safetensors
    download."""
    stopped = runs.stopped
    assert "stopped by SIGTERM in the ldm stage after saving a checkpoint; rerun the same command to resume" in (
        stopped.output)
    assert stopped.steps == [("ldm", 1)]
    assert "ldm/checkpoints" in stopped.files and "ldm/done.json" not in stopped.files
    assert not [f for f in stopped.files if f.startswith(("pipeline", "adapter"))]
    straight, resumed = runs.workdirs["unet"], runs.workdirs["preempted"]
    assert _metrics(resumed) == _metrics(straight) and [s for _, s, _ in _metrics(straight)] == [1, 2, 3]
    weights = sorted(p.relative_to(straight) for p in straight.glob("pipeline/*/*.safetensors"))
    assert len(weights) == 3
    for path in weights:
        assert (resumed / path).read_bytes() == (straight / path).read_bytes(), path


# ---------------------------------------------------------------- the exports in diffusers

def _diffusers_pipeline(folder: Path):
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)


def _diffusers_images(reference, latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    with torch.no_grad():
        return reference(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                         latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images


@pytest.mark.parametrize("mode", ["unet", "unet+text_encoder"], ids=["sd1_epsilon", "sd2_v_prediction"])
def test_an_export_generates_in_diffusers_what_it_generates_here(runs, downloads, mode):
    """diffusers' StableDiffusionPipeline and ours on an export, from the same latents: the same images."""
    export = runs.workdirs[mode] / "pipeline"
    pipe = cxr_ldm.Pipeline.from_pretrained(export)
    assert pipe.scheduler.prediction_type == ("epsilon" if mode == "unet" else "v_prediction")
    latents = pipe.initial_latents([0, 1], 64, 64)
    ours = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, sampler="ddim", latents=latents)
    theirs = _diffusers_images(_diffusers_pipeline(export), latents, 3, 4.0)
    assert ours.shape == theirs.shape == (2, 64, 64, 1 if mode == "unet" else 3)
    assert np.abs(ours - theirs).max() < 2e-3
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # the prompts matter
    downloaded = _diffusers_images(_diffusers_pipeline(downloads.folder(MODES[mode][0])), latents, 3, 4.0)
    assert np.abs(downloaded - theirs).max() > 1e-2  # the fine-tune matters


def _unet_inputs():
    """diffusers UNet inputs: latents (1, 4, 16, 16), timestep 500, text states (1, 77, 16)."""
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.standard_normal((1, 4, 16, 16)).astype(np.float32)), torch.tensor([500]),
            torch.from_numpy(rng.standard_normal((1, 77, 16)).astype(np.float32)))


def _unet_output(unet) -> np.ndarray:
    with torch.no_grad():
        return unet(*_unet_inputs()).sample.numpy()


def _text_states(reference, prompt: str) -> np.ndarray:
    with torch.no_grad():
        return reference.encode_prompt(prompt, "cpu", 1, False)[0].numpy()


def test_the_lora_adapter_loads_in_diffusers_and_peft_as_the_merged_export(runs, downloads):
    """adapter/ of the lora run on the downloaded UNet (diffusers' load_lora_weights, PEFT's adapter) computes
    what the merged export's UNet computes."""
    adapter, export = runs.workdirs["lora"] / "adapter", runs.workdirs["lora"] / "pipeline"
    merged = _unet_output(_diffusers_pipeline(export).unet)
    base = _diffusers_pipeline(downloads.sd1.safetensors)
    plain = _unet_output(base.unet)
    assert np.abs(plain - merged).max() > 20 * ATOL  # the trained LoRA matters
    base.load_lora_weights(adapter)
    np.testing.assert_allclose(_unet_output(base.unet), merged, atol=ATOL, rtol=0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(downloads.sd1.safetensors / "unet")
    np.testing.assert_allclose(_unet_output(peft.PeftModel.from_pretrained(unet, adapter / "unet").eval()), merged,
                               atol=ATOL, rtol=0)


def test_the_textual_inversion_adapter_loads_in_diffusers_as_the_merged_export(runs, downloads):
    """adapter/ of the textual-inversion run in the downloaded pipeline (diffusers' load_textual_inversion)
    encodes a prompt with the new token as the export does, in diffusers and here."""
    adapter, export = runs.workdirs["textual_inversion"] / "adapter", runs.workdirs["textual_inversion"] / "pipeline"
    merged = _text_states(_diffusers_pipeline(export), PROMPTS[0])
    base = _diffusers_pipeline(downloads.sd1.safetensors)
    plain = _text_states(base, PROMPTS[0])
    assert np.abs(plain - merged).max() > 100 * ATOL  # the learned token matters
    base.load_textual_inversion(adapter)
    assert base.tokenizer.convert_tokens_to_ids(TOKEN) == VOCAB
    np.testing.assert_allclose(_text_states(base, PROMPTS[0]), merged, atol=1e-5, rtol=0)
    ours = np.asarray(cxr_ldm.Pipeline.from_pretrained(export).encode_text(PROMPTS[:1]))
    np.testing.assert_allclose(ours, merged, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the README's Python

def test_the_readme_loading_commands_read_the_download_and_its_fp16_variant(downloads, tmp_path):
    """The README's first Python block on a download holding float32 weights and an fp16 variant, as the hub's
    SD folders do: load_component and from_pretrained read the float32 weights, variant="fp16" the fp16 ones,
    and save_component writes a UNet that diffusers loads to the same tensors."""
    code = readme_python('load_component("sd15/unet")', {INIT_FROM: downloads.sd1.variants,
                                                          "out/unet": tmp_path / "out" / "unet"})
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    pipelines.assert_params_equal(namespace["unet_params"], downloads.sd1.fp32["unet"])
    pipe = namespace["pipe"]  # the last one the block loads: variant="fp16"
    for name in ("unet", "vae", "text_encoder"):
        pipelines.assert_params_equal(getattr(pipe, f"{name}_params"), downloads.sd1.fp16[name])
    assert any(np.abs(downloads.sd1.fp16["unet"][k] - v).max() > 0 for k, v in downloads.sd1.fp32["unet"].items())
    saved = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    for key, value in downloads.sd1.fp32["unet"].items():
        np.testing.assert_array_equal(saved[key].numpy(), value, err_msg=key)


def test_the_readme_adapter_commands_load_what_the_runs_trained(runs, downloads, tmp_path):
    """The README's adapter block: the lora run's adapter/ at scale 0.8 moves the downloaded UNet 0.8 of the way
    to the merged export; the textual-inversion run's file adds its token, and the same vectors saved in A1111's
    form add the token the caller names."""
    ((token, rows),) = adapters.read_embeddings(runs.workdirs["textual_inversion"] / "adapter")
    save_file({"emb_params": rows}, tmp_path / "a1111_embedding.safetensors")
    code = readme_python("load_lora_weights", {
        INIT_FROM: downloads.sd1.safetensors, "runs/lora/adapter": runs.workdirs["lora"] / "adapter",
        "learned_embeds.safetensors": runs.workdirs["textual_inversion"] / "adapter" / adapters.EMBEDDINGS_NAME,
        "a1111_embedding.safetensors": tmp_path / "a1111_embedding.safetensors"})
    assert re.search(r"load_lora_weights\([^)]*scale=0\.8\)", code) and 'token="<effusion>"' in code
    namespace = {"cxr_ldm": cxr_ldm}  # imported by the README's first block
    exec(compile(code, "README.md", "exec"), namespace)
    pipe = namespace["pipe"]
    base = cxr_ldm.Pipeline.from_pretrained(downloads.sd1.safetensors)
    merged = cxr_ldm.Pipeline.from_pretrained(runs.workdirs["lora"] / "pipeline")
    expected = jax.tree.map(lambda b, m: b + 0.8 * (m - b), base.unet_params, merged.unet_params)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=1e-6, rtol=0), pipe.unet_params,
                 expected)
    assert [pipe.tokenizer.convert_tokens_to_ids(t) for t in (token, "<effusion>")] == [VOCAB, VOCAB + 1]
    table = np.asarray(pipe.text_encoder_params["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[VOCAB:], np.concatenate([rows, rows]))
    ours = np.asarray(pipe.encode_text([PROMPTS[0]]))
    expected_states = np.asarray(cxr_ldm.Pipeline.from_pretrained(
        runs.workdirs["textual_inversion"] / "pipeline").encode_text([PROMPTS[0]]))
    np.testing.assert_allclose(ours, expected_states, atol=1e-5, rtol=0)


def test_the_readme_bert_commands_keep_a_task_head_checkpoints_encoder_and_run_it(tmp_path):
    """The README's line that saves a BertForMaskedLM checkpoint's encoder alone, then its BERT block on that
    folder (with a WordPiece vocab.txt): the token ids of its prompt and the states of transformers' BertModel."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "small", "left", "pleural", "effusion", "."]
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64)).save_pretrained(tmp_path / "dir")
    (line,) = re.findall(r"`(transformers\.BertModel\.from_pretrained\([^`]*)`", readme_section())
    for placeholder in ("dir", "cxr-bert"):
        assert f'"{placeholder}"' in line, line
        line = line.replace(f'"{placeholder}"', f'"{tmp_path / placeholder}"')
    exec(compile(line, "README.md", "exec"), {"transformers": transformers})
    (tmp_path / "cxr-bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    namespace = {"cxr_ldm": cxr_ldm}
    exec(compile(readme_python("load_wordpiece_tokenizer", {"cxr-bert": tmp_path / "cxr-bert"}), "README.md", "exec"),
         namespace)
    ids = np.asarray(namespace["ids"])
    assert ids.tolist() == [[2, 5, 6, 7, 8, 9, 3] + [0] * 57]  # [CLS] small left pleural effusion . [SEP] [PAD]...
    reference = transformers.BertModel.from_pretrained(tmp_path / "cxr-bert").eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(ids != 0).long())
    np.testing.assert_allclose(np.asarray(namespace["states"])[:, :7], expected.last_hidden_state.numpy()[:, :7],
                               atol=1e-5, rtol=0)
