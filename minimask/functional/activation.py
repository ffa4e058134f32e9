"""Activations: ReLU, sigmoid, softmax and log-softmax.

ReLU is the nonlinearity of every ResNet, FPN and head layer (He et al. 2016; Mask R-CNN Sec. 3,
"Network Architecture").  Softmax turns the box head's K+1 class scores into probabilities, and
the per-pixel sigmoid turns mask logits into mask probabilities: the paper's key choice of a
per-class sigmoid rather than a softmax over classes for masks (Sec. 3, "Mask Representation"
and Table 2b).

Sigmoid and (log-)softmax call exp, which overflows float32 beyond x ~ 88.  Each is written so
that exp only ever sees a number <= 0, so any finite logit gives a finite, exact-as-can-be result.
"""

from ..backend import get_array_module
from ..tensor import Function
from .arith import sum_to


def stable_sigmoid(x):
    """1 / (1 + e^-x) on an array, without overflow: exp only of -|x| (<= 0).

    For x >= 0 use 1 / (1 + e^-x); for x < 0 the same value written as e^x / (1 + e^x).
    Shared with the losses (binary cross-entropy's gradient is sigmoid(x) - t).
    """
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]: never overflows
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class ReLU(Function):
    """y = max(x, 0);  dx = gy where x > 0, else 0 (the kink at 0 gets 0, as in PyTorch)."""

    def forward(self, x):
        if self.recording:  # a bool mask, a quarter of x's float32 bytes, for backward only
            self.save_for_backward(positive=x > 0)
        return get_array_module(x).maximum(x, 0)  # a Python 0 keeps x's dtype

    def backward(self, gy):
        return gy * self.positive


class AddReLU(Function):
    """y = max(a + b, 0): the end of a residual block, "F(x) + x, then ReLU" (He et al. 2016,
    Fig. 2), in one array and one pass instead of two;  da = db = gy where y > 0.

    The same numbers as ``relu(a + b)`` to the bit, forward and backward: the same sum, the
    same maximum, in place on the sum, which nobody else holds."""

    def forward(self, a, b):
        y = a + b
        get_array_module(y).maximum(y, 0, out=y)
        if self.recording:
            self.save_for_backward(positive=y > 0, shapes=(a.shape, b.shape))
        return y

    def backward(self, gy):
        g = gy * self.positive
        return sum_to(g, self.shapes[0]), sum_to(g, self.shapes[1])


class Sigmoid(Function):
    """y = 1 / (1 + e^-x);  dx = gy * y * (1 - y)."""

    def forward(self, x):
        y = stable_sigmoid(x)
        self.save_for_backward(y=y)  # the output: dy/dx = y (1 - y), no need to keep x
        return y

    def backward(self, gy):
        return gy * self.y * (1 - self.y)


class Softmax(Function):
    """y_i = e^(x_i - m) / sum_j e^(x_j - m), m = max_j x_j (subtracting m changes nothing but
    keeps exp <= 1);  dx_i = y_i (gy_i - sum_j gy_j y_j)."""

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        y = e / e.sum(axis=self.axis, keepdims=True)
        self.save_for_backward(y=y)
        return y

    def backward(self, gy):
        y = self.y
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """y_i = x_i - m - log sum_j e^(x_j - m)  (m = max_j x_j);
    dx_i = gy_i - softmax(x)_i * sum_j gy_j.

    Computing log(softmax) directly would take the log of an underflowed 0 (-inf) for a logit
    far below the others; this form stays finite.
    """

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        shifted = x - x.max(axis=self.axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        self.save_for_backward(y=y)
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


def add_relu(a, b=None):
    """max(a + b, 0) in one step (see ``AddReLU``); relu(a) when b is None."""
    return ReLU()(a) if b is None else AddReLU()(a, b)


def relu(x):
    return ReLU()(x)


def sigmoid(x):
    return Sigmoid()(x)


def softmax(x, axis=-1):
    return Softmax(axis)(x)


def log_softmax(x, axis=-1):
    return LogSoftmax(axis)(x)
