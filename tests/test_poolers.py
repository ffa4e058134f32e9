"""Multi-level RoIAlign: FPN level assignment (Eq. 1), routing of boxes to levels and back into
input order, gradients to the features, and the Table 2c pooler types."""

import math

import numpy as np
import pytest

import minimask
from minimask import functional as F
from minimask.models import poolers
from minimask.models.poolers import MultiScaleRoIAlign, assign_boxes_to_levels, infer_strides


def square(size, x=0.0, y=0.0):
    return [x, y, x + size, y + size]


def test_levels_of_boxes_of_known_size():
    boxes = np.array([square(224), square(112), square(448), square(56), square(1), square(5000),
                      [0, 0, 112, 448], [0, 0, 0, 0]], dtype=np.float32)
    levels = assign_boxes_to_levels(boxes, min_level=2, max_level=5) + 2
    # P4 for the canonical 224, one level per factor 2, clamped at P2 and P5; a 112 x 448 box
    # has the canonical area; an empty box goes to the finest level.
    np.testing.assert_array_equal(levels, [4, 3, 5, 2, 2, 5, 4, 2])


def test_level_boundaries():
    just_below, just_above = 224 * (1 - 1e-4), 224 * (1 + 1e-4)
    boxes = np.array([square(just_below), square(224), square(just_above), square(2 * just_below),
                      square(448), square(896), square(448 * (1 - 1e-4))], dtype=np.float64)
    levels = assign_boxes_to_levels(boxes, min_level=2, max_level=6) + 2
    np.testing.assert_array_equal(levels, [3, 4, 4, 4, 5, 6, 4])
    # The index counts from min_level, and the canonical settings can be changed.
    np.testing.assert_array_equal(assign_boxes_to_levels(boxes[:3], 3, 5), [0, 1, 1])
    np.testing.assert_array_equal(assign_boxes_to_levels(boxes[:3], 2, 6, canonical_box_size=112), [2, 3, 3])


def test_epsilon_keeps_float32_boxes_of_canonical_sizes_on_their_level():
    # In float32, 448.3 - 0.3 is 447.99998...: without the 1e-6 these boxes would drop a level.
    boxes = np.array([[0.3, 0.3, 448.3, 448.3], [0.1, 0.1, 112.1, 112.1]], dtype=np.float32)
    exact = boxes.astype(np.float64)  # the sizes as the float32 numbers really are
    assert (exact[:, 2] - exact[:, 0] < [448, 112]).all()
    np.testing.assert_array_equal(assign_boxes_to_levels(boxes, 2, 5) + 2, [5, 3])
    np.testing.assert_array_equal(assign_boxes_to_levels(boxes, 2, 5, eps=0) + 2, [4, 2])


def test_levels_follow_the_formula_on_random_boxes(rng):
    xy = rng.uniform(0, 300, size=(200, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(2000), size=(200, 2)))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    expected = [min(max(math.floor(4 + math.log2(math.sqrt(w * h) / 224) + 1e-6), 2), 5) - 2 for w, h in wh]
    np.testing.assert_array_equal(assign_boxes_to_levels(boxes, 2, 5), expected)
    # A list of per-image arrays is the same as their concatenation.
    parts = [boxes[:70], boxes[70:71], boxes[71:]]
    np.testing.assert_array_equal(assign_boxes_to_levels(parts, 2, 5), expected)


def test_infer_strides():
    feats = [np.zeros((1, 1, 200 // s, 304 // s)) for s in (4, 8, 16, 32)]
    assert infer_strides(feats, (200, 304)) == [4, 8, 16, 32]
    assert infer_strides(feats, [(190, 300), (200, 260)]) == [4, 8, 16, 32]  # the largest height


def features_and_boxes(rng, dtype=np.float64, channels=3):
    """Two images of 128 x 128, P2..P5 (strides 4..32), boxes spread over all four levels."""
    feats = [minimask.Tensor(rng.standard_normal((2, channels, 128 // s, 128 // s)).astype(dtype),
                             requires_grad=True) for s in (4, 8, 16, 32)]
    # Listed out of level order, and so that putting them back is not its own inverse.
    boxes0 = np.array([[5.5, 8.2, 126.1, 120.3],  # ~116 px: P3
                       [-60.2, -50.7, 200.4, 190.1],  # ~250: P4
                       [10.3, 12.1, 30.7, 41.9],  # ~25: P2
                       [20.6, 30.3, 24.2, 35.8]])  # tiny: P2
    boxes1 = np.array([[-200.5, -180.2, 300.1, 290.4],  # ~490: P5
                       [40.2, 50.9, 100.6, 115.4],  # ~63: P2
                       [0.7, 1.2, 127.3, 126.8]])  # ~126: P3
    return feats, [boxes0, boxes1]


def test_pooler_routes_boxes_to_levels_and_back_in_input_order(rng, monkeypatch):
    # A stand-in for roi_align that only tags its output with the level's scale and the RoI's
    # batch index, so that this test checks the routing alone (whatever roi_align computes).
    calls = []

    def tagging_roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True):
        calls.append((spatial_scale, rois.copy(), sampling_ratio, aligned))
        picked = x[rois[:, 0].astype(np.int64)][:, :, :output_size[0], :output_size[1]]
        return picked * spatial_scale

    monkeypatch.setattr(poolers.F, "roi_align", tagging_roi_align)
    feats, boxes = features_and_boxes(rng)
    out = MultiScaleRoIAlign(output_size=2)(feats, boxes, image_size=(128, 128))
    assert out.shape == (7, 3, 2, 2)
    rois = np.concatenate(boxes)
    levels = assign_boxes_to_levels(rois, 2, 5)
    np.testing.assert_array_equal(levels, [1, 2, 0, 0, 3, 0, 1])
    image_of = [0, 0, 0, 0, 1, 1, 1]
    for k in range(7):
        expected = feats[levels[k]].data[image_of[k], :, :2, :2] / 2 ** (levels[k] + 2)
        np.testing.assert_allclose(out.data[k], expected)
    assert [c[0] for c in calls] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert all(c[2] == 2 and c[3] is False for c in calls)  # torchvision's defaults
    np.testing.assert_array_equal(calls[0][1][:, 1:], rois[[2, 3, 5]])  # the P2 boxes, unchanged
    # Gradients go back through the reordering to the right level and image.
    g = rng.standard_normal(out.shape)
    out.backward(g)
    expected = [np.zeros_like(f.data) for f in feats]
    for k in range(7):  # boxes of one image and level read the same corner: their gradients add
        expected[levels[k]][image_of[k], :, :2, :2] += g[k] / 2 ** (levels[k] + 2)
    for f, e in zip(feats, expected):
        np.testing.assert_allclose(f.grad, e)


def test_pooler_equals_roi_align_per_box_at_its_level(rng):
    feats, boxes = features_and_boxes(rng)
    rois = np.concatenate([np.concatenate([np.full((len(b), 1), i), b], axis=1) for i, b in enumerate(boxes)])
    levels = assign_boxes_to_levels(rois[:, 1:], 2, 5)
    for sampling_ratio, aligned in ((2, False), (0, True)):  # torchvision's and Detectron2's settings
        pooler = MultiScaleRoIAlign(output_size=3, sampling_ratio=sampling_ratio, aligned=aligned)
        out = pooler(feats, boxes, image_size=(128, 128))
        assert out.shape == (7, 3, 3, 3)
        for k, level in enumerate(levels):
            one = F.roi_align(feats[level], rois[k:k + 1], (3, 3), spatial_scale=1 / 2 ** (level + 2),
                              sampling_ratio=sampling_ratio, aligned=aligned)
            np.testing.assert_allclose(out.data[k], one.data[0], rtol=1e-12, atol=1e-12)


def test_pooler_gradient_to_features(rng):
    feats, boxes = features_and_boxes(rng, channels=2)
    pooler = MultiScaleRoIAlign(output_size=2, sampling_ratio=2)
    assert minimask.gradcheck(lambda *fs: pooler(list(fs), boxes, image_size=(128, 128)), feats, directions=4)


@pytest.mark.parametrize("pooler_type", ["roialign", "roipool", "roiwarp"])
def test_each_pooler_type_runs_and_is_what_it_says(rng, pooler_type):
    feats, boxes = features_and_boxes(rng, dtype=np.float32)
    pooler = MultiScaleRoIAlign(output_size=(3, 2), pooler_type=pooler_type)
    out = pooler(feats, boxes, strides=(4, 8, 16, 32))
    assert out.shape == (7, 3, 3, 2) and out.dtype == np.float32
    rois = np.concatenate([np.concatenate([np.full((len(b), 1), i), b], axis=1) for i, b in enumerate(boxes)])
    levels = assign_boxes_to_levels(rois[:, 1:], 2, 5)
    k = 0  # a P3 box
    scale = 1 / 8
    if pooler_type == "roipool":
        expected = F.roi_pool(feats[1], rois[k:k + 1].astype(np.float32), (3, 2), spatial_scale=scale)
    else:
        r = rois[k:k + 1].astype(np.float32)
        if pooler_type == "roiwarp":  # corners rounded on the feature grid first
            r[:, 1:] = np.round(r[:, 1:] * scale) / scale
        expected = F.roi_align(feats[1], r, (3, 2), spatial_scale=scale, sampling_ratio=2, aligned=False)
    assert levels[k] == 1
    np.testing.assert_allclose(out.data[k], expected.data[0], rtol=1e-6, atol=1e-6)


def test_single_level_and_empty_and_errors(rng):
    feats, boxes = features_and_boxes(rng)
    pooler = MultiScaleRoIAlign(output_size=2)
    out = pooler(feats[:1], boxes, image_size=(128, 128))  # one level: every box pooled from it
    assert out.shape == (7, 3, 2, 2)
    empty = pooler(feats, [np.zeros((0, 4)), np.zeros((0, 4))], image_size=(128, 128))
    assert empty.shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="pyramid"):
        pooler(feats, boxes, strides=(4, 8, 32, 64))
    with pytest.raises(ValueError, match="image_size"):
        pooler(feats, boxes)
    with pytest.raises(ValueError, match="one per image"):
        pooler(feats, boxes[:1], image_size=(128, 128))
    with pytest.raises(ValueError, match="pooler_type"):
        MultiScaleRoIAlign(pooler_type="roicrop")


@pytest.mark.gpu
def test_pooler_on_gpu_matches_cpu(rng):
    feats, boxes = features_and_boxes(rng)
    pooler = MultiScaleRoIAlign(output_size=3, sampling_ratio=0, aligned=True)
    cpu = pooler(feats, boxes, image_size=(128, 128))
    gpu_feats = [minimask.Tensor(f.data, requires_grad=True).to("gpu") for f in feats]
    gpu = pooler(gpu_feats, boxes, image_size=(128, 128))
    np.testing.assert_allclose(gpu.numpy(), cpu.data, rtol=1e-10, atol=1e-10)
    g = rng.standard_normal(cpu.shape)
    cpu.backward(g)
    gpu.backward(minimask.Tensor(g).to("gpu").data)
    for f, fg in zip(feats, gpu_feats):
        np.testing.assert_allclose(fg.grad.get(), f.grad, rtol=1e-10, atol=1e-10)
