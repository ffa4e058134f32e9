"""Finite-difference gradient checking: the test every Function in minimask must pass.

For a function f of tensors x_1..x_n and a random upstream gradient g (random, not ones, so
that a backward that mixes up elements cannot pass by symmetry), the backward pass gives
<g, df/dx_i>.  Central differences estimate the same number element by element:

    d/dx_ij <g, f(x)>  ~  (<g, f(x + eps e_j)> - <g, f(x - eps e_j)>) / (2 eps)

with an error of O(eps^2).  In float64 with eps = 1e-6 the two agree to ~1e-8 on smooth
inputs; in float32 rounding would swamp the difference, which is why checks run in float64.
Large inputs may be checked along a few random directions v instead of every element:
<grad, v> against (F(x + eps v) - F(x - eps v)) / (2 eps).
"""

import numpy as np

from .backend import get_array_module
from .tensor import Tensor


def _scalar(fn, inputs, g):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    total = 0.0
    for o, gi in zip(outs, g):
        if gi is not None:
            total += float((o.data * gi).sum())
    return total


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, directions=None, seed=0):
    """Compare ``fn``'s backward with central differences; True or raise AssertionError.

    ``inputs`` are Tensors; those with ``requires_grad=True`` are checked (they should be
    float64).  ``directions=k`` checks along k random directions per input instead of every
    element (for large tensors).
    """
    rng = np.random.default_rng(seed)
    inputs = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
    for x in inputs:
        x.grad = None
        if x.requires_grad and not x.data.flags.c_contiguous:  # perturbed through a flat view
            x.data = get_array_module(x.data).ascontiguousarray(x.data)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = []
    for o in outs:
        if o.requires_grad and o.dtype.kind == "f":
            xp = get_array_module(o.data)
            g.append(xp.asarray(rng.standard_normal(o.shape)).astype(o.dtype))
        else:
            g.append(None)
    if all(gi is None for gi in g):
        raise AssertionError("gradcheck: no output requires grad")
    # One backward through a sum of <g_k, out_k>, so that several outputs are checked at once.
    total = None
    for o, gi in zip(outs, g):
        if gi is not None:
            term = (o * Tensor(gi)).sum()
            total = term if total is None else total + term
    total.backward()

    for idx, x in enumerate(inputs):
        if not x.requires_grad:
            continue
        if x.dtype != np.float64:
            raise AssertionError(f"gradcheck: input {idx} is {x.dtype}; check in float64")
        analytic = x.grad if x.grad is not None else get_array_module(x.data).zeros_like(x.data)
        analytic = np.asarray(getattr(analytic, "get", lambda: analytic)(), dtype=np.float64)
        data = x.data
        flat = data.reshape(-1)  # a view: perturbing it perturbs x.data
        if directions is None:
            numeric = np.zeros(flat.size)
            for j in range(flat.size):
                orig = float(flat[j])
                flat[j] = orig + eps
                plus = _scalar(fn, inputs, g)
                flat[j] = orig - eps
                minus = _scalar(fn, inputs, g)
                flat[j] = orig
                numeric[j] = (plus - minus) / (2 * eps)
            numeric = numeric.reshape(x.shape)
            err = np.abs(analytic - numeric)
            bound = atol + rtol * np.abs(numeric)
            if not np.all(err <= bound):
                j = int(np.argmax(err - bound))
                a, n = analytic.reshape(-1)[j], numeric.reshape(-1)[j]
                raise AssertionError(
                    f"gradcheck: input {idx} {x.shape}: worst mismatch at flat index {j}: "
                    f"backward {a:.8g} vs finite difference {n:.8g} (|diff| {abs(a - n):.3g}, "
                    f"{int((err > bound).sum())} of {err.size} elements off)")
        else:
            xp = get_array_module(data)
            orig = data.copy()
            for k in range(directions):
                v = rng.standard_normal(x.shape)
                vx = xp.asarray(v, dtype=data.dtype)
                data[...] = orig + eps * vx
                plus = _scalar(fn, inputs, g)
                data[...] = orig - eps * vx
                minus = _scalar(fn, inputs, g)
                data[...] = orig
                numeric = (plus - minus) / (2 * eps)
                a = float((analytic * v).sum())
                if abs(a - numeric) > atol + rtol * abs(numeric):
                    raise AssertionError(
                        f"gradcheck: input {idx} {x.shape}: along random direction {k}: "
                        f"backward {a:.8g} vs finite difference {numeric:.8g} "
                        f"(|diff| {abs(a - numeric):.3g})")
    return True
