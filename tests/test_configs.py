"""The shipped configs parse from the command line the way train.py reads them (ml_collections flags)."""
from __future__ import annotations

import pathlib
import re
import shlex

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import default
from cxr_ldm.training import config_check, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")


def _parse(argv: list[str]):
    """The config train.py would run for `python train.py *argv` (argv: --config=FILE, default
    configs/default.py, and --config.* flags)."""
    if not any(a.startswith("--config=") for a in argv):
        argv = ["--config=configs/default.py", *argv]  # train.py's default, which it parses itself
    argv = ["train.py", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "configs/default.py", flag_values=values, lock_config=True,
                                    sys_argv=argv)  # the overrides it registers are read from sys_argv
    values(argv)
    return values.config


def _untyped_none_leaves(node, prefix=""):
    """Dotted names of the leaves that hold None without a declared type: ml_collections refuses to
    override those from the command line."""
    found = []
    for key in node.keys():
        value = node[key]
        if hasattr(value, "keys"):
            found += _untyped_none_leaves(value, f"{prefix}{key}.")
        elif node.get_type(key) is type(None):
            found.append(prefix + key)
    return found


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_optional_field_can_be_set_on_the_command_line(name, monkeypatch):
    monkeypatch.chdir(REPO)
    config = _parse([f"--config=configs/{name}"])
    assert _untyped_none_leaves(config) == []


def _readme_train_commands() -> list[list[str]]:
    """The arguments of every `python train.py ...` command in the README (backslash continuations joined,
    `--config FILE` written as `--config=FILE`)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ").replace("--config ", "--config=")
    commands = [shlex.split(line.strip())[2:] for line in text.splitlines()
                if line.strip().startswith("python train.py")]
    assert commands, "the README shows no train.py command"
    return commands


def test_readme_train_commands_parse(monkeypatch):
    monkeypatch.chdir(REPO)
    for argv in _readme_train_commands():
        config_argv = [a for a in argv if a.startswith("--config")]
        config = _parse(config_argv)
        for flag in config_argv:
            name, _, value = flag[2:].partition("=")
            if name.startswith("config."):
                field = config
                for part in name.split(".")[1:]:
                    field = field[part]
                assert str(field) == value, flag


def test_optional_fields_take_values_and_none_fields_take_numbers(monkeypatch):
    monkeypatch.chdir(REPO)
    config = _parse(["--config.ldm.init_from=/models/sd15", "--config.ldm.scaling_factor=0.18215",
                     "--config.ldm.unet.num_attention_heads=8", "--config.ldm.snr_gamma=2.5"])
    assert (config.ldm.init_from, config.ldm.scaling_factor) == ("/models/sd15", 0.18215)
    assert (config.ldm.unet.num_attention_heads, config.ldm.snr_gamma) == (8, 2.5)
    assert config.ldm.unet.to_dict()["num_attention_heads"] == 8
    loading = _parse(["--config.ldm.init_variant=fp16", "--config.ldm.init_allow_pickle=True"])
    assert (loading.ldm.init_variant, loading.ldm.init_allow_pickle) == ("fp16", True)
    # mimic_sd15 turns min-SNR weighting off; the command line can turn it back on.
    assert _parse(["--config=configs/mimic_sd15.py"]).ldm.snr_gamma is None
    assert _parse(["--config=configs/mimic_sd15.py", "--config.ldm.snr_gamma=5"]).ldm.snr_gamma == 5.0


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_configs_build_models_that_fit_together(name, monkeypatch):
    monkeypatch.chdir(REPO)
    config_check.check_models_fit(_parse([f"--config=configs/{name}"]))


def test_models_scaled_for_accelerators_fit_together(monkeypatch):
    monkeypatch.chdir(REPO)
    config = _parse([])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    default.scale_for_accelerators(config)
    assert (config.data.resolution, config.ldm.unet.sample_size) == (128, 32)
    config_check.check_models_fit(config)


@pytest.mark.parametrize("flag, message", [
    ("--config.ldm.text_encoder.hidden_size=64",
     "config.ldm.text_encoder.hidden_size=64 differs from config.ldm.unet.cross_attention_dim=128"),
    ("--config.ldm.unet.sample_size=32", "config.ldm.unet.sample_size=32 is not config.data.resolution=64 / 4"),
    ("--config.autoencoder.model.latent_channels=8",
     "config.ldm.unet.in_channels=4 differs from config.autoencoder.model.latent_channels=8"),
])
def test_models_that_do_not_fit_are_named_before_anything_is_written(flag, message, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = _parse([flag, f"--config.data.data_dir={tmp_path / 'tfds'}"])
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.run(config, str(tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # Models loaded from a pipeline folder are not the config's: nothing to check.
    config_check.check_models_fit(_parse([flag, "--config.ldm.init_from=/models/sd15"]))


def _leaves(node, prefix=""):
    """{dotted name: value} of a ConfigDict's leaves."""
    out = {}
    for key in node.keys():
        value = node[key]
        out.update(_leaves(value, f"{prefix}{key}.") if hasattr(value, "keys") else {prefix + key: value})
    return out


def test_quick_config_is_the_default_with_the_measured_30_minute_cut(monkeypatch):
    """configs/quick.py is the cut measured in docs/recipes.md (`--config.autoencoder.num_steps=1500
    --config.ldm.num_steps=5500 --config.ldm.learning_rate=2e-3 --config.ldm.warmup_steps=200
    --config.sample_every=5500`), and nothing else."""
    monkeypatch.chdir(REPO)
    quick, base = _leaves(_parse(["--config=configs/quick.py"])), _leaves(_parse([]))
    changed = {key: quick[key] for key in base if quick[key] != base[key]}
    assert changed == {"workdir": "workdir/quick", "autoencoder.num_steps": 1500, "ldm.num_steps": 5500,
                       "ldm.learning_rate": 2e-3, "ldm.warmup_steps": 200, "sample_every": 5500}
    assert quick.keys() == base.keys()
