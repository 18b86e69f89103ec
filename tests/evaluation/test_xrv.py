"""torchxrayvision DenseNet-121 features: the Flax network equals torchxrayvision's own
`DenseNet.features2` (the library's class, with random weights); preprocessing equals its `normalize`
and `fix_resolution` (F.interpolate, bilinear, antialiased); the converter refuses pickles without
--allow-pickle, reads state dicts and whole pickled modules in both torch formats without running their
code, and names missing or mismatched tensors.

torchxrayvision is installed without its dependencies (`pip install --no-deps torchxrayvision==1.5.7`,
as .ci/run does): PyPI's torchvision does not import beside torch's CPU build, and pandas,
scikit-image and imageio serve only its data set loaders. `import_torchxrayvision` imports it with
inert stand-ins for those four packages, which `DenseNet`, `features2`, `fix_resolution` and
`normalize` never use, and takes the stand-ins out of sys.modules again."""
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("torchxrayvision") is None:
    pytest.skip("needs torchxrayvision: pip install --no-deps torchxrayvision==1.5.7 (as .ci/run does)",
                allow_module_level=True)
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import traverse_util  # noqa: E402

from cxr_ldm.evaluation import xrv as xrv_features  # noqa: E402
from cxr_ldm.io.weights import read_safetensors, write_safetensors  # noqa: E402

STAND_INS = ("torchvision", "torchvision.models", "torchvision.transforms", "pandas", "imageio", "imageio.v2",
             "skimage", "skimage.io", "skimage.transform")


class _StandIn(types.ModuleType):
    """A module whose every attribute is a function that refuses to run."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{attr} is a stand-in in tests/evaluation/test_xrv.py")
        return unavailable


def import_torchxrayvision():
    if "torchxrayvision" in sys.modules:
        return sys.modules["torchxrayvision"]
    saved = {name: sys.modules.get(name) for name in STAND_INS}
    stand_ins = {name: _StandIn(name) for name in STAND_INS}
    for name, module in stand_ins.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_ins[parent], child, module)
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("torchxrayvision")
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def reference():
    """torchxrayvision, its DenseNet-121 with random weights and BatchNorm statistics, and its state dict."""
    xrv = import_torchxrayvision()
    torch.manual_seed(0)
    model = xrv.models.DenseNet().eval()
    model.input_resolution = 224  # as with pretrained weights: features2 resizes other sizes itself
    model.op_threshs = torch.rand(len(model.targets))  # a pretrained model's state dict has this buffer too
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return xrv, model, {k: v.numpy() for k, v in model.state_dict().items()}


def _to_nchw(images):
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def test_features_equal_torchxrayvision_features2(reference):
    """256 px images, so the resize runs; 3 images in batches of 2, so the padded last batch runs."""
    xrv, model, state = reference
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256] / 255.0
    disk = ((yy - 0.4) ** 2 + (xx - 0.6) ** 2 < 0.05) * 0.7 + 0.1
    images = np.stack([rng.random((256, 256)), xx, disk + 0.2 * rng.random((256, 256))])[..., None]
    images = np.clip(images, 0, 1).astype(np.float32)
    with torch.no_grad():
        expected = model.features2(torch.from_numpy(xrv.utils.normalize(_to_nchw(images), 1.0))).numpy()
    got = xrv_features.XRVFeatures(xrv_features.state_dict_to_params(state), batch_size=2)(images)
    assert got.shape == (3, xrv_features.FEATURE_DIM) and got.dtype == np.float32
    scale = np.abs(expected).max()
    error = np.abs(got - expected).max()
    print(f"features2: max |expected| {scale:.4g}, max abs error {error:.3g}")
    assert error <= 1e-5 * scale
    assert np.abs(expected - expected[::-1]).max() > 0.1 * scale  # the images' features differ


@pytest.mark.parametrize("size", [224, 256, 512, 160, 97])
def test_preprocess_equals_torchxrayvision_normalize_and_resize(reference, size):
    xrv, model, _ = reference
    images = np.random.default_rng(size).random((2, size, size, 1)).astype(np.float32)
    x = torch.from_numpy(xrv.utils.normalize(_to_nchw(images), 1.0))
    expected = xrv.utils.fix_resolution(x, 224, model)
    if size != 224:  # what fix_resolution does, spelled out
        torch.testing.assert_close(expected, F.interpolate(x, size=(224, 224), mode="bilinear",
                                                           align_corners=False, antialias=True), rtol=0, atol=0)
    got = np.asarray(xrv_features.preprocess(jnp.asarray(images)))
    assert got.shape == (2, 224, 224, 1)
    # Values in [-1024, 1024]; torch's own float32 result differs from its float64 one by up to 0.04 here
    # (sampling positions rounded to float32), JAX's from torch's float32 one by up to 0.016.
    np.testing.assert_allclose(got[..., 0], expected.numpy()[:, 0], rtol=0, atol=0.05)


def test_preprocess_takes_the_first_channel_and_refuses_what_torchxrayvision_refuses():
    rgb = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(xrv_features.preprocess(rgb)),
                                  np.asarray(xrv_features.preprocess(rgb[..., :1])))
    with pytest.raises(ValueError, match="square"):
        xrv_features.preprocess(np.zeros((1, 64, 48, 1), np.float32))
    features = xrv_features.XRVFeatures({}, batch_size=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        features(np.full((1, 64, 64, 1), 255.0, np.float32))
    with pytest.raises(ValueError, match="square"):
        features(np.zeros((1, 64, 48, 1), np.float32))


def _expected_params(state):
    """The Flax params the torch tensors should become, by the documented renames and layouts."""
    renames = {"weight": "scale", "running_mean": "mean", "running_var": "var", "bias": "bias"}
    expected = {}
    for key, value in state.items():
        if key.startswith("classifier.") or key.endswith("num_batches_tracked") or key == "op_threshs":
            continue
        module, leaf = key.rsplit(".", 1)
        if value.ndim == 4:
            expected[f"{module}.kernel"] = value.transpose(2, 3, 1, 0)
        else:
            expected[f"{module}.{renames[leaf]}"] = value
    return expected


@pytest.mark.parametrize("saved", ["state_dict", "state_dict_legacy_format", "module", "module_legacy_format"])
def test_converter_round_trip(reference, tmp_path, capsys, saved):
    """A state dict, or a whole pickled module as torchxrayvision publishes its weights, in torch's zip
    format or its legacy format (torch < 1.6, as the published files)."""
    _, model, state = reference
    pt = tmp_path / "weights.pt"
    torch.save(model.state_dict() if saved.startswith("state_dict") else model, pt,
               _use_new_zipfile_serialization="legacy" not in saved)
    out = tmp_path / "xrv.safetensors"
    xrv_features.main(["--convert", str(pt), "--out", str(out), "--allow-pickle"])
    report = capsys.readouterr().out
    if saved.startswith("module"):  # read as inert records, not as torchxrayvision's classes
        assert "a pickled torchxrayvision.models.DenseNet module" in report
    assert set(read_safetensors(out)) == set(xrv_features.expected_torch_shapes())  # no classifier etc.
    got = traverse_util.flatten_dict(xrv_features.load_params(out), sep=".")
    expected = _expected_params(state)
    assert got.keys() == expected.keys() and len(got) == 604
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _touch(path):
    Path(path).touch()


class _Payload:
    """Unpickling it would call _touch(marker) -- if the reader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("saved", ["state_dict", "module"])
def test_converter_runs_no_code_from_the_pickle(reference, tmp_path, capsys, saved, legacy):
    """A payload in a state dict, or an attribute of a pickled module (the legacy-format module takes
    the restricted-unpickler path), is read as an inert record and never called."""
    _, model, _ = reference
    marker, pt, out = tmp_path / "ran", tmp_path / "weights.pt", tmp_path / "x.safetensors"
    if saved == "state_dict":
        torch.save({**model.state_dict(), "payload": _Payload(marker)}, pt, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError, match="not tensors: \\['payload'\\]"):
            xrv_features.main(["--convert", str(pt), "--out", str(out), "--allow-pickle"])
        assert not out.exists()
    else:
        model.payload = _Payload(marker)
        try:
            torch.save(model, pt, _use_new_zipfile_serialization=not legacy)
        finally:
            del model.payload
        xrv_features.main(["--convert", str(pt), "--out", str(out), "--allow-pickle"])
        assert ("restricted unpickler" in capsys.readouterr().out) == legacy
        assert out.exists()
    assert not marker.exists()


def test_converter_refuses_pickles_without_the_flag(reference, tmp_path):
    _, model, _ = reference
    pt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(SystemExit, match="--allow-pickle"):
        xrv_features.main(["--convert", str(pt), "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_and_mismatched_tensors_are_named(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match=xrv_features.PUBLISHED_FILE):
        xrv_features.load_params(tmp_path / "absent.safetensors")
    _, _, state = reference
    broken = {k: v for k, v in state.items() if k != "features.denseblock3.denselayer7.conv2.weight"}
    broken["features.norm5.running_var"] = np.ones(7, np.float32)
    write_safetensors(tmp_path / "broken.safetensors", broken)
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['features.denseblock3.denselayer7.conv2.weight'\]\)"
                       r".*features.norm5.running_var \(7,\) \(expected \(1024,\)\)"):
        xrv_features.load_params(tmp_path / "broken.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in broken.items()}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="features.denseblock3.denselayer7.conv2.weight"):
        xrv_features.main(["--convert", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "x.safetensors"),
                           "--allow-pickle"])
    assert not (tmp_path / "x.safetensors").exists()
