"""Base of the builders of manually downloaded data sets (MIMIC-CXR-JPG, Open-i).

Such a builder writes one example per image, with the features of `common.cxr_features` plus its
own. The base owns what they share: the configs ("<res>" keeps frontal views, "<res>_all_views"
every view, for res in RESOLUTIONS), `_info`, locating the required files in manual_dir, and
generating the examples (images loaded on threads, prompt and label encoding, skip accounting).
A builder states its version, homepage, files and own features, and says per item what its example
is made of (`ExampleParts`) or why there is none (`Skip`).
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import tensorflow_datasets as tfds
from etils import epath

from cxr_ldm.data import reports
from cxr_ldm.data.builders import common
from cxr_ldm.data.tokenizer import load_tokenizer

RESOLUTIONS = (64, 128, 256, 512)


@dataclasses.dataclass
class ManualDownloadConfig(tfds.core.BuilderConfig):
    """resolution: output side in pixels; num_workers: threads decoding images."""

    resolution: int = 256
    num_workers: int = dataclasses.field(default_factory=common.default_num_workers)


def resolution_configs(config_of: Callable[..., ManualDownloadConfig]) -> list[ManualDownloadConfig]:
    """`config_of(name=..., resolution=..., frontal_only=...)` for "<res>" (frontal_only=True) and
    "<res>_all_views" (False), for every res in RESOLUTIONS."""
    return [config_of(name=name, resolution=res, frontal_only=frontal_only)
            for res in RESOLUTIONS
            for name, frontal_only in ((str(res), True), (f"{res}_all_views", False))]


@dataclasses.dataclass(frozen=True)
class ExampleParts:
    """What one example is made of before its image is read.

    key: example key, also naming the item in skip logs; features: the builder's own feature values.
    """

    key: str
    image_path: epath.Path
    report: str
    labels: Mapping[str, int | None]
    features: Mapping[str, Any]


class Skip(NamedTuple):
    """An item without an example: `item` names it in the log, `reason` is its count's key."""

    item: str
    reason: str
    detail: str = ""


class ManualDownloadBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds examples from files in manual_dir (module doc).

    Not a data set itself: skip_registration keeps it out of the TFDS registry, and it is abstract.
    """

    DEFAULT_CONFIG_NAME = "256"
    HOMEPAGE: ClassVar[str]
    # {key: alternative paths relative to manual_dir}, for common.find_required.
    REQUIRED_FILES: ClassVar[Mapping[str, Sequence[str]]]

    @abc.abstractmethod
    def _own_features(self) -> dict[str, tfds.features.FeatureConnector]:
        """The builder's features besides image, report, prompt and labels."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.cxr_features(self.builder_config.resolution, **self._own_features()),
            metadata=tfds.core.MetadataDict(),
            homepage=self.HOMEPAGE,
        )

    def _find_required(self, dl_manager: tfds.download.DownloadManager
                       ) -> tuple[epath.Path, dict[str, epath.Path]]:
        """(manual_dir, {key of REQUIRED_FILES: existing path}); FileNotFoundError listing what is missing."""
        manual_dir = epath.Path(dl_manager.manual_dir)
        return manual_dir, common.find_required(manual_dir, self.name, self.REQUIRED_FILES,
                                                self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _generate_examples(self, split: str, items: Iterable[Any],
                           parts_of: Callable[[Any], ExampleParts | Skip]):
        """The examples of `items`, in order.

        `parts_of(item)` runs on `num_workers` threads, like the image loading that follows it. An
        item may also be a `Skip` itself. Skips are logged and counted in info.metadata["skipped"][split].
        """
        skips = common.SkipCounter(self.name, split)
        resolution = self.builder_config.resolution
        tokenizer = load_tokenizer()

        def load(item):
            parts = item if isinstance(item, Skip) else parts_of(item)
            if isinstance(parts, Skip):
                return parts, None
            try:
                return parts, common.load_square_grayscale(parts.image_path, resolution)
            except FileNotFoundError:
                return Skip(parts.key, "missing_image", str(parts.image_path)), None
            except common.IMAGE_ERRORS as error:
                return Skip(parts.key, "corrupt_image", f"{parts.image_path}: {error}"), None

        for parts, image in common.ordered_parallel_map(load, items, self.builder_config.num_workers):
            if isinstance(parts, Skip):
                skips.skip(parts.reason, parts.item, parts.detail)
                continue
            yield parts.key, {
                "image": common.png_bytes(image),
                "report": parts.report,
                "prompt": reports.prompt_from_report(parts.report, tokenizer=tokenizer),
                "labels": common.encode_labels(parts.labels),
                **parts.features,
            }
        skips.record(self.info)
