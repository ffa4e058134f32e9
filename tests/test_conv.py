"""conv2d, conv_transpose2d and max_pool2d: gradients, loop references, torch, GPU."""

import numpy as np
import pytest

import minimask
from minimask import Tensor, gradcheck, no_grad
from minimask.backend import to_device
from minimask.functional import conv as conv_module
from minimask.functional import conv2d, conv_transpose2d, max_pool2d
from minimask.functional.conv import CHUNK_BYTES, MIN_GEMM_COLUMNS, Conv2dFn, col2im, im2col


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---- references written as plain loops, straight from the definitions ------------------
def loop_conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """y[n, :, u, v] = sum_{i, j} w[:, :, i, j] @ x[n, :, s u + d i - p, s v + d j - p] (0 outside)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, o, ho, wo), dtype=np.float64)
    for b_ in range(n):
        for u in range(ho):
            for v in range(wo):
                for i in range(kh):
                    for j in range(kw):
                        r, q = sh * u + dh * i - ph, sw * v + dw * j - pw
                        if 0 <= r < h and 0 <= q < wd:
                            y[b_, :, u, v] += w[:, :, i, j] @ x[b_, :, r, q]
    if b is not None:
        y += b[None, :, None, None]
    return y


def loop_conv_transpose2d(x, w, b=None, stride=1, padding=0):
    """Each input pixel (r, q) adds x * w[ci, :, i, j] at output (s r + i - p, s q + j - p)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    ho, wo = (h - 1) * sh - 2 * ph + kh, (wd - 1) * sw - 2 * pw + kw
    y = np.zeros((n, cout, ho, wo), dtype=np.float64)
    for b_ in range(n):
        for r in range(h):
            for q in range(wd):
                for i in range(kh):
                    for j in range(kw):
                        u, v = sh * r + i - ph, sw * q + j - pw
                        if 0 <= u < ho and 0 <= v < wo:
                            y[b_, :, u, v] += x[b_, :, r, q] @ w[:, :, i, j]
    if b is not None:
        y += b[None, :, None, None]
    return y


def loop_max_pool2d(x, gy, kernel, stride, padding):
    """Max over each window clipped to the image, and the gradient sent to the first arg-max."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    n, c, h, wd = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, c, ho, wo))
    gx = np.zeros(x.shape)
    for b_ in range(n):
        for ch in range(c):
            for u in range(ho):
                for v in range(wo):
                    best, where = -np.inf, None
                    for r in range(sh * u - ph, sh * u - ph + kh):  # row-major: first max wins
                        for q in range(sw * v - pw, sw * v - pw + kw):
                            if 0 <= r < h and 0 <= q < wd and x[b_, ch, r, q] > best:
                                best, where = x[b_, ch, r, q], (r, q)
                    y[b_, ch, u, v] = best
                    gx[b_, ch, where[0], where[1]] += gy[b_, ch, u, v]
    return y, gx


def distinct(rng, shape, spacing=0.05):
    """Values with no ties and gaps far wider than gradcheck's eps (max-pool needs that)."""
    size = int(np.prod(shape))
    return (rng.permutation(size) * spacing - size * spacing / 2).reshape(shape).astype(np.float64)


def t64(rng, *shape):
    return Tensor(rng.standard_normal(shape), requires_grad=True)


@pytest.fixture(params=["loops", "slices"])
def columns(request, monkeypatch):
    """Each CPU test of conv2d and conv_transpose2d runs with the Numba column loops (the default)
    and with the slice copies (what the GPU runs)."""
    monkeypatch.setattr(conv_module, "CPU_COLUMNS", request.param)
    return request.param


# ---- conv2d ---------------------------------------------------------------------------------
CONV_CASES = [
    # x shape, w shape, stride, padding, dilation
    ((2, 3, 5, 6), (4, 3, 3, 3), 1, 1, 1),
    ((2, 3, 7, 7), (4, 3, 3, 3), 2, 1, 1),         # stride 2 on odd sizes
    ((1, 2, 9, 8), (3, 2, 3, 3), 1, 2, 2),         # dilation 2, batch of 1
    ((2, 3, 6, 7), (2, 3, 2, 3), (2, 1), (1, 0), 1),  # non-square kernel, stride and padding
    ((2, 4, 5, 5), (3, 4, 1, 1), 1, 0, 1),         # 1x1: the plain-matmul path
    ((2, 4, 7, 6), (3, 4, 1, 1), 2, 0, 1),         # 1x1 with stride 2
    ((2, 2, 4, 4), (3, 2, 5, 5), 1, 2, 1),         # kernel larger than the image
]


@pytest.mark.parametrize("method", ["im2col", "shift"])
@pytest.mark.parametrize("xs, ws, stride, padding, dilation", CONV_CASES)
def test_conv2d_matches_loop(columns, rng, method, xs, ws, stride, padding, dilation):
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    y = Conv2dFn(stride, padding, dilation, method=method)(Tensor(x), Tensor(w), Tensor(b))
    expected = loop_conv2d(x, w, b, stride, padding, dilation)
    np.testing.assert_allclose(y.data, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["im2col", "shift"])
@pytest.mark.parametrize("xs, ws, stride, padding, dilation", CONV_CASES)
def test_conv2d_gradcheck(columns, rng, method, xs, ws, stride, padding, dilation):
    x, w, b = t64(rng, *xs), t64(rng, *ws), t64(rng, ws[0])
    assert gradcheck(lambda x, w, b: Conv2dFn(stride, padding, dilation, method=method)(x, w, b), [x, w, b])


def test_conv2d_without_bias_gradcheck(columns, rng):
    x, w = t64(rng, 2, 3, 6, 5), t64(rng, 4, 3, 3, 3)
    assert gradcheck(lambda x, w: conv2d(x, w, stride=2, padding=1), [x, w])


def test_chunks_keep_a_minimum_of_gemm_columns(monkeypatch):
    """Tall columns (many channels) get chunks of at least MIN_GEMM_COLUMNS output pixels, so
    the GEMMs stay wide; short ones keep the CHUNK_BYTES budget; every pixel is covered once."""
    from minimask.functional.conv import ConvGeometry, column_chunks

    monkeypatch.setitem(CHUNK_BYTES, "cpu", 2 * 2**20)
    monkeypatch.setitem(MIN_GEMM_COLUMNS, "cpu", 512)
    g = ConvGeometry((200, 272), (3, 3), (1, 1), (1, 1), (1, 1))
    tall = list(column_chunks(1, g, 256, 4, "cpu"))  # C kh kw = 2304: 1 row of 272 in 2 MiB
    assert [(u0, u1) for _, _, u0, u1 in tall] == [(u0, u0 + 2) for u0 in range(0, 200, 2)]
    assert all((u1 - u0) * g.wo >= 512 for _, _, u0, u1 in tall)  # 2 rows: 544 pixels
    short = list(column_chunks(1, g, 16, 4, "cpu"))  # C kh kw = 144: the 2 MiB decide
    rows = (2 * 2**20) // (16 * 9 * 272 * 4)
    assert [(u0, u1) for _, _, u0, u1 in short] == [(u0, min(200, u0 + rows)) for u0 in range(0, 200, rows)]


@pytest.mark.parametrize("budget", [1, 2000, 13000])  # bands of 1 row, of 2 rows; 2 images a chunk
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_in_chunks(columns, rng, monkeypatch, budget, stride):
    """Columns built a chunk at a time (images or bands of rows) give the same conv and gradients."""
    monkeypatch.setitem(CHUNK_BYTES, "cpu", budget)
    monkeypatch.setitem(MIN_GEMM_COLUMNS, "cpu", 0)  # the budget alone sets the chunks
    x, w, b = t64(rng, 3, 2, 7, 6), t64(rng, 3, 2, 3, 3), t64(rng, 3)
    y = conv2d(x, w, b, stride=stride, padding=1)
    np.testing.assert_allclose(y.data, loop_conv2d(x.data, w.data, b.data, stride, 1), rtol=1e-10, atol=1e-10)
    assert gradcheck(lambda x, w, b: conv2d(x, w, b, stride=stride, padding=1), [x, w, b])
    xt, wt = t64(rng, 3, 2, 4, 5), t64(rng, 2, 3, 3, 3)
    assert gradcheck(lambda x, w: conv_transpose2d(x, w, stride=stride, padding=1), [xt, wt])


def test_bands_are_written_into_the_output_directly(rng, monkeypatch):
    """A band of one image's output rows is GEMM'd straight into a strided view of y: the same
    bits as each band's product computed on its own (float32)."""
    monkeypatch.setitem(CHUNK_BYTES, "cpu", 3000)
    monkeypatch.setitem(MIN_GEMM_COLUMNS, "cpu", 0)
    x = rng.standard_normal((2, 5, 12, 9)).astype(np.float32)
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    one = (1, 1)
    g = conv_module.ConvGeometry(x.shape[2:], w.shape[2:], one, one, one)
    chunks = list(conv_module.column_chunks(2, g, 5, 4, "cpu"))
    assert all(n1 - n0 == 1 for n0, n1, _, _ in chunks) and len(chunks) > 2  # bands, not images
    expected = np.empty((2, 7, 12, 9), np.float32)
    for n0, n1, u0, u1 in chunks:
        cols = im2col(x[n0:n1], (3, 3), one, one)[0][:, u0 * 9:u1 * 9]
        expected[n0, :, u0:u1] = (w.reshape(7, -1) @ cols).reshape(7, u1 - u0, 9)
    np.testing.assert_array_equal(conv_module.conv_forward(x, w, one, one, one), expected)


@pytest.mark.parametrize("budget", [2000, 2 * 2**20])  # bands of rows; whole images
def test_column_loops_and_slices_give_the_same_bits(rng, monkeypatch, budget):
    """The Numba loops only copy and add in the slice copies' order: float32 results are identical."""
    monkeypatch.setitem(CHUNK_BYTES, "cpu", budget)
    monkeypatch.setitem(MIN_GEMM_COLUMNS, "cpu", 0)
    x = rng.standard_normal((3, 8, 13, 11)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((3, 6, 7, 6)).astype(np.float32)
    results = []
    for mode in ("loops", "slices"):
        monkeypatch.setattr(conv_module, "CPU_COLUMNS", mode)
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        y = conv2d(xt, wt, stride=2, padding=1)
        y.backward(gy)
        results.append((y.data, xt.grad, wt.grad))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_conv2d_frozen_weight_gives_input_grad_only(rng):
    """A frozen layer (w, b not requiring grad) still passes the gradient to x, and w.grad stays None."""
    x = t64(rng, 2, 3, 5, 5)
    w, b = Tensor(rng.standard_normal((4, 3, 3, 3))), Tensor(rng.standard_normal(4))
    gy = rng.standard_normal((2, 4, 5, 5))
    conv2d(x, w, b, padding=1).backward(gy)
    assert w.grad is None and b.grad is None
    x2 = t64(rng, 2, 3, 5, 5)
    x2.data[...] = x.data
    w2 = Tensor(w.data, requires_grad=True)
    conv2d(x2, w2, b, padding=1).backward(gy)
    np.testing.assert_allclose(x.grad, x2.grad, rtol=1e-12)


def test_conv2d_keeps_dtype(rng):
    for dtype in (np.float32, np.float64):
        x = Tensor(rng.standard_normal((1, 2, 4, 4)).astype(dtype), requires_grad=True)
        w = Tensor(rng.standard_normal((3, 2, 3, 3)).astype(dtype), requires_grad=True)
        y = conv2d(x, w, padding=1)
        y.backward(np.ones(y.shape, dtype))
        assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype


def test_im2col_and_col2im_are_adjoint(rng):
    """<im2col(x), c> = <x, col2im(c)>: col2im is exactly the transpose of the gather."""
    args = ((3, 2), (2, 1), (1, 2), (2, 1))  # kernel, stride, padding, dilation
    x = rng.standard_normal((2, 3, 7, 6))
    cols = im2col(x, *args)
    c = rng.standard_normal(cols.shape)
    assert np.isclose((cols * c).sum(), (x * col2im(c, x.shape, *args)).sum(), rtol=1e-12)


def test_conv2d_bad_inputs_are_named(rng):
    x = Tensor(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="3 channels but w expects 4"):
        conv2d(x, Tensor(np.zeros((2, 4, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv2d(x, Tensor(np.zeros((2, 3, 3, 3), np.float32)), stride=0)
    with pytest.raises(ValueError, match="output would be empty"):
        conv2d(x, Tensor(np.zeros((2, 3, 7, 7), np.float32)))
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d(x, Tensor(np.zeros((2, 3, 3, 3), np.float32)), Tensor(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="must be 4-D"):
        conv2d(Tensor(np.zeros((3, 5, 5), np.float32)), Tensor(np.zeros((2, 3, 3, 3), np.float32)))
    with pytest.raises(TypeError, match="float32"):
        conv2d(x, Tensor(np.zeros((2, 3, 3, 3), np.float64)))


# ---- conv_transpose2d -----------------------------------------------------------------------
TRANSPOSE_CASES = [
    # x shape, w shape (in, out, kh, kw), stride, padding
    ((2, 3, 4, 5), (3, 2, 3, 3), 1, 0),
    ((2, 3, 4, 4), (3, 2, 3, 3), 2, 1),         # stride 2 with padding 1
    ((2, 4, 3, 3), (4, 3, 2, 2), 2, 0),         # the mask head's 2x2 stride-2 deconv
    ((1, 2, 3, 4), (2, 3, 4, 3), (2, 3), (1, 0)),  # batch of 1, non-square everything
]


@pytest.mark.parametrize("xs, ws, stride, padding", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_loop(columns, rng, xs, ws, stride, padding):
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[1])
    y = conv_transpose2d(Tensor(x), Tensor(w), Tensor(b), stride, padding)
    expected = loop_conv_transpose2d(x, w, b, stride, padding)
    np.testing.assert_allclose(y.data, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("xs, ws, stride, padding", TRANSPOSE_CASES)
def test_conv_transpose2d_gradcheck(columns, rng, xs, ws, stride, padding):
    x, w, b = t64(rng, *xs), t64(rng, *ws), t64(rng, ws[1])
    assert gradcheck(lambda x, w, b: conv_transpose2d(x, w, b, stride, padding), [x, w, b])


def test_conv_transpose2d_without_bias_gradcheck(columns, rng):
    x, w = t64(rng, 2, 3, 3, 4), t64(rng, 3, 2, 3, 3)
    assert gradcheck(lambda x, w: conv_transpose2d(x, w, stride=2), [x, w])


def test_conv_transpose2d_is_adjoint_of_conv2d(rng):
    """<conv2d(z, w), x> = <z, conv_transpose2d(x, w)> for the same w, stride and padding."""
    w = rng.standard_normal((3, 2, 3, 3))  # conv2d: 2 -> 3 channels; transpose: 3 -> 2
    x = rng.standard_normal((2, 3, 4, 5))
    y = conv_transpose2d(Tensor(x), Tensor(w), stride=2, padding=1).data
    z = rng.standard_normal(y.shape)
    lhs = (conv2d(Tensor(z), Tensor(w), stride=2, padding=1).data * x).sum()
    assert np.isclose(lhs, (z * y).sum(), rtol=1e-12)


def test_conv_transpose2d_bad_inputs_are_named():
    x = Tensor(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="3 channels but w expects 2"):
        conv_transpose2d(x, Tensor(np.zeros((2, 3, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="too large"):
        conv_transpose2d(x, Tensor(np.zeros((3, 2, 1, 1), np.float32)), padding=1)


# ---- max_pool2d -----------------------------------------------------------------------------
POOL_CASES = [
    # x shape, kernel, stride, padding
    ((2, 3, 7, 7), 3, 2, 1),        # the ResNet stem: stride 2 on odd sizes with padding
    ((2, 2, 6, 6), 2, None, 0),     # stride defaults to the kernel
    ((1, 2, 7, 5), 1, 2, 0),        # FPN's P6: 1x1 with stride 2
    ((2, 2, 5, 6), 3, 1, 1),        # overlapping windows: a pixel can win several times
    ((1, 3, 6, 7), (3, 2), (2, 1), (1, 0)),  # non-square
]


@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES)
def test_max_pool2d_matches_loop(columns, rng, xs, kernel, stride, padding):
    x = distinct(rng, xs)
    t = Tensor(x, requires_grad=True)
    y = max_pool2d(t, kernel, stride, padding)
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    ref_y, ref_gx = loop_max_pool2d(x, gy, kernel, kernel if stride is None else stride, padding)
    np.testing.assert_array_equal(y.data, ref_y)
    np.testing.assert_allclose(t.grad, ref_gx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES)
def test_max_pool2d_gradcheck(columns, rng, xs, kernel, stride, padding):
    x = Tensor(distinct(rng, xs), requires_grad=True)
    assert gradcheck(lambda x: max_pool2d(x, kernel, stride, padding), [x])


def test_max_pool2d_ties_go_to_the_first(columns, rng):
    """On a constant window the whole gradient goes to its top-left pixel (PyTorch's rule)."""
    x = Tensor(np.ones((1, 1, 4, 4)), requires_grad=True)
    max_pool2d(x, 2).backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(x.grad[0, 0], expected)


def test_max_pool2d_padding_never_wins(columns, rng):
    """-inf padding: an all-negative image pools to its own values, never to the pad's 0."""
    x = -1 - np.abs(rng.standard_normal((1, 1, 5, 5)))
    y = max_pool2d(Tensor(x), 3, 2, 1).data
    assert (y < 0).all() and y[0, 0, 0, 0] == x[0, 0, :2, :2].max()


@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES + [((2, 3, 9, 8), 4, 3, 2)])
def test_max_pool2d_loops_and_slices_give_the_same_bits(rng, monkeypatch, xs, kernel, stride, padding):
    """Ties, a NaN and overlapping windows: kernels/maxpool.py picks the same winners and adds the
    gradients in the same order as the slicing version (float32, exactly equal)."""
    x = rng.standard_normal(xs).astype(np.float32)
    x[0, 0, :3, :3] = 1.0
    x[-1, -1, 1, 1] = np.nan
    gy = None
    results = []
    for mode in ("loops", "slices"):
        monkeypatch.setattr(conv_module, "CPU_COLUMNS", mode)
        t = Tensor(x, requires_grad=True)
        y = max_pool2d(t, kernel, stride, padding)
        gy = rng.standard_normal(y.shape).astype(np.float32) if gy is None else gy
        y.backward(gy)
        results.append((y.data, t.grad))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES + [((2, 3, 9, 8), 4, 3, 2),
                                                          ((1, 2, 12, 13), 3, 2, 1)])
def test_max_pool2d_values_only_is_the_same_bits(rng, xs, kernel, stride, padding):
    """Under no_grad the max pool skips ``arg`` and goes row by row, then column by column
    (``kernels/maxpool.max_pool_values``): the same bits as the window-by-window loop, with
    ties, signed zeros and NaN anywhere (a NaN survives only at a window's offset 0)."""
    x = rng.standard_normal(xs).astype(np.float32)
    x[rng.random(xs) < 0.1] = np.nan
    x[rng.random(xs) < 0.2] = 1.0  # ties
    x[rng.random(xs) < 0.1] = -0.0
    x[rng.random(xs) < 0.1] = 0.0
    with_arg = max_pool2d(Tensor(x, requires_grad=True), kernel, stride, padding).data
    with no_grad():
        values = max_pool2d(Tensor(x, requires_grad=True), kernel, stride, padding).data
    np.testing.assert_array_equal(np.signbit(values), np.signbit(with_arg))
    np.testing.assert_array_equal(values, with_arg)
    assert np.isnan(with_arg).any() and not np.isnan(with_arg).all()  # the case is exercised
    x = distinct(rng, xs).astype(np.float32)  # and, without NaN, the plain loop's values
    with no_grad():
        values = max_pool2d(Tensor(x), kernel, stride, padding).data
    ref, _ = loop_max_pool2d(x, np.zeros(values.shape), kernel, kernel if stride is None else stride, padding)
    np.testing.assert_array_equal(values, ref)


def test_max_pool2d_bad_padding_is_named():
    with pytest.raises(ValueError, match="at most half the kernel"):
        max_pool2d(Tensor(np.zeros((1, 1, 4, 4))), 2, padding=2)


# ---- against PyTorch (float32) ----------------------------------------------------------------
def _compare_with_torch(torch_fn, mine_fn, arrays, rng, atol=1e-4):
    """Forward and backward (random upstream gradient) of torch_fn and mine_fn on the same arrays."""
    torch = pytest.importorskip("torch", reason="torch not installed: the comparison with PyTorch is skipped")
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    ty = torch_fn(torch.nn.functional, *theirs)
    gy = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.tensor(gy))
    mine = [Tensor(a, requires_grad=True) for a in arrays]
    y = mine_fn(*mine)
    y.backward(gy)
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-4, atol=atol)
    for m, t in zip(mine, theirs):
        np.testing.assert_allclose(m.grad, t.grad.numpy(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("xs, ws, stride, padding, dilation",
                         CONV_CASES + [((2, 16, 12, 12), (8, 16, 3, 3), 2, 1, 1)])
def test_conv2d_matches_torch(rng, xs, ws, stride, padding, dilation):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (xs, ws, ws[0])]
    _compare_with_torch(lambda F, x, w, b: F.conv2d(x, w, b, stride, padding, dilation),
                        lambda x, w, b: conv2d(x, w, b, stride, padding, dilation), arrays, rng)


@pytest.mark.parametrize("xs, ws, stride, padding", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_torch(rng, xs, ws, stride, padding):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (xs, ws, ws[1])]
    _compare_with_torch(lambda F, x, w, b: F.conv_transpose2d(x, w, b, stride, padding),
                        lambda x, w, b: conv_transpose2d(x, w, b, stride, padding), arrays, rng)


@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES)
def test_max_pool2d_matches_torch(rng, xs, kernel, stride, padding):
    arrays = [rng.standard_normal(xs).astype(np.float32)]  # random floats: no ties
    _compare_with_torch(lambda F, x: F.max_pool2d(x, kernel, stride, padding),
                        lambda x: max_pool2d(x, kernel, stride, padding), arrays, rng, atol=1e-6)


# ---- on the GPU: the same numbers as on the CPU -------------------------------------------------
def _cpu_and_gpu(fn, arrays, gy):
    out = {}
    for device in ("cpu", "gpu"):
        ts = [Tensor(to_device(a, device), requires_grad=True) for a in arrays]
        y = fn(*ts)
        y.backward(to_device(gy, device))
        out[device] = [y.numpy()] + [to_device(t.grad, "cpu") for t in ts]
    for c, g in zip(out["cpu"], out["gpu"]):
        np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["im2col", "shift"])
@pytest.mark.parametrize("xs, ws, stride, padding, dilation", CONV_CASES)
def test_conv2d_gpu_matches_cpu(rng, method, xs, ws, stride, padding, dilation):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (xs, ws, ws[0])]
    y = loop_conv2d(*arrays, stride, padding, dilation)
    _cpu_and_gpu(lambda x, w, b: Conv2dFn(stride, padding, dilation, method=method)(x, w, b), arrays,
                 rng.standard_normal(y.shape).astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("xs, ws, stride, padding", TRANSPOSE_CASES)
def test_conv_transpose2d_gpu_matches_cpu(rng, xs, ws, stride, padding):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (xs, ws, ws[1])]
    y = loop_conv_transpose2d(*arrays, stride, padding)
    _cpu_and_gpu(lambda x, w, b: conv_transpose2d(x, w, b, stride, padding), arrays,
                 rng.standard_normal(y.shape).astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES)
def test_max_pool2d_gpu_matches_cpu(rng, xs, kernel, stride, padding):
    x = distinct(rng, xs).astype(np.float32)
    y = max_pool2d(Tensor(x), kernel, stride, padding)
    _cpu_and_gpu(lambda x: max_pool2d(x, kernel, stride, padding), [x],
                 rng.standard_normal(y.shape).astype(np.float32))


def test_public_names():
    assert minimask.functional.conv2d is conv2d
    assert minimask.functional.conv_transpose2d is conv_transpose2d
    assert minimask.functional.max_pool2d is max_pool2d


def test_bench_ops_runs(monkeypatch, capsys):
    """`minimask bench ops` prints one row per shape (tiny shapes here: it times, tests nothing)."""
    from minimask.bench import ops

    monkeypatch.setattr(ops, "CASES", [("tiny 3x3", 1, 2, 6, 3, 3, 1, 1), ("tiny 1x1", 1, 2, 5, 3, 1, 2, 0)])
    ops.main(device="cpu", repeat=1)
    out = capsys.readouterr().out
    assert "tiny 3x3" in out and "tiny 1x1" in out


def test_settings_must_be_ints():
    x, w = Tensor(np.zeros((1, 1, 4, 4))), Tensor(np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints, got 1.5"):
        conv2d(x, w, padding=1.5)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        max_pool2d(x, (2, 2, 2))
