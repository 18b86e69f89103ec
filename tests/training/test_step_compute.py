"""What the UNet train step computes: the analytic FLOP count against XLA's, the bf16 step against the
fp32 one, and in the lowered bf16 step donated state, float32 master weights and optimizer state, bf16
convolutions and matmuls, no cast undone by the next one."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_ldm.models import unet_flops
from cxr_ldm.models.unet import dummy_inputs
from cxr_ldm.training import optimizer, sharding, state, steps
from helpers.training import random_params, tiny_models

BATCH, LATENT, TEXT = 2, 8, 8
# XLA counts the elementwise work (norms, activations, softmax) that the analytic count leaves out, and
# convolution taps that fall on the zero padding, which it leaves out; at this size the two nearly cancel.
FLOPS_RTOL = 0.03


@pytest.fixture(scope="module")
def unet_and_batch():
    unet = tiny_models().unet  # one cross-attention level of 32 channels
    params = random_params(unet, *dummy_inputs(unet.config))
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((BATCH, LATENT, LATENT, 4), np.float32),
             "noise": rng.standard_normal((BATCH, LATENT, LATENT, 4), np.float32),
             "t": np.array([10, 900], np.int32),
             "context": rng.standard_normal((BATCH, TEXT, unet.config.cross_attention_dim), np.float32)}
    return unet, params, batch


def _loss(unet):
    def loss(params, batch):
        prediction = unet.apply({"params": params}, batch["x"], batch["t"], batch["context"])
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - batch["noise"]))
    return loss


@pytest.fixture(scope="module")
def grads_by_dtype(unet_and_batch):
    """{dtype name: (compiled value_and_grad, loss, grads)} of the fp32 and the bf16-compute UNet."""
    unet, params, batch = unet_and_batch
    out = {}
    for dtype in ("float32", "bfloat16"):
        compiled = jax.jit(jax.value_and_grad(_loss(unet.clone(dtype=jnp.dtype(dtype))))).lower(params, batch).compile()
        out[dtype] = (compiled, *compiled(params, batch))
    return out


def test_analytic_flops_match_xla_cost_analysis(unet_and_batch, grads_by_dtype):
    unet, _, _ = unet_and_batch
    counted = grads_by_dtype["float32"][0].cost_analysis()["flops"]
    analytic = unet_flops.train_step_flops(unet.config, BATCH, LATENT, LATENT, TEXT)
    assert analytic == pytest.approx(counted, rel=FLOPS_RTOL)
    # SD 1.5 at 512 px: about 0.8 TFLOP per image and forward pass.
    sd15 = unet_flops.forward_flops(type(unet.config)(cross_attention_dim=768), 1, 64, 64, 77)
    assert 0.78e12 < sd15 < 0.82e12


def test_bf16_step_matches_fp32_within_bf16_tolerance(grads_by_dtype):
    _, loss32, grads32 = grads_by_dtype["float32"]
    _, loss16, grads16 = grads_by_dtype["bfloat16"]
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    for path, g32 in jax.tree_util.tree_leaves_with_path(grads32):
        g16 = np.asarray(_get(grads16, path))
        assert g16.dtype == np.float32  # gradients of the float32 master weights
        error = np.linalg.norm(g16 - g32) / max(np.linalg.norm(g32), 1e-12)
        assert error < 0.05, (jax.tree_util.keystr(path), error)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_bf16_step_donates_state_and_keeps_fp32_master_weights(unet_and_batch):
    unet, params, batch = unet_and_batch
    module = unet.clone(dtype=jnp.bfloat16)

    def loss_fn(trainable, frozen, batch, rng, update_index):
        return _loss(module)(trainable["unet"], batch), {}
    tx = optimizer.make_optimizer(optimizer.OptimizerConfig(learning_rate=1e-4, schedule="constant"))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    abstract = jax.eval_shape(lambda p: state.create_train_state({"unet": p}, {}, tx, jax.random.PRNGKey(0)), params)
    step = steps.make_train_step(loss_fn, tx, mesh, state.train_state_shardings(abstract, mesh))
    text = step.lower(abstract, jax.eval_shape(lambda b: b, batch)).as_text()

    signature = text[text.index("func.func public @main"):].split("{\n", 1)[0]
    state_args = re.findall(r"%arg\d+: tensor<(?:\d+x)*(\w+)>[^%]*?tf\.aliasing_output", signature)
    assert len(state_args) == len(jax.tree_util.tree_leaves(abstract))  # every state buffer donated
    assert "bf16" not in signature  # params, Adam moments: float32
    element = lambda op: re.findall(rf"{op}.*?-> tensor<(?:\d+x)*(\w+)>", text)
    assert set(element("stablehlo.convolution")) == {"bf16"}
    # matmuls in bf16, but for the attention logits, which jax.nn.dot_product_attention keeps in float32
    dots = element("stablehlo.dot_general")
    assert dots.count("bf16") > 2 * dots.count("f32") > 0
    converts = {out: (source, origin, to) for out, source, origin, to in re.findall(
        r"(%\S+) = stablehlo.convert (%\S+) : \(tensor<(?:\d+x)*(\w+)>\) -> tensor<(?:\d+x)*(\w+)>", text)}
    undone = [out for out, (source, _, to) in converts.items() if source in converts and converts[source][1] == to]
    assert not undone  # no x -> float32 -> x (or x -> bf16 -> x) casts
