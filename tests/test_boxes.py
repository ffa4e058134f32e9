"""Box geometry: IoU and IoA on hand-computed cases, crowd regions, clipping, small-box removal, the
box coder."""

import math

import numpy as np
import pytest

from minimask.backend import to_device
from minimask.ops import (
    CROWD_IOA_THRESH,
    BoxCoder,
    box_area,
    box_ioa,
    box_iou,
    clip_boxes,
    crowd_ignore_mask,
    remove_small_boxes,
)


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_box_area():
    boxes = np.array([[0, 0, 2, 3], [1, 1, 1, 5], [-1, -2, 3, 2]], dtype=np.float32)
    np.testing.assert_array_equal(box_area(boxes), [6, 0, 16])


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # overlap 1x1, union 4 + 4 - 1
    ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),  # disjoint
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),  # nested
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching along an edge: zero-width intersection
    ([0, 0, 1, 1], [1, 1, 2, 2], 0.0),  # touching at a corner
    ([2, 3, 7, 5], [2, 3, 7, 5], 1.0),  # identical
    ([0, 0, 4, 2], [2, 0, 6, 2], 4 / 12),  # half overlap along x
    ([1, 1, 1, 1], [0, 0, 2, 2], 0.0),  # zero-area box inside another
    ([1, 1, 1, 3], [1, 1, 1, 3], 0.0),  # two identical zero-area boxes: union 0 -> 0 (not NaN)
])
def test_box_iou_hand_computed(a, b, expected):
    iou = box_iou(np.array([a], dtype=np.float64), np.array([b], dtype=np.float64))
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(expected, abs=1e-15)
    # IoU is symmetric.
    assert box_iou(np.array([b], float), np.array([a], float))[0, 0] == pytest.approx(expected, abs=1e-15)


def test_box_iou_pairwise_matches_a_loop(rng):
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    b[0] = a[3]  # one identical pair
    iou = box_iou(a, b)
    assert iou.shape == (7, 5)
    for i in range(7):
        for j in range(5):
            w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            area_a = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])
            area_b = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
            assert iou[i, j] == pytest.approx(w * h / (area_a + area_b - w * h), rel=1e-12, abs=1e-15)
    assert iou[3, 0] == pytest.approx(1.0)
    assert box_iou(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32


def test_box_iou_empty_and_bad_shape():
    assert box_iou(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou(np.zeros((2, 5)), np.zeros((2, 4)))


def test_box_iou_matches_torchvision(rng, torchvision):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    a, b = random_boxes(rng, 20), random_boxes(rng, 30)
    expected = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("box, region, expected", [
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 4),   # overlap 1x1 of the box's 4 (IoU would be 1/7)
    ([1, 1, 2, 2], [0, 0, 4, 4], 1.0),     # wholly inside: 1 however large the region (IoU 1/16)
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),  # the other way round: not symmetric
    ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),     # disjoint
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),     # touching along an edge
    ([0, 0, 10, 4], [7, -1, 20, 9], 3 / 10),  # the right 3 of 10 columns
    ([1, 1, 1, 3], [0, 0, 2, 4], 0.0),     # a zero-area box: 0, not 0/0
])
def test_box_ioa_hand_computed(box, region, expected):
    ioa = box_ioa(np.array([box], np.float64), np.array([region], np.float64))
    assert ioa.shape == (1, 1)
    assert ioa[0, 0] == pytest.approx(expected, abs=1e-15)


def test_box_ioa_pairwise_matches_a_loop(rng):
    a, b = random_boxes(rng, 6), random_boxes(rng, 4)
    ioa = box_ioa(a, b)
    assert ioa.shape == (6, 4)
    for i in range(6):
        for j in range(4):
            w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            assert ioa[i, j] == pytest.approx(w * h / ((a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])), rel=1e-12)
    assert box_ioa(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32
    assert box_ioa(np.zeros((0, 4)), b).shape == (0, 4)
    with pytest.raises(ValueError, match="regions must have shape"):
        box_ioa(a, b[:, :3])


def test_crowd_ignore_mask_is_strictly_above_the_threshold():
    """Ignored: IoA > 0.7 with some crowd region (strictly: exactly 0.7 is kept)."""
    assert CROWD_IOA_THRESH == 0.7
    crowd = np.array([[3, 0, 100, 10], [0, 50, 10, 60]], np.float64)
    boxes = np.array([[0, 0, 10, 10],     # 7 of its 10 columns in the first region: 0.7, kept
                      [-1, 0, 9, 10],     # 6 of 10: kept
                      [2, 0, 12, 10],     # 9 of 10: ignored
                      [0, 52, 10, 62],    # 8 of 10 rows in the second region: ignored
                      [50, 50, 60, 60]], np.float64)
    np.testing.assert_array_equal(crowd_ignore_mask(boxes, crowd), [False, False, True, True, False])
    np.testing.assert_array_equal(crowd_ignore_mask(boxes, crowd, threshold=0.65),
                                  [True, False, True, True, False])
    for none in (None, np.zeros((0, 4))):  # no crowd region: nothing is ignored
        np.testing.assert_array_equal(crowd_ignore_mask(boxes, none), [False] * 5)
    assert crowd_ignore_mask(np.zeros((0, 4)), crowd).shape == (0,)


def test_clip_boxes():
    boxes = np.array([[-5, -3, 20, 8], [2, 12, 30, 40], [1, 1, 2, 2]], dtype=np.float32)
    clipped = clip_boxes(boxes, (10, 15))  # height 10, width 15
    np.testing.assert_array_equal(clipped, [[0, 0, 15, 8], [2, 10, 15, 10], [1, 1, 2, 2]])
    assert clipped.dtype == np.float32
    assert boxes[0, 0] == -5  # the input is not changed


def test_remove_small_boxes():
    boxes = np.array([[0, 0, 2, 2],  # 2 x 2: kept at min_size 2 (>=)
                      [0, 0, 1.9, 5],  # too narrow
                      [0, 0, 5, 1.5],  # too short
                      [3, 3, 8, 9],  # big
                      [4, 4, 4, 4]])  # empty
    keep = remove_small_boxes(boxes, 2.0)
    np.testing.assert_array_equal(keep, [0, 3])
    assert keep.dtype == np.int64


def test_box_coder_encode_by_hand():
    proposal = np.array([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), size 10 x 10
    gt = np.array([[5.0, 5.0, 25.0, 15.0]])  # centre (15, 10), size 20 x 10
    np.testing.assert_allclose(BoxCoder().encode(gt, proposal), [[1.0, 0.5, math.log(2), 0.0]])
    np.testing.assert_allclose(BoxCoder((10, 10, 5, 5)).encode(gt, proposal),
                               [[10.0, 5.0, 5 * math.log(2), 0.0]])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(rng, weights):
    coder = BoxCoder(weights)
    proposals, gt = random_boxes(rng, 50), random_boxes(rng, 50)
    deltas = coder.encode(gt, proposals)
    assert deltas.shape == (50, 4)
    np.testing.assert_allclose(coder.decode(deltas, proposals), gt, rtol=1e-10, atol=1e-9)


def test_box_coder_class_specific_decode(rng):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = random_boxes(rng, 6)
    deltas = rng.normal(size=(6, 4 * 3))
    decoded = coder.decode(deltas, boxes)
    assert decoded.shape == (6, 12)
    for k in range(3):  # class k's four deltas decode against the same box
        columns = slice(4 * k, 4 * k + 4)
        np.testing.assert_allclose(decoded[:, columns], coder.decode(deltas[:, columns], boxes))


def test_box_coder_clips_large_dw_dh():
    coder = BoxCoder()
    box = np.array([[0.0, 0.0, 10.0, 20.0]])
    decoded = coder.decode(np.array([[0.0, 0.0, 100.0, 1e4]]), box)
    assert np.all(np.isfinite(decoded))
    # exp(log(1000 / 16)) = 62.5 times the box's size, centred where it was.
    np.testing.assert_allclose(decoded, [[5 - 312.5, 10 - 625.0, 5 + 312.5, 10 + 625.0]])
    # Below the clip nothing changes: dw = log 2 doubles the width.
    np.testing.assert_allclose(coder.decode(np.array([[0, 0, math.log(2), 0.0]]), box), [[-5, 0, 15, 20]])


def test_box_coder_dtype_lists_and_errors(rng):
    coder = BoxCoder()
    boxes = random_boxes(rng, 4).astype(np.float32)
    assert coder.decode(np.zeros((4, 4), np.float32), boxes).dtype == np.float32
    np.testing.assert_allclose(coder.decode(np.zeros((4, 4), np.float32), boxes), boxes, rtol=1e-5)
    a, b = random_boxes(rng, 5), random_boxes(rng, 5)
    parts = coder.encode([a[:2], a[2:]], [b[:2], b[2:]])
    assert [p.shape for p in parts] == [(2, 4), (3, 4)]
    np.testing.assert_allclose(np.concatenate(parts), coder.encode(a, b))
    with pytest.raises(ValueError, match="deltas"):
        coder.decode(np.zeros((4, 5)), boxes)
    with pytest.raises(ValueError, match="pair up"):
        coder.encode(a, b[:3])
    with pytest.raises(ValueError, match="four numbers"):
        BoxCoder((1, 1, 1))


@pytest.mark.gpu
def test_boxes_on_gpu_match_numpy(rng):
    a, b = random_boxes(rng, 30), random_boxes(rng, 20)
    ga, gb = to_device(a, "gpu"), to_device(b, "gpu")
    np.testing.assert_allclose(to_device(box_iou(ga, gb), "cpu"), box_iou(a, b), rtol=1e-12)
    np.testing.assert_allclose(to_device(box_ioa(ga, gb), "cpu"), box_ioa(a, b), rtol=1e-12)
    np.testing.assert_array_equal(to_device(crowd_ignore_mask(ga, gb[:3], 0.3), "cpu"),
                                  crowd_ignore_mask(a, b[:3], 0.3))
    coder = BoxCoder((10, 10, 5, 5))
    np.testing.assert_allclose(to_device(coder.encode(ga[:20], gb), "cpu"), coder.encode(a[:20], b),
                               rtol=1e-12)
    deltas = rng.normal(size=(20, 8))
    np.testing.assert_allclose(to_device(coder.decode(to_device(deltas, "gpu"), gb), "cpu"),
                               coder.decode(deltas, b), rtol=1e-12)
    np.testing.assert_array_equal(to_device(clip_boxes(ga, (50, 60)), "cpu"), clip_boxes(a, (50, 60)))
    np.testing.assert_array_equal(to_device(remove_small_boxes(ga, 20.0), "cpu"), remove_small_boxes(a, 20.0))
