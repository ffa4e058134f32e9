"""interpolate: gradients by finite differences (nearest and bilinear, integer and non-integer
factors, up and down), values against plain loops written from the formulas, and PyTorch's
numbers for both modes."""

import math

import numpy as np
import pytest

from minimask import F, Tensor, gradcheck


def loop_nearest(x, oh, ow):
    """src = min(floor(dst * in / out), in - 1), in float32 as PyTorch, pixel by pixel."""
    n, c, h, w = x.shape
    y = np.zeros((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            r = min(int(math.floor(np.float32(i) * (np.float32(h) / np.float32(oh)))), h - 1)
            s = min(int(math.floor(np.float32(j) * (np.float32(w) / np.float32(ow)))), w - 1)
            y[:, :, i, j] = x[:, :, r, s]
    return y


def loop_bilinear(x, oh, ow, align_corners=False):
    """Each output pixel from its four neighbours, coordinates from the formulas, in float64."""
    n, c, h, w = x.shape

    def source(dst, n_in, n_out):
        if align_corners:
            return dst * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return max((dst + 0.5) * n_in / n_out - 0.5, 0.0)

    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        sy = source(i, h, oh)
        y0 = min(int(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = source(j, w, ow)
            x0 = min(int(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            y[:, :, i, j] = ((1 - fy) * ((1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1])
                             + fy * ((1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]))
    return y


@pytest.mark.parametrize("kwargs", [
    dict(scale_factor=2),            # the FPN's case: the integer shortcut
    dict(size=(8, 10)),              # 2x by size
    dict(size=(7, 9)),               # non-integer up
    dict(size=(3, 2)),               # non-integer down
    dict(scale_factor=(3, 1)),       # integer, different per axis
    dict(scale_factor=1.7),          # non-integer scale factor (used as 1/1.7 in coordinates)
])
def test_nearest_gradient(rng, kwargs):
    x = Tensor(rng.standard_normal((2, 3, 4, 5)), requires_grad=True)
    assert gradcheck(lambda x: F.interpolate(x, mode="nearest", **kwargs), [x])


@pytest.mark.parametrize("kwargs", [
    dict(size=(7, 9)),                                # up, non-integer
    dict(size=(3, 2)),                                # down, non-integer
    dict(scale_factor=2),                             # up 2x
    dict(scale_factor=0.6),                           # down by a scale factor
    dict(size=(6, 8), align_corners=True),
    dict(size=(1, 3), align_corners=True),            # a single output row
])
def test_bilinear_gradient(rng, kwargs):
    x = Tensor(rng.standard_normal((2, 3, 4, 5)), requires_grad=True)
    assert gradcheck(lambda x: F.interpolate(x, mode="bilinear", **kwargs), [x])


@pytest.mark.parametrize("size", [(8, 10), (12, 5), (7, 9), (3, 2), (4, 5), (9, 1), (2, 82)])
def test_nearest_values_against_loop(rng, size):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    if size == (2, 82):
        x = rng.standard_normal((1, 2, 1, 2)).astype(np.float32)  # the float32 rounding case
    np.testing.assert_array_equal(F.interpolate(Tensor(x), size=size).data, loop_nearest(x, *size))


@pytest.mark.parametrize("size", [(8, 10), (7, 9), (3, 2), (4, 5), (1, 1), (13, 3)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_values_against_loop(rng, size, align_corners):
    x = rng.standard_normal((2, 3, 4, 5))
    y = F.interpolate(Tensor(x, dtype=np.float64), size=size, mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(y.data, loop_bilinear(x, *size, align_corners), rtol=1e-12, atol=1e-12)


def test_nearest_2x_backward_sums_each_block(rng):
    x = Tensor(rng.standard_normal((2, 3, 4, 5)).astype(np.float32), requires_grad=True)
    g = rng.standard_normal((2, 3, 8, 10)).astype(np.float32)
    F.interpolate(x, scale_factor=2).backward(g)
    expected = np.zeros(x.shape, np.float32)
    for i in range(8):
        for j in range(10):
            expected[:, :, i // 2, j // 2] += g[:, :, i, j]
    np.testing.assert_allclose(x.grad, expected, rtol=1e-6, atol=1e-6)
    assert x.grad.dtype == np.float32


def test_same_size_is_identity(rng):
    x = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    for mode in ("nearest", "bilinear"):
        np.testing.assert_array_equal(F.interpolate(Tensor(x), size=(3, 4), mode=mode).data, x)


def test_errors(rng):
    x = Tensor(rng.standard_normal((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="exactly one"):
        F.interpolate(x, size=4, scale_factor=2)
    with pytest.raises(ValueError, match="exactly one"):
        F.interpolate(x)
    with pytest.raises(ValueError, match="unknown mode"):
        F.interpolate(x, size=4, mode="bicubic")
    with pytest.raises(ValueError, match="align_corners"):
        F.interpolate(x, size=4, align_corners=True)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        F.interpolate(Tensor(rng.standard_normal((2, 3, 4))), size=4)
    with pytest.raises(ValueError, match="empty"):
        F.interpolate(x, scale_factor=0.1)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("kwargs", [
    dict(scale_factor=2), dict(size=(11, 7)), dict(size=(2, 3)), dict(scale_factor=1.5),
    dict(scale_factor=(0.7, 2.3)), dict(size=(5, 82)),
])
def test_against_torch(rng, mode, kwargs):
    torch = pytest.importorskip("torch", reason="torch is only needed to compare results")
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    a = Tensor(x, requires_grad=True)
    y = F.interpolate(a, mode=mode, **kwargs)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    t = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.interpolate(t, mode=mode, **kwargs)
    ty.backward(torch.tensor(g))
    assert y.shape == tuple(ty.shape)
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.grad, t.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_corner_cases_against_torch(rng):
    torch = pytest.importorskip("torch", reason="torch is only needed to compare results")
    tf = torch.nn.functional
    x = rng.standard_normal((1, 2, 4, 7)).astype(np.float32)
    y = F.interpolate(Tensor(x), size=(9, 3), mode="bilinear", align_corners=True)
    ty = tf.interpolate(torch.tensor(x), size=(9, 3), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(y.data, ty.numpy(), rtol=1e-5, atol=1e-6)
    # 2 -> 82 columns: output 41 maps to exactly 1.0 in exact arithmetic, to 0 in PyTorch's float32.
    x = np.array([[[[1.0, 2.0]]]], dtype=np.float32)
    np.testing.assert_array_equal(F.interpolate(Tensor(x), size=(1, 82)).data,
                                  tf.interpolate(torch.tensor(x), size=(1, 82)).numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("kwargs", [dict(scale_factor=2), dict(size=(7, 3))])
def test_gpu_matches_cpu(rng, mode, kwargs):
    from minimask import to_device

    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    results = []
    for device in ("cpu", "gpu"):
        a = Tensor(to_device(x, device), requires_grad=True)
        y = F.interpolate(a, mode=mode, **kwargs)
        g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
        y.backward(to_device(g, device))
        results.append((to_device(y.data, "cpu"), to_device(a.grad, "cpu")))
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)
