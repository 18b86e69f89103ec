"""LoRA and textual-inversion files between cxr_ldm.Pipeline and diffusers / PEFT: what one side writes, the other
loads, and the UNet and text encoder then compute the same numbers (a tiny random SD pipeline)."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import cxr_ldm  # noqa: E402
from cxr_ldm.io import adapters  # noqa: E402
from cxr_ldm.training import finetune  # noqa: E402
from helpers.pipelines import tiny_sd_pipeline  # noqa: E402

PROMPT = "moderate left pleural effusion."
ATOL = 2e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny diffusers pipeline folder."""
    folder = tmp_path_factory.mktemp("base")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs():
    """UNet inputs: latents (1, 8, 8, 4) NHWC, timestep 500, text states (1, 77, 16); prompt ids (1, 77)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 8, 8, 4)).astype(np.float32), np.array([500]),
            rng.standard_normal((1, 77, 16)).astype(np.float32))


def _reference(base):
    return diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, *args):
    return module.apply({"params": params}, *args)


def _our_outputs(pipe, inputs, prompt=PROMPT):
    """(UNet output (1, 8, 8, 4), text states (1, 77, 16)) of our pipeline."""
    return np.asarray(_apply(pipe.unet, pipe.unet_params, *inputs)), np.asarray(pipe.encode_text([prompt]))


def _diffusers_outputs(reference, inputs, prompt=PROMPT):
    latents, t, states = inputs
    with torch.no_grad():
        unet = reference.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                              torch.from_numpy(states)).sample.numpy().transpose(0, 2, 3, 1)
        text = reference.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
    return unet, text


def _assert_close(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def _random_lora_b(trainable, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32) if path[-1].key == "lora_B" else x,
        trainable)


def test_our_lora_file_loads_in_diffusers_and_peft_as_merged_here(base, inputs, tmp_path):
    pipe = cxr_ldm.Pipeline.from_pretrained(base)
    config = finetune.FinetuneConfig(mode="lora", lora_rank=2, lora_alpha=6.0, lora_text_encoder=True)
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params, "vae": pipe.vae_params}
    trainable, frozen = finetune.split_params(config, params, rng=jax.random.PRNGKey(0))
    trainable = _random_lora_b(trainable, 1)
    merged = finetune.merge_params(config, trainable, frozen)
    pipe.unet_params, pipe.text_encoder_params = merged["unet"], merged["text_encoder"]
    ours = _our_outputs(pipe, inputs)
    finetune.save_adapter(config, trainable, str(tmp_path / "adapter"))

    reference = _reference(base)
    before = _diffusers_outputs(reference, inputs)
    assert np.abs(before[0] - ours[0]).max() > 100 * ATOL and np.abs(before[1] - ours[1]).max() > 100 * ATOL
    reference.load_lora_weights(tmp_path / "adapter")
    _assert_close(ours, _diffusers_outputs(reference, inputs))

    unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet")
    peft_unet = peft.PeftModel.from_pretrained(unet, tmp_path / "adapter" / "unet").eval()
    latents, t, states = inputs
    with torch.no_grad():
        out = peft_unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(states)).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, ours[0], atol=ATOL, rtol=0)

    again = cxr_ldm.Pipeline.from_pretrained(base)
    again.load_lora_weights(tmp_path / "adapter")
    _assert_close(_our_outputs(again, inputs), ours)


UNET_LORA = dict(r=2, lora_alpha=5, init_lora_weights="gaussian",
                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])  # proj_in: a 1x1 conv
TEXT_LORA = dict(r=3, lora_alpha=2, use_rslora=True, init_lora_weights="gaussian",
                 target_modules=["q_proj", "v_proj", "fc1"])


def _randomize_lora_b(reference, seed):
    """lora_B random (PEFT starts it at zero), so that the adapters change the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for model in (reference.unet, reference.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)


def test_diffusers_lora_file_merges_here_as_diffusers_runs_it(base, inputs, tmp_path):
    reference = _reference(base)
    reference.unet.add_adapter(peft.LoraConfig(**UNET_LORA))
    text_encoder = peft.get_peft_model(reference.text_encoder, peft.LoraConfig(**TEXT_LORA))
    _randomize_lora_b(reference, 2)
    # As diffusers' LoRA training scripts save (their key spellings), with the LoraConfigs as metadata.
    text_layers = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(text_encoder).items()}
    reference.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(reference.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_layers),
        unet_lora_adapter_metadata=reference.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict())
    keys = safetensors_torch.load_file(tmp_path / adapters.LORA_WEIGHTS_NAME)
    assert any(k.endswith("to_q.lora.down.weight") for k in keys)
    assert any(k.endswith("q_proj.lora_linear_layer.down.weight") for k in keys)
    reference.fuse_lora(lora_scale=0.7)
    theirs = _diffusers_outputs(reference, inputs)

    pipe = cxr_ldm.Pipeline.from_pretrained(base)
    before = _our_outputs(pipe, inputs)
    assert np.abs(before[0] - theirs[0]).max() > 100 * ATOL and np.abs(before[1] - theirs[1]).max() > 100 * ATOL
    pipe.load_lora_weights(tmp_path / adapters.LORA_WEIGHTS_NAME, scale=0.7)
    _assert_close(_our_outputs(pipe, inputs), theirs)


def test_peft_and_kohya_lora_files_merge_here_as_diffusers_runs_them(base, inputs, tmp_path):
    reference = _reference(base)
    reference.unet.add_adapter(peft.LoraConfig(**UNET_LORA))
    # PEFT's own model wrapper (LoRA layers put into reference.text_encoder) and its save:
    # adapter_config.json + adapter_model.safetensors.
    text_encoder = peft.get_peft_model(reference.text_encoder, peft.LoraConfig(**TEXT_LORA))
    _randomize_lora_b(reference, 3)
    text_encoder.save_pretrained(tmp_path / "peft")
    # kohya-ss names and alphas (alpha 1 with r 2: scale 0.5); diffusers converts them on load.
    kohya = {}
    for module, (down, up) in _factors(get_peft_model_state_dict(reference.unet)).items():
        name = "lora_unet_" + module.replace(".", "_")
        kohya |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
    safetensors_torch.save_file(kohya, tmp_path / "kohya.safetensors")

    with torch.no_grad():
        text_states = reference.encode_prompt(PROMPT, "cpu", 1, False)[0].numpy()
    kohya_reference = _reference(base)
    kohya_reference.load_lora_weights(tmp_path / "kohya.safetensors")
    theirs = _diffusers_outputs(kohya_reference, inputs)[0], text_states

    pipe = cxr_ldm.Pipeline.from_pretrained(base)
    pipe.load_lora_weights(tmp_path / "peft")
    pipe.load_lora_weights(tmp_path / "kohya.safetensors")
    _assert_close(_our_outputs(pipe, inputs), theirs)


def _factors(state):
    """PEFT-style tensors -> {module: (lora_A, lora_B)}."""
    return {key.removesuffix(".lora_A.weight"): (value, state[key.replace("lora_A", "lora_B")])
            for key, value in state.items() if key.endswith(".lora_A.weight")}


def test_textual_inversion_files_load_on_both_sides_alike(base, inputs, tmp_path):
    rng = np.random.default_rng(4)
    # Ours: one vector for "<pleura>", as train.py writes it.
    ours_file = adapters.save_embeddings(tmp_path / "ours", {"<pleura>": rng.standard_normal(16)})[0]
    # diffusers' training script: {token: (n, D)}; two vectors make the tokens <cardio> and <cardio>_1.
    safetensors_torch.save_file({"<cardio>": torch.randn(2, 16)}, tmp_path / adapters.EMBEDDINGS_NAME)
    # A1111 / kohya-ss: {"emb_params": (n, D)}, the token named by the caller.
    safetensors_torch.save_file({"emb_params": torch.randn(1, 16)}, tmp_path / "a1111.safetensors")
    prompt = "<cardio> and <pleura> with <spine>."

    reference, pipe = _reference(base), cxr_ldm.Pipeline.from_pretrained(base)
    for target in (reference, pipe):
        target.load_textual_inversion(ours_file)
        target.load_textual_inversion(tmp_path)
        target.load_textual_inversion(tmp_path / "a1111.safetensors", token="<spine>")
    assert pipe.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    ours, theirs = _our_outputs(pipe, inputs, prompt), _diffusers_outputs(reference, inputs, prompt)
    np.testing.assert_allclose(ours[1], theirs[1], atol=ATOL, rtol=0)
    plain = _our_outputs(cxr_ldm.Pipeline.from_pretrained(base), inputs, prompt)[1]
    assert np.abs(plain - ours[1]).max() > 100 * ATOL

    with pytest.raises(ValueError, match="already in the tokenizer"):
        pipe.load_textual_inversion(ours_file)


def test_mixed_rank_lora_of_convs_and_linears_loads_in_peft_and_diffusers_as_merged_here(base, inputs, tmp_path):
    rng = np.random.default_rng(5)
    layers = {"down_blocks.0.attentions.0.proj_in": adapters.LoraLayer(  # a 1x1 conv, 16 -> 16 channels
                  rng.standard_normal((2, 16, 1, 1)), 0.2 * rng.standard_normal((16, 2, 1, 1)), 3.0),
              "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": adapters.LoraLayer(  # 16 -> 16
                  rng.standard_normal((3, 16)), 0.2 * rng.standard_normal((16, 3)), 0.5)}
    adapters.save_lora(tmp_path, {"unet": layers})
    config = peft.LoraConfig.from_pretrained(tmp_path / "unet")
    assert config.rank_pattern == config.alpha_pattern != {}

    pipe = cxr_ldm.Pipeline.from_pretrained(base)
    before = _our_outputs(pipe, inputs)[0]
    pipe.load_lora_weights(tmp_path)
    ours = _our_outputs(pipe, inputs)[0]
    assert np.abs(before - ours).max() > 100 * ATOL
    peft_unet = peft.PeftModel.from_pretrained(diffusers.UNet2DConditionModel.from_pretrained(base / "unet"),
                                               tmp_path / "unet").eval()
    reference = _reference(base)
    reference.load_lora_weights(tmp_path)
    latents, t, states = inputs
    for unet in (peft_unet, reference.unet):
        with torch.no_grad():
            out = unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                       torch.from_numpy(states)).sample.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(out, ours, atol=ATOL, rtol=0)
