"""Inception-V3 pool3 features (2048-d) for the standard FID, in Flax.

The network is the "FID Inception" of TensorFlow's original FID code as ported by pytorch-fid
(Inception-V3 of 2015-12-05 with TensorFlow's average pooling that ignores padding, and max pooling
in the last block). Weights come from a local file that the user supplies -- runtime never downloads:

  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
  (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth;
  "6726825d" is the first 8 hex digits of the file's sha256, the torch.hub check-hash convention),
  converted once to safetensors:

    python -m cxr_ldm.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
        --out pt_inception-2015-12-05.safetensors --allow-pickle

  (the .pth file is a pickle: the converter reads it only with --allow-pickle, through
  torch.load(weights_only=True), and checks the sha256 prefix). A safetensors or .npz file holding
  the same tensors under the same names works as well. `fc.*` (the 1008-class logits) and
  `*.num_batches_tracked` entries are ignored.

Preprocessing as pytorch-fid: images in [0, 1], grayscale repeated to 3 channels, bilinear resize to
299 x 299 (half-pixel centres, no antialiasing: F.interpolate(align_corners=False)), then 2x - 1.
"""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxr_ldm.io.weights import read_tensor_file, write_safetensors

PUBLISHED_FILE = "pt_inception-2015-12-05-6726825d.pth"
PUBLISHED_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
FEATURE_DIM = 2048
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("fc.",)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, inference statistics) + ReLU; params as torch names it."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), use_bias=False, name="conv",
                    padding=((self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])))(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


class FrozenBatchNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias with fixed statistics (all four are params)."""
    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """max_pool=False: Mixed_7b (average pool ignoring padding); True: Mixed_7c (3x3 max pool)."""
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg_pool_3x3(x))
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """(B, S, S, 3) in [-1, 1] (S >= 75) -> pool3 features (B, 2048)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, 1|3) in [0, 1] -> (B, 299, 299, 3) in [-1, 1], as pytorch-fid (module doc)."""
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                               "linear", antialias=False)
    return 2.0 * resized - 1.0


def torch_tensors_to_params(state: Mapping[str, np.ndarray]) -> dict:
    """Torch names and layouts -> Flax param tree of these modules (no checks): "a.b.conv.weight"
    (O, I, kh, kw) -> a/b/conv/kernel (kh, kw, I, O); bn weight/bias/running_mean/running_var ->
    scale/bias/mean/var; fc.* and num_batches_tracked are dropped."""
    renames = {"weight": "scale", "running_mean": "mean", "running_var": "var"}
    params: dict = {}
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES):
            continue
        *path, leaf = key.split(".")
        value = np.asarray(value, np.float32)
        if path and path[-1] == "conv" and leaf == "weight":
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        elif path and path[-1] == "bn":
            leaf = renames.get(leaf, leaf)
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params


def state_dict_to_params(state: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """pytorch-fid Inception-V3 tensors -> FIDInceptionV3 params, checked against the network's names and
    shapes (ValueError naming `source` and the first mismatches)."""
    params = torch_tensors_to_params(state)
    expected = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]
    flat_expected = {k: v.shape for k, v in traverse_util.flatten_dict(expected, sep=".").items()}
    flat_got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep=".").items()}
    missing = sorted(set(flat_expected) - set(flat_got))
    unexpected = sorted(set(flat_got) - set(flat_expected))
    wrong = sorted(k for k in set(flat_expected) & set(flat_got) if flat_expected[k] != flat_got[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{source} is not the FID Inception-V3 ({PUBLISHED_FILE} tensors): "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(wrong)} of wrong shape (e.g. {wrong[:3]})")
    return params


def load_params(path: str | Path) -> dict:
    """FIDInceptionV3 params from a .safetensors or .npz file of the pytorch-fid tensors (module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {path} not found. The standard FID needs pytorch-fid's {PUBLISHED_FILE} "
            f"(sha256 {PUBLISHED_SHA256_PREFIX}...), converted with: python -m cxr_ldm.evaluation.inception "
            f"--convert {PUBLISHED_FILE} --out pt_inception-2015-12-05.safetensors --allow-pickle")
    state = read_tensor_file(path, "convert a .pth with `python -m cxr_ldm.evaluation.inception --convert FILE.pth "
                                   "--out FILE.safetensors --allow-pickle`")
    return state_dict_to_params(state, str(path))


class BatchedFeatures:
    """Callable: images (N, H, W, C) -> features (N, feature_dim) of `dtype`, by a jitted `apply(params, x)` on
    fixed-size batches (the last one padded), so that it compiles once."""

    feature_dim: int
    dtype = np.float64

    def __init__(self, params: dict, apply, batch_size: int = 32):
        self.params, self.batch_size = params, batch_size
        self._apply = jax.jit(apply)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        out = [np.zeros((0, self.feature_dim), self.dtype)]
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            padded = np.pad(batch, ((0, self.batch_size - len(batch)),) + ((0, 0),) * 3)
            out.append(np.asarray(self._apply(self.params, padded), self.dtype)[:len(batch)])
        return np.concatenate(out)


class InceptionFeatures(BatchedFeatures):
    """Callable: images (N, H, W, 1|3) in [0, 1] -> pool3 features (N, 2048) float64, in batches."""

    feature_dim = FEATURE_DIM

    def __init__(self, params: dict, batch_size: int = 32):
        net = FIDInceptionV3()
        super().__init__(params, lambda p, x: net.apply({"params": p}, preprocess(x)), batch_size)

    @classmethod
    def from_file(cls, path: str | Path, batch_size: int = 32) -> "InceptionFeatures":
        return cls(load_params(path), batch_size)


def convert(source: Path, out: Path, allow_pickle: bool) -> None:
    """pytorch-fid .pth (only with allow_pickle) or .npz/.safetensors -> checked safetensors file."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if source.suffix in (".pth", ".pt", ".bin"):
        if not allow_pickle:
            raise SystemExit(f"{source} is a pickle, which can run code when loaded; pass --allow-pickle if "
                             "you trust it (the converter then uses torch.load(weights_only=True))")
        if source.name == PUBLISHED_FILE and not digest.startswith(PUBLISHED_SHA256_PREFIX):
            raise SystemExit(f"{source}: sha256 {digest} does not start with {PUBLISHED_SHA256_PREFIX}: "
                             "the download is corrupt or another file")
        import torch  # only for the one-off conversion of a trusted file

        state = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                 for k, v in torch.load(source, map_location="cpu", weights_only=True).items()}
    else:
        state = read_tensor_file(source, "or a .pth pickle with --allow-pickle")
    state_dict_to_params(state, str(source))  # refuse to write a file that would not load
    kept = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()
            if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(IGNORED_PREFIXES)}
    write_safetensors(out, kept)
    print(f"wrote {out} ({len(kept)} tensors) from {source} (sha256 {digest})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert pytorch-fid Inception weights to safetensors.")
    parser.add_argument("--convert", type=Path, required=True, help=f"source file, e.g. {PUBLISHED_FILE}")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--allow-pickle", action="store_true", help="allow reading a (trusted) .pth pickle")
    args = parser.parse_args(argv)
    convert(args.convert, args.out, args.allow_pickle)


if __name__ == "__main__":
    main()
