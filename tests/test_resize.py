"""interpolate: gradients by finite differences (nearest and bilinear, integer and non-integer
factors, up and down), values against plain loops written from the formulas, and PyTorch's
numbers for both modes.  The one resize rule: the index tables, ``interpolate``, and the array
resizes of images and masks against ``torch.nn.functional.interpolate`` for every (in, out)
pair of a grid up to 200 -> 400."""

import math

import numpy as np
import pytest

from minimask import F, Tensor, gradcheck
from minimask.functional.resize import (
    interpolation_matrix,
    linear_table,
    nearest_table,
    resize_image,
    resize_masks,
)

# Sizes in and out, all pairs: 1 and 2 (edges), 82 (the float32 rounding case 2 -> 82), primes,
# integer factors of each other, up to 200 -> 400 and down to 1.
GRID_IN = (1, 2, 3, 5, 7, 10, 14, 21, 28, 41, 64, 97, 128, 157, 200)
GRID_OUT = (1, 2, 4, 6, 13, 20, 31, 47, 64, 82, 111, 128, 199, 261, 400)
PAIRS = [(a, b) for a in GRID_IN for b in GRID_OUT]


def grid_cases():
    """(h, w, out_h, out_w) covering every grid pair on the rows; the columns take the pairs in
    another order, so that the two axes do not always resize alike."""
    return [(a, c, b, d) for (a, b), (c, d) in zip(PAIRS, PAIRS[::-1])]


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch's interpolate is the oracle for the resize rule")


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


# ---------------------------------------------------------------- the one rule, against torch


def test_tables_equal_torch_on_grid():
    torch = torch_or_skip()
    tf = torch.nn.functional
    # A fused multiply-add (one rounding) in the bilinear coordinate is what torch's AVX2,
    # AVX-512 and CUDA kernels compute; its plain DEFAULT CPU build rounds twice.
    fused = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    for a, b in PAIRS:
        # Nearest: resizing 0, 1, ..., a-1 (exact in float32) returns the source indices.
        probe = torch.arange(a, dtype=torch.float32)[None, None, None]
        theirs = tf.interpolate(probe, size=(1, b), mode="nearest")[0, 0, 0].numpy().astype(np.int64)
        np.testing.assert_array_equal(nearest_table(a, b), theirs, err_msg=f"nearest {a} -> {b}")
        # Bilinear: resizing the columns of an identity matrix returns the (out, in) matrix of
        # the weights, each weight times 1 plus the other times 0, so exactly the weights.
        eye = torch.eye(a, dtype=torch.float32)[None, None]
        theirs = tf.interpolate(eye, size=(a, b), mode="bilinear", align_corners=False)[0, 0].numpy().T
        i0, i1, w0, w1 = linear_table(a, b)
        ours = interpolation_matrix(a, [(i0, w0), (i1, w1)], np.float32)
        if fused:
            np.testing.assert_array_equal(ours, theirs, err_msg=f"bilinear {a} -> {b}")
        else:
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=f"bilinear {a} -> {b}")


def test_float64_rule_would_pick_another_pixel_at_2_to_82():
    # Why the tables compute in float32: 41 * (2 / 82) is 1.0 in float64, 0.99999994 in float32.
    torch = torch_or_skip()
    assert int(41 * (2 / 82)) == 1 and nearest_table(2, 82)[41] == 0
    x = np.array([[[[1.0, 2.0]]]], dtype=np.float32)
    theirs = torch.nn.functional.interpolate(torch.tensor(x), size=(2, 82)).numpy()
    assert theirs[0, 0, 0, 41] == 1.0
    np.testing.assert_array_equal(F.interpolate(Tensor(x), size=(2, 82)).data, theirs)
    masks = np.array([[[0, 1], [1, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_masks(masks, (82, 82)),
                                  torch.nn.functional.interpolate(torch.tensor(masks[None]).float(),
                                                                  size=(82, 82))[0].numpy())


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_interpolate_equals_torch_on_grid(rng, mode):
    torch = torch_or_skip()
    for h, w, oh, ow in grid_cases():
        x = rng.standard_normal((1, 2, h, w)).astype(np.float32)
        ours = F.interpolate(Tensor(x), size=(oh, ow), mode=mode).data
        theirs = torch.nn.functional.interpolate(torch.from_numpy(x), size=(oh, ow), mode=mode).numpy()
        where = f"{mode} ({h}, {w}) -> ({oh}, {ow})"
        if mode == "nearest":
            np.testing.assert_array_equal(ours, theirs, err_msg=where)
        else:  # the same weights; sums may round in another order (torch fuses multiply-adds)
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=where)


def test_array_resizes_equal_torch_on_grid(rng):
    torch = torch_or_skip()
    tf = torch.nn.functional
    for h, w, oh, ow in grid_cases():
        where = f"({h}, {w}) -> ({oh}, {ow})"
        image = rng.random((h, w, 3)).astype(np.float32)
        theirs = tf.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(oh, ow),
                                mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        ours = resize_image(image, (oh, ow))
        assert ours.dtype == np.float32 and ours.shape == (oh, ow, 3)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=where)
        np.testing.assert_allclose(resize_image(image[..., 0], (oh, ow)), theirs[..., 0],
                                   rtol=1e-5, atol=1e-6, err_msg=where)
        masks = (rng.random((2, h, w)) < 0.5).astype(np.uint8)
        theirs = tf.interpolate(torch.from_numpy(masks)[None].float(), size=(oh, ow), mode="nearest")[0]
        ours = resize_masks(masks, (oh, ow))
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs.numpy().astype(np.uint8), err_msg=where)


def test_uint8_image_is_torch_float_result_rounded(rng):
    torch = torch_or_skip()
    total = ties = 0
    for h, w, oh, ow in grid_cases():
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        theirs = torch.nn.functional.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False)
        theirs = theirs[0].permute(1, 2, 0).numpy()
        ours = resize_image(image, (oh, ow))
        assert ours.dtype == np.uint8
        expected = np.rint(theirs)  # torch.round: half to even, as np.rint
        differ = ours != expected
        # The weights are torch's exactly, but torch fuses the multiply-adds of the sum, so
        # a value a rounding error from a tie (k + 0.5) may round to the other side: there, and
        # only there, the two may differ, by one.
        near_tie = np.abs(np.abs(theirs - np.floor(theirs)) - 0.5) < 1e-4
        assert not (differ & ~near_tie).any(), f"({h}, {w}) -> ({oh}, {ow})"
        assert (np.abs(ours[differ].astype(int) - expected[differ]) == 1).all()
        total, ties = total + ours.size, ties + differ.sum()
    assert ties < 1e-3 * total  # rare: a pixel in thousands


def test_float64_image_computes_in_float64(rng):
    torch = torch_or_skip()
    image = rng.random((13, 17))
    ours = resize_image(image, (29, 8))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=(29, 8),
                                             mode="bilinear", align_corners=False)[0, 0].numpy()
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=1e-13)


def test_array_resizes_same_size_copy_exactly(rng):
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    masks = rng.random((2, 5, 7)) < 0.5
    for a, resized in ((image, resize_image(image, (5, 7))), (masks, resize_masks(masks, (5, 7)))):
        np.testing.assert_array_equal(resized, a)
        assert resized.dtype == a.dtype and not np.shares_memory(resized, a)
    wide = resize_image(image, (5, 12))  # rows unchanged: each row resized on its own
    np.testing.assert_array_equal(wide[2], resize_image(image[2:3], (1, 12))[0])


def test_array_resize_errors(rng):
    with pytest.raises(ValueError, match=r"\(H, W, C\) or \(H, W\)"):
        resize_image(np.zeros((1, 2, 3, 4)), (3, 3))
    with pytest.raises(ValueError, match="positive"):
        resize_image(np.zeros((4, 4)), (0, 3))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        resize_masks(np.zeros((4, 4)), (3, 3))
    with pytest.raises(ValueError, match="positive"):
        resize_masks(np.zeros((1, 4, 4)), (3, 0))


@pytest.mark.gpu
def test_array_resizes_gpu_match_cpu(rng):
    import cupy

    image = rng.integers(0, 256, (21, 14, 3), dtype=np.uint8)
    masks = (rng.random((3, 21, 14)) < 0.5).astype(np.uint8)
    for size in ((47, 31), (2, 82), (21, 14)):
        gpu = resize_image(cupy.asarray(image), size)
        np.testing.assert_array_equal(gpu.get(), resize_image(image, size))
        gpu = resize_image(cupy.asarray(image, dtype=np.float32), size)
        cpu = resize_image(image.astype(np.float32), size)
        np.testing.assert_allclose(gpu.get(), cpu, rtol=1e-6, atol=1e-4)
        gpu = resize_masks(cupy.asarray(masks), size)
        np.testing.assert_array_equal(gpu.get(), resize_masks(masks, size))
