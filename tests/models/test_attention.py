"""Attention kernels: which one "auto" picks per backend, dtype and shape, and that each path computes
the same attention (on CPU: XLA's, and the TPU flash kernel's layout through its pure-JAX reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.flash_attention import mha_reference

from cxr_ldm.models.layers import dot_product_attention, heads_first_attention, select_attention

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("backend, dtype, head_dim, q_len, kv_len, masked, capability, expected", [
    ("cpu", BF16, 40, 4096, 77, False, None, "xla"),
    ("gpu", BF16, 40, 4096, 77, False, 9.0, "cudnn"),  # SD 1.5's first block, cross-attention
    ("gpu", F16, 160, 256, 256, False, 9.0, "cudnn"),  # its 1280-channel blocks on Hopper
    ("gpu", BF16, 160, 256, 256, False, 8.0, "xla"),  # ... and on Ampere
    ("gpu", BF16, 64, 256, 256, False, 7.5, "xla"),  # before Ampere
    ("gpu", BF16, 64, 256, 256, False, 0.0, "xla"),  # no CUDA capability (ROCm)
    ("gpu", F32, 40, 4096, 4096, False, 9.0, "xla"),
    ("gpu", BF16, 12, 64, 64, False, 9.0, "xla"),  # head_dim not a multiple of 8
    ("gpu", BF16, 64, 77, 77, True, 9.0, "xla"),  # a padding mask (text encoders)
    ("tpu", BF16, 40, 4096, 4096, False, None, "pallas"),
    ("tpu", F32, 160, 256, 1024, False, None, "pallas"),
    ("tpu", BF16, 40, 4096, 77, False, None, "xla"),  # 77 tokens: not whole 128-row blocks
    ("tpu", BF16, 40, 64, 64, False, None, "xla"),
    ("tpu", BF16, 64, 128, 128, True, None, "xla"),
])
def test_auto_picks_the_kernel_by_backend_dtype_and_shape(backend, dtype, head_dim, q_len, kv_len, masked,
                                                          capability, expected):
    assert select_attention(dtype, head_dim, q_len, kv_len, masked=masked, backend=backend,
                            compute_capability=capability) == expected


def _qkv(dtype, batch=2, q_len=24, kv_len=10, heads=3, head_dim=16):
    rng = np.random.default_rng(0)
    make = lambda length: jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
    return make(q_len), make(kv_len), make(kv_len)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_auto_falls_back_to_xla_on_cpu(dtype):
    q, k, v = _qkv(dtype)
    auto = jax.jit(lambda *a: dot_product_attention(*a, implementation="auto"))(q, k, v)
    xla = jax.jit(lambda *a: dot_product_attention(*a, implementation="xla"))(q, k, v)
    assert auto.dtype == dtype
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(xla, np.float32))


@pytest.mark.parametrize("is_causal", [False, True])
def test_the_tpu_kernel_layout_computes_the_same_attention(is_causal):
    # heads_first_attention is what runs jax's Pallas TPU flash kernel; here with that module's pure-JAX reference.
    q, k, v = _qkv(F32, kv_len=24)
    kernel = lambda q, k, v, causal, sm_scale: mha_reference(q, k, v, None, causal=causal, sm_scale=sm_scale)
    out = heads_first_attention(kernel, q, k, v, is_causal)
    expected = dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes no mask"):
        dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 24, 24), bool), implementation="pallas")
