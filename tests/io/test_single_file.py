"""Single-file SD 1.x checkpoints: diffusers -> original layout (written here) -> convert_single_file round trip."""
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.numpy import load_file, save_file

from cxr_ldm import load_component
from cxr_ldm.io.single_file import SingleFileError, convert_single_file, convert_text_encoder, convert_unet

DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
CHANNELS = (32, 32, 64)
LAYERS = 2


def randomised(model):
    """Every tensor distinct (norm weights too), so any swapped key changes some value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_models():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=DOWN, up_block_types=UP,
                                block_out_channels=CHANNELS, layers_per_block=LAYERS, cross_attention_dim=32,
                                attention_head_dim=8)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=CHANNELS, layers_per_block=LAYERS,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        latent_channels=4, sample_size=32)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=998, eos_token_id=999))
    return randomised(unet), randomised(vae), randomised(clip)


def _replace_prefixes(key: str, pairs) -> str:
    for diffusers_prefix, ldm_prefix in pairs:
        if key.startswith(diffusers_prefix):
            return ldm_prefix + key[len(diffusers_prefix):]
    raise KeyError(key)


def unet_to_original(state):
    """diffusers UNet keys -> latent-diffusion keys (written independently of the module under test)."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    per_block = LAYERS + 1
    for i in range(len(DOWN)):
        for j in range(LAYERS):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per_block * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per_block * i + j + 1}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_block * (i + 1)}.0.op."))
        for j in range(per_block):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per_block * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per_block * i + j}.1."))
        slot = 2 if UP[i].startswith("CrossAttn") else 1
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per_block * i + LAYERS}.{slot}."))
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    out = {}
    for key, value in state.items():
        if ".resnets." in key:
            for new, old in resnet:
                key = key.replace(f".{new}.", f".{old}.")
        out[_replace_prefixes(key, pairs)] = value
    return out


def vae_to_original(state):
    """diffusers AutoencoderKL keys -> latent-diffusion keys, attention projections as 1x1 convs."""
    n = len(CHANNELS)
    pairs = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(LAYERS)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.")
                  for j in range(LAYERS + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attentions." in key:
            module, leaf = key.rsplit(".", 1)
            head, sub = module.split(".attentions.0.")
            key = f"{head}.attentions.0.{attention[sub]}.{leaf}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[_replace_prefixes(key, pairs)] = value
    return out


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder with diffusers configs, single-file path, the three reference state dicts)."""
    root = tmp_path_factory.mktemp("single")
    unet, vae, clip = tiny_models()
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        model.save_pretrained(root / "configs" / name)
    refs = {"unet": numpy_state(unet), "vae": numpy_state(vae), "text_encoder": numpy_state(clip)}
    single = {"model.diffusion_model." + k: v for k, v in unet_to_original(refs["unet"]).items()}
    single.update({"first_stage_model." + k: v for k, v in vae_to_original(refs["vae"]).items()})
    single.update({"cond_stage_model.transformer.text_model." + k: v for k, v in refs["text_encoder"].items()})
    single["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    single["alphas_cumprod"] = np.linspace(1, 0, 10, dtype=np.float32)
    save_file(single, root / "sd.safetensors")
    return root / "configs", root / "sd.safetensors", refs


def assert_same_state(got: dict, want: dict, prefix: str = ""):
    assert sorted(got) == sorted(prefix + k for k in want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[prefix + key], value, err_msg=key)


def test_round_trip_to_diffusers_folder(tmp_path, checkpoint):
    config_dir, single, refs = checkpoint
    out = convert_single_file(single, config_dir, tmp_path / "pipe")
    assert_same_state(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), refs["unet"])
    assert_same_state(load_file(out / "vae" / "diffusion_pytorch_model.safetensors"), refs["vae"])
    assert_same_state(load_file(out / "text_encoder" / "model.safetensors"), refs["text_encoder"], "text_model.")
    assert_same_state(numpy_state(UNet2DConditionModel.from_pretrained(out / "unet")), refs["unet"])
    assert_same_state(numpy_state(AutoencoderKL.from_pretrained(out / "vae")), refs["vae"])
    load_component(out / "text_encoder")
    with pytest.raises(FileExistsError):
        convert_single_file(single, config_dir, out)


def test_unmatched_keys_are_named(checkpoint):
    config_dir, single, _ = checkpoint
    state = load_file(single)
    state["model.diffusion_model.input_blocks.42.0.in_layers.0.weight"] = np.zeros(3, np.float32)
    with pytest.raises(SingleFileError, match=r"input_blocks\.42\.0\.in_layers\.0\.weight"):
        convert_unet(state, UNet2DConditionModel.load_config(config_dir / "unet"))


def test_extract_ema_takes_ema_copy(checkpoint):
    config_dir, single, refs = checkpoint
    state = load_file(single)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    for key in unet_keys:
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + 1
    config = UNet2DConditionModel.load_config(config_dir / "unet")
    ema = convert_unet(state, config, extract_ema=True)
    assert_same_state(ema, {k: v + 1 for k, v in refs["unet"].items()})
    del state["model_ema." + "".join(unet_keys[0].split(".")[1:])]
    with pytest.raises(SingleFileError, match="EMA"):
        convert_unet(state, config, extract_ema=True)


def test_open_clip_and_pickles_refused(tmp_path, checkpoint):
    config_dir, _, _ = checkpoint
    with pytest.raises(SingleFileError, match="OpenCLIP"):
        convert_text_encoder({"cond_stage_model.model.token_embedding.weight": np.zeros((4, 2), np.float32)})
    (tmp_path / "sd.ckpt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        convert_single_file(tmp_path / "sd.ckpt", config_dir, tmp_path / "out")
