"""The LDM conditioned on a BERT folder (`config.ldm.text_encoder_from`): a tiny random transformers BertModel of
width 24 with a WordPiece vocab.txt, a UNet of cross_attention_dim 32 (configs/tiny.py) trained a few steps with
the BERT frozen ("unet") and trained ("text_encoder"). The projection trains in both; the exported pipeline
reloads and draws the in-training pipeline's images; its prompt states are transformers' BertModel last hidden
state (padding masked) through the saved projection."""
from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

import cxr_ldm  # noqa: E402
from configs import tiny  # noqa: E402
from cxr_ldm.training import ldm_stage, trainer  # noqa: E402

WORDS = ("no", "acute", "cardiopulmonary", "process", "large", "small", "left", "right", "pleural", "effusion",
         "moderate", "cardiomegaly", "mild", "pneumothorax", "apical", "lung", "lobe", "lower", "upper", ".", ",")
PROMPTS = ("Large left pleural effusion.", "No acute cardiopulmonary process.")


def _bert_folder(folder) -> str:
    """A random BertModel of width 24 (biases randomised too) and its WordPiece tokenizer, saved to `folder`."""
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + WORDS) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=16, pad_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return str(folder)


def _config(data_dir, bert: str, finetune: str):
    config = tiny.get_config()
    config.stages = ("autoencoder", "ldm")
    config.data.data_dir = str(data_dir)
    config.autoencoder.update({"num_steps": 2, "warmup_steps": 1, "eval_every": 2})
    config.ldm.update({"num_steps": 3, "warmup_steps": 1, "learning_rate": 1e-2, "text_encoder_learning_rate": 1e-2,
                       "text_encoder_from": bert, "finetune": finetune})
    config.update({"log_every": 1, "checkpoint_every": 3, "sample_every": 3})
    config.sample.update({"prompts": PROMPTS, "steps": 2})
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{finetune mode: (config, workdir, images the in-training pipeline drew at the last step)}; the second run
    starts from the first's autoencoder stage and draws no images (None)."""
    root = tmp_path_factory.mktemp("bert_conditioning")
    bert = _bert_folder(root / "bert")
    drawn, results = [], {}
    write_grid = ldm_stage.write_sample_grid

    def recording(pipe, config, workdir, name):
        s = config.sample
        drawn.append(pipe(list(s.prompts), num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                          sampler=s.sampler, seed=s.seed))
        return write_grid(pipe, config, workdir, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm_stage, "write_sample_grid", recording)
        for mode in ("unet", "text_encoder"):
            config, workdir = _config(root / "tfds", bert, mode), root / mode
            if results:  # no sample grid: the export is what is checked of this run
                shutil.copytree(results["unet"][1] / "autoencoder", workdir / "autoencoder")
                config.sample_every = 100
            assert trainer.run(config, str(workdir))
            results[mode] = (config, workdir, drawn[-1] if drawn else None)
    return bert, results


def _params(folder) -> dict:
    return jax.tree_util.tree_map(np.asarray, cxr_ldm.load_component(folder)[1])


def _leaves_equal(a, b) -> list[bool]:
    return [np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]


def test_bert_frozen_or_trained_and_the_projection_trained(runs):
    bert, results = runs
    config, workdir, _ = results["unet"]
    initial = ldm_stage.build_models(config, str(workdir), vocab_size=5 + len(WORDS)).params["text_encoder"]
    original = _params(bert)
    assert all(_leaves_equal(initial["bert"], original))
    query = lambda p: p["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    for mode in ("unet", "text_encoder"):  # both start from the same projection (the same seed)
        exported = results[mode][1] / "pipeline"
        trained = _params(exported / "text_encoder")
        if mode == "unet":
            assert all(_leaves_equal(trained, original))
        else:
            assert np.abs(query(trained) - query(original)).max() > 1e-4
        assert not any(_leaves_equal(_params(exported / "text_projection"), initial["projection"]))


def test_the_export_reloads_and_draws_the_in_training_images(runs):
    _, results = runs
    config, workdir, drawn = results["unet"]
    pipe = cxr_ldm.Pipeline.from_pretrained(workdir)
    s = config.sample
    images = pipe(list(s.prompts), num_inference_steps=s.steps, guidance_scale=s.guidance_scale, sampler=s.sampler,
                  seed=s.seed)
    assert images.shape == (2, 32, 32, 1)
    np.testing.assert_array_equal(images, drawn)


def test_prompt_states_are_transformers_bert_through_the_saved_projection(runs):
    _, results = runs
    exported = results["unet"][1] / "pipeline"
    pipe = cxr_ldm.Pipeline.from_pretrained(exported)
    got = np.asarray(pipe.encode_text(list(PROMPTS)))

    tokenizer = transformers.BertTokenizer.from_pretrained(str(exported / "tokenizer"))
    ids = tokenizer(list(PROMPTS), padding="max_length", max_length=16, return_tensors="pt")
    assert (ids.attention_mask.sum(1) < 16).all()  # both prompts are padded
    reference = transformers.BertModel.from_pretrained(str(exported / "text_encoder")).eval()
    linear = load_file(str(exported / "text_projection" / "diffusion_pytorch_model.safetensors"))
    with torch.no_grad():
        hidden = reference(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state.numpy()
    want = hidden @ linear["linear.weight"].T + linear["linear.bias"]
    assert got.shape == (2, 16, 32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
