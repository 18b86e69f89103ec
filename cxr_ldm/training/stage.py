"""What every training stage shares."""
from __future__ import annotations

import ml_collections


def dataset_name(config: ml_collections.ConfigDict) -> str:
    """"name/config" of the TFDS data set of a run config (e.g. "phantom_cxr/64")."""
    return f"{config.data.name}/{config.data.config}" if config.data.config else config.data.name
