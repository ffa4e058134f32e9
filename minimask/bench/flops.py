"""Multiply-adds of the convolutions and fully connected layers a forward actually runs.

A Mask R-CNN's work is almost all in its convolutions (ResNet, FPN, RPN head, mask head) and
its box head's fc layers; how much depends on the input size and, in training, on how many
RoIs reach the heads (positives only for the mask head).  So the count is taken on a real
forward, not from the config: inside ``counting()`` every ``conv2d``, ``conv_transpose2d`` and
``linear`` adds its multiply-adds (MACs) to the counter it yields,

    conv2d             N O Ho Wo  x  C kh kw        (each output: a dot product over its window)
    conv_transpose2d   N C_in H W  x  C_out kh kw   (each input pixel spreads a kh x kw patch)
    linear             rows  x  in  x  out

A MAC is 2 FLOP.  A training step costs about 3x its forward: the backward of a conv or fc
layer is two products of the forward's size (the input gradient and the weight gradient), so
``step_gflop`` is 2 x 3 x MACs (slightly more than the truth where a layer needs only one of
them: frozen weights, or the image, which needs no gradient).  RoIAlign, norms, activations
and the rest are not counted: they are a few percent of the arithmetic.
"""

import contextlib
import math

from ..functional.conv import Conv2dFn, ConvTranspose2dFn
from ..functional.linear import Linear

# The Functions whose forward is counted, and how many MACs one call costs (its arrays in,
# its array out).
_COUNTED = {
    Conv2dFn: lambda x, w, y: y.size * w.shape[1] * w.shape[2] * w.shape[3],
    ConvTranspose2dFn: lambda x, w, y: x.size * w.shape[1] * w.shape[2] * w.shape[3],
    Linear: lambda x, w, y: math.prod(y.shape) * w.shape[1],
}


class MacCounter:
    """What ``counting()`` yields: ``macs`` so far, and the same split by kind of layer."""

    def __init__(self):
        self.macs = 0
        self.by_kind = {}

    def add(self, kind, macs):
        self.macs += int(macs)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + int(macs)

    def reset(self):
        self.macs, self.by_kind = 0, {}


def forward_gflop(macs):
    return 2 * macs / 1e9


def step_gflop(macs):
    """FLOP of a training step whose forward ran ``macs`` multiply-adds: forward + backward."""
    return 3 * forward_gflop(macs)


@contextlib.contextmanager
def counting():
    """Count the MACs of every conv2d, conv_transpose2d and linear forward run inside the block.

    Not thread-safe (it wraps the Functions' ``forward`` for the duration): for benchmarks."""
    counter = MacCounter()
    saved = []
    for cls, macs_of in _COUNTED.items():
        original = cls.forward

        def forward(self, x, w, *rest, _original=original, _macs_of=macs_of, _name=cls.__name__):
            y = _original(self, x, w, *rest)
            counter.add(_name, _macs_of(x, w, y))
            return y

        saved.append((cls, original))
        cls.forward = forward
    try:
        yield counter
    finally:
        for cls, original in saved:
            cls.forward = original
