"""Anchors: cell anchors and their grid, against values worked out by hand."""

import numpy as np
import pytest

from minimask.backend import to_device
from minimask.ops import AnchorGenerator

# Size 32 at aspect ratios (h / w) 0.5, 1, 2, by hand:
#   r = 0.5: w = 32 * sqrt(2) = 45.25, h = 32 / sqrt(2) = 22.63; halves 22.63, 11.31 -> 23, 11
#   r = 1:   w = h = 32; halves 16
#   r = 2:   w = 22.63, h = 45.25 -> 11, 23
CELL_32 = [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]


def test_cell_anchors_by_hand():
    np.testing.assert_array_equal(AnchorGenerator.cell_anchors((32,), (0.5, 1.0, 2.0)), CELL_32)
    # Two sizes: ratio-major, size-minor.  Size 64 at r = 0.5: halves 45.25, 22.63 -> 45, 23.
    np.testing.assert_array_equal(AnchorGenerator.cell_anchors((32, 64), (0.5, 1.0)),
                                  [[-23, -11, 23, 11], [-45, -23, 45, 23],
                                   [-16, -16, 16, 16], [-32, -32, 32, 32]])


def test_grid_of_a_small_level_by_hand():
    gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location() == [3]
    (anchors,) = gen.grid_anchors([(2, 3)], [16])  # a 2 x 3 feature map at stride 16
    assert anchors.shape == (2 * 3 * 3, 4) and anchors.dtype == np.float32
    expected = []
    for y in range(2):  # order (y, x, anchor)
        for x in range(3):
            for x1, y1, x2, y2 in CELL_32:
                expected.append([x1 + 16 * x, y1 + 16 * y, x2 + 16 * x, y2 + 16 * y])
    np.testing.assert_array_equal(anchors, expected)
    # Spot checks written out: anchor 1 at (y=0, x=1) and anchor 2 at (y=1, x=2).
    np.testing.assert_array_equal(anchors[(0 * 3 + 1) * 3 + 1], [0, -16, 32, 16])
    np.testing.assert_array_equal(anchors[(1 * 3 + 2) * 3 + 2], [21, -7, 43, 39])


def test_call_derives_strides_from_the_padded_image():
    gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((1.0,), (0.5, 1.0, 2.0)))
    assert gen.num_anchors_per_location() == [1, 3]
    level0, level1 = gen((64, 96), [(16, 24), (8, 12)])  # strides 4 and 8
    assert level0.shape == (16 * 24, 4) and level1.shape == (8 * 12 * 3, 4)
    centres = (level0[:, :2] + level0[:, 2:]) / 2
    np.testing.assert_array_equal(centres[25], [4 * 1, 4 * 1])  # (y=1, x=1)
    np.testing.assert_array_equal(centres[-1], [4 * 23, 4 * 15])
    centres1 = ((level1[:, :2] + level1[:, 2:]) / 2).reshape(8, 12, 3, 2)
    np.testing.assert_array_equal(centres1[5, 7, 2], [8 * 7, 8 * 5])
    widths = level1[:3, 2] - level1[:3, 0]
    np.testing.assert_array_equal(widths, [90, 64, 46])  # 2 * round(45.25), 64, 2 * round(22.63)


def test_explicit_non_square_strides_and_default_config():
    gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,),), strides=[(8, 16)])
    (anchors,) = gen((100, 100), [(2, 2)])  # the given strides win over 100 // 2
    np.testing.assert_array_equal(anchors, [[-16, -16, 16, 16], [0, -16, 32, 16],
                                            [-16, -8, 16, 24], [0, -8, 32, 24]])
    default = AnchorGenerator()
    assert default.num_anchors_per_location() == [3] * 5
    levels = default((256, 256), [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)], dtype=np.float64)
    assert [a.shape[0] for a in levels] == [64 * 64 * 3, 32 * 32 * 3, 16 * 16 * 3, 8 * 8 * 3, 4 * 4 * 3]
    assert all(a.dtype == np.float64 for a in levels)
    # The square anchors of each level have the level's size: 32, 64, ..., 512.
    assert [float(a[1, 2] - a[1, 0]) for a in levels] == [32, 64, 128, 256, 512]


def test_anchor_errors():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((1.0,),))
    with pytest.raises(ValueError, match="positive"):
        AnchorGenerator(sizes=((0,),), aspect_ratios=((1.0,),))
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator()((64, 64), [(16, 16)])


@pytest.mark.gpu
def test_anchors_on_gpu():
    gen = AnchorGenerator()
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    for cpu, gpu in zip(gen((64, 64), shapes), gen((64, 64), shapes, device="gpu")):
        assert type(gpu).__module__.startswith("cupy")
        np.testing.assert_array_equal(to_device(gpu, "cpu"), cpu)
