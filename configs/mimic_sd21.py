"""Fine-tune a downloaded Stable Diffusion 2.x folder (v-prediction, 768 px native, OpenCLIP text
encoder in diffusers' CLIPTextModel format) on MIMIC-CXR-JPG at 512 px; otherwise as mimic_sd15.py.

    python train.py --config configs/mimic_sd21.py --config.ldm.init_from=/models/sd21 \
        --config.data.manual_dir=/data/mimic-cxr-jpg

The prediction type (v_prediction) and zero-SNR settings come from the folder's scheduler config.
No results are recorded for it yet (docs/results.md).
"""
import ml_collections

from configs import mimic_sd15


def get_config() -> ml_collections.ConfigDict:
    c = mimic_sd15.get_config()
    c.workdir = "workdir/mimic_sd21"
    return c
