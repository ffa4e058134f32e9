"""Weight initialisation, as ``torch.nn.init`` (in place on a Parameter's data).

Why it matters: a deep network trains only if the scale of activations and gradients stays
about the same from layer to layer.  He et al. ("Delving Deep into Rectifiers", ICCV 2015,
Sec. 2.2) show that for ReLU networks this holds when a weight has variance 2 / fan, where fan
is the number of inputs (``fan_in``, keeps forward activations steady) or outputs
(``fan_out``, keeps backward gradients steady) of one unit.  Mask R-CNN's heads follow
Detectron: convolutions get ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, the final
predictors small ``normal_(std=0.01 or 0.001)`` and zero biases.

All draws come from one module-level generator, so ``init.manual_seed(s)`` makes model
construction reproducible.  Numbers are drawn on the CPU in float64 and then cast and copied
to the parameter's device, so a seed gives the same weights on CPU and GPU.
"""

import math

import numpy as np

from ..backend import device_of, to_device
from ..tensor import Tensor

_rng = np.random.default_rng()


def manual_seed(seed):
    """Reseed the generator every initialiser draws from."""
    global _rng
    _rng = np.random.default_rng(seed)


def _fill(p, values):
    """Copy ``values`` (a NumPy array or number) into ``p``'s array in place, on its device."""
    arr = p.data if isinstance(p, Tensor) else p
    arr[...] = to_device(np.asarray(values), device_of(arr)).astype(arr.dtype)
    return p


def _fans(shape):
    """(fan_in, fan_out) of a weight, as PyTorch computes them.

    Dimension 1 counts inputs and dimension 0 outputs, times the kernel area for convolutions:
    a Conv2d weight (out, in, kh, kw) has fan_in = in*kh*kw.  (For a ConvTranspose2d weight,
    laid out (in, out, kh, kw), PyTorch's rule reads them the other way round; we keep its
    rule so that default initialisations match.)"""
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a weight with at least 2 dimensions, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity, a=0.0):
    """The factor that keeps the variance steady through ``nonlinearity`` (PyTorch's values)."""
    if nonlinearity in ("linear", "conv2d", "conv_transpose2d", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + a * a))
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}")


def _fan(p, mode):
    fan_in, fan_out = _fans(p.shape)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def uniform_(p, a=0.0, b=1.0):
    """Values uniform in [a, b)."""
    return _fill(p, _rng.uniform(a, b, size=p.shape))


def normal_(p, std=1.0, mean=0.0):
    """Values from N(mean, std^2).  (``std`` comes first here because that is the argument the
    heads set; pass both by name to read the same as PyTorch's ``normal_(t, mean, std)``.)"""
    return _fill(p, _rng.normal(mean, std, size=p.shape))


def constant_(p, value):
    return _fill(p, value)


def zeros_(p):
    return _fill(p, 0.0)


def ones_(p):
    return _fill(p, 1.0)


def kaiming_normal_(p, a=0.0, mode="fan_out", nonlinearity="relu"):
    """N(0, std^2) with std = gain / sqrt(fan) (He et al. 2015: Eq. 10 for fan_in, Eq. 14 for fan_out).

    The defaults are Detectron's choice for Mask R-CNN's convolutions (``c2_msra_fill``);
    PyTorch's own defaults are mode="fan_in", nonlinearity="leaky_relu"."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(p, mode))
    return _fill(p, _rng.normal(0.0, std, size=p.shape))


def kaiming_uniform_(p, a=0.0, mode="fan_in", nonlinearity="leaky_relu"):
    """Uniform in +-bound with bound = gain * sqrt(3 / fan) (same variance as kaiming_normal_).

    PyTorch's default for Conv2d and Linear weights is this with a = sqrt(5), which works out
    to bound = 1 / sqrt(fan_in)."""
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(p, mode))
    return _fill(p, _rng.uniform(-bound, bound, size=p.shape))


def default_weight_bias_(weight, bias):
    """PyTorch's default for Conv2d, ConvTranspose2d and Linear (``reset_parameters``): weight
    kaiming-uniform with a = sqrt(5), bias uniform in +-1/sqrt(fan_in)."""
    kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(_fans(weight.shape)[0])
        uniform_(bias, -bound, bound)
