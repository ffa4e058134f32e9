"""The three losses of Mask R-CNN's multi-task loss, L = L_cls + L_box + L_mask (Sec. 3, Eq. 1).

- ``cross_entropy``: L_cls, softmax cross-entropy over the K+1 classes of each sampled RoI
  (Fast R-CNN, Girshick 2015, Eq. 1); sampled-out or ambiguous labels are skipped with
  ``ignore_index``.
- ``smooth_l1_loss``: L_box, the robust box-regression loss of Fast R-CNN (Eq. 3): quadratic for
  errors below ``beta``, linear above (so outliers do not dominate); beta = 0 is plain L1.
- ``binary_cross_entropy_with_logits``: L_mask, "the average binary cross-entropy loss" over the
  m x m mask of the ground-truth class (Sec. 3, "Mask R-CNN"), and the RPN's objectness loss.

Each takes ``reduction="mean" | "sum" | "none"`` (mean by default, as PyTorch).  A mean over
nothing (an empty batch, or every label ignored) is 0 with a zero gradient, not 0/0 = NaN: an
image with no sampled positives must not poison a training step.
"""

from ..backend import get_array_module
from ..tensor import Function, Tensor
from .activation import stable_sigmoid

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: expected one of {REDUCTIONS}")


def _reduce(loss, reduction, count):
    """Sum or average the per-element ``loss`` (``count`` items averaged, an array or int)."""
    xp = get_array_module(loss)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "mean":
        total = total / xp.maximum(xp.asarray(count), 1).astype(loss.dtype)
    return xp.asarray(total, dtype=loss.dtype)


def _upstream(gy, reduction, count, shape):
    """d(reduced loss)/d(per-element loss) times gy, broadcast to the per-element shape."""
    xp = get_array_module(gy)
    if reduction == "none":
        return gy
    if reduction == "mean":
        gy = gy / xp.maximum(xp.asarray(count), 1).astype(gy.dtype)
    return xp.broadcast_to(gy, shape)


class CrossEntropy(Function):
    """loss_i = -log softmax(z_i)[t_i] = logsumexp(z_i) - z_i[t_i] for rows with t_i != ignore;

    dz_i = (softmax(z_i) - onehot(t_i)) * g_i, g_i the upstream gradient of row i
    (gy / number of kept rows for the mean, 0 for ignored rows).  ``t`` is a constant input.
    """

    def __init__(self, ignore_index, reduction):
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, z, target):
        xp = get_array_module(z)
        n = z.shape[0]
        valid = target != self.ignore_index
        safe_t = xp.where(valid, target, 0)  # any in-range index for ignored rows
        shifted = z - z.max(axis=1, keepdims=True)  # stable: exp of numbers <= 0
        log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        rows = xp.arange(n)
        nll = xp.where(valid, -log_p[rows, safe_t], 0).astype(z.dtype)
        count = valid.sum()
        self.save_for_backward(valid=valid, safe_t=safe_t, rows=rows, probs=xp.exp(log_p), count=count)
        return _reduce(nll, self.reduction, count)

    def backward(self, gy):
        g_rows = _upstream(gy, self.reduction, self.count, self.valid.shape) * self.valid
        gz = self.probs.copy()
        gz[self.rows, self.safe_t] -= 1  # one index per row: a plain assignment is exact
        return gz * g_rows[:, None].astype(gz.dtype), None


class BinaryCrossEntropyWithLogits(Function):
    """loss = -t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)) = max(x, 0) - x t + log(1 + e^-|x|);

    dx = (sigmoid(x) - t) * gy,  dt = -x * gy.

    The right-hand form never takes exp of a positive number or log of 0, so a logit of 1000
    gives its exact loss (0 or 1000) instead of inf or NaN.
    """

    def __init__(self, reduction):
        self.reduction = reduction

    def forward(self, x, t):
        xp = get_array_module(x)
        t = t.astype(x.dtype, copy=False)
        self.save_for_backward(x=x, t=t)
        loss = xp.maximum(x, 0) - x * t + xp.log1p(xp.exp(-xp.abs(x)))
        return _reduce(loss, self.reduction, x.size)

    def backward(self, gy):
        g = _upstream(gy, self.reduction, self.x.size, self.x.shape)
        gx = (stable_sigmoid(self.x) - self.t) * g if self.needs_input_grad[0] else None
        gt = -self.x * g if self.needs_input_grad[1] else None
        return gx, gt


class SmoothL1(Function):
    """With d = x - t:  loss = 0.5 d^2 / beta if |d| < beta, else |d| - 0.5 beta;

    dx = d / beta if |d| < beta, else sign(d);  dt = -dx.  The two pieces meet with equal value
    and slope at |d| = beta; beta = 0 leaves only the linear piece, the L1 loss |d|.
    """

    def __init__(self, beta, reduction):
        self.beta, self.reduction = beta, reduction

    def forward(self, x, t):
        xp = get_array_module(x)
        d = x - t.astype(x.dtype, copy=False)
        ad = xp.abs(d)
        if self.beta == 0:  # no quadratic piece (and no division by beta = 0)
            loss = ad
            self.save_for_backward(d=d)
        else:
            small = ad < self.beta
            loss = xp.where(small, 0.5 * d * d / self.beta, ad - 0.5 * self.beta)
            self.save_for_backward(d=d, small=small)
        return _reduce(loss.astype(x.dtype, copy=False), self.reduction, x.size)

    def backward(self, gy):
        xp = get_array_module(gy)
        g = _upstream(gy, self.reduction, self.d.size, self.d.shape)
        slope = xp.sign(self.d)
        if self.beta > 0:
            slope = xp.where(self.small, self.d / self.beta, slope)
        gx = (slope * g).astype(self.d.dtype, copy=False)
        return (gx if self.needs_input_grad[0] else None), (-gx if self.needs_input_grad[1] else None)


def _array(v):
    return v.data if isinstance(v, Tensor) else v


def cross_entropy(logits, target, ignore_index=-1, reduction="mean"):
    """Softmax cross-entropy of ``logits`` (N, K) against integer class ``target`` (N,).

    Rows whose target is ``ignore_index`` count for nothing (the mean is over the other rows);
    no gradient flows to ``target``.
    """
    _check_reduction(reduction)
    xp = get_array_module(logits)
    target = xp.asarray(_array(target))
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, K), got shape {tuple(logits.shape)}")
    if target.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: target must be ({logits.shape[0]},) class indices, "
                         f"got shape {tuple(target.shape)}")
    if target.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy: target must hold integer class indices, got dtype {target.dtype}")
    k = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= k))
    if bool(bad.any()):  # on the GPU this one check waits for the device: worth it for a clear error
        first = int(target[bad][0])
        raise ValueError(f"cross_entropy: target {first} is outside 0..{k - 1} "
                         f"(and is not ignore_index={ignore_index})")
    return CrossEntropy(ignore_index, reduction)(logits, target)


def binary_cross_entropy_with_logits(logits, target, reduction="mean"):
    """Sigmoid cross-entropy of ``logits`` against ``target`` in [0, 1] (same shape)."""
    _check_reduction(reduction)
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"binary_cross_entropy_with_logits: target shape {tuple(target.shape)} "
                         f"differs from logits shape {tuple(logits.shape)}")
    return BinaryCrossEntropyWithLogits(reduction)(logits, target)


def smooth_l1_loss(x, target, beta=1.0, reduction="mean"):
    """Fast R-CNN's smooth L1 of ``x - target`` (beta = 1 there; Detectron2 uses 0 or 1/9)."""
    _check_reduction(reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    if tuple(target.shape) != tuple(x.shape):
        raise ValueError(f"smooth_l1_loss: target shape {tuple(target.shape)} differs from "
                         f"x shape {tuple(x.shape)}")
    return SmoothL1(float(beta), reduction)(x, target)
