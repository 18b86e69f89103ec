"""torchxrayvision DenseNet-121 features (1024-d): a chest X-ray feature space for FID, in Flax.

The network is torchxrayvision's `xrv.models.DenseNet` (DenseNet-121: growth 32, blocks 6/12/24/16,
64 initial features, 1 input channel) with the weights "densenet121-res224-all", the chest X-ray
feature space RoentGen reported its FID in. The features are its `features2(x)`: the convolutional
trunk (ending with BatchNorm `norm5`), ReLU, global average pooling, flatten. BatchNorm uses the stored
inference statistics (eps 1e-5, torch's default). The classifier head is not used.

Weights come from a local file that the user supplies -- runtime never downloads:

  torchxrayvision's `nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt`
  (https://github.com/mlmed/torchxrayvision/releases/download/v1/<that name>; torchxrayvision caches it
  as ~/.torchxrayvision/models_data/<that name>), converted once to safetensors:

    python -m cxr_ldm.evaluation.xrv --allow-pickle --out xrv-densenet121-res224-all.safetensors \
        --convert nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt

  A safetensors or .npz file holding the model's state-dict tensors under torch's names works as well
  (e.g. `safetensors.torch.save_file(model.state_dict(), ...)` of an `xrv.models.DenseNet`);
  `classifier.*`, `op_threshs` and `*.num_batches_tracked` are ignored.

  Reading the .pt: it is a pickle, which can run code when loaded, so the converter reads it only with
  --allow-pickle, and even then lets the file call or import nothing. A state dict loads with
  `torch.load(weights_only=True)`. The published file is not a state dict but a whole pickled module
  (`torch.save(model)`: references to `torchxrayvision.models.DenseNet`, `torch.nn.Conv2d`, ...), which
  plain `weights_only=True` refuses. In torch's zip format (torch >= 1.6) it loads with
  `weights_only=True` once every class reference is allowlisted as an inert record (`_PickledObject`:
  it stores its pickled attributes and runs nothing). In the legacy format -- likely that of the
  published files, as torchxrayvision patches them for the `_non_persistent_buffers_set` that modules
  pickled before torch 1.6 lack -- each module class is stored as a `("module", class, source)`
  persistent id, which torch's weights-only unpickler refuses whatever the allowlist. For those files
  the converter falls back to `torch.load(weights_only=False, pickle_module=...)` with a restricted
  unpickler (the Python documentation's "restricting globals": `find_class` returns only OrderedDict,
  set and torch's tensor and parameter rebuild functions, torch itself resolves the storage types, and
  every other reference becomes an inert record). The tensors are then read from the records'
  `_parameters`, `_buffers` and `_modules` as `nn.Module.state_dict()` reads them. Neither path imports
  torchxrayvision or torchvision. The tests convert torchxrayvision's DenseNet saved by torch 2.13 in
  both formats (the published file itself is not downloaded); if the published file fails anyway,
  export its state dict where torchxrayvision loads it, e.g.
  `safetensors.torch.save_file(xrv.models.DenseNet(weights="densenet121-res224-all").state_dict(), F)`.

Preprocessing as torchxrayvision: images (N, S, S, 1|3) in [0, 1], square (crop first, as
`xrv.datasets.XRayCenterCrop`); the first channel (as `xrv.utils.load_image`); scaled to [-1024, 1024] by
`xrv.utils.normalize(img, maxval=1)` = (2x - 1) * 1024; then, unless S = 224, resized to 224 x 224 the
way the pretrained model resizes any other input itself (`xrv.utils.fix_resolution`, called from
`features2`): F.interpolate(mode="bilinear", antialias=True, align_corners=False), i.e. a triangle
filter widened by the scale factor when downsampling, half-pixel centres, weights renormalised at the
borders -- which is `jax.image.resize(..., "linear", antialias=True)` (tests/evaluation/test_xrv.py
checks it against torch at 97 to 512 px). torchxrayvision's data set loaders resize with `XRayResizer`
(skimage) instead; at S = 224 no resampling happens at all. Convolutions run at full float32 precision
(`Precision.HIGHEST`: no TF32 on GPUs), like the float32 reference on a CPU.

Use: `XRVFeatures.from_file("xrv-densenet121-res224-all.safetensors")(images)` -> (N, 1024) float32.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import pickle
import pickletools
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxr_ldm.evaluation.inception import BatchedFeatures, FrozenBatchNorm
from cxr_ldm.io.weights import read_tensor_file, write_safetensors

WEIGHTS_NAME = "densenet121-res224-all"
PUBLISHED_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
PUBLISHED_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{PUBLISHED_FILE}"
INPUT_SIZE = 224
FEATURE_DIM = 1024
GROWTH_RATE, BN_SIZE, INIT_FEATURES, BLOCK_CONFIG = 32, 4, 64, (6, 12, 24, 16)
BN_EPS = 1e-5
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("classifier.",)
IGNORED_KEYS = ("op_threshs",)
CONVERT_COMMAND = (f"python -m cxr_ldm.evaluation.xrv --convert {PUBLISHED_FILE} "
                   "--out xrv-densenet121-res224-all.safetensors --allow-pickle")


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *, name: str) -> nn.Conv:
    """torch Conv2d(bias=False) in full float32 precision (no TF32 on GPUs), as the reference computes."""
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((padding, padding), (padding, padding)),
                   use_bias=False, precision=jax.lax.Precision.HIGHEST, name=name)


class DenseLayer(nn.Module):
    """norm1 -> relu -> conv1 (1x1, 128) -> norm2 -> relu -> conv2 (3x3, 32); output concatenated to input."""

    @nn.compact
    def __call__(self, x):
        y = _conv(BN_SIZE * GROWTH_RATE, 1, name="conv1")(nn.relu(FrozenBatchNorm(BN_EPS, name="norm1")(x)))
        y = _conv(GROWTH_RATE, 3, padding=1, name="conv2")(nn.relu(FrozenBatchNorm(BN_EPS, name="norm2")(y)))
        return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
    num_layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = DenseLayer(name=f"denselayer{i + 1}")(x)
        return x


class Transition(nn.Module):
    """norm -> relu -> conv (1x1) -> 2x2 average pool, stride 2."""
    features: int

    @nn.compact
    def __call__(self, x):
        x = _conv(self.features, 1, name="conv")(nn.relu(FrozenBatchNorm(BN_EPS, name="norm")(x)))
        return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNetTrunk(nn.Module):
    """torchxrayvision's `model.features`: conv0 .. norm5 (no final ReLU)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(FrozenBatchNorm(BN_EPS, name="norm0")(_conv(INIT_FEATURES, 7, 2, 3, name="conv0")(x)))
        x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        channels = INIT_FEATURES
        for i, num_layers in enumerate(BLOCK_CONFIG):
            x = DenseBlock(num_layers, name=f"denseblock{i + 1}")(x)
            channels += num_layers * GROWTH_RATE
            if i != len(BLOCK_CONFIG) - 1:
                channels //= 2
                x = Transition(channels, name=f"transition{i + 1}")(x)
        return FrozenBatchNorm(BN_EPS, name="norm5")(x)


class XRVDenseNet121(nn.Module):
    """(B, 224, 224, 1) in [-1024, 1024] -> `features2` (B, 1024): trunk, ReLU, global average pool."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(DenseNetTrunk(name="features")(x)).mean(axis=(1, 2))


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
    """(B, S, S, 1|3) in [0, 1] -> (B, 224, 224, 1) in [-1024, 1024], as torchxrayvision (module doc)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images (N, S, S, 1|3), got shape {images.shape}; "
                         "crop to a square first, as xrv.datasets.XRayCenterCrop")
    x = (2.0 * images[..., :1].astype(jnp.float32) - 1.0) * 1024.0
    if images.shape[1] != INPUT_SIZE:
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 1), "linear", antialias=True)
    return x


def _is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES) or key in IGNORED_KEYS


def torch_tensors_to_params(state: Mapping[str, np.ndarray]) -> dict:
    """Torch names and layouts -> Flax param tree of these modules (no checks): "features.conv0.weight"
    (O, I, kh, kw) -> features/conv0/kernel (kh, kw, I, O); norm* weight/bias/running_mean/running_var ->
    scale/bias/mean/var; classifier.*, op_threshs and num_batches_tracked are dropped."""
    renames = {"weight": "scale", "running_mean": "mean", "running_var": "var"}
    params: dict = {}
    for key, value in state.items():
        if _is_ignored(key):
            continue
        *path, leaf = key.split(".")
        value = np.asarray(value, np.float32)
        if path and path[-1].startswith("conv") and leaf == "weight":
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        elif path and path[-1].startswith("norm"):
            leaf = renames.get(leaf, leaf)
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params


@functools.cache
def _expected_torch_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = jax.eval_shape(XRVDenseNet121().init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    leaves = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var", "bias": "bias"}
    expected = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        shape = leaf.shape if path[-1] != "kernel" else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
        expected[".".join(path[:-1] + (leaves[path[-1]],))] = shape
    return tuple(expected.items())


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """The torch state-dict names and shapes this network needs (ignored entries excluded)."""
    return dict(_expected_torch_shapes())


def state_dict_to_params(state: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """torchxrayvision DenseNet-121 tensors -> XRVDenseNet121 params, checked against the network's names
    and shapes (ValueError naming `source` and the first mismatched tensors by their torch names)."""
    expected = expected_torch_shapes()
    got = {k: tuple(np.shape(v)) for k, v in state.items() if not _is_ignored(k)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{k} {got[k]} (expected {expected[k]})" for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{source} is not torchxrayvision's DenseNet-121 ({WEIGHTS_NAME}, {PUBLISHED_FILE}): "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(wrong)} of wrong shape (e.g. {wrong[:3]})")
    return torch_tensors_to_params(state)


def load_params(path: str | Path) -> dict:
    """XRVDenseNet121 params from a .safetensors or .npz file of the torchxrayvision tensors (module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"torchxrayvision weights {path} not found. The XRV FID needs torchxrayvision's {WEIGHTS_NAME} "
            f"weights ({PUBLISHED_URL}), converted with: {CONVERT_COMMAND}")
    state = read_tensor_file(path, "convert a .pt with `python -m cxr_ldm.evaluation.xrv --convert FILE.pt "
                                   "--out FILE.safetensors --allow-pickle`")
    return state_dict_to_params(state, str(path))


class XRVFeatures(BatchedFeatures):
    """Callable: images (N, S, S, 1|3) in [0, 1] -> torchxrayvision `features2` (N, 1024) float32, in batches."""

    feature_dim = FEATURE_DIM
    dtype = np.float32

    def __init__(self, params: dict, batch_size: int = 32):
        net = XRVDenseNet121()
        super().__init__(params, lambda p, x: net.apply({"params": p}, preprocess(x)), batch_size)

    @classmethod
    def from_file(cls, path: str | Path, batch_size: int = 32) -> "XRVFeatures":
        return cls(load_params(path), batch_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
            raise ValueError(f"expected square images (N, S, S, 1|3), got shape {images.shape}; "
                             "crop to a square first, as xrv.datasets.XRayCenterCrop")
        if len(images) and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(f"expected images in [0, 1], got values in [{images.min()}, {images.max()}]")
        return super().__call__(images)


# --- Reading torch pickles without running them (module doc) ---

class _PickledObject:
    """What a class or function reference of a weights pickle becomes: it keeps its constructor arguments
    and pickled state and runs nothing."""
    qualified_name = "?"
    dump_patches = False  # read by torch's legacy loader when it compares a class's saved source

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


_RECORD_TYPES: dict[str, type] = {}


def _record_type(qualified_name: str) -> type:
    if qualified_name not in _RECORD_TYPES:
        _RECORD_TYPES[qualified_name] = type(qualified_name.rsplit(".", 1)[-1], (_PickledObject,),
                                             {"qualified_name": qualified_name, "__module__": __name__})
    return _RECORD_TYPES[qualified_name]


def _pickle_globals(path: Path) -> set[str]:
    """The GLOBAL references of a torch file's object pickle, read without unpickling (pickletools)."""
    def scan(stream, count: int) -> set[str]:
        names = set()
        for _ in range(count):
            names.update(arg.replace(" ", ".") for op, arg, _ in pickletools.genops(stream) if op.name == "GLOBAL")
        return names

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return set().union(*(scan(io.BytesIO(archive.read(n)), 1)
                                 for n in archive.namelist() if n.endswith("data.pkl")))
    with open(path, "rb") as f:  # legacy format: magic number, protocol, sys info, then the object
        return scan(f, 4)


class _RestrictedUnpickler(pickle.Unpickler):
    """find_class returns only these; every other reference becomes an inert `_PickledObject` type."""
    _ALLOWED = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set, ("__builtin__", "set"): set}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            import torch._utils

            return getattr(torch._utils, name)
        return _record_type(f"{module}.{name}")


_restricted_pickle = types.SimpleNamespace(
    __name__="restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load())


def _module_tensors(record: _PickledObject, prefix: str = "") -> dict:
    """nn.Module.state_dict() of a pickled module record: parameters, persistent buffers, then children."""
    state = record.state[0] if isinstance(record.state, tuple) else record.state
    if not isinstance(state, Mapping) or "_modules" not in state:
        raise ValueError(f"{prefix or 'the pickled object'} ({record.qualified_name}) is not a pickled torch module")
    skip = state.get("_non_persistent_buffers_set") or ()
    tensors = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and not (group == "_buffers" and name in skip):
                tensors[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(_module_tensors(child, f"{prefix}{name}."))
    return tensors


def read_torch_pickle(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Tensors of a trusted torch .pt/.pth/.bin file (a state dict, {"state_dict": ...}, or a whole pickled
    module) as float32 numpy arrays, without running the pickle's code (module doc); and what it held."""
    import torch  # only for the one-off conversion of a trusted file

    records = [(_record_type(name), name) for name in _pickle_globals(path)]
    try:  # torch's own allowlist wins over these records, so tensors and storages still load as tensors
        with torch.serialization.safe_globals(records):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        how = "torch.load(weights_only=True)"
    except pickle.UnpicklingError as err:
        if zipfile.is_zipfile(path):
            raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it: {err}") from err
        with warnings.catch_warnings():  # torch warns that it cannot check the records' source code
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        how = "torch.load with a restricted unpickler (legacy-format module pickle)"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, _PickledObject):
        held, state = f"a pickled {obj.qualified_name} module", _module_tensors(obj)
    elif isinstance(obj, Mapping):
        held, state = "a state dict", dict(obj)
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}, neither a state dict nor a pickled torch module")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    arrays = {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy() for k, v in state.items()}
    return arrays, f"{held}, read with {how}"


def convert(source: Path, out: Path, allow_pickle: bool) -> None:
    """torchxrayvision .pt (only with allow_pickle) or .npz/.safetensors -> checked safetensors file."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    held = source.suffix
    if source.suffix in (".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise SystemExit(f"{source} is a pickle, which can run code when loaded; pass --allow-pickle if "
                             "you trust it (the converter then reads it without running its code: module doc "
                             "of cxr_ldm.evaluation.xrv)")
        state, held = read_torch_pickle(source)
    else:
        state = read_tensor_file(source, "or a .pt pickle with --allow-pickle")
    state_dict_to_params(state, str(source))  # refuse to write a file that would not load
    kept = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items() if not _is_ignored(k)}
    write_safetensors(out, kept)
    print(f"wrote {out} ({len(kept)} tensors) from {source} ({held}; sha256 {digest})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=f"Convert torchxrayvision DenseNet-121 weights ({WEIGHTS_NAME}) to safetensors.")
    parser.add_argument("--convert", type=Path, required=True, help=f"source file, e.g. {PUBLISHED_FILE}")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--allow-pickle", action="store_true", help="allow reading a (trusted) .pt pickle")
    args = parser.parse_args(argv)
    convert(args.convert, args.out, args.allow_pickle)


if __name__ == "__main__":
    main()
