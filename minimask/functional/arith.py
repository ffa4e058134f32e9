"""Elementwise arithmetic, reductions and matrix products, each a Function.

These are the building blocks every layer is written in.  Broadcasting follows NumPy's rules;
in backward, a gradient of the broadcast shape is summed back to the input's shape
(``sum_to``), since an input that was repeated along an axis receives the sum of the
gradients of its copies.
"""

import numpy as np

from ..backend import get_array_module
from ..tensor import Function, Tensor


def sum_to(g, shape):
    """Sum ``g`` over the axes broadcasting added or stretched, to get back ``shape``."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                      if n == 1 and g.shape[i + lead] != 1)
    g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _pair(a, b):
    """Tensors for a binary op; a Python number takes the dtype of the other operand."""
    if not isinstance(a, Tensor) and isinstance(b, Tensor) and np.isscalar(a):
        a = get_array_module(b.data).asarray(a, dtype=b.dtype)
    if not isinstance(b, Tensor) and isinstance(a, Tensor) and np.isscalar(b):
        b = get_array_module(a.data).asarray(b, dtype=a.dtype)
    return a, b


class Add(Function):
    """y = a + b;  da = gy, db = gy (summed back over broadcast axes)."""

    def forward(self, a, b):
        self.save_for_backward(shapes=(a.shape, b.shape))  # only the shapes, to undo broadcasting
        return a + b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(gy, self.shapes[1])


class Sub(Function):
    """y = a - b;  da = gy, db = -gy."""

    def forward(self, a, b):
        self.save_for_backward(shapes=(a.shape, b.shape))
        return a - b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(-gy, self.shapes[1])


class Mul(Function):
    """y = a * b;  da = gy * b, db = gy * a."""

    def forward(self, a, b):
        self.save_for_backward(a=a, b=b)
        return a * b

    def backward(self, gy):
        ga = sum_to(gy * self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(gy * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """y = a / b;  da = gy / b, db = -gy * a / b^2."""

    def forward(self, a, b):
        self.save_for_backward(a=a, b=b)
        return a / b

    def backward(self, gy):
        ga = sum_to(gy / self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(-gy * self.a / (self.b * self.b), self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    """y = -x;  dx = -gy."""

    def forward(self, x):
        return -x  # saves nothing: the gradient of -x does not depend on x

    def backward(self, gy):
        return -gy


class Pow(Function):
    """y = x^c for a constant c;  dx = gy * c * x^(c-1)."""

    def __init__(self, c):
        self.c = c

    def forward(self, x):
        self.save_for_backward(x=x)
        return x ** self.c

    def backward(self, gy):
        return gy * (self.c * self.x ** (self.c - 1))


class Exp(Function):
    """y = e^x;  dx = gy * y."""

    def forward(self, x):
        y = get_array_module(x).exp(x)
        self.save_for_backward(y=y)  # the output: d(e^x)/dx = e^x, no need to keep x
        return y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    """y = ln x;  dx = gy / x."""

    def forward(self, x):
        self.save_for_backward(x=x)
        return get_array_module(x).log(x)

    def backward(self, gy):
        return gy / self.x


class Sqrt(Function):
    """y = sqrt(x);  dx = gy / (2 y)."""

    def forward(self, x):
        y = get_array_module(x).sqrt(x)
        self.save_for_backward(y=y)
        return y

    def backward(self, gy):
        return gy / (2 * self.y)


class Abs(Function):
    """y = |x|;  dx = gy * sign(x) (0 at the kink)."""

    def forward(self, x):
        self.save_for_backward(x=x)
        return get_array_module(x).abs(x)

    def backward(self, gy):
        return gy * get_array_module(self.x).sign(self.x)


class Cast(Function):
    """y = x as another float dtype;  dx = gy cast back."""

    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.save_for_backward(in_dtype=x.dtype)
        return x.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.in_dtype)


class Sum(Function):
    """y = sum of x over ``axis``;  dx = gy broadcast back over the summed axes."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.save_for_backward(in_shape=x.shape)
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        xp = get_array_module(gy)
        if not self.keepdims and self.axis is not None:
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            axes = sorted(a % len(self.in_shape) for a in axes)
            for a in axes:  # put the reduced axes back as size 1, then broadcast
                gy = xp.expand_dims(gy, a)
        return xp.broadcast_to(gy, self.in_shape).copy()


class MatMul(Function):
    """y = a @ b (2-D, or batched with broadcasting);  da = gy @ b^T, db = a^T @ gy."""

    def forward(self, a, b):
        self.save_for_backward(a=a, b=b)
        return a @ b

    def backward(self, gy):
        a, b = self.a, self.b
        xp = get_array_module(gy)
        a2 = a[None, :] if a.ndim == 1 else a  # vectors as 1-row / 1-column matrices
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = gy
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)
        if b.ndim == 1:
            g2 = xp.expand_dims(g2, -1)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = g2 @ xp.swapaxes(b2, -1, -2)
            ga = sum_to(ga, a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            gb = xp.swapaxes(a2, -1, -2) @ g2
            gb = sum_to(gb, b2.shape).reshape(b.shape)
        return ga, gb


def add(a, b):
    return Add()(*_pair(a, b))


def sub(a, b):
    return Sub()(*_pair(a, b))


def mul(a, b):
    return Mul()(*_pair(a, b))


def div(a, b):
    return Div()(*_pair(a, b))


def neg(x):
    return Neg()(x)


def pow(x, c):
    if isinstance(c, Tensor):
        raise TypeError("only constant exponents are supported: x ** c with c a number")
    return Pow(c)(x)


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)


def sqrt(x):
    return Sqrt()(x)


def abs(x):  # noqa: A001 - the name users expect
    return Abs()(x)


def cast(x, dtype):
    return Cast(np.dtype(dtype))(x)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    """Mean as a sum times 1/n, n the number of elements reduced."""
    shape = x.shape
    if axis is None:
        n = int(np.prod(shape))
    else:
        axes = (axis,) if isinstance(axis, int) else axis
        n = int(np.prod([shape[a] for a in axes]))
    return Sum(axis, keepdims)(x) * (1.0 / max(n, 1))


def matmul(a, b):
    return MatMul()(a, b)
