"""RoIPool: reference vs Numba vs CUDA, an independent oracle for the quantization rules, gradients."""

import numpy as np
import pytest

import minimask
from minimask import Tensor
from minimask import functional as F
from minimask.kernels import roi_pool as K

SCALE = 0.5


def make_rois():
    """[b, x1, y1, x2, y2] in pixels for a (2, C, 6, 7) map at stride 2; .5 coordinates test the rounding."""
    return np.array([
        [0, 2.3, 1.7, 9.1, 8.6],        # inside
        [1, -5.0, -3.0, 6.2, 4.4],      # partly outside
        [1, 8.0, 6.0, 30.0, 25.0],      # partly outside, past H and W
        [0, -40.0, -30.0, -10.0, -5.0],  # wholly outside: every bin empty
        [1, 5.0, 3.0, 5.0, 3.0],        # one cell (x1 * 0.5 = 2.5 rounds to 3, not NumPy's 2)
        [0, -9.0, -7.0, 25.0, 21.0],    # larger than the map
        [1, 1.0, 7.0, 3.0, 9.0],        # 1.0 * 0.5 = 0.5 rounds to 1; 4.5 -> 5
        [0, 9.0, 3.0, 4.0, 8.0],        # reversed in x: width clamped to 1
    ])


def spread(rng, shape):
    """Distinct values at least 0.05 apart (no ties, and an eps-sized nudge never moves a max)."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.05 + rng.uniform(0, 0.01, n)).reshape(shape)


def oracle(x, rois, output_size, scale):
    """The rules in integer arithmetic and NumPy slicing (independent of the kernels' code):
    floor(ph * h / oh) = (ph * h) // oh and ceil(q * h / oh) = -(-(q * h) // oh)."""
    oh, ow = output_size
    _, C, H, W = x.shape
    out = np.zeros((len(rois), C, oh, ow), dtype=x.dtype)
    for k, (b, *box) in enumerate(rois):
        sx, sy, ex, ey = (int(np.sign(v) * np.floor(abs(v) * scale + 0.5)) for v in box)
        rw, rh = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
        for ph in range(oh):
            for pw in range(ow):
                h0, h1 = np.clip([(ph * rh) // oh + sy, -(-((ph + 1) * rh) // oh) + sy], 0, H)
                w0, w1 = np.clip([(pw * rw) // ow + sx, -(-((pw + 1) * rw) // ow) + sx], 0, W)
                if h1 > h0 and w1 > w0:
                    out[k, :, ph, pw] = x[int(b), :, h0:h1, w0:w1].max(axis=(1, 2))
    return out


def test_rounding_is_half_away_from_zero():
    assert [K.round_half_away(v) for v in (2.5, 3.5, -2.5, 0.49, -0.5)] == [3, 4, -3, 0, -1]


@pytest.mark.parametrize("output_size", [(3, 4), (2, 2)])
def test_reference_matches_oracle(rng, output_size):
    x = rng.standard_normal((2, 3, 6, 7))
    out, _ = K.roi_pool_reference(x, make_rois(), output_size, SCALE)
    np.testing.assert_array_equal(out, oracle(x, make_rois(), output_size, SCALE))
    assert np.all(out[3] == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_matches_reference(rng, dtype):
    x = rng.standard_normal((2, 5, 6, 7)).astype(dtype)
    rois = make_rois()
    ref, ref_arg = K.roi_pool_reference(x, rois, (3, 4), SCALE)
    out, arg = K.roi_pool_forward(x, rois, (3, 4), SCALE)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(arg, ref_arg)
    assert (arg == -1).any() and (arg >= 0).any()
    gy = rng.standard_normal(out.shape).astype(dtype)
    np.testing.assert_allclose(K.roi_pool_backward(gy, rois, arg, x.shape),
                               K.roi_pool_backward_reference(gy, rois, ref_arg, x.shape),
                               rtol=1e-6, atol=1e-6)


def test_numba_ties_pick_the_first_cell():
    x = np.ones((1, 2, 4, 4))
    out, arg = K.roi_pool_forward(x, np.array([[0, 0.0, 0.0, 3.0, 3.0]]), (2, 2), 1.0)
    np.testing.assert_array_equal(arg[0, 0], [[0, 2], [8, 10]])  # the top-left cell of each 2x2 bin
    _, ref_arg = K.roi_pool_reference(x, np.array([[0, 0.0, 0.0, 3.0, 3.0]]), (2, 2), 1.0)
    np.testing.assert_array_equal(arg, ref_arg)


def test_numba_many_boxes(rng):
    x = rng.standard_normal((3, 40, 9, 11)).astype(np.float32)
    n = 30
    xy = rng.uniform(-4, 22, (n, 2))
    rois = np.concatenate([rng.integers(0, 3, (n, 1)), xy, xy + rng.uniform(0, 15, (n, 2))], 1)
    ref, ref_arg = K.roi_pool_reference(x, rois, (2, 3), SCALE)
    out, arg = K.roi_pool_forward(x, rois, (2, 3), SCALE)
    np.testing.assert_array_equal(out, ref)
    gy = rng.standard_normal(out.shape).astype(np.float32)
    np.testing.assert_allclose(K.roi_pool_backward(gy, rois, arg, x.shape),
                               K.roi_pool_backward_reference(gy, rois, ref_arg, x.shape),
                               rtol=1e-5, atol=1e-5)


def test_gradcheck(rng):
    x = Tensor(spread(rng, (2, 2, 6, 7)), requires_grad=True)
    rois = make_rois()
    assert minimask.gradcheck(lambda t: F.roi_pool(t, rois, (3, 2), SCALE), [x])


def test_function_and_errors(rng):
    x = Tensor(rng.standard_normal((2, 3, 6, 7)).astype(np.float32), requires_grad=True)
    y = F.roi_pool(x, make_rois(), 2, SCALE)
    assert y.shape == (len(make_rois()), 3, 2, 2) and y.dtype == np.float32
    y.sum().backward()
    _, arg = K.roi_pool_forward(x.data, make_rois(), (2, 2), SCALE)
    assert x.grad.dtype == np.float32
    assert x.grad.sum() == pytest.approx(float((arg >= 0).sum()))  # one unit of gradient per non-empty bin
    assert F.roi_pool(x, np.zeros((0, 5)), 2).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="batch indices"):
        F.roi_pool(x, np.array([[0.5, 0, 0, 1, 1.0]]), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_matches_reference(rng, dtype):
    import cupy

    x = rng.standard_normal((2, 5, 6, 7)).astype(dtype)
    rois = make_rois()
    ref, ref_arg = K.roi_pool_reference(x, rois, (3, 4), SCALE)
    out, arg = K.roi_pool_forward(cupy.asarray(x), cupy.asarray(rois), (3, 4), SCALE)
    np.testing.assert_array_equal(out.get(), ref)
    np.testing.assert_array_equal(arg.get(), ref_arg)
    gy = rng.standard_normal(ref.shape).astype(dtype)
    gx = K.roi_pool_backward(cupy.asarray(gy), cupy.asarray(rois), arg, x.shape)
    np.testing.assert_allclose(gx.get(), K.roi_pool_backward_reference(gy, rois, ref_arg, x.shape),
                               rtol=1e-6, atol=1e-6)
