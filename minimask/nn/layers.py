"""The layers Mask R-CNN is built from, as Modules holding their weights.

Each layer keeps its Parameters and buffers and calls one op of ``minimask.functional``; the
math and the gradients live there.  Names, shapes and default initialisations follow PyTorch,
so a torchvision or Detectron2 checkpoint maps onto ours key by key:

- ``Conv2d`` / ``ConvTranspose2d``: the backbone, FPN, RPN and mask head (Sec. 3.1; the mask
  head's 2x upsampling is a stride-2 transposed convolution, Fig. 4).
- ``Linear``: the box head's two fully connected layers and the class / box predictors.
- ``BatchNorm2d``: ordinary batch norm (training from scratch, small models).
- ``FrozenBatchNorm2d``: the backbone's batch norm when fine-tuning from ImageNet weights.  The
  paper's models train with 2 images per GPU, too few for good batch statistics, so (as in
  Detectron) the statistics and affine parameters are fixed constants: buffers, not Parameters.
"""

import numpy as np

from .. import functional as F
from ..tensor import is_grad_enabled, records
from . import init
from .module import Module, Parameter


def _pair(v, name):
    """An int or a pair of ints, as a pair (kernel sizes, strides, paddings)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _empty(*shape):
    return np.zeros(shape, dtype=np.float32)


class Conv2d(Module):
    """2-D convolution; weight (out, in, kh, kw), bias (out,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.weight = Parameter(_empty(out_channels, in_channels, *self.kernel_size))
        self.bias = Parameter(_empty(out_channels)) if bias else None
        init.default_weight_bias_(self.weight, self.bias)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


class ConvTranspose2d(Module):
    """2-D transposed convolution (the gradient of a convolution, used to upsample);
    weight (in, out, kh, kw) as PyTorch lays it out, bias (out,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.weight = Parameter(_empty(in_channels, out_channels, *self.kernel_size))
        self.bias = Parameter(_empty(out_channels)) if bias else None
        init.default_weight_bias_(self.weight, self.bias)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class Linear(Module):
    """y = x W^T + b; weight (out, in), bias (out,)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_empty(out_features, in_features))
        self.bias = Parameter(_empty(out_features)) if bias else None
        init.default_weight_bias_(self.weight, self.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel (Ioffe & Szegedy 2015).

    Training: normalise with the batch's mean and (biased) variance, and update the running
    statistics, running = (1 - momentum) * running + momentum * batch (the unbiased variance,
    as PyTorch).  Eval: normalise with the running statistics."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked += 1  # in place: a buffer, on whichever device
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)

    def fixed_affine(self):
        """(scale, shift) arrays when this layer is a constant per-channel map right now (eval
        mode, no gradient wanted for weight and bias), else None (``conv_norm`` folds it)."""
        wants_grad = is_grad_enabled() and (self.weight.requires_grad or self.bias.requires_grad)
        if self.training or wants_grad:
            return None
        stats = self.running_mean, self.running_var
        return F.batch_norm_affine(*stats, self.weight.data, self.bias.data, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class FrozenBatchNorm2d(Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, never trained):
    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel.

    Same names as torchvision's FrozenBatchNorm2d, so an ImageNet checkpoint loads directly
    (its ``num_batches_tracked`` counters are ignored)."""

    ignored_state_keys = ("num_batches_tracked",)

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", np.ones(num_features, dtype=np.float32))
        self.register_buffer("bias", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))

    def forward(self, x):
        return F.frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def fixed_affine(self):
        """(scale, shift): always constant (``conv_norm`` folds it into the conv before it)."""
        return F.batch_norm_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


def conv_relu(conv, x):
    """relu(conv(x)) for a ``Conv2d``: at inference the bias and ReLU are one pass over the
    conv's output (``F.conv2d_relu``)."""
    return F.conv2d_relu(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation)


def conv_norm(conv, norm, x, relu=False, residual=None):
    """norm(conv(x)), with the norm folded into the conv's weights when it is a constant map;
    with ``relu=True``, relu(norm(conv(x)) + residual) (residual optional: the end of a ResNet
    block), and then at inference, with the norm folded, the shift, the residual and the ReLU
    are one pass over the conv's output (``F.conv2d_relu``).

    A frozen batch norm (always) or a batch norm in eval mode (outside training, no gradient
    for its weight and bias) is y = scale * z + shift per channel, and z = w * x + b is linear,
    so y = (scale w) * x + (scale b + shift): one conv with scaled weights, and no pass over
    the output to normalise it (two passes, or four for BatchNorm2d's eval formula, over the
    largest arrays of the backbone).  The scaling runs through the autograd engine, so a
    trainable conv before a frozen norm still gets its gradient: d/dw = scale * d/d(scale w).
    The same numbers up to float rounding (``tests/test_nn.py``); the deployment trick
    inference engines call "BN folding".  Where the weights are larger than the output (deep
    layers on small maps: the shapes model's layer4 has 128 x 128 x 9 weights and 4 x 4 maps)
    scaling them costs more than scaling the output, so the constant map is applied after the
    conv instead (``folds_into_conv``).  Otherwise (batch statistics in training) the two
    layers run one after the other."""
    if residual is not None and not relu:
        raise ValueError("conv_norm: a residual is added before the ReLU; pass relu=True with it")
    affine = norm.fixed_affine() if isinstance(conv, Conv2d) else None
    if affine is None:
        return _then_relu(norm(conv(x)), relu, residual)
    scale, shift = (a.astype(conv.weight.dtype) for a in affine)
    if not folds_into_conv(conv, x.shape):
        return _then_relu(F.channel_affine(conv(x), scale, shift), relu, residual)
    weight, bias = conv.weight, conv.bias
    if not records(weight, bias):  # nothing to record: the same products on the arrays
        weight, bias = weight.data, None if bias is None else bias.data
    weight = weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if bias is None else bias * scale + shift
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    if relu:
        return F.conv2d_relu(x, weight, bias, residual, **geometry)
    return F.conv2d(x, weight, bias, **geometry)


def _then_relu(y, relu, residual):
    return F.add_relu(y, residual) if relu else y


def folds_into_conv(conv, x_shape):
    """Whether ``conv_norm`` scales the conv's weights (True) or its output (False) for an input
    of shape ``x_shape``: whichever is smaller, counted per output channel (C kh kw weights
    against about N H W / stride^2 outputs)."""
    n, _, h, w = x_shape
    c, kh, kw = conv.weight.shape[1:]
    sh, sw = conv.stride
    return c * kh * kw <= n * -(-h // sh) * -(-w // sw)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
