"""Tensor, Function and the backward engine: reverse-mode automatic differentiation.

Mask R-CNN is trained by gradient descent on the multi-task loss of Eq. 1 of the paper
(L = L_cls + L_box + L_mask).  Every gradient in minimask comes from this file: each op is a
``Function`` whose ``forward`` computes on raw arrays (NumPy or CuPy) and whose ``backward``
maps the gradient of the outputs to the gradient of the inputs (the vector-Jacobian product).
Calling a Function on Tensors records it as the ``creator`` of its outputs; ``Tensor.backward``
walks that graph in reverse topological order, so a node's gradient is complete (summed over
all its uses) before it is passed further back.

Conventions, as in PyTorch:
- ``tensor.grad`` is a plain array of the tensor's shape (NumPy or CuPy), accumulated over
  ``backward`` calls until you reset it (``module.zero_grad()`` or ``t.grad = None``).
- Only leaf tensors (made by the user, ``requires_grad=True``) keep ``.grad``.
- After ``backward`` the graph's saved arrays are freed (each Function names them with
  ``save_for_backward``; see ``Function``); a second ``backward`` through the same graph raises
  an error unless the first used ``retain_graph=True``.
"""

import contextlib
import weakref

import numpy as np

from .backend import device_of, get_array_module, to_device

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block Functions record no graph (inference, optimizer updates)."""
    global _grad_enabled
    old, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = old


def is_grad_enabled():
    return _grad_enabled


def records(*inputs):
    """Whether a Function called on ``inputs`` now would be recorded for backward: gradients
    are on and some input is a Tensor that wants one (the rule ``Function.__call__`` applies;
    a fused inference path asks it before choosing)."""
    return _grad_enabled and any(isinstance(x, Tensor) and x.requires_grad for x in inputs)


def _as_array(data, dtype=None):
    """Array from data; Python floats and lists become float32, arrays keep their dtype."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.generic):  # NumPy scalars (x.sum() gives one) keep their dtype
        data = np.asarray(data)
    if isinstance(data, np.ndarray) or type(data).__module__.startswith("cupy"):
        return data if dtype is None else data.astype(dtype, copy=False)
    arr = np.asarray(data, dtype=dtype)
    if dtype is None and arr.dtype == np.float64:
        arr = arr.astype(np.float32)  # float32 by default, as PyTorch
    return arr


class Tensor:
    """An array with an optional gradient and a link to the Function that made it."""

    __array_priority__ = 1000  # so that ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self.creator = None  # the Function that produced this tensor (None for leaves)
        self.name = None

    # ---- plain properties -------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: device_of(self.data))
    is_leaf = property(lambda self: self.creator is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = repr(self.data).replace("\n", "\n       ")
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({body}{grad})"

    def numpy(self):
        """The data as a NumPy array (copied from the GPU if needed)."""
        return to_device(self.data, "cpu")

    def item(self):
        return self.data.item()

    def detach(self):
        """A new leaf sharing the data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """A copy on ``"cpu"`` or ``"gpu"`` (the same tensor when already there).

        A leaf keeps ``requires_grad``; the copy is a new leaf (device moves are not recorded)."""
        if device == self.device:
            return self
        t = Tensor(to_device(self.data, device), requires_grad=self.requires_grad)
        if self.grad is not None:
            t.grad = to_device(self.grad, device)
        return t

    def astype(self, dtype):
        from .functional.arith import cast

        return cast(self, dtype)

    # ---- the backward engine ----------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) * grad into every leaf's ``.grad``.

        ``grad`` defaults to ones for a scalar (the usual loss.backward()).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input of its graph had requires_grad=True, or it was made under no_grad)")
        xp = get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            # on this tensor's device: a NumPy gradient for a CuPy tensor is copied over
            grad = to_device(_as_array(grad, self.dtype), self.device)
            if grad.shape != self.shape:
                raise ValueError(f"gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        if self.creator is None:  # a leaf: nothing to propagate
            self.grad = grad if self.grad is None else self.grad + grad
            return

        # Gradients of non-leaf tensors live here during this call, keyed by id; the entry holds
        # the tensor itself too, so that it stays alive (and its id unique) until its creator
        # has read the gradient, even after the consumers that referenced it were released.
        grads = {id(self): (self, grad)}
        for f in _topological_order(self.creator):
            if f.freed:
                saved = ", ".join(f.saved_names) or "nothing but its inputs"
                raise RuntimeError(f"backward through {type(f).__name__} a second time: what it saved "
                                   f"for backward ({saved}) was freed by the first backward "
                                   "(pass retain_graph=True to it)")
            gys = []
            for ref in f.outputs:
                out = ref()
                gys.append(None if out is None else grads.pop(id(out), (None, None))[1])
            if all(g is None for g in gys):
                continue  # this branch does not reach the loss
            gys = [xp.zeros(shape, dtype) if g is None else g
                   for g, (shape, dtype) in zip(gys, f.output_meta)]
            gxs = f.backward(*gys)
            if not isinstance(gxs, tuple):
                gxs = (gxs,)
            if len(gxs) != len(f.inputs):
                raise RuntimeError(f"{type(f).__name__}.backward returned {len(gxs)} gradients "
                                   f"for {len(f.inputs)} inputs")
            for x, gx in zip(f.inputs, gxs):
                if gx is None or not x.requires_grad:
                    continue
                if gx.shape != x.shape:
                    raise RuntimeError(f"{type(f).__name__}.backward gave a gradient of shape {gx.shape} "
                                       f"for an input of shape {x.shape}")
                if x.creator is None:
                    x.grad = gx if x.grad is None else x.grad + gx
                else:
                    key = id(x)
                    grads[key] = (x, gx if key not in grads else grads[key][1] + gx)
            if not retain_graph:
                f.release()

    # ---- operators (the Functions live in functional/arith.py and functional/shape.py) ---
    def __add__(self, other):
        return _arith().add(self, other)

    def __radd__(self, other):
        return _arith().add(other, self)

    def __sub__(self, other):
        return _arith().sub(self, other)

    def __rsub__(self, other):
        return _arith().sub(other, self)

    def __mul__(self, other):
        return _arith().mul(self, other)

    def __rmul__(self, other):
        return _arith().mul(other, self)

    def __truediv__(self, other):
        return _arith().div(self, other)

    def __rtruediv__(self, other):
        return _arith().div(other, self)

    def __neg__(self):
        return _arith().neg(self)

    def __pow__(self, exponent):
        return _arith().pow(self, exponent)

    def __matmul__(self, other):
        return _arith().matmul(self, other)

    def __rmatmul__(self, other):
        return _arith().matmul(other, self)

    def __getitem__(self, key):
        return _shape().getitem(self, key)

    def sum(self, axis=None, keepdims=False):
        return _arith().sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return _arith().mean(self, axis, keepdims)

    def exp(self):
        return _arith().exp(self)

    def log(self):
        return _arith().log(self)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _shape().reshape(self, shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _shape().transpose(self, axes or None)

    def permute(self, *axes):
        return self.transpose(*axes)

    @property
    def T(self):
        return _shape().transpose(self, None)

    def flatten(self, start_dim=0):
        return _shape().flatten(self, start_dim)


def _arith():
    from .functional import arith

    return arith


def _shape():
    from .functional import shape

    return shape


def _topological_order(root):
    """Functions reachable from ``root``, each after every Function that consumes its outputs.

    An iterative depth-first search (deep networks would overflow Python's recursion limit)
    gives a post-order: a node appears after all its inputs' creators.  Reversed, every node
    comes before the nodes that produced its inputs, which is the order backward needs.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        f, expanded = stack.pop()
        if expanded:
            order.append(f)
            continue
        if id(f) in visited:
            continue
        visited.add(id(f))
        stack.append((f, True))
        for x in f.inputs:
            if x.creator is not None and id(x.creator) not in visited:
                stack.append((x.creator, False))
    return order[::-1]


class Function:
    """One differentiable op: ``forward`` on arrays, ``backward`` mapping output gradients to
    input gradients.

    A Function holds two kinds of state, kept apart so that a reader sees exactly what memory a
    node of the graph holds until backward:

    - **settings**, set in ``__init__``: plain Python values (stride, axis, eps, reduction).  They
      stay for the node's life.  Arrays are not settings: an array the op reads (RoI boxes, a
      loss target, frozen per-channel constants) is an *input*, passed when the Function is
      called, as a constant when it needs no gradient (its backward returns None for it).
    - **saved state**: everything ``backward`` reads that ``forward`` computed or was given,
      named in one call, ``self.save_for_backward(x=x, w=w, x_shape=x.shape)``.  That sets the
      attributes (backward reads ``self.x``) and records the names in ``saved_names``; after
      backward, ``release()`` deletes exactly those, so the arrays are freed as soon as the
      gradient has passed.  A Function whose backward needs nothing from forward (``Neg``,
      ``Stack``) saves nothing and says so in a comment.

    (The engine's own per-node links, ``inputs``, ``outputs`` and ``needs_input_grad``, are set
    by ``__call__``; release replaces the inputs by stand-ins that keep no data.)  ``backward``
    receives one gradient per output and returns one per input (or None for inputs that need
    none), each of the input's shape.  Call an instance on Tensors (or arrays / Python numbers,
    taken as constants): ``Mul()(a, b)``.
    """

    freed = False
    saved_names = ()  # what save_for_backward recorded: the state backward reads, freed by release
    # Whether this call is recorded for backward (set by __call__ before forward runs): when
    # False (under no_grad, or no input wants a gradient) a forward may skip computing what only
    # its backward reads, such as ReLU's mask.  True for a forward called directly.
    recording = True

    def __call__(self, *inputs):
        tensors = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
        needs_grad = records(*tensors)
        self.recording = needs_grad
        outs = self.forward(*[t.data for t in tensors])
        single = not isinstance(outs, tuple)
        outs = (outs,) if single else outs
        results = [Tensor(y, requires_grad=needs_grad) for y in outs]
        if needs_grad:
            self.inputs = tensors
            self.needs_input_grad = [t.requires_grad for t in tensors]
            self.outputs = [weakref.ref(r) for r in results]
            self.output_meta = [(y.shape, y.dtype) for y in outs]
            for r in results:
                r.creator = self
        return results[0] if single else tuple(results)

    def save_for_backward(self, **state):
        """Keep ``state`` (name=value) for backward, as attributes of self, freed by ``release``.

        A name may not shadow a setting, a method or the engine's links: release would delete it.
        """
        for name, value in state.items():
            if hasattr(self, name) or name in _ENGINE_NAMES:
                raise AttributeError(f"{type(self).__name__}.save_for_backward: {name!r} is already "
                                     "an attribute (a setting, a method or saved once already)")
            setattr(self, name, value)
        self.saved_names = self.saved_names + tuple(state)

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    def release(self):
        """Drop what forward saved for backward, and the links to the inputs' data."""
        for k in self.saved_names:
            self.__dict__.pop(k, None)
        self.inputs = [_Freed(x) for x in self.inputs]
        self.freed = True


# the links Function.__call__ sets on a node after forward: saved state may not take these names
_ENGINE_NAMES = ("inputs", "outputs", "output_meta", "needs_input_grad", "recording")


class _Freed:
    """Stands in for an input of a released Function: keeps what the engine reads, not data."""

    def __init__(self, x):
        self.creator, self.requires_grad, self.shape = x.creator, x.requires_grad, x.shape


def as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)
