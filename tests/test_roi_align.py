"""RoIAlign: reference vs Numba vs CUDA, gradients, an independent torch oracle, and the rules.

The boxes cover the cases the kernel rules single out: inside, partly and wholly outside the
map, smaller than a bin, larger than the map, on the border row/column, degenerate (zero size,
reversed), and several batch indices.
"""

import math

import numpy as np
import pytest

import minimask
from minimask import Tensor
from minimask import functional as F
from minimask.kernels import roi_align as K

SCALE = 0.5  # boxes in "image pixels", map at stride 2


def make_rois():
    """(K, 5) [b, x1, y1, x2, y2] in image pixels for a (2, C, 6, 7) map at stride 2 (14 x 12 pixels)."""
    return np.array([
        [0, 2.3, 1.7, 9.1, 8.6],      # inside
        [1, -5.0, -3.0, 6.2, 4.4],    # partly outside (top-left)
        [1, 8.0, 6.0, 30.0, 25.0],    # partly outside (bottom-right), samples past H and W
        [0, -40.0, -30.0, -10.0, -5.0],  # wholly outside: every sample gives 0
        [0, 20.0, 15.0, 40.0, 35.0],     # wholly outside on the other side
        [1, 5.1, 4.2, 5.6, 4.9],      # smaller than a bin (and than a cell)
        [0, -9.0, -7.0, 25.0, 21.0],  # larger than the map
        [1, 3.0, 10.0, 13.9, 11.9],   # along the bottom border row
        [0, 4.0, 4.0, 4.0, 4.0],      # zero size
        [1, 9.0, 3.0, 4.0, 8.0],      # reversed in x (x2 < x1)
    ])


SETTINGS = [(aligned, ratio) for aligned in (True, False) for ratio in (0, 2)]


@pytest.mark.parametrize("aligned,ratio", SETTINGS)
@pytest.mark.parametrize("dtype,layout", [(np.float64, "map"), (np.float64, "windows"), (np.float32, None)])
def test_numba_forward_and_backward_match_reference(rng, aligned, ratio, dtype, layout):
    x = rng.standard_normal((2, 5, 6, 7)).astype(dtype)
    rois = make_rois()
    ref = K.roi_align_reference(x, rois, (3, 4), SCALE, ratio, aligned)
    out = K.roi_align_forward(x, rois, (3, 4), SCALE, ratio, aligned, layout)
    assert out.dtype == dtype and out.shape == (len(rois), 5, 3, 4)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    assert np.all(out[3] == 0) and np.all(out[4] == 0)  # wholly outside
    assert np.abs(ref).max() > 0.1  # the comparison is not between zeros

    gy = rng.standard_normal(out.shape).astype(dtype)
    gref = K.roi_align_backward_reference(gy, rois, x.shape, SCALE, ratio, aligned)
    gx = K.roi_align_backward(gy, rois, x.shape, SCALE, ratio, aligned, layout)
    assert gx.dtype == dtype and gx.shape == x.shape
    np.testing.assert_allclose(gx, gref, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["map", "windows"])
def test_numba_many_channels_and_boxes(rng, layout):
    """More channels than one backward block, many random boxes: the parallel paths."""
    x = rng.standard_normal((3, 70, 9, 11)).astype(np.float32)
    n = 40
    xy = rng.uniform(-4, 22, (n, 2))
    rois = np.concatenate([rng.integers(0, 3, (n, 1)), xy, xy + rng.uniform(0, 15, (n, 2))], 1)
    ref = K.roi_align_reference(x, rois, (2, 3), SCALE, 0, True)
    out = K.roi_align_forward(x, rois, (2, 3), SCALE, 0, True, layout)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    gy = rng.standard_normal(ref.shape).astype(np.float32)
    gref = K.roi_align_backward_reference(gy, rois, x.shape, SCALE, 0, True)
    gx = K.roi_align_backward(gy, rois, x.shape, SCALE, 0, True, layout)
    np.testing.assert_allclose(gx, gref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aligned,ratio", SETTINGS)
def test_windows_hold_every_sample(aligned, ratio):
    """The per-box window that the "windows" layout copies contains every cell a sample reads
    (Numba does not check bounds, so a too-small window would read outside its buffer)."""
    rois = make_rois()
    windows = K._windows(rois, 3, 4, SCALE, ratio, aligned, 6, 7)
    for roi, (r0, r1, c0, c1) in zip(rois, windows):
        geo = K.roi_geometry(roi, (3, 4), SCALE, ratio, aligned)
        for ph in range(3):
            for pw in range(4):
                for row, col, _ in K.bin_samples(geo, ph, pw, 6, 7):
                    assert r0 <= row <= r1 and c0 <= col <= c1, (roi, row, col)


@pytest.mark.parametrize("aligned,ratio", SETTINGS)
def test_gradcheck(rng, aligned, ratio):
    x = Tensor(rng.standard_normal((2, 2, 6, 7)), requires_grad=True)
    rois = make_rois()
    assert minimask.gradcheck(lambda t: F.roi_align(t, rois, (3, 2), SCALE, ratio, aligned), [x])


def test_linear_ramp_gives_sample_centres():
    """On x[h, w] = w the interpolated value is the x coordinate, so (away from the border) a
    bin's mean is its centre: x1 * scale - 0.5 + (pw + 0.5) * bin_w (aligned).  A check of the
    sampling geometry written from the rules, not from the kernel."""
    H, W = 20, 30
    x = np.broadcast_to(np.arange(W, dtype=np.float64), (1, 1, H, W)).copy()
    rois = np.array([[0, 6.0, 8.0, 30.0, 20.0]])
    for aligned, shift in ((True, 0.5), (False, 0.0)):
        out = F.roi_align(Tensor(x), rois, (2, 4), 0.5, 3, aligned).data[0, 0]
        bin_w = (30.0 - 6.0) * 0.5 / 4
        expected = 6.0 * 0.5 - shift + (np.arange(4) + 0.5) * bin_w
        np.testing.assert_allclose(out, np.broadcast_to(expected, (2, 4)), atol=1e-12)


def test_border_and_outside_rules():
    """A sample in (H-1, H] reads the last row; one past H, or below -1, reads nothing."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 3, :] = 7.0  # the last row
    # aligned=False, 1x1 output, 1 sample, a box of height 1: the sample is at its centre y
    def at(y):
        box = np.array([[0, 1.0, y - 0.5, 2.0, y + 0.5]])
        return F.roi_align(Tensor(x), box, 1, 1.0, 1, False).data.item()

    assert at(3.5) == 7.0   # between H-1 and H: the last row repeated
    assert at(4.0) == 7.0   # exactly H still counts
    assert at(4.2) == 0.0   # past H: outside
    x[0, 0] = 5.0
    assert at(-0.5) == 5.0  # in [-1, 0): clamped to row 0
    assert at(-1.2) == 0.0  # below -1: outside


def test_adaptive_sampling_count():
    """sampling_ratio=0 uses ceil(roi_h / oh) x ceil(roi_w / ow) samples, all in the divisor:
    a box whose samples half fall past -1 gives half the constant."""
    x = np.ones((1, 1, 8, 8))
    # aligned=False, box x from -6 to 2 (width 8, output 1 -> 8 samples at -5.5, ..., 1.5): the 5
    # below -1 give 0, the other 3 (-0.5 clamped to 0, 0.5, 1.5) give 1; the divisor stays 8.
    out = F.roi_align(Tensor(x), np.array([[0, -6.0, 2.0, 2.0, 3.0]]), 1, 1.0, 0, False).data.item()
    assert out == pytest.approx(3 / 8)


def test_function_shapes_dtypes_and_errors(rng):
    x = Tensor(rng.standard_normal((2, 3, 5, 5)).astype(np.float32), requires_grad=True)
    y = F.roi_align(x, make_rois()[:3], 2)
    assert y.shape == (3, 3, 2, 2) and y.dtype == np.float32
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == np.float32
    empty = F.roi_align(x, np.zeros((0, 5)), (2, 2))
    assert empty.shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="rois must be"):
        F.roi_align(x, np.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="batch indices"):
        F.roi_align(x, np.array([[2, 0, 0, 1, 1.0]]), 2)
    with pytest.raises(ValueError, match="features must be"):
        F.roi_align(Tensor(np.zeros((3, 5, 5))), np.zeros((0, 5)), 2)


# ---- an independent oracle: RoIAlign in torch ops, gradients by torch autograd ------------------
def torch_roi_align(torch, x, rois, output_size, scale, ratio, aligned):
    """RoIAlign written differently: bilinear interpolation is separable, so the samples of a box
    are R_y @ x[b] @ R_x^T with R_y (samples_y, H) and R_x (samples_x, W) interpolation
    matrices built from the C++ rules; bins are then means over their sample blocks."""
    oh, ow = output_size
    H, W = x.shape[2], x.shape[3]
    offset = 0.5 if aligned else 0.0

    def axis_matrix(start, size, bins, grid, n):
        """(bins * grid, n): row i interpolates sample i along one axis (0 where outside)."""
        bins_i = torch.arange(bins, dtype=torch.float64)[:, None]
        grid_i = torch.arange(grid, dtype=torch.float64)[None]
        pts = start + bins_i * size / bins + (grid_i + 0.5) * size / bins / grid
        pts = pts.reshape(-1)
        inside = ((pts >= -1) & (pts <= n)).double()
        p = pts.clamp(min=0)
        low = p.floor().long()
        at_border = low >= n - 1
        low = torch.where(at_border, torch.full_like(low, n - 1), low)
        high = torch.where(at_border, low, low + 1)
        p = torch.where(at_border, low.double(), p)
        frac = p - low
        m = torch.zeros(len(pts), n, dtype=torch.float64)
        rows = torch.arange(len(pts))
        m.index_put_((rows, low), (1 - frac) * inside, accumulate=True)
        m.index_put_((rows, high), frac * inside, accumulate=True)
        return m

    outs = []
    for b, x1, y1, x2, y2 in rois.tolist():
        x1, y1, x2, y2 = (v * scale - offset for v in (x1, y1, x2, y2))
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = ratio if ratio > 0 else max(math.ceil(rh / oh), 0)
        gw = ratio if ratio > 0 else max(math.ceil(rw / ow), 0)
        ry = axis_matrix(y1, rh, oh, gh, H).to(x.dtype)
        rx = axis_matrix(x1, rw, ow, gw, W).to(x.dtype)
        samples = ry @ x[int(b)] @ rx.T  # (C, oh * gh, ow * gw)
        bins = samples.reshape(x.shape[1], oh, gh, ow, gw).sum(dim=(2, 4))
        outs.append(bins / max(gh * gw, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("aligned,ratio", SETTINGS)
def test_against_torch_oracle_float32(rng, aligned, ratio):
    torch = pytest.importorskip("torch", reason="torch is needed for the independent RoIAlign oracle")
    x = rng.standard_normal((2, 4, 6, 7)).astype(np.float32)
    rois = make_rois()
    xt = torch.tensor(x, requires_grad=True)
    expected = torch_roi_align(torch, xt, rois, (3, 4), SCALE, ratio, aligned)
    gy = rng.standard_normal(tuple(expected.shape)).astype(np.float32)
    expected.backward(torch.tensor(gy))

    xm = Tensor(x, requires_grad=True)
    out = F.roi_align(xm, rois, (3, 4), SCALE, ratio, aligned)
    out.backward(gy)
    np.testing.assert_allclose(out.data, expected.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(xm.grad, xt.grad.numpy(), atol=1e-5, rtol=1e-5)
    assert np.abs(xm.grad).max() > 0.1


# ---- CUDA kernels -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("aligned,ratio", SETTINGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_matches_reference(rng, aligned, ratio, dtype):
    import cupy

    x = rng.standard_normal((2, 5, 6, 7)).astype(dtype)
    rois = make_rois()
    ref = K.roi_align_reference(x, rois, (3, 4), SCALE, ratio, aligned)
    out = K.roi_align_forward(cupy.asarray(x), cupy.asarray(rois), (3, 4), SCALE, ratio, aligned)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out.get(), ref, atol=tol, rtol=tol)
    gy = rng.standard_normal(ref.shape).astype(dtype)
    gref = K.roi_align_backward_reference(gy, rois, x.shape, SCALE, ratio, aligned)
    gx = K.roi_align_backward(cupy.asarray(gy), cupy.asarray(rois), x.shape, SCALE, ratio, aligned)
    np.testing.assert_allclose(gx.get(), gref, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_cuda_through_the_function(rng):
    x = Tensor(rng.standard_normal((2, 3, 6, 7)), requires_grad=True).to("gpu")
    rois = make_rois()
    y = F.roi_align(x, rois, (3, 2), SCALE, 2, True)  # rois given as a NumPy array: moved to the GPU
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    xn = Tensor(x.numpy(), requires_grad=True)
    yn = F.roi_align(xn, rois, (3, 2), SCALE, 2, True)
    yn.backward(gy)
    np.testing.assert_allclose(y.numpy(), yn.data, atol=1e-12)
    np.testing.assert_allclose(x.grad.get(), xn.grad, atol=1e-12)
