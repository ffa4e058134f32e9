"""Modules: registration and dotted names, modes, devices, state dicts through .npz and their
errors, initialisation, the layers against PyTorch, and a small network that learns."""

import math
import os

import numpy as np
import pytest

from minimask import Tensor, nn
from minimask.nn import init
from minimask.optim import SGD


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.blocks = nn.ModuleList([Block(4), Block(4)])
        self.head = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2, bias=False))
        self.register_buffer("step", np.zeros((), dtype=np.int64))
        self.scale = 2.0  # a plain attribute: not registered


PARAMS = ["stem.weight", "stem.bias",
          "blocks.0.conv.weight", "blocks.0.bn.weight", "blocks.0.bn.bias",
          "blocks.1.conv.weight", "blocks.1.bn.weight", "blocks.1.bn.bias",
          "head.0.weight", "head.0.bias", "head.2.weight"]
BN_BUFFERS = ["running_mean", "running_var", "num_batches_tracked"]


def test_registration_and_dotted_names():
    m = Net()
    assert [n for n, _ in m.named_parameters()] == PARAMS
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.dtype == np.float32
               for p in m.parameters())
    bn_buffers = [f"blocks.{i}.bn.{b}" for i in (0, 1) for b in BN_BUFFERS]
    assert [n for n, _ in m.named_buffers()] == ["step"] + bn_buffers
    assert [n for n, _ in m.named_modules()] == ["", "stem", "blocks",
                                                "blocks.0", "blocks.0.conv", "blocks.0.bn",
                                                "blocks.1", "blocks.1.conv", "blocks.1.bn",
                                                "head", "head.0", "head.1", "head.2"]
    assert list(m.children()) == [m.stem, m.blocks, m.head]
    assert m.head[2].bias is None and m.head[1] is m.head._modules["1"] and len(m.blocks) == 2
    # state_dict: PyTorch's order (each module's parameters, then its buffers, then children).
    assert list(m.state_dict())[:5] == ["step", "stem.weight", "stem.bias", "blocks.0.conv.weight",
                                        "blocks.0.bn.weight"]


def test_reassigning_and_sharing():
    m = Net()
    m.stem = nn.Linear(2, 2)  # a module replaces a module
    assert [n for n, _ in m.named_parameters()][:2] == ["stem.weight", "stem.bias"]
    m.stem.bias = None  # a parameter may become None (no bias)
    assert "stem.bias" not in dict(m.named_parameters()) and m.stem.bias is None
    with pytest.raises(TypeError, match="Parameter"):
        m.stem.weight = Tensor(np.zeros((2, 2)))  # would silently stop training
    m.head = m.stem  # one module under two names: its parameters are listed once
    names = [n for n, _ in m.named_parameters()]
    assert sum(p is m.stem.weight for p in m.parameters()) == 1 and "head.weight" not in names
    assert list(m.state_dict()).count("stem.weight") == 1 and "head.weight" not in m.state_dict()
    del m.head
    assert "head" not in dict(m.named_children())

    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match=r"super\(\)\.__init__"):
        Forgot()


def test_train_eval_reach_every_module():
    m = Net()
    assert all(x.training for x in m.modules())
    assert m.eval() is m and not any(x.training for x in m.modules())
    m.blocks.train()
    assert m.blocks[1].bn.training and not m.training and not m.head[0].training
    m.train()
    assert all(x.training for x in m.modules())


def test_zero_grad_and_to_cpu_keep_parameter_identity():
    m = Net()
    params = list(m.parameters())
    for p in params:
        p.grad = np.ones_like(p.data)
    m.zero_grad()
    assert all(p.grad is None for p in params)
    assert m.to("cpu") is m and all(a is b for a, b in zip(params, m.parameters()))
    with pytest.raises(ValueError, match="unknown device"):
        m.to("tpu")


def test_astype_casts_floats_not_counters():
    m = Block(2).astype(np.float64)
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert m.bn.running_mean.dtype == np.float64 and m.bn.num_batches_tracked.dtype == np.int64


# ---- state dicts --------------------------------------------------------------------------------

def test_state_dict_round_trip_through_npz(tmp_path):
    init.manual_seed(0)
    a = Net()
    a.blocks[0].bn.running_mean[:] = [1, 2, 3, 4]
    a.step[...] = 7
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    a.stem.weight.data += 1  # the state dict is a snapshot, not a view
    assert not np.array_equal(sd["stem.weight"], a.stem.weight.data)

    path = tmp_path / "ckpt" / "net.weights"  # any name, kept exactly; folders made
    a.save(path)
    assert sorted(os.listdir(path.parent)) == ["net.weights"]  # no temp file left behind
    init.manual_seed(1)
    b = Net()
    params_before = list(b.parameters())
    b.load(path)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)
        assert b.state_dict()[k].dtype == v.dtype
    assert all(x is y for x, y in zip(params_before, b.parameters()))  # loaded in place
    assert int(b.step) == 7


def test_save_overwrites_atomically(tmp_path):
    m = Block(2)
    path = tmp_path / "m.npz"
    m.save(path)
    m.bn.bias.data[:] = 5
    m.save(path)
    assert np.all(nn.load_npz(path)["bn.bias"] == 5)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_load_state_dict_lists_every_problem():
    m = Net()
    sd = m.state_dict()
    del sd["stem.bias"], sd["blocks.1.bn.running_var"]
    sd["head.2.bias"] = np.zeros(2)
    sd["extra"] = np.zeros(1)
    sd["head.0.weight"] = np.zeros((4, 5))
    sd["blocks.0.bn.weight"] = np.zeros(3)
    with pytest.raises(KeyError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    for key in ["stem.bias", "blocks.1.bn.running_var", "head.2.bias", "extra", "head.0.weight",
                "blocks.0.bn.weight", "(4, 5)", "(5, 4)"]:
        assert key in msg, key
    assert "missing keys (2)" in msg and "unexpected keys (2)" in msg and "wrong shapes (2)" in msg

    # strict=False tolerates missing / unexpected keys (and reports them), never a wrong shape.
    with pytest.raises(KeyError, match="wrong shapes"):
        m.load_state_dict(sd, strict=False)
    sd = m.state_dict()
    del sd["stem.bias"]
    sd["extra"] = np.zeros(1)
    sd["stem.weight"] = np.full_like(sd["stem.weight"], 0.5)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert missing == ["stem.bias"] and unexpected == ["extra"] and np.all(m.stem.weight.data == 0.5)


def test_frozen_bn_loads_a_batchnorm_checkpoint():
    bn = nn.BatchNorm2d(3)
    bn.running_var[:] = [1, 2, 3]
    frozen = nn.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())  # its num_batches_tracked is ignored, not an error
    np.testing.assert_array_equal(frozen.running_var, [1, 2, 3])
    assert list(frozen.parameters()) == [] and [n for n, _ in frozen.named_buffers()] == [
        "weight", "bias", "running_mean", "running_var"]


# ---- initialisation ---------------------------------------------------------------------------------

def test_init_helpers():
    init.manual_seed(3)
    w = nn.Parameter(np.zeros((256, 128, 3, 3), dtype=np.float32))
    init.kaiming_normal_(w)  # fan_out = 256 * 9, relu gain sqrt(2)
    assert w.data.std() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.01)
    assert abs(w.data.mean()) < 1e-3 and w.dtype == np.float32
    init.kaiming_uniform_(w, a=math.sqrt(5))  # bound = 1 / sqrt(fan_in), fan_in = 128 * 9
    bound = 1 / math.sqrt(128 * 9)
    assert np.abs(w.data).max() <= bound * (1 + 1e-6) and np.abs(w.data).max() > 0.99 * bound
    init.normal_(w, std=0.01)
    assert w.data.std() == pytest.approx(0.01, rel=0.01)
    init.constant_(w, 0.25)
    assert np.all(w.data == 0.25)
    init.zeros_(w)
    assert not w.data.any()
    init.ones_(w)
    assert np.all(w.data == 1)
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_normal_(w, mode="fan_avg")
    with pytest.raises(ValueError, match="2 dimensions"):
        init.kaiming_uniform_(nn.Parameter(np.zeros(3)))


def test_seed_makes_models_reproducible_and_defaults_as_pytorch():
    init.manual_seed(5)
    a = Net().state_dict()
    init.manual_seed(5)
    b = Net().state_dict()
    init.manual_seed(6)
    c = Net().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["stem.weight"], c["stem.weight"])
    # PyTorch's default: weight and bias uniform in +-1/sqrt(fan_in), fan_in = in * kh * kw
    # (for ConvTranspose2d PyTorch's rule reads fan_in from dim 1 of (in, out, kh, kw): out * kh * kw).
    layers = [(nn.Conv2d(8, 16, 3), 72), (nn.Linear(50, 30), 50), (nn.ConvTranspose2d(6, 10, 2), 40)]
    for layer, fan_in in layers:
        for p in (layer.weight, layer.bias):
            assert np.abs(p.data).max() <= 1 / math.sqrt(fan_in) + 1e-7
            assert np.abs(p.data).max() > 0.8 / math.sqrt(fan_in)


# ---- layers -----------------------------------------------------------------------------------------

def test_layer_output_shapes(rng):
    x = Tensor(rng.standard_normal((2, 3, 11, 13)).astype(np.float32))
    assert nn.Conv2d(3, 8, 3, stride=2, padding=1)(x).shape == (2, 8, 6, 7)
    assert nn.Conv2d(3, 8, (3, 5), padding=(1, 2), dilation=1)(x).shape == (2, 8, 11, 13)
    assert nn.Conv2d(3, 8, 3, padding=2, dilation=2)(x).shape == (2, 8, 11, 13)
    assert nn.ConvTranspose2d(3, 5, 2, stride=2)(x).shape == (2, 5, 22, 26)
    assert nn.MaxPool2d(3, stride=2, padding=1)(x).shape == (2, 3, 6, 7)
    assert nn.BatchNorm2d(3)(x).shape == x.shape
    assert nn.FrozenBatchNorm2d(3)(x).shape == x.shape
    assert nn.ReLU()(x).shape == x.shape
    assert nn.Linear(13, 4)(x).shape == (2, 3, 11, 4)


def test_frozen_bn_formula(rng):
    bn = nn.FrozenBatchNorm2d(3, eps=1e-3)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name)[:] = rng.standard_normal(3)
    bn.running_var[:] = rng.uniform(0.5, 2, 3)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    c = (slice(None), None, None)  # per channel
    want = (x - bn.running_mean[c]) / np.sqrt(bn.running_var[c] + 1e-3) * bn.weight[c] + bn.bias[c]
    np.testing.assert_allclose(bn(Tensor(x)).data, want, rtol=1e-5, atol=1e-5)


def _random_norm(norm, rng):
    """Statistics and affine values far from the identity, so that folding them shows."""
    for name in ("running_mean", "weight", "bias"):
        arr = getattr(norm, name)
        (arr.data if isinstance(arr, Tensor) else arr)[:] = rng.standard_normal(arr.shape[0])
    norm.running_var[:] = rng.uniform(0.5, 2, norm.running_var.shape[0])
    return norm


def _conv_norm_pair(norm_kind, bias, rng):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias).astype(np.float64)
    norm = nn.FrozenBatchNorm2d(4, eps=1e-3) if norm_kind == "frozen" else nn.BatchNorm2d(4)
    norm = norm.astype(np.float64)
    return conv, _random_norm(norm, rng)


@pytest.mark.parametrize("norm_kind", ["frozen", "bn_eval"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_shape, folds", [((2, 3, 9, 7), True), ((1, 3, 5, 3), False)])
def test_conv_norm_folds_a_fixed_norm_into_the_conv(rng, norm_kind, bias, x_shape, folds):
    """conv_norm(conv, norm, x) == norm(conv(x)) in value, and in the gradients of x and the
    conv's weights, when the norm is a constant affine map: folded into the weights (27 per
    output channel against 40 outputs), or applied to the output (against 6)."""
    from minimask.nn.layers import folds_into_conv
    from minimask.tensor import no_grad

    conv, norm = _conv_norm_pair(norm_kind, bias, rng)
    norm.eval()
    assert norm.fixed_affine() is None if norm_kind == "bn_eval" else norm.fixed_affine() is not None
    assert folds_into_conv(conv, x_shape) == folds
    x = rng.standard_normal(x_shape)
    with no_grad():  # an eval BatchNorm2d folds when nobody wants its gradient
        assert norm.fixed_affine() is not None
        np.testing.assert_allclose(nn.conv_norm(conv, norm, Tensor(x)).data, norm(conv(Tensor(x))).data,
                                   rtol=1e-12, atol=1e-12)
    if norm_kind == "bn_eval":
        return  # with gradients on, its weight and bias are trained: not folded (test below)
    grads = []
    for f in (lambda t: nn.conv_norm(conv, norm, t), lambda t: norm(conv(t))):
        xt = Tensor(x, requires_grad=True)
        conv.zero_grad()
        y = f(xt)
        (y * Tensor(np.cos(np.arange(y.size)).reshape(y.shape))).sum().backward()
        grads.append([xt.grad, conv.weight.grad] + ([conv.bias.grad] if bias else []))
    for folded, plain in zip(*grads):
        np.testing.assert_allclose(folded, plain, rtol=1e-10, atol=1e-12)


def test_conv_norm_keeps_batch_statistics_in_training(rng):
    """A BatchNorm2d in training mode (or in eval with its weights wanting gradients) is no
    constant map: conv_norm runs it as a layer, updating its running statistics."""
    conv, norm = _conv_norm_pair("bn", False, rng)
    x = Tensor(rng.standard_normal((2, 3, 9, 7)))
    assert norm.fixed_affine() is None
    before = norm.running_mean.copy()
    nn.conv_norm(conv, norm, x)
    assert not np.allclose(norm.running_mean, before)
    norm.eval()
    y = nn.conv_norm(conv, norm, x)
    y.sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None


def _torch_layer_pair(kind, torch, rng):
    """The same layer in minimask and in torch, with torch's weights loaded into ours."""
    tnn = torch.nn
    if kind == "conv":
        ours, theirs = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), tnn.Conv2d(3, 4, 3, 2, 1)
    elif kind == "conv_dilated":
        ours = nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False)
        theirs = tnn.Conv2d(3, 4, 3, 1, 2, 2, bias=False)
    elif kind == "deconv":
        ours, theirs = nn.ConvTranspose2d(3, 4, 2, stride=2), tnn.ConvTranspose2d(3, 4, 2, 2)
    else:
        ours, theirs = nn.Linear(7, 4), tnn.Linear(7, 4)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


@pytest.mark.parametrize("kind", ["conv", "conv_dilated", "deconv", "linear"])
def test_layers_match_torch_forward_and_backward(rng, kind):
    torch = pytest.importorskip("torch", reason="torch is only used as an independent reference")
    ours, theirs = _torch_layer_pair(kind, torch, rng)
    x = rng.standard_normal((2, 3, 6, 7) if kind != "linear" else (5, 7)).astype(np.float32)
    gy_shape = theirs(torch.tensor(x)).shape
    gy = rng.standard_normal(tuple(gy_shape)).astype(np.float32)

    y = ours(Tensor(x))
    y.backward(gy)
    tx = torch.tensor(x)
    ty = theirs(tx)
    ty.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-4, atol=1e-5)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, dict(theirs.named_parameters())[name].grad.numpy(),
                                   rtol=1e-4, atol=1e-4, err_msg=name)


def test_batchnorm_matches_torch_in_train_and_eval(rng):
    torch = pytest.importorskip("torch", reason="torch is only used as an independent reference")
    ours, theirs = nn.BatchNorm2d(3, momentum=0.2), torch.nn.BatchNorm2d(3, momentum=0.2)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    for step in range(2):  # two training steps: the running statistics are updated twice
        x = (rng.standard_normal((4, 3, 5, 6)) * 2 + 1).astype(np.float32)
        gy = rng.standard_normal(x.shape).astype(np.float32)
        ours.zero_grad()
        theirs.zero_grad()
        y = ours(Tensor(x))
        y.backward(gy)
        ty = theirs(torch.tensor(x))
        ty.backward(torch.tensor(gy))
        np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-4, atol=1e-4)
        for name in ("weight", "bias"):
            np.testing.assert_allclose(getattr(ours, name).grad, getattr(theirs, name).grad.numpy(),
                                       rtol=1e-4, atol=1e-4, err_msg=name)
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(ours(Tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    assert int(ours.num_batches_tracked) == 2  # eval steps do not count


# ---- end to end ----------------------------------------------------------------------------------------

def test_mlp_learns_a_regression(rng):
    """Linear + ReLU + Linear fits y = sin(x1) + x2^2 / 2 by SGD: the loss drops at least 10x."""
    init.manual_seed(0)
    x = rng.uniform(-2, 2, (128, 2)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:] ** 2).astype(np.float32)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_fn():
        d = model(Tensor(x)) - Tensor(y)
        return (d * d).mean()

    first = loss_fn().item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = loss_fn().item()
    assert last < first / 10, (first, last)


@pytest.mark.gpu
def test_to_gpu_keeps_identity_and_round_trips(tmp_path, rng):
    m = Net()
    params = list(m.parameters())
    before = m.state_dict()
    m.to("gpu")
    assert all(a is b for a, b in zip(params, m.parameters()))
    assert all(p.device == "gpu" for p in m.parameters())
    assert all(type(b).__module__.startswith("cupy") for b in m.buffers())
    m.save(tmp_path / "g.npz")  # saved from the GPU, loaded on the CPU
    cpu = Net()
    cpu.load(tmp_path / "g.npz")
    for k, v in before.items():
        np.testing.assert_array_equal(cpu.state_dict()[k], v)
    m.load_state_dict(cpu.state_dict())  # a CPU state into GPU arrays
    assert all(p.device == "gpu" for p in m.parameters())
    x = Tensor(rng.standard_normal((2, 4, 5, 5)).astype(np.float32))
    blk = m.blocks[0].eval()
    out_gpu = blk(x.to("gpu"))
    out_cpu = cpu.blocks[0].eval()(x)
    np.testing.assert_allclose(out_gpu.numpy(), out_cpu.data, rtol=1e-4, atol=1e-4)
