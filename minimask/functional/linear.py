"""Fully connected layer: y = x w^T + b.

The box head's two 1024-d fc layers and its class-score and box-regression outputs (Mask R-CNN
Sec. 3, Fig. 4 right: the "2fc" head of FPN) are linear layers.  The weight is stored as
(out_features, in_features), as in PyTorch, so that published weights load unchanged.
"""

from ..tensor import Function


class Linear(Function):
    """y = x w^T + b, x (..., in), w (out, in), b (out,);

    dx = gy w,  dw = gy^T x (summed over all leading axes),  db = gy summed over leading axes.
    """

    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: x has {x.shape[-1]} features on its last axis but the weight "
                             f"{w.shape} expects {w.shape[1]} (weight is (out, in))")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias of shape {b.shape}, expected ({w.shape[0]},)")
        self.save_for_backward(x=x, w=w, has_bias=b is not None)
        y = x @ w.T
        return y + b if b is not None else y

    def backward(self, gy):
        x, w = self.x, self.w
        gx = gy @ w if self.needs_input_grad[0] else None
        gw = None
        if self.needs_input_grad[1]:
            # Flatten the leading axes: every row of x is one sample contributing to dw.
            gw = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if not self.has_bias:
            return gx, gw
        gb = gy.reshape(-1, gy.shape[-1]).sum(axis=0) if self.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x, w, b=None):
    """y = x w^T + b with w laid out (out_features, in_features), as torch.nn.functional.linear."""
    if w.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    return Linear()(x, w) if b is None else Linear()(x, w, b)
