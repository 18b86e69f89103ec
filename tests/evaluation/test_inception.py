"""FID Inception-V3: the Flax network equals a PyTorch reference of pytorch-fid's FIDInceptionV3
(torchvision's InceptionV3 blocks with pytorch-fid's patches, written out below because torchvision is
not a dependency) with random weights; preprocessing equals F.interpolate; the converter refuses
pickles without --allow-pickle and its output loads; missing weights give a clear error."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cxr_ldm.evaluation import inception  # noqa: E402
from cxr_ldm.io.weights import write_safetensors  # noqa: E402


class Conv(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg3(x))], 1)


class B(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class C(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, (1, 7), padding=(0, 3)), Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg3(x))], 1)


class D(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), padding=(3, 0)), Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class E(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), padding=(0, 1)), Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class ReferenceInception(nn.Module):
    """pytorch-fid's FIDInceptionV3 up to pool3 (same module names, so the same state-dict keys)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        self.Mixed_6a = B(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
        self.fc = nn.Linear(2048, 1008)  # in the published file; unused for pool3

    def forward(self, x):
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def reference_state():
    torch.manual_seed(0)
    model = ReferenceInception().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.8, 1.6)
                module.bias.uniform_(-0.1, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.3, 1.0)
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["A", "B", "C", "D", "E_avg", "E_max"])
def test_each_block_equals_pytorch_reference(name):
    """Every block type at a small input (fast); the whole network is checked by the slow test below."""
    torch.manual_seed(1)
    cin = 24
    reference, block = {
        "A": (A(cin, 8), inception.InceptionA(8)), "B": (B(cin), inception.InceptionB()),
        "C": (C(cin, 8), inception.InceptionC(8)), "D": (D(cin), inception.InceptionD()),
        "E_avg": (E(cin, False), inception.InceptionE(max_pool=False)),
        "E_max": (E(cin, True), inception.InceptionE(max_pool=True))}[name]
    reference.eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.3, 1.0)
    x = np.random.default_rng(2).standard_normal((2, cin, 7, 7)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    params = inception.torch_tensors_to_params({k: v.numpy() for k, v in reference.state_dict().items()})
    got = np.asarray(block.apply({"params": params}, x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, expected, atol=2e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.slow
def test_features_equal_pytorch_reference(reference_state, tmp_path):
    model, state = reference_state
    path = tmp_path / "inception.safetensors"
    write_safetensors(path, state)  # includes fc.* and num_batches_tracked, which the loader ignores
    params = inception.load_params(path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 96, 96)).astype(np.float32)  # 96 px: every block runs
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = np.asarray(inception.FIDInceptionV3().apply({"params": params}, x.transpose(0, 2, 3, 1)))
    assert got.shape == (2, inception.FEATURE_DIM)
    scale = np.abs(expected).max()
    assert scale > 1e-3
    np.testing.assert_allclose(got / scale, expected / scale, atol=2e-4)


def test_preprocess_equals_pytorch_fid_resize_and_scaling():
    gray = np.random.default_rng(1).random((2, 37, 37, 1)).astype(np.float32)
    rgb = np.repeat(gray, 3, axis=-1)
    expected = 2 * F.interpolate(torch.from_numpy(rgb.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                                 align_corners=False) - 1
    got = np.asarray(inception.preprocess(gray))
    np.testing.assert_allclose(got, expected.numpy().transpose(0, 2, 3, 1), atol=2e-5)


def test_converter_refuses_pickles_without_flag_and_writes_a_loadable_file(reference_state, tmp_path):
    _, state = reference_state
    pth = tmp_path / "weights.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
    with pytest.raises(SystemExit, match="--allow-pickle"):
        inception.main(["--convert", str(pth), "--out", str(tmp_path / "x.safetensors")])
    inception.main(["--convert", str(pth), "--out", str(tmp_path / "x.safetensors"), "--allow-pickle"])
    params = inception.load_params(tmp_path / "x.safetensors")
    kernel = params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, state["Mixed_5b.branch1x1.conv.weight"].transpose(2, 3, 1, 0))
    npz = tmp_path / "w.npz"
    np.savez(npz, **state)
    assert inception.load_params(npz)["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)


def test_missing_and_wrong_weights_are_clear_errors(reference_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_params(tmp_path / "absent.safetensors")
    _, state = reference_state
    broken = {k: v for k, v in state.items() if not k.startswith("Mixed_7c.branch_pool")}
    write_safetensors(tmp_path / "broken.safetensors", broken)
    with pytest.raises(ValueError, match="missing"):
        inception.load_params(tmp_path / "broken.safetensors")
