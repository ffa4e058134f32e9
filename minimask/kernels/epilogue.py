"""A convolution's epilogue at inference, y = max(y + b + r, 0), in one pass over y, in place.

Most convs of Mask R-CNN are followed by the same few per-pixel steps: add the bias (or a
folded batch norm's shift, ``nn.conv_norm``), add the residual at the end of a ResNet block,
take the ReLU.  Written as separate ops each is a full pass over the conv's output, and the
ones that make a new array (``a + b``, ``maximum(x, 0)``) also get fresh memory from the
system, which is zeroed page by page.  On the large maps of ``r50_fpn`` these passes are
memory-bound: for res2's 256 x 200 x 272 output (56 MB) "bias, then add the shortcut, then
ReLU" cost about four times as much as the loop below, which reads y (and r) once and writes
y once (measured on 2 cores; the numbers are in issue 15's notes).

Only at inference (``functional/conv.py``'s ``conv2d_relu`` when nothing is recorded):
training needs ReLU's mask and keeps the separate ops.  The conv's output is a fresh array
that nobody else holds, so it can be overwritten.

    epilogue_reference   the separate NumPy steps, as ``conv2d`` then ``relu`` / ``add_relu``
                         do them (also runs on CuPy)
    bias_relu_           the same arithmetic in the same order, (y + b) + r, then max with 0,
                         as one Numba loop over y in place: the same bits

One thread, as the im2col loops (``kernels/im2col.py``): the pass is memory-bound, and a
second thread gained little here while adding a barrier per call.
"""

import numpy as np
from numba import njit

from ..backend import get_array_module


def epilogue_reference(y, b=None, r=None):
    """max(y + b + r, 0) as the unfused ops compute it: a new array (b, r optional)."""
    xp = get_array_module(y)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    if r is not None:
        y = y + r
    return xp.maximum(y, 0)


@njit(cache=True)
def _bias_relu(y, b):
    # y: (N, C, HW), b: (C,).  v + b then the max, as y += b and maximum(y, 0) round.
    n, c, hw = y.shape
    for i in range(n):
        for j in range(c):
            bj = b[j]
            for p in range(hw):
                v = y[i, j, p] + bj
                y[i, j, p] = v if v > 0 else 0
    return y


@njit(cache=True)
def _bias_add_relu(y, b, r):
    # (v + b) + r, the order of y += b followed by add_relu(y, r).
    n, c, hw = y.shape
    for i in range(n):
        for j in range(c):
            bj = b[j]
            for p in range(hw):
                v = (y[i, j, p] + bj) + r[i, j, p]
                y[i, j, p] = v if v > 0 else 0
    return y


def bias_relu_(y, b=None, r=None):
    """y = max(y + b + r, 0) in place on a C-contiguous (N, C, H, W) NumPy array y; b (C,) and
    r (y's shape) optional, of y's dtype.  Returns y."""
    if not y.flags.c_contiguous:  # reshape would copy, and the result would be lost
        raise ValueError(f"bias_relu_: y must be C-contiguous, got strides {y.strides}")
    n, c = y.shape[:2]
    y3 = y.reshape(n, c, y.shape[2] * y.shape[3])
    b = np.zeros(c, dtype=y.dtype) if b is None else np.ascontiguousarray(b)
    if r is None:
        _bias_relu(y3, b)
    else:
        _bias_add_relu(y3, b, np.ascontiguousarray(r).reshape(y3.shape))
    return y
