"""evaluate(): the whole evaluation on a tiny random pipeline and the phantom "tiny" data set (32 px):
every section is present and consistent, the report and grids are written, the classifier cache
is reused on a second run, the guidance sweep agrees with single-scale runs, and the autoencoder-only evaluation agrees with the full one."""
import json

import jax
import numpy as np
import pytest

from cxr_ldm.evaluation import evaluator
from cxr_ldm.data.tokenizer import load_tokenizer
from cxr_ldm.diffusion.schedules import SchedulerConfig
from cxr_ldm.evaluation import classifier as clf
from cxr_ldm.evaluation.prompts import HANDWRITTEN as PROMPTS
from cxr_ldm.evaluation.prompts import EvalPrompt
from cxr_ldm.models import autoencoder, text_encoder, unet
from cxr_ldm.pipeline import Pipeline

pytestmark = pytest.mark.slow  # about a minute on two CPU cores: data set build, classifier, sampling


def tiny_pipeline(folder):
    """A random 32 px pipeline (1-channel VAE, 16x16x4 latents) saved as a diffusers folder."""
    models = []
    for module, config in (
            (unet, unet.UNetConfig.from_dict(dict(
                sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=16, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))),
            (autoencoder, autoencoder.AutoencoderConfig.from_dict(dict(
                in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2))),
            (text_encoder, text_encoder.CLIPTextConfig.from_dict(dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                projection_dim=16)))):
        model_class = {unet: unet.UNet2DConditionModel, autoencoder: autoencoder.AutoencoderKL,
                       text_encoder: text_encoder.CLIPTextModel}[module]
        model = model_class(config)
        models += [model, jax.jit(model.init)(jax.random.key(len(models)), *module.dummy_inputs(config))["params"]]
    scheduler = SchedulerConfig.from_dict(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               steps_offset=1, set_alpha_to_one=False, clip_sample=False))
    Pipeline(*models[:2], *models[2:4], *models[4:6], load_tokenizer(), scheduler).save_pretrained(folder)
    return folder


def test_evaluate_end_to_end(tmp_path):
    checkpoint = tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "eval" / "r.json"
    options = dict(dataset_config="tiny", data_dir=str(tmp_path / "tfds"), num_samples=2, num_fid=12, steps=2,
                   batch_size=8)
    recipe = clf.TrainConfig(input_size=32, widths=(8, 16), feature_dim=32, min_positives=5, epochs=1,
                             batch_size=32, warmup_steps=2)
    # normal, effusion, cardiomegaly; and a normal prompt longer than the text encoder's 77 tokens
    long_prompt = EvalPrompt(" ".join(["Normal chest radiograph."] * 20), findings={})  # 5 tokens each
    prompts = PROMPTS[:2] + PROMPTS[3:5] + PROMPTS[30:32] + (long_prompt,)

    results = evaluator.evaluate(checkpoint, out, prompts=prompts, classifier_config=recipe,
                                       guidance_sweep=(evaluator.DEFAULT_GUIDANCE, 1.5), **options)
    saved = json.loads(out.read_text())
    assert saved["conditioning_accuracy"] == results["conditioning_accuracy"]
    assert 0.0 <= saved["conditioning_accuracy"] <= 1.0
    assert 0.0 <= saved["classifier_exact_match_real"] <= saved["classifier_accuracy_real"] <= 1.0
    usable = saved["conditioning"]["per_prompt"]
    assert len(usable) + len(saved["skipped_prompts"]) == len(prompts)
    assert saved["truncated_prompts"] == [{"prompt": long_prompt.text, "num_tokens": 102,
                                           "prompt_used": " ".join(["Normal chest radiograph."] * 15)}]
    assert saved["conditioning_accuracy"] == pytest.approx(np.mean([p["success_rate"] for p in usable]))
    assert all(p["num_images"] == 2 for p in usable)
    real_studies = saved["conditioning_real_studies"]
    assert saved["conditioning_accuracy_real_studies"] == real_studies["conditioning_accuracy"]
    assert [p["prompt"] for p in real_studies["per_prompt"]] == [p["prompt"] for p in usable]
    through_vae = saved["conditioning_vae_reconstructed"]
    assert saved["conditioning_accuracy_vae_reconstructed"] == pytest.approx(
        np.mean([p["success_rate"] for p in through_vae["per_prompt"]]))
    assert [p["prompt"] for p in through_vae["per_prompt"]] == [p["prompt"] for p in usable]
    assert "the same studies through the VAE" in out.with_suffix(".md").read_text()
    assert saved["fid"]["domain"]["n"] == 12 and saved["fid"]["domain"]["real_vs_real"] >= 0
    assert saved["fid"]["domain"]["real_vs_real_same_cases"] >= 0  # second renderings of the test studies
    assert 0.0 <= saved["conditioning_accuracy"] <= saved["presence_accuracy"] <= 1.0
    assert saved["prompt_set"] == {"name": "custom", "num_prompts": len(usable),
                                   "verbatim_in_training": saved["prompt_set"]["verbatim_in_training"]}
    assert saved["prompt_set"]["verbatim_in_training"] >= 1  # "Normal chest radiograph." is a phantom impression
    assert saved["fid"]["inception"] is None
    assert saved["reconstruction"]["num_images"] >= 12 and saved["reconstruction"]["psnr"] > 0
    assert saved["memorization"]["generated"]["copy_fraction"] == 0.0  # random weights copy nothing
    assert 0 < saved["diversity"]["generated_mean"] <= 1
    assert saved["classifier"]["cached"] is False
    report = out.with_suffix(".md").read_text()
    assert "conditioning_accuracy" in report and "r_assets/prompt_00.png" in report
    assert f"| VAE PSNR / SSIM / RMSE | {saved['reconstruction']['psnr']:.3f} / " in report
    assert (out.parent / "r_assets" / "memorization_pairs.png").is_file()
    # The guidance sweep: its row at the headline's scale is the headline; its other row is what an evaluation
    # at that scale gives (same prompts and seeds), here the second run, which also reuses the cached classifier.
    sweep = {row["guidance"]: row for row in saved["guidance_sweep"]}
    assert list(sweep) == [1.5, evaluator.DEFAULT_GUIDANCE] and "## Guidance sweep" in report
    assert sweep[evaluator.DEFAULT_GUIDANCE]["conditioning_accuracy"] == saved["conditioning_accuracy"]
    assert sweep[evaluator.DEFAULT_GUIDANCE]["domain_fid"] == saved["fid"]["domain"]["generated_vs_real"]
    again = evaluator.evaluate(checkpoint, tmp_path / "r2.json", prompts=prompts, classifier_config=recipe,
                                     guidance=1.5, **options)
    assert again["classifier"]["cached"] is True
    assert again["classifier_accuracy_real"] == saved["classifier_accuracy_real"]
    assert sweep[1.5]["conditioning_accuracy"] == again["conditioning_accuracy"]
    assert sweep[1.5]["detection_rate"] == again["conditioning"]["detection_rate"]
    assert sweep[1.5]["domain_fid"] == pytest.approx(again["fid"]["domain"]["generated_vs_real"])
    assert sweep[1.5]["domain_fid"] != sweep[evaluator.DEFAULT_GUIDANCE]["domain_fid"]


    # --vae-only on the same folder: the same VAE gives the same reconstruction and ceilings, with no sampling.
    vae_out = tmp_path / "vae_only" / "v.json"
    vae_only = evaluator.evaluate_autoencoder(checkpoint, vae_out, prompts=prompts, classifier_config=recipe,
                                                    **options)
    assert json.loads(vae_out.read_text()) == vae_only
    assert "conditioning_accuracy" not in vae_only and vae_only["classifier"]["cached"] is True
    assert vae_only["reconstruction"] == saved["reconstruction"]
    for key in ("conditioning_accuracy_real_studies", "conditioning_accuracy_vae_reconstructed",
                "classifier_accuracy_real"):
        assert vae_only[key] == saved[key]
    report = vae_out.with_suffix(".md").read_text()
    assert f"| VAE PSNR / SSIM / RMSE | {saved['reconstruction']['psnr']:.3f} / " in report
    assert (vae_out.parent / "v_assets" / "reconstructions.png").is_file()
    with pytest.raises(FileNotFoundError, match="no AutoencoderKL folder"):
        evaluator.load_autoencoder(tmp_path / "eval")
