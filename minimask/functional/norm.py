"""Batch normalization (Ioffe & Szegedy 2015), trainable and frozen.

Mask R-CNN's ResNet backbone comes pre-trained on ImageNet with batch normalization after every
convolution.  Detection batches hold only 1-2 large images per GPU, too few for good batch
statistics, so the paper (Sec. 3.1, "Implementation Details", following Detectron) *freezes* them:
each BN becomes a fixed per-channel affine map, y = x * scale + shift, with

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale

(torchvision's ``FrozenBatchNorm2d`` and Detectron2's ``FrozenBatchNorm2d``, both eps = 1e-5).
That is ``frozen_batch_norm``.  ``batch_norm`` is the ordinary layer, for models trained from
scratch (the synthetic ``shapes`` preset) and for the lessons:

    training:  mu, s2 = mean and (biased) variance of x over every axis but the channel axis 1
               y = weight * (x - mu) / sqrt(s2 + eps) + bias
               running_mean <- (1 - momentum) running_mean + momentum mu
               running_var  <- (1 - momentum) running_var  + momentum s2 n / (n - 1)
    eval:      the same y with running_mean, running_var in place of mu, s2.

As in PyTorch, the running variance takes the *unbiased* estimate (n / (n - 1), n the number of
values per channel) while normalization uses the biased one.
"""

from ..backend import get_array_module
from ..tensor import Function, Tensor


def _channel_shape(x):
    """(1, C, 1, 1) for (N, C, H, W) inputs, (1, C) for (N, C): per-channel values broadcast."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _reduce_axes(x):
    """Every axis but the channel axis 1: the statistics are per channel."""
    return (0,) + tuple(range(2, x.ndim))


class BatchNormTrain(Function):
    """Batch statistics; the gradient flows through them too.

    With xhat = (x - mu) * r, r = 1 / sqrt(s2 + eps), n values per channel, g = gy * weight:

        dx      = r / n * (n g - sum(g) - xhat * sum(g * xhat))
        dweight = sum(gy * xhat),   dbias = sum(gy)

    (sums over the n values of each channel).  The two subtracted terms are the paths through
    mu and s2: every x moves the mean and variance that all the other outputs were divided by.

    ``running_mean`` and ``running_var`` come in as constant inputs and forward updates them in
    place with mu and s2 (as PyTorch's batch_norm does), so that the statistics are not kept on
    the node for the caller to read: it saves only what backward needs.
    """

    def __init__(self, eps, momentum):
        self.eps, self.momentum = eps, momentum

    def forward(self, x, weight, bias, running_mean, running_var):
        xp = get_array_module(x)
        axes, shape = _reduce_axes(x), _channel_shape(x)
        mean = x.mean(axis=axes, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=axes, keepdims=True)  # biased: divide by n
        inv_std = 1 / xp.sqrt(var + self.eps)
        xhat = centered * inv_std
        weight = weight.reshape(shape)
        # The running statistics are statistics, not part of the graph: no gradient flows into them.
        n = x.size // x.shape[1]  # values per channel
        for arr, batch_value in ((running_mean, mean), (running_var, var * (n / (n - 1)))):
            arr[...] = (1 - self.momentum) * arr + self.momentum * batch_value.reshape(-1).astype(arr.dtype)
        self.save_for_backward(xhat=xhat, inv_std=inv_std, weight=weight)
        return xhat * weight + bias.reshape(shape)

    def backward(self, gy):
        axes, xhat = _reduce_axes(gy), self.xhat
        n = gy.size // gy.shape[1]
        gx = gw = gb = None
        if self.needs_input_grad[0]:
            g = gy * self.weight
            sum_g = g.sum(axis=axes, keepdims=True)
            sum_gx = (g * xhat).sum(axis=axes, keepdims=True)
            gx = (self.inv_std / n) * (n * g - sum_g - xhat * sum_gx)
        if self.needs_input_grad[1]:
            gw = (gy * xhat).sum(axis=axes)
        if self.needs_input_grad[2]:
            gb = gy.sum(axis=axes)
        return gx, gw, gb, None, None


class BatchNormEval(Function):
    """Running statistics, held fixed:  y = xhat * weight + bias, xhat = (x - mean) / sqrt(var + eps);

    dx = gy * weight / sqrt(var + eps),  dweight = sum(gy * xhat),  dbias = sum(gy).
    ``mean`` and ``var`` are constant inputs.
    """

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight, bias, mean, var):
        xp = get_array_module(x)
        shape = _channel_shape(x)
        inv_std = 1 / xp.sqrt(var.astype(x.dtype).reshape(shape) + self.eps)
        xhat = (x - mean.astype(x.dtype).reshape(shape)) * inv_std
        weight = weight.reshape(shape)
        self.save_for_backward(xhat=xhat, inv_std=inv_std, weight=weight)
        return xhat * weight + bias.reshape(shape)

    def backward(self, gy):
        axes = _reduce_axes(gy)
        gx = gy * (self.weight * self.inv_std) if self.needs_input_grad[0] else None
        gw = (gy * self.xhat).sum(axis=axes) if self.needs_input_grad[1] else None
        gb = gy.sum(axis=axes) if self.needs_input_grad[2] else None
        return gx, gw, gb, None, None


class FrozenBatchNorm(Function):
    """y = x * scale + shift, scale and shift constant inputs per channel;  dx = gy * scale."""

    def forward(self, x, scale, shift):
        shape = _channel_shape(x)
        scale = scale.astype(x.dtype).reshape(shape)
        self.save_for_backward(scale=scale)
        return x * scale + shift.astype(x.dtype).reshape(shape)

    def backward(self, gy):
        return gy * self.scale, None, None


def _array(v):
    return v.data if isinstance(v, Tensor) else v


def _check(x, name, v):
    if v is not None and tuple(v.shape) != (x.shape[1],):
        raise ValueError(f"{name}: expected one value per channel, shape ({x.shape[1]},), "
                         f"got {tuple(v.shape)}")


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalization over (N, C) or (N, C, H, W), as ``torch.nn.functional.batch_norm``.

    In training the batch statistics normalize ``x`` and ``running_mean`` / ``running_var``
    (Tensors or arrays, or None to keep none) are updated *in place*; in eval the running
    statistics normalize.  ``weight`` / ``bias`` None mean 1 / 0.
    """
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must be (N, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    for name, v in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check(x, f"batch_norm {name}", v)
    xp = get_array_module(x)
    if weight is None:
        weight = xp.ones(x.shape[1], dtype=x.dtype)  # a plain array: a constant, no gradient
    if bias is None:
        bias = xp.zeros(x.shape[1], dtype=x.dtype)

    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
        # xp.asarray: statistics kept on the other device are copied over (a no-op when already there).
        mean, var = xp.asarray(_array(running_mean)), xp.asarray(_array(running_var))
        return BatchNormEval(eps)(x, weight, bias, mean, var)

    n = x.size // x.shape[1]  # values per channel
    if n < 2:
        raise ValueError(f"batch_norm: training needs more than 1 value per channel to estimate a "
                         f"variance, got input of shape {tuple(x.shape)}")
    # Forward updates the running statistics in place, so that the module's buffer (the same
    # array) sees it; a statistic nobody keeps (None) is updated in a throwaway array.
    running = [xp.zeros(x.shape[1], dtype=x.dtype) if buf is None else _array(buf)
               for buf in (running_mean, running_var)]
    return BatchNormTrain(eps, momentum)(x, weight, bias, *running)


def batch_norm_affine(mean, var, weight, bias, eps=1e-5):
    """(scale, shift) arrays of a batch norm with fixed statistics (arrays on one device):
    y = x * scale + shift, with scale = weight / sqrt(var + eps), shift = bias - mean * scale."""
    scale = weight / get_array_module(var).sqrt(var + eps)
    return scale, bias - mean * scale


def channel_affine(x, scale, shift):
    """y = x * scale + shift per channel (axis 1), scale and shift constant arrays (C,): a batch
    norm with fixed statistics once ``batch_norm_affine`` has made its two vectors."""
    _check(x, "channel_affine scale", scale)
    _check(x, "channel_affine shift", shift)
    return FrozenBatchNorm()(x, scale, shift)


def frozen_batch_norm(x, mean, var, weight, bias, eps=1e-5):
    """A batch norm turned into a constant per-channel affine map (torchvision's
    ``FrozenBatchNorm2d``): y = x * scale + shift; only ``x`` receives a gradient."""
    if x.ndim < 2:
        raise ValueError(f"frozen_batch_norm: input must be (N, C, ...), got shape {tuple(x.shape)}")
    xp = get_array_module(x)
    mean, var, weight, bias = (xp.asarray(_array(v)) for v in (mean, var, weight, bias))
    for name, v in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        _check(x, f"frozen_batch_norm {name}", v)
    return channel_affine(x, *batch_norm_affine(mean, var, weight, bias, eps))
