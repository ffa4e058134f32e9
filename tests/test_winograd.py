"""Winograd F(2x2, 3x3): the tile transforms (Numba against NumPy, each against its adjoint),
the convolution against the plain loop, its gradients against finite differences, the chunking,
and where ``method="auto"`` uses it."""

import numpy as np
import pytest
from test_conv import loop_conv2d, t64

from minimask import Tensor, gradcheck
from minimask.functional import conv as conv_module
from minimask.functional import winograd as W
from minimask.functional.conv import Conv2dFn, uses_winograd
from minimask.kernels import winograd as K

# (N, C, H, W), O, padding: odd and even sizes (tiles hanging over), padding 0, 1 and 2, 1x1 images
CASES = [((2, 3, 5, 7), 4, 1), ((1, 2, 6, 6), 3, 1), ((2, 3, 6, 5), 2, 0), ((3, 5, 9, 4), 2, 2),
         ((1, 1, 1, 1), 2, 1), ((2, 4, 3, 3), 1, 0)]


def _tiles(xs, padding):
    n, c, h, w = xs
    return K.tile_counts(h + 2 * padding - 2, w + 2 * padding - 2)


# ---- the matrices ------------------------------------------------------------------------
def test_the_matrices_compute_two_outputs_of_a_three_tap_filter(rng):
    """The 1-D identity the 2-D algorithm nests: A^T [(G g) * (B^T d)] = the correlation of d with g."""
    d, g = rng.standard_normal(4), rng.standard_normal(3)
    direct = np.array([d[0:3] @ g, d[1:4] @ g])
    np.testing.assert_allclose(K.AT @ ((K.G @ g) * (K.BT @ d)), direct, rtol=1e-12)


def test_the_f4_matrices_compute_four_outputs_of_a_three_tap_filter(rng):
    d, g = rng.standard_normal(6), rng.standard_normal(3)
    direct = np.array([d[i:i + 3] @ g for i in range(4)])
    np.testing.assert_allclose(K.AT4 @ ((K.G4 @ g) * (K.BT4 @ d)), direct, rtol=1e-12)


def test_filter_transform_is_g_g_gt(rng):
    w = rng.standard_normal((3, 2, 3, 3))
    u = W.transform_filters(w)
    for o in range(3):
        for c in range(2):
            np.testing.assert_allclose(u[:, o, c].reshape(4, 4), K.G @ w[o, c] @ K.G.T, rtol=1e-12)
    gu = rng.standard_normal(u.shape)
    # adjoint: <U(w), gu> = <w, U^T(gu)>
    np.testing.assert_allclose((u * gu).sum(), (w * W.transform_filters_adjoint(gu)).sum(), rtol=1e-12)


# ---- the transforms: Numba against the NumPy reference, and adjoint pairs ---------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("xs, o, padding", CASES)
def test_numba_transforms_match_the_reference(rng, dtype, xs, o, padding):
    th, tw = _tiles(xs, padding)
    m, c, h, w = xs
    x = rng.standard_normal(xs).astype(dtype)
    xpad = K.padded_tiles(x, (padding, padding), th, tw)
    np.testing.assert_array_equal(K.input_tiles(x, (padding, padding), 0, th, tw),
                                  K.input_tiles_reference(xpad, th, tw))
    for ty0 in range(th):  # a band of tile rows reads the rows the whole does
        np.testing.assert_array_equal(
            K.input_tiles(x, (padding, padding), ty0, 1, tw),
            K.input_tiles_reference(xpad[:, :, 2 * ty0:2 * ty0 + 4], 1, tw))
    gv = rng.standard_normal((16, c, m * th * tw)).astype(dtype)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.input_tiles_adjoint_add(gv, th, tw, np.zeros_like(xpad)),
                               K.input_tiles_adjoint_reference(gv, m, th, tw), **tol)
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    mt = rng.standard_normal((16, o, m * th * tw)).astype(dtype)
    np.testing.assert_allclose(K.output_tiles(mt, th, tw, np.empty((m, o, ho, wo), dtype)),
                               K.output_tiles_reference(mt, m, th, tw, ho, wo), **tol)
    gy = rng.standard_normal((m, o, ho, wo)).astype(dtype)
    np.testing.assert_array_equal(K.output_tiles_adjoint(gy, th, tw),
                                  K.output_tiles_adjoint_reference(gy, th, tw))


@pytest.mark.parametrize("xs, o, padding", CASES)
def test_each_transform_and_its_adjoint_are_transposes(rng, xs, o, padding):
    """<T a, b> = <a, T^T b> for random a and b, for the reference maps and the Numba ones:
    what makes the backward pass the exact gradient of the forward."""
    th, tw = _tiles(xs, padding)
    m, c, h, w = xs
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    xpad = rng.standard_normal((m, c, 2 * th + 2, 2 * tw + 2))
    gv = rng.standard_normal((16, c, m * th * tw))
    pairs = [(K.input_tiles_reference(xpad, th, tw), K.input_tiles_adjoint_reference(gv, m, th, tw)),
             (K.input_tiles(xpad, (0, 0), 0, th, tw),
              K.input_tiles_adjoint_add(gv, th, tw, np.zeros_like(xpad)))]
    for fwd, adj in pairs:
        np.testing.assert_allclose((fwd * gv).sum(), (xpad * adj).sum(), rtol=1e-10)
    mt, gy = rng.standard_normal((16, o, m * th * tw)), rng.standard_normal((m, o, ho, wo))
    pairs = [(K.output_tiles_reference(mt, m, th, tw, ho, wo), K.output_tiles_adjoint_reference(gy, th, tw)),
             (K.output_tiles(mt, th, tw, np.empty((m, o, ho, wo))), K.output_tiles_adjoint(gy, th, tw))]
    for fwd, adj in pairs:
        np.testing.assert_allclose((fwd * gy).sum(), (mt * adj).sum(), rtol=1e-10)


def test_transforms_read_and_write_views(rng):
    """The convolution hands images and bands of rows (views) to the loops: the same numbers as copies."""
    x = rng.standard_normal((3, 3, 12, 8))[1:, :, :, 1:]  # a non-contiguous view
    np.testing.assert_array_equal(K.input_tiles(x, (1, 1), 2, 2, 4), K.input_tiles(x.copy(), (1, 1), 2, 2, 4))
    y, mt = np.zeros((2, 3, 9, 6)), rng.standard_normal((16, 3, 6))
    K.output_tiles(mt, 2, 3, y[1:2, :, 4:8])
    expected = np.zeros((2, 3, 9, 6))
    expected[1:2, :, 4:8] = K.output_tiles(mt, 2, 3, np.zeros((1, 3, 4, 6)))
    np.testing.assert_array_equal(y, expected)


# ---- the convolution ---------------------------------------------------------------------
@pytest.mark.parametrize("xs, o, padding", CASES)
def test_winograd_conv_matches_the_loop(rng, xs, o, padding):
    x, w, b = rng.standard_normal(xs), rng.standard_normal((o, xs[1], 3, 3)), rng.standard_normal(o)
    y = Conv2dFn(1, padding, method="winograd")(Tensor(x), Tensor(w), Tensor(b))
    np.testing.assert_allclose(y.data, loop_conv2d(x, w, b, 1, padding), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("xs, o, padding", CASES)
def test_winograd_conv_gradcheck(rng, xs, o, padding):
    x, w, b = t64(rng, *xs), t64(rng, o, xs[1], 3, 3), t64(rng, o)
    assert gradcheck(lambda x, w, b: Conv2dFn(1, padding, method="winograd")(x, w, b), [x, w, b])


def test_winograd_frozen_weight_gives_input_grad_only(rng):
    x, w = t64(rng, 2, 3, 6, 5), Tensor(rng.standard_normal((4, 3, 3, 3)))
    y = Conv2dFn(1, 1, method="winograd")(x, w)
    y.backward(np.ones(y.shape))
    assert w.grad is None
    expected = Conv2dFn(1, 1, method="im2col")(Tensor(x.data, requires_grad=True), w)
    gx = expected.creator.backward(np.ones(y.shape))[0]
    np.testing.assert_allclose(x.grad, gx, rtol=1e-10)


def test_float32_stays_close_to_im2col(rng):
    """The transforms add and halve, so float32 rounding stays at im2col's scale: the two
    methods agree to a few units in the last place of the outputs' size."""
    x = rng.standard_normal((2, 64, 12, 10)).astype(np.float32)
    w = (rng.standard_normal((32, 64, 3, 3)) / 24).astype(np.float32)
    gy = rng.standard_normal((2, 32, 12, 10)).astype(np.float32)
    exact = loop_conv2d(x.astype(np.float64), w.astype(np.float64), None, 1, 1)
    y = W.winograd_forward(x, w, (1, 1))
    assert y.dtype == np.float32
    scale = np.abs(exact).max()
    err_w = np.abs(y - exact).max() / scale
    err_i = np.abs(conv_module.conv_forward(x, w, (1, 1), (1, 1), (1, 1)) - exact).max() / scale
    assert err_w < 1e-6 and err_w < 8 * err_i + 1e-7, (err_w, err_i)
    gx, gw = W.winograd_backward(x, w, gy, (1, 1))
    gx64, gw64 = W.winograd_backward(*(a.astype(np.float64) for a in (x, w, gy)), (1, 1))
    assert np.abs(gx - gx64).max() / np.abs(gx64).max() < 1e-6
    assert np.abs(gw - gw64).max() / np.abs(gw64).max() < 1e-6


@pytest.mark.parametrize("budget, min_tiles", [(1, 1), (2000, 1), (1, 10), (10**9, 1)])
def test_chunks_give_the_same_numbers(rng, monkeypatch, budget, min_tiles):
    """Bands of tile rows, several images per chunk, or all at once: the same result."""
    monkeypatch.setattr(W, "CHUNK_BYTES", budget)
    monkeypatch.setattr(W, "MIN_CHUNK_TILES", min_tiles)
    x, w = rng.standard_normal((3, 4, 11, 9)), rng.standard_normal((5, 4, 3, 3))
    gy = rng.standard_normal((3, 5, 11, 9))
    chunks = list(W._Tiling(x.shape, 5, (1, 1)).chunks(8))
    covered = sorted((b, ty) for n0, n1, ty0, ty1 in chunks
                     for b in range(n0, n1) for ty in range(ty0, ty1))
    assert covered == [(b, ty) for b in range(3) for ty in range(6)]  # every tile row once
    np.testing.assert_allclose(W.winograd_forward(x, w, (1, 1)), loop_conv2d(x, w, None, 1, 1),
                               rtol=1e-10, atol=1e-10)
    gx, gw = W.winograd_backward(x, w, gy, (1, 1))
    one = (1, 1)
    np.testing.assert_allclose(gx, conv_module.conv_grad_input(gy, w, x.shape, one, one, one), rtol=1e-10)
    np.testing.assert_allclose(gw, conv_module.conv_grad_weight(x, gy, (3, 3), one, one, one), rtol=1e-10)


# ---- where "auto" uses it ----------------------------------------------------------------
def test_auto_uses_winograd_only_where_it_pays():
    wide = np.zeros((1, 256, 64, 64), np.float32)       # 1024 tiles x 256 channels
    wide64 = np.zeros((1, 64, 128, 128), np.float32)    # 4096 tiles x 64 channels
    narrow = np.zeros((4, 64, 32, 32), np.float32)      # the shapes model's largest: 65k
    small = np.zeros((1, 256, 8, 8), np.float32)        # too few tiles
    one = (1, 1)
    assert uses_winograd("auto", wide, (256, 256, 3, 3), one, one, one)
    assert uses_winograd("auto", wide, (256, 256, 3, 3), one, one, one, product="backward")
    assert uses_winograd("auto", wide64, (64, 64, 3, 3), one, one, one)
    assert not uses_winograd("auto", wide64, (64, 64, 3, 3), one, one, one, product="backward")
    assert not uses_winograd("auto", narrow, (64, 64, 3, 3), one, one, one)
    assert not uses_winograd("auto", small, (256, 256, 3, 3), one, one, one)
    assert not uses_winograd("auto", wide, (256, 256, 3, 3), (2, 2), one, one)  # stride 2
    assert not uses_winograd("auto", wide, (256, 256, 1, 1), one, (0, 0), one)  # 1x1
    assert not uses_winograd("auto", wide, (256, 256, 3, 3), one, (2, 2), (2, 2))  # dilated
    assert not uses_winograd("im2col", wide, (256, 256, 3, 3), one, one, one)


def test_the_shapes_model_never_uses_winograd(monkeypatch):
    """Its convs stay on im2col, training (4 images, one data-parallel share) and predicting:
    the preset's schedule was measured with those numbers."""
    from minimask.models import build_model
    from minimask.models.config import preset
    from minimask.tensor import no_grad

    picked = []
    original = conv_module.uses_winograd

    def spy(*args, **kwargs):
        picked.append(original(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(conv_module, "uses_winograd", spy)
    model = build_model(preset("shapes"))
    images = [np.zeros((128, 128, 3), np.uint8)] * 4
    model.eval()
    with no_grad():
        model.predict(images[:1])
    model.train()
    target = dict(boxes=np.array([[10, 10, 40, 40]], np.float32), labels=np.array([1]),
                  masks=np.pad(np.ones((1, 30, 30), np.uint8), ((0, 0), (10, 88), (10, 88))))
    losses = model(images, [target] * 4)
    sum(losses.values()).backward()
    assert picked and not any(picked)


def test_winograd_forward_with_im2col_backward(rng, monkeypatch):
    """"auto" may pick Winograd for the forward and im2col for the backward (64 channels on a
    large map): the gradients are im2col's, with no columns kept from a forward that built none."""
    monkeypatch.setitem(conv_module.WINOGRAD_AUTO, "forward", (1, 1))
    monkeypatch.setitem(conv_module.WINOGRAD_AUTO, "backward", (10**9, 0))
    x, w = t64(rng, 2, 3, 6, 5), t64(rng, 4, 3, 3, 3)
    assert gradcheck(lambda x, w: Conv2dFn(1, 1)(x, w), [x, w])


def test_asking_for_winograd_where_it_cannot_run_is_named(rng):
    x, w = Tensor(rng.standard_normal((1, 2, 6, 6))), Tensor(rng.standard_normal((3, 2, 3, 3)))
    with pytest.raises(ValueError, match="method 'winograd' computes 3x3 stride-1"):
        Conv2dFn(2, 1, method="winograd")(x, w)
    with pytest.raises(ValueError, match="method must be one of"):
        Conv2dFn(1, 1, method="fft")


# ---- F(4x4, 3x3): forward only, for inference --------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("xs, o, padding", CASES + [((1, 2, 10, 9), 3, 1)])
def test_f4_loops_match_the_reference(rng, dtype, xs, o, padding):
    m, c, h, w = xs
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    th, tw = K.tile_counts(ho, wo, 4)
    x = rng.standard_normal(xs).astype(dtype)
    xpad = np.zeros((m, c, 4 * th + 2, 4 * tw + 2), dtype)
    xpad[:, :, padding:padding + h, padding:padding + w] = x
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.input_tiles4(x, (padding, padding), 0, th, tw),
                               K.input_tiles4_reference(xpad, th, tw), **tol)
    mt = rng.standard_normal((36, o, m * th * tw)).astype(dtype)
    np.testing.assert_allclose(K.output_tiles4(mt, th, tw, np.empty((m, o, ho, wo), dtype)),
                               K.output_tiles4_reference(mt, m, th, tw, ho, wo), **tol)


@pytest.mark.parametrize("xs, o, padding", CASES + [((1, 2, 10, 9), 3, 1)])
def test_f4_conv_matches_the_loop(rng, xs, o, padding):
    x, w = rng.standard_normal(xs), rng.standard_normal((o, xs[1], 3, 3))
    np.testing.assert_allclose(W.winograd_forward(x, w, (padding, padding), tile=4),
                               loop_conv2d(x, w, None, 1, padding), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("budget, min_tiles", [(1, 1), (10**9, 1)])
def test_f4_chunks_give_the_same_numbers(rng, monkeypatch, budget, min_tiles):
    monkeypatch.setattr(W, "CHUNK_BYTES", budget)
    monkeypatch.setattr(W, "MIN_CHUNK_TILES", min_tiles)
    x, w = rng.standard_normal((3, 4, 13, 11)), rng.standard_normal((5, 4, 3, 3))
    np.testing.assert_allclose(W.winograd_forward(x, w, (1, 1), tile=4), loop_conv2d(x, w, None, 1, 1),
                               rtol=1e-10, atol=1e-10)


def test_f4_float32_error_is_bounded(rng):
    """Bigger tiles round more: F(4x4)'s float32 error against the exact result stays within
    a few 1e-6 of the output's size (F(2x2)'s and im2col's: a few 1e-7)."""
    x = rng.standard_normal((2, 64, 12, 10)).astype(np.float32)
    w = (rng.standard_normal((32, 64, 3, 3)) / 24).astype(np.float32)
    exact = loop_conv2d(x.astype(np.float64), w.astype(np.float64), None, 1, 1)
    err = np.abs(W.winograd_forward(x, w, (1, 1), tile=4) - exact).max() / np.abs(exact).max()
    assert err < 2e-5, err


def test_auto_uses_f4_only_without_a_backward(rng, monkeypatch):
    """"auto": F(4x4, 3x3) for an inference forward on a large map, F(2x2) when a backward
    follows, on small maps, or with many channels."""
    tiles_used = []
    original = W.winograd_forward

    def spy(x, w, padding, tile=2):
        tiles_used.append(tile)
        return original(x, w, padding, tile)

    monkeypatch.setattr(W, "winograd_forward", spy)
    monkeypatch.setitem(conv_module.WINOGRAD_AUTO, "forward", (1, 1))
    monkeypatch.setitem(conv_module.WINOGRAD4_AUTO, "min_pixels", 100)
    monkeypatch.setitem(conv_module.WINOGRAD4_AUTO, "max_channels", 8)
    from minimask.tensor import no_grad

    x, w = rng.standard_normal((1, 4, 12, 12)), rng.standard_normal((4, 4, 3, 3))
    with no_grad():
        y4 = Conv2dFn(1, 1)(Tensor(x), Tensor(w))                       # 144 pixels: F(4x4)
        Conv2dFn(1, 1)(Tensor(x[:, :, :8, :8]), Tensor(w))              # 64 pixels: F(2x2)
        Conv2dFn(1, 1)(Tensor(np.tile(x, (1, 4, 1, 1))), Tensor(np.tile(w, (4, 4, 1, 1))))  # 16 channels
    Conv2dFn(1, 1)(Tensor(x, requires_grad=True), Tensor(w))            # a backward follows
    assert tiles_used == [4, 2, 2, 2]
    np.testing.assert_allclose(y4.data, loop_conv2d(x, w, None, 1, 1), rtol=1e-10, atol=1e-10)


def test_f4_rule_at_r50_fpn_sizes():
    def tile(recording, shape, o):
        x = np.broadcast_to(np.float32(0), shape)  # only its shape is read
        return conv_module.winograd_tile(recording, x, (o, shape[1], 3, 3), (1, 1))
    assert tile(False, (1, 256, 200, 272), 256) == 4   # FPN's and the RPN's P2
    assert tile(False, (1, 64, 200, 272), 64) == 4     # the ResNet's C2
    assert tile(True, (1, 256, 200, 272), 256) == 2    # training
    assert tile(False, (1, 512, 25, 34), 512) == 2     # C5: small map, many channels
    assert tile(False, (100, 256, 14, 14), 256) == 2   # the mask head's RoIs
