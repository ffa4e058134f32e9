"""Differentiable ops, each a Function with forward and backward side by side.

Imported as ``F`` (``from minimask import functional as F``); names and argument order follow
``torch.nn.functional`` and ``torchvision.ops`` so that the same numbers give the same results.
"""

from .activation import add_relu, log_softmax, relu, sigmoid, softmax
from .arith import abs, add, cast, div, exp, log, matmul, mean, mul, neg, pow, sqrt, sub, sum
from .conv import conv2d, conv2d_relu, conv_transpose2d, max_pool2d
from .linear import linear
from .loss import binary_cross_entropy_with_logits, cross_entropy, smooth_l1_loss
from .norm import batch_norm, batch_norm_affine, channel_affine, frozen_batch_norm
from .resize import interpolate
from .roi import roi_align, roi_pool
from .shape import cat, concat, flatten, getitem, pad2d, permute, reshape, stack, transpose

__all__ = [
    "abs", "add", "cast", "div", "exp", "log", "matmul", "mean", "mul", "neg", "pow", "sqrt", "sub", "sum",
    "cat", "concat", "flatten", "getitem", "pad2d", "permute", "reshape", "stack", "transpose",
    "relu", "add_relu", "sigmoid", "softmax", "log_softmax", "linear",
    "conv2d", "conv2d_relu", "conv_transpose2d", "max_pool2d",
    "batch_norm", "batch_norm_affine", "channel_affine", "frozen_batch_norm",
    "interpolate",
    "cross_entropy", "binary_cross_entropy_with_logits", "smooth_l1_loss", "roi_align", "roi_pool",
]
