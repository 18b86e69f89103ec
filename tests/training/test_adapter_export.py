"""finetune.save_adapter on the output of a tiny real fine-tune: diffusers' loaders read the files it writes
and then compute what the merged fine-tuned model computes."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts  # noqa: E402

from cxr_ldm.io import adapters  # noqa: E402
from cxr_ldm.io.components import save_component  # noqa: E402
from cxr_ldm.training import finetune, sharding  # noqa: E402
from helpers import training as common  # noqa: E402

ATOL = 2e-4


def _train(mode: str):
    """(models, finetune config, frozen params, trained params) after two steps (the first runs at warmup
    learning rate 0; the second's rate makes the trained LoRA change the outputs well beyond float error), numpy."""
    models, config, mesh, state, _, step = common.build(mode, ema=False, learning_rate=1e-2)
    for i in range(2):
        batch = common.tiny_batch(i)
        if mode == "textual_inversion":
            batch["input_ids"][:, 1:3] = [common.VOCAB, common.VOCAB + 1]
        state, _ = step(state, sharding.global_batch_from_process(batch, mesh))
    return models, config, sharding.to_host(state.frozen), sharding.to_host(state.trainable)


def test_lora_export_loads_in_diffusers_as_the_merged_fine_tune(tmp_path):
    models, config, frozen, trained = _train("lora")
    assert config.lora_scale != 1.0 and "text_encoder_lora" in trained
    finetune.save_adapter(config, trained, str(tmp_path / "adapter"))
    merged = finetune.merge_params(config, trained, frozen)

    for name, module in (("unet", models.unet), ("text_encoder", models.text_encoder)):
        save_component(module, frozen[name], tmp_path / name)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    text_encoder = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(tmp_path / "adapter")
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet)
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, text_encoder)

    batch = common.tiny_batch(5, batch_size=2)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    timesteps = np.array([10, 900])
    states = models.text_encoder.apply({"params": merged["text_encoder"]}, batch["input_ids"])
    ours = models.unet.apply({"params": merged["unet"]}, latents, timesteps, states)
    with torch.no_grad():
        their_states = text_encoder(torch.from_numpy(batch["input_ids"]).long()).last_hidden_state
        theirs = unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                      their_states).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(their_states.numpy(), states, atol=ATOL, rtol=0)
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
    plain = models.unet.apply({"params": frozen["unet"]}, latents, timesteps, states)
    assert np.abs(plain - ours).max() > 50 * ATOL  # the trained LoRA matters


def test_textual_inversion_export_holds_the_trained_rows_as_diffusers_reads_them(tmp_path):
    _, config, frozen, trained = _train("textual_inversion")
    table = finetune.merge_params(config, trained, frozen)["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    finetune.save_adapter(config, trained, str(tmp_path / "adapter"), placeholder_tokens=["<a>", "<b>"])
    files = sorted((tmp_path / "adapter").iterdir())
    assert [f.name for f in files] == ["learned_embeds_0.safetensors", "learned_embeds_1.safetensors"]
    for file, token, row in zip(files, ["<a>", "<b>"], np.asarray(table)[common.VOCAB:]):
        (state,) = load_textual_inversion_state_dicts([str(file)])
        assert list(state) == [token]
        np.testing.assert_array_equal(state[token].numpy(), row[None])
    assert [(t, v.tolist()) for t, v in adapters.read_embeddings(tmp_path / "adapter")] == [
        (t, np.asarray(table)[common.VOCAB + i][None].tolist()) for i, t in enumerate(["<a>", "<b>"])]
    # A later run in a mode without an adapter leaves no stale one.
    finetune.save_adapter(finetune.FinetuneConfig(mode="unet"), {}, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
