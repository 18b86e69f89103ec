"""TFDS builders of the CXR data sets (array_record files, read with `tfds.data_source`).

  phantom_cxr     embedded synthetic radiographs (no download); configs "64", "128", "256", "tiny"
  mimic_cxr_jpg   MIMIC-CXR-JPG 2.x (manual download); configs "64" ... "512", "<res>_all_views"
  openi_cxr       Indiana University collection (manual download); same config names
  synthetic_cxr   generated images written by `python -m cxr_ldm.synthesize`; configs "16" ... "1024"

Importing this package registers the builders with TFDS, so `tfds.data_source("phantom_cxr/64",
data_dir=...)` finds them.
"""
from __future__ import annotations

import logging
import os

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from cxr_ldm.data.builders.mimic_cxr_jpg import MimicCxrJpg
from cxr_ldm.data.builders.openi_cxr import OpeniCxr
from cxr_ldm.data.builders.phantom_cxr import PhantomCxr
from cxr_ldm.data.builders.synthetic_cxr import SyntheticCxr

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "phantom_cxr": PhantomCxr,
    "mimic_cxr_jpg": MimicCxrJpg,
    "openi_cxr": OpeniCxr,
    "synthetic_cxr": SyntheticCxr,
}


def builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
    """The builder of data set `name` (its VERSION, BUILDER_CONFIGS); ValueError naming the known ones."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown data set {name!r}; expected one of {sorted(BUILDERS)}.")
    return BUILDERS[name]


def prepare(name: str, data_dir: str | os.PathLike, config: str | None = None,
            manual_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The builder of data set `name` (config `config`, None = default) with its files in `data_dir`.

    Builds the array_record files first if they are absent (a no-op otherwise). `name` may also be
    "name/config". `manual_dir` is where the manual-download data sets (MIMIC-CXR-JPG, Open-i) lie
    (default: TFDS's `<data_dir>/downloads/manual`). With several processes, build in one of them
    first: concurrent builds of one data set in one data_dir are not coordinated.
    """
    if "/" in name:
        if config is not None:
            raise ValueError(f"Data set {name!r} names a config and config={config!r} names another.")
        name, config = name.split("/", 1)
    builder_cls = builder_class(name)
    config_names = [c.name for c in builder_cls.BUILDER_CONFIGS]
    if config is not None and config not in config_names:
        raise ValueError(f"Unknown config {config!r} of {name}; expected one of {config_names}.")
    builder = builder_cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if builder.data_path.exists() and builder.is_prepared():  # TFDS's check warns of a folder not yet built
        return builder
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        # TFDS's own default place for manual downloads.
        manual_dir = manual_dir or os.path.join(builder.data_dir_root, "downloads", "manual")
        if not os.path.isdir(manual_dir):
            raise FileNotFoundError(f"{name}: manual_dir {manual_dir} does not exist; "
                                    f"{name} is built from files downloaded by hand.\n"
                                    f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    download_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir))
    own_progress = getattr(builder, "SHOWS_PROGRESS", False)
    shown_before = getattr(tqdm_utils, "_active", True)  # the caller's tfds.display_progress_bar setting
    if own_progress:  # TFDS's bars per split and per shuffle; the builder shows one per split instead
        tfds.display_progress_bar(False)
    try:
        builder.download_and_prepare(download_config=download_config)
    finally:
        if own_progress:
            tfds.display_progress_bar(shown_before)
    return builder


class _WithoutOpenCvNotice(logging.Filter):
    """Drops TFDS's "OpenCV is not installed ... Defaulting to PIL" warning: PIL decodes our PNGs as meant."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_WithoutOpenCvNotice())


__all__ = ["BUILDERS", "MimicCxrJpg", "OpeniCxr", "PhantomCxr", "SyntheticCxr", "builder_class", "prepare"]
