"""Anchors: the reference boxes the RPN classifies and regresses from.

Faster R-CNN (Ren et al. 2015, Sec. 3.1.1): "At each sliding-window location, we simultaneously
predict multiple region proposals ... The k proposals are parameterized relative to k reference
boxes, which we call anchors. An anchor is centered at the sliding window in question, and is
associated with a scale and aspect ratio."  With an FPN (Lin et al. 2017, Sec. 4.1) each pyramid
level P2..P6 gets anchors of a single size (32, 64, 128, 256, 512 pixels) and three aspect ratios
(1:2, 1:1, 2:1); Mask R-CNN (Sec. 3.1, "Implementation Details") uses the same: 5 scales and 3
aspect ratios.

This follows torchvision's ``AnchorGenerator`` (``models/detection/anchor_utils.py``) number for
number:

1. *Cell anchors*, centred at (0, 0): for an aspect ratio r = height / width and a size s,
   ``h_ratio = sqrt(r)``, ``w_ratio = 1 / h_ratio``, ``w = w_ratio * s``, ``h = h_ratio * s``
   (so the area stays s * s), and the box ``round([-w, -h, w, h] / 2)``.  The rounding (half to
   even) makes them integer boxes, as torchvision's; the order is ratio-major, size-minor.
2. *Shifts*: on a level of stride S, the cell at row y, column x is shifted by (x * S, y * S).
   (Anchors are centred on the top-left corner of each stride cell, not its middle: that is what
   torchvision and Detectron2, with offset 0, do; the RPN learns the constant half-cell offset.)

**Order of anchors.**  Each level gives an ``(H * W * A, 4)`` array in the order
``(y, x, anchor)``: row index ``(y * W + x) * A + a``.  The RPN head's outputs, laid out
``(N, A, H, W)`` for objectness and ``(N, A * 4, H, W)`` for deltas, must therefore be permuted to
``(N, H, W, A)`` and ``(N, H, W, A, 4)`` before they are flattened, so that row i of the scores
and deltas belongs to anchor i here.
"""

import numpy as np

from ..backend import to_device


def _pair(value, name):
    """``s`` or ``(sy, sx)`` -> ``(sy, sx)`` as ints."""
    if np.ndim(value) == 0:
        return int(value), int(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be one number or a pair (y, x); got {value!r}")
    return int(value[0]), int(value[1])


class AnchorGenerator:
    """Anchors for every level of a feature pyramid.

    Args:
        sizes: one tuple of sizes (pixels, the side of a square anchor of the same area) per level.
        aspect_ratios: one tuple of height/width ratios per level.
        strides: optional stride per level (an int, or ``(sy, sx)``).  ``None`` derives it from
            the padded image and feature sizes as torchvision does: ``image_size // feature_size``.
    """

    def __init__(self, sizes=((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios=((0.5, 1.0, 2.0),) * 5, strides=None):
        sizes = tuple(tuple(s) if np.ndim(s) else (s,) for s in sizes)
        aspect_ratios = tuple(tuple(r) if np.ndim(r) else (r,) for r in aspect_ratios)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes gives {len(sizes)} levels but aspect_ratios gives "
                             f"{len(aspect_ratios)}; give one tuple of each per pyramid level")
        if strides is not None and len(strides) != len(sizes):
            raise ValueError(f"strides gives {len(strides)} levels, sizes {len(sizes)}")
        for level in sizes + aspect_ratios:
            if len(level) == 0 or any(v <= 0 for v in level):
                raise ValueError(f"sizes and aspect ratios must be positive; got {level!r}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.strides = None if strides is None else [_pair(s, "stride") for s in strides]

    def num_anchors_per_location(self):
        """A = len(sizes) * len(aspect_ratios) for each level (what the RPN head must predict)."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def cell_anchors(sizes, aspect_ratios, dtype=np.float32):
        """The ``(len(aspect_ratios) * len(sizes), 4)`` anchors of one location, centred at 0."""
        sizes = np.asarray(sizes, dtype=dtype)
        ratios = np.asarray(aspect_ratios, dtype=dtype)
        h_ratios = np.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # ratio-major, size-minor
        hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
        base = np.stack([-ws, -hs, ws, hs], axis=1) / 2
        return np.round(base).astype(dtype)

    def grid_anchors(self, feature_shapes, strides, dtype=np.float32, device="cpu"):
        """One ``(H * W * A, 4)`` array per level, in the order (y, x, anchor).

        ``feature_shapes`` is a list of ``(H, W)`` per level, ``strides`` an int or ``(sy, sx)``
        per level.  The arrays are made on the CPU and moved to ``device`` ("cpu" or "gpu").
        """
        if len(feature_shapes) != len(self.sizes) or len(strides) != len(self.sizes):
            raise ValueError(f"the generator has {len(self.sizes)} levels; got {len(feature_shapes)} "
                             f"feature shapes and {len(strides)} strides")
        anchors = []
        for sizes, ratios, shape, stride in zip(self.sizes, self.aspect_ratios, feature_shapes, strides):
            height, width = _pair(shape, "feature shape")
            stride_y, stride_x = _pair(stride, "stride")
            base = self.cell_anchors(sizes, ratios, dtype)  # (A, 4)
            shift_x = np.arange(width, dtype=np.int64) * stride_x
            shift_y = np.arange(height, dtype=np.int64) * stride_y
            shift_y, shift_x = np.meshgrid(shift_y, shift_x, indexing="ij")  # (H, W): y outer
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1).astype(dtype)  # (H*W, 4)
            level = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)  # anchor index fastest
            anchors.append(to_device(level, device))
        return anchors

    def __call__(self, image_size_padded, feature_shapes, dtype=np.float32, device="cpu"):
        """Anchors for a batch padded to ``image_size_padded = (H, W)``: a list per level.

        Every image of a batch shares these anchors (the batch is padded to one size); anchors
        reaching beyond an image are kept, as in torchvision (the RPN clips its proposals).
        """
        image_h, image_w = _pair(image_size_padded, "image size")
        if self.strides is not None:
            strides = self.strides
        else:
            strides = [(image_h // h, image_w // w)
                       for h, w in (_pair(s, "feature shape") for s in feature_shapes)]
        return self.grid_anchors(feature_shapes, strides, dtype=dtype, device=device)
