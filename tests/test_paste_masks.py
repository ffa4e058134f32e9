"""Mask pasting: the NumPy reference against torch's grid_sample, Numba and CUDA against the
reference, torchvision's variant against torch's interpolate, and the threshold's edge."""

import numpy as np
import pytest

from minimask.kernels import paste_masks as K
from minimask.ops.masks import paste_masks_in_image


def random_case(rng, n=12, m=28, image_shape=(37, 53)):
    """Random masks and boxes: fractional corners, some partly outside, some tiny, one empty."""
    h, w = image_shape
    masks = rng.uniform(0, 1, size=(n, m, m))
    x0 = rng.uniform(-15, w, size=n)
    y0 = rng.uniform(-15, h, size=n)
    bw = rng.uniform(0.3, 40, size=n)
    bh = rng.uniform(0.3, 40, size=n)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1)
    boxes[0] = [w - 10.3, h - 7.6, w + 20.2, h + 11.9]  # over the bottom-right corner
    boxes[1] = [3.2, 4.7, 3.9, 5.1]  # smaller than a pixel
    boxes[2] = [5.0, 5.0, 5.0, 9.0]  # zero width: pastes nothing
    boxes[3] = [-30.5, -20.2, -2.1, -1.3]  # outside the image
    return masks, boxes


def test_reference_matches_torch_grid_sample(rng):
    torch = pytest.importorskip("torch", reason="torch gives an independent grid_sample to compare with")
    masks, boxes = random_case(rng)
    boxes = np.delete(boxes, 2, axis=0)  # grid_sample would divide by the zero width
    masks = masks[: len(boxes)]
    h, w = 37, 53
    ours = K.paste_masks_reference(masks, boxes, (h, w))
    # Detectron2's construction: pixel centres mapped to [-1, 1] over the box, then grid_sample.
    b = torch.from_numpy(boxes)
    gx = ((torch.arange(w, dtype=torch.float64) + 0.5) - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1
    gy = ((torch.arange(h, dtype=torch.float64) + 0.5) - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, h, w), gy[:, :, None].expand(-1, h, w)], dim=3)
    theirs = torch.nn.functional.grid_sample(torch.from_numpy(masks)[:, None], grid, align_corners=False)
    np.testing.assert_allclose(ours, theirs[:, 0].numpy(), atol=1e-12)
    assert ours.max() > 0.5  # the case is not trivially empty


def test_numba_matches_reference(rng):
    for threshold in (0.5, 0.3, 0.9):
        masks, boxes = random_case(rng)
        expected = K.paste_masks_reference(masks, boxes, (37, 53), threshold)
        got = K.paste_masks_numba(masks, boxes, (37, 53), threshold)
        assert got.dtype == np.bool_ and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        assert expected.any() and not expected[2].any() and not expected[3].any()


def test_numba_loop_as_plain_python_matches_reference(rng):
    # The jitted loop's Python body (what NUMBA_DISABLE_JIT=1 runs), on a small case.
    masks, boxes = random_case(rng, n=5, m=7, image_shape=(15, 19))
    out = np.zeros((5, 15, 19), dtype=bool)
    getattr(K._paste_numba, "py_func", K._paste_numba)(masks, boxes, 0.5, out)  # plain when JIT is off
    np.testing.assert_array_equal(out, K.paste_masks_reference(masks, boxes, (15, 19), 0.5))


def test_float32_inputs_give_the_same_masks(rng):
    masks, boxes = random_case(rng)
    masks, boxes = masks.astype(np.float32), boxes.astype(np.float32)
    got = paste_masks_in_image(masks, boxes, (37, 53))
    np.testing.assert_array_equal(got, K.paste_masks_reference(masks, boxes, (37, 53), 0.5))


def test_mask_of_ones_fills_exactly_the_pixels_whose_centres_are_in_the_box(rng):
    # With zero outside the mask, the sample is >= 0.5 exactly when u >= -0.5 (and <= M - 0.5),
    # i.e. when the pixel centre lies in [x0, x1]: the box's own pixels, no more, no fewer.
    boxes = np.array([[10.3, 4.6, 30.8, 20.1], [-5.2, 30.7, 12.4, 45.0], [40.2, 2.1, 40.9, 2.8]])
    masks = np.ones((3, 28, 28))
    got = paste_masks_in_image(masks, boxes, (40, 50))
    cx = np.arange(50) + 0.5
    cy = np.arange(40) + 0.5
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        inside = ((cy >= y0) & (cy <= y1))[:, None] & ((cx >= x0) & (cx <= x1))[None, :]
        np.testing.assert_array_equal(got[i], inside)
    assert got[2].sum() == 1  # a box smaller than a pixel still owns the pixel whose centre it holds


def test_low_threshold_reaches_into_the_fade_beyond_the_box():
    # A mask of ones, sampled with zeros around it, is a product of two ramps: 1 over the mask's
    # cell centres, falling linearly to 0 one cell beyond (half a cell outside the box).  At a
    # low threshold the pasted mask reaches past the box edge (10 pixels a cell here), so the
    # Numba loop must visit more than the box's own pixels.
    m, cell = 7, 10.0
    box = np.array([[20.2, 15.3, 20.2 + m * cell, 15.3 + m * cell]])
    ones = np.ones((1, m, m))

    def ramp(u):  # u: mask coordinate, cell j centred at u = j
        return np.clip(np.minimum(u + 1, m - u), 0, 1)

    u = (np.arange(120) + 0.5 - box[0, 0]) / cell - 0.5
    v = (np.arange(110) + 0.5 - box[0, 1]) / cell - 0.5
    for t in (0.1, 0.3, 0.5):
        got = paste_masks_in_image(ones, box, (110, 120), threshold=t)[0]
        np.testing.assert_array_equal(got, ramp(v)[:, None] * ramp(u)[None, :] >= t)
        if t < 0.5:
            assert got.sum() > (m * cell) ** 2  # more pixels than the box holds
        np.testing.assert_array_equal(got, K.paste_masks_reference(ones, box, (110, 120), t)[0])


def test_threshold_is_inclusive_at_one_to_one_scale():
    # An integer box of exactly M x M pixels puts pixel centres on mask cell centres, so the
    # pasted probabilities equal the mask's numbers exactly and the threshold's edge is visible.
    m = 6
    mask = np.full((m, m), 0.2)
    mask[1, 2] = 0.5
    mask[3, 4] = np.nextafter(0.5, 0)
    mask[4, 1] = 0.75
    box = np.array([[7.0, 3.0, 7.0 + m, 3.0 + m]])
    probs = paste_masks_in_image(mask[None], box, (12, 16), threshold=None)
    np.testing.assert_array_equal(probs[0, 3:3 + m, 7:7 + m], mask)
    got = paste_masks_in_image(mask[None], box, (12, 16), threshold=0.5)[0]
    assert got[3 + 1, 7 + 2] and got[3 + 4, 7 + 1]  # 0.5 itself is in (>=), as Detectron2
    assert not got[3 + 3, 7 + 4]  # the float just below 0.5 is not
    assert got.sum() == 2
    assert paste_masks_in_image(mask[None], box, (12, 16), threshold=0.7)[0].sum() == 1


def test_torchvision_mode_matches_torch_interpolate(rng):
    torch = pytest.importorskip("torch", reason="torch's interpolate is the resize torchvision uses")
    tF = torch.nn.functional
    masks, boxes = random_case(rng)
    masks, boxes = masks.astype(np.float32), boxes.astype(np.float32)
    h, w = 37, 53
    ours = paste_masks_in_image(masks, boxes, (h, w), threshold=None, mode="torchvision")
    # torchvision's steps, written out with torch: pad one cell, grow the box, truncate, resize.
    m = masks.shape[-1]
    scale = (m + 2) / m
    tb = torch.from_numpy(boxes)
    half_w, half_h = (tb[:, 2] - tb[:, 0]) * 0.5 * scale, (tb[:, 3] - tb[:, 1]) * 0.5 * scale
    cx, cy = (tb[:, 2] + tb[:, 0]) * 0.5, (tb[:, 3] + tb[:, 1]) * 0.5
    grown = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).to(torch.int64).tolist()
    padded = tF.pad(torch.from_numpy(masks), (1, 1, 1, 1))
    expected = np.zeros((len(masks), h, w), dtype=np.float32)
    for i, (x0, y0, x1, y1) in enumerate(grown):
        r = tF.interpolate(padded[i][None, None], size=(max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)),
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        for yy in range(max(y0, 0), min(y1 + 1, h)):
            for xx in range(max(x0, 0), min(x1 + 1, w)):
                expected[i, yy, xx] = r[yy - y0, xx - x0]
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert expected.max() > 0.5
    binary = paste_masks_in_image(masks, boxes, (h, w), mode="torchvision")
    np.testing.assert_array_equal(binary, ours > 0.5)  # torchvision's evaluation keeps > 0.5


def test_torchvision_mode_is_close_to_detectron2_mode(rng):
    # The two conventions differ by under a pixel at the edges; on big boxes most pixels agree.
    masks = np.zeros((1, 28, 28))
    masks[0, 5:23, 7:20] = 1.0
    box = np.array([[20.4, 10.7, 120.2, 90.3]])
    a = paste_masks_in_image(masks, box, (100, 140))
    b = paste_masks_in_image(masks, box, (100, 140), mode="torchvision")
    assert a.sum() > 1000
    assert (a != b).sum() < 0.1 * a.sum()


def test_inputs_and_errors(rng):
    masks, boxes = random_case(rng, n=5)
    masks, boxes = masks[:3], boxes[:3]
    out = paste_masks_in_image(masks[:, None], boxes, (20, 30))  # (N, 1, M, M) is accepted
    assert out.shape == (3, 20, 30) and out.dtype == np.bool_
    assert paste_masks_in_image(np.zeros((0, 28, 28)), np.zeros((0, 4)), (20, 30)).shape == (0, 20, 30)
    with pytest.raises(ValueError, match="boxes must be"):
        paste_masks_in_image(masks, boxes[:2], (20, 30))
    with pytest.raises(ValueError, match="threshold"):
        paste_masks_in_image(masks, boxes, (20, 30), threshold=0.0)
    with pytest.raises(ValueError, match="NaN"):
        paste_masks_in_image(masks, np.full((3, 4), np.nan), (20, 30))
    with pytest.raises(ValueError, match="mode"):
        paste_masks_in_image(masks, boxes, (20, 30), mode="detectron1")
    with pytest.raises(ValueError, match="masks must be"):
        paste_masks_in_image(masks[0], boxes, (20, 30))


@pytest.mark.gpu
def test_cupy_matches_reference(rng):
    import cupy

    for threshold in (0.5, 0.3):
        masks, boxes = random_case(rng, n=20, image_shape=(61, 47))
        expected = K.paste_masks_reference(masks, boxes, (61, 47), threshold)
        got = K.paste_masks_cupy(cupy.asarray(masks), cupy.asarray(boxes), (61, 47), threshold)
        np.testing.assert_array_equal(cupy.asnumpy(got), expected)
        got = paste_masks_in_image(cupy.asarray(masks.astype(np.float32)), boxes, (61, 47), threshold)
        assert isinstance(got, cupy.ndarray)
        expected32 = K.paste_masks_reference(masks.astype(np.float32), boxes, (61, 47), threshold)
        np.testing.assert_array_equal(cupy.asnumpy(got), expected32)


@pytest.mark.gpu
def test_probabilities_and_torchvision_mode_on_gpu(rng):
    import cupy

    masks, boxes = random_case(rng)
    for mode in ("detectron2", "torchvision"):
        cpu = paste_masks_in_image(masks, boxes, (37, 53), threshold=None, mode=mode)
        gpu = paste_masks_in_image(cupy.asarray(masks), cupy.asarray(boxes), (37, 53), None, mode=mode)
        np.testing.assert_allclose(cupy.asnumpy(gpu), cpu, atol=1e-12)
