"""Drawings put boxes where their pixels are (minimask/viz.py)."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib", reason="the drawings need matplotlib")
matplotlib.use("Agg")

from minimask.viz import display_scale, draw_detections, show_masks  # noqa: E402


def test_pixels_cover_the_unit_squares_boxes_are_measured_in():
    """A box around pixels x0..x1-1 is (x0, x1) in box coordinates; the image must be drawn so
    that pixel j spans [j, j+1], or every outline sits half a pixel off its object."""
    import matplotlib.pyplot as plt

    image = np.zeros((20, 30, 3), np.uint8)
    masks = np.zeros((1, 20, 30), bool)
    masks[0, 5:9, 10:16] = True
    fig, ax = plt.subplots()
    ax = draw_detections(image, np.array([[10, 5, 16, 9]], np.float32), np.array([1]), masks=masks, ax=ax)
    for im in ax.images:  # the image and the mask layer
        assert tuple(im.get_extent()) == (0, 30, 20, 0)
    plt.close(fig)
    fig, ax = plt.subplots()
    show_masks(None, masks, ax=ax)
    assert tuple(ax.images[-1].get_extent()) == (0, 30, 20, 0)
    plt.close(fig)


def test_display_scale_is_a_whole_factor():
    assert display_scale(128, 128) == 4
    assert display_scale(100, 300, min_long_side=512) == 2
    assert display_scale(800, 1333) == 1
