"""Shape ops: reshape, transpose, indexing, concatenation, stacking.

They move numbers without changing them, so each backward moves the gradient back the same
way: reshape it back, transpose it by the inverse permutation, scatter it into the indexed
places, split it along the concatenated axis.
"""

import numpy as np

from ..backend import get_array_module, scatter_add
from ..tensor import Function, Tensor


class Reshape(Function):
    """y = x viewed as ``shape``;  dx = gy viewed as x's shape."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.save_for_backward(in_shape=x.shape)
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.in_shape)


class Transpose(Function):
    """y = x with axes permuted;  dx = gy permuted by the inverse permutation."""

    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, x):
        self.save_for_backward(ndim=x.ndim)
        return x.transpose(self.axes)

    def backward(self, gy):
        if self.axes is None:
            return gy.transpose()
        inverse = np.argsort([a % self.ndim for a in self.axes])
        return gy.transpose(tuple(int(i) for i in inverse))


def _plain_key(key):
    """Index key with Tensors replaced by their arrays."""
    if isinstance(key, tuple):
        return tuple(k.data if isinstance(k, Tensor) else k for k in key)
    return key.data if isinstance(key, Tensor) else key


def _has_int_array(key):
    keys = key if isinstance(key, tuple) else (key,)
    return any(hasattr(k, "dtype") and k.dtype.kind in "iu" or isinstance(k, list) for k in keys)


def _picks_each_once(key, shape):
    """True when ``key`` is integer arrays only (one per leading axis) that never name one element
    twice; then ``gx[key] = gy`` is the scatter-add.  False when unsure (other kinds of key)."""
    keys = key if isinstance(key, tuple) else (key,)
    if not keys or len(keys) > len(shape):
        return False
    if not all(hasattr(k, "dtype") and k.dtype.kind in "iu" for k in keys):
        return False
    xp = get_array_module(*keys)
    arrays = xp.broadcast_arrays(*keys)
    if arrays[0].size < 2:
        return True
    flat = xp.ravel_multi_index(tuple(a.ravel() for a in arrays), shape[:len(keys)], mode="wrap")
    flat = xp.sort(flat)
    return not bool((flat[1:] == flat[:-1]).any())


class GetItem(Function):
    """y = x[key] (ints, slices, integer arrays, boolean masks);  dx = zeros, gy placed at key.

    Integer arrays may repeat an index (x[[0, 0]]): those gradients must add up, so they go
    through a scatter-add; other keys pick each element at most once and a plain assignment
    does.  Most integer keys in Mask R-CNN do not repeat either (the pooler's reordering of
    RoIs by level is a permutation, the class-specific box and mask outputs pick one class per
    RoI), and NumPy's ``np.add.at`` is many times slower than an assignment, so backward checks
    (a sort of the flat indices) and assigns when it can.
    """

    def __init__(self, key):
        # Saved state, not a setting: the key may hold index arrays or a boolean mask as large as
        # x, which backward needs (to scatter into) and release must free.
        self.save_for_backward(key=key)

    def forward(self, x):
        self.save_for_backward(in_shape=x.shape)
        return x[self.key]

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        if _has_int_array(self.key) and not _picks_each_once(self.key, self.in_shape):
            scatter_add(gx, self.key, gy)
        else:
            gx[self.key] = gy
        return gx


class Concat(Function):
    """y = concatenation of xs along ``axis``;  dx_i = the slice of gy that came from x_i."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        self.save_for_backward(sizes=[x.shape[self.axis] for x in xs])
        return get_array_module(*xs).concatenate(xs, axis=self.axis)

    def backward(self, gy):
        xp = get_array_module(gy)
        cuts = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(gy, cuts, axis=self.axis))


class Stack(Function):
    """y = xs stacked along a new ``axis``;  dx_i = gy taken at index i of that axis."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        return get_array_module(*xs).stack(xs, axis=self.axis)  # saves nothing: backward only splits gy

    def backward(self, gy):
        xp = get_array_module(gy)
        return tuple(xp.take(gy, i, axis=self.axis) for i in range(gy.shape[self.axis]))


class Pad(Function):
    """y = x with zeros around its last two axes;  dx = the interior of gy."""

    def __init__(self, pad):  # pad = (top, bottom, left, right)
        self.pad = pad

    def forward(self, x):
        t, b, l, r = self.pad
        widths = [(0, 0)] * (x.ndim - 2) + [(t, b), (l, r)]
        self.save_for_backward(in_shape=x.shape)
        return get_array_module(x).pad(x, widths)

    def backward(self, gy):
        t, _, l, _ = self.pad
        h, w = self.in_shape[-2:]
        return gy[..., t:t + h, l:l + w]


def reshape(x, shape):
    return Reshape(tuple(shape))(x)


def transpose(x, axes=None):
    return Transpose(None if axes is None else tuple(axes))(x)


permute = transpose


def flatten(x, start_dim=1):
    # The size is spelled out rather than -1, so that an empty batch (0, C, H, W) flattens too.
    return Reshape(tuple(x.shape[:start_dim]) + (int(np.prod(x.shape[start_dim:])),))(x)


def getitem(x, key):
    return GetItem(_plain_key(key))(x)


def concat(xs, axis=0):
    xs = list(xs)
    if len(xs) == 1:
        return xs[0] if isinstance(xs[0], Tensor) else Tensor(xs[0])
    return Concat(axis)(*xs)


cat = concat


def stack(xs, axis=0):
    return Stack(axis)(*xs)


def pad2d(x, pad):
    """Zero-pad the last two axes by ``(top, bottom, left, right)``."""
    return Pad(tuple(int(p) for p in pad))(x)
