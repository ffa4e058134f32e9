"""Module and Parameter: how a network holds its weights, as ``torch.nn.Module`` does.

Mask R-CNN (He et al., ICCV 2017, Sec. 3.1) is a tree of parts: a backbone (ResNet + FPN), a
region proposal network, and box, mask (and keypoint) heads, each made of convolutions and
linear layers.  A ``Module`` is one node of that tree.  Assigning a ``Parameter`` or another
``Module`` as an attribute registers it, so that the whole tree can be walked by name:

    self.conv1 = Conv2d(3, 64, 7)       # registers "conv1" (a child module)
    self.weight = Parameter(w)          # registers "weight" (trained)
    self.register_buffer("running_mean", m)  # registers a buffer (saved, not trained)

From those names come ``parameters()`` (what the optimizer updates), ``state_dict()`` (what a
checkpoint saves: dotted names such as ``"backbone.layer1.0.conv1.weight"``, the same names
PyTorch gives, so that weights can be moved between the two), ``train()``/``eval()`` (batch
norm behaves differently in each) and ``to(device)``.
"""

import contextlib
import os
import tempfile
from collections import OrderedDict

import numpy as np

from ..backend import device_of, to_device
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module trains: ``requires_grad`` is True unless told otherwise."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


def _is_array(x):
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("cupy")


class Module:
    """Base class of every layer and model: subclasses set attributes in ``__init__`` (after
    calling ``super().__init__()``) and compute in ``forward``."""

    # Keys a module accepts in load_state_dict without holding them (FrozenBatchNorm2d drops
    # the ``num_batches_tracked`` counter of a trained BatchNorm2d checkpoint, as torchvision).
    ignored_state_keys = ()

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dicts to exist already.
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ---- registration ----------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__(): "
                                 f"call super().__init__() first in {type(self).__name__}.__init__")
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            if name not in params:  # a replacement keeps its place in the order
                self._forget(name)
            params[name] = value
        elif isinstance(value, Module):
            if name not in modules:
                self._forget(name)
            modules[name] = value
        elif name in params:
            # Only None may replace a Parameter (a layer built with bias=False): a plain Tensor
            # here is almost always a bug (it would silently stop being trained).
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r}: "
                                "wrap it in Parameter(...) or assign None")
            params[name] = None
        elif name in buffers:
            if value is not None and not _is_array(value):
                raise TypeError(f"buffer {name!r} must be a NumPy/CuPy array, got {type(value).__name__}")
            buffers[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to child module {name!r}")
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Called only when normal lookup fails, i.e. for registered names.
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def _forget(self, name):
        """Drop ``name`` from every registry (it is about to be registered as something else)."""
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        self.__dict__.pop(name, None)

    def register_buffer(self, name, array):
        """Keep ``array`` under ``name``: saved in ``state_dict`` and moved by ``to``, not trained
        (batch norm's running statistics)."""
        if array is not None and not _is_array(array):
            array = np.asarray(array)
        self._forget(name)
        self._buffers[name] = array

    def register_parameter(self, name, param):
        """Same as ``self.name = param``; ``param`` may be None (an absent bias)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"parameter {name!r} must be a Parameter or None, got {type(param).__name__}")
        self._forget(name)
        self._parameters[name] = param

    # ---- walking the tree --------------------------------------------------------------
    def named_modules(self, prefix=""):
        """(dotted name, module) for this module ("") and every descendant, depth first."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if id(m) in seen:  # a module shared by two parents is listed once
                continue
            seen.add(id(m))
            yield name, m
            children = [(f"{name}.{k}" if name else k, c) for k, c in m._modules.items() if c is not None]
            stack.extend(reversed(children))  # reversed: pop them in definition order

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_children(self):
        return ((k, m) for k, m in self._modules.items() if m is not None)

    def children(self):
        return (m for _, m in self.named_children())

    def _named(self, store, prefix=""):
        seen = set()
        for mname, m in self.named_modules(prefix):
            for k, v in getattr(m, store).items():
                if v is None or id(v) in seen:  # shared (tied) weights appear once
                    continue
                seen.add(id(v))
                yield (f"{mname}.{k}" if mname else k), v

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) for every parameter of the tree, each once."""
        return self._named("_parameters", prefix)

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def named_buffers(self, prefix=""):
        return self._named("_buffers", prefix)

    def buffers(self):
        return (b for _, b in self.named_buffers())

    def apply(self, fn):
        """Call ``fn(module)`` on every module of the tree (e.g. a custom initialisation)."""
        for m in self.modules():
            fn(m)
        return self

    # ---- modes and devices -------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode on the whole tree (batch norm uses batch statistics)."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """Inference mode on the whole tree (batch norm uses its running statistics)."""
        return self.train(False)

    def zero_grad(self):
        """Forget accumulated gradients (set them to None, as PyTorch does by default)."""
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter and buffer to ``"cpu"`` or ``"gpu"``, in place.

        The Parameter objects stay the same (only their ``.data`` is replaced), so an
        optimizer made before the move still updates the model's weights."""
        for m in self.modules():
            for p in m._parameters.values():
                if p is not None:
                    p.data = to_device(p.data, device)
                    if p.grad is not None:
                        p.grad = to_device(p.grad, device)
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = to_device(b, device)
        return self

    def astype(self, dtype):
        """Cast every floating parameter and buffer to ``dtype`` in place (float64 for gradient
        checks, float32 for training); integer buffers (counters) are left alone."""
        dtype = np.dtype(dtype)
        for m in self.modules():
            for p in m._parameters.values():
                if p is not None and p.dtype.kind == "f":
                    p.data = p.data.astype(dtype)
                    p.grad = None if p.grad is None else p.grad.astype(dtype)
            for k, b in m._buffers.items():
                if b is not None and b.dtype.kind == "f":
                    m._buffers[k] = b.astype(dtype)
        return self

    # ---- calling -------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    # ---- saving and loading ----------------------------------------------------------------
    def state_dict(self):
        """Dotted name -> NumPy copy, for every parameter and buffer (a snapshot: later training
        does not change it, and it can be saved from either device).  The order is PyTorch's:
        module by module, each one's parameters, then its buffers."""
        state = OrderedDict()
        for name, (m, store, key) in self._state_entries().items():
            v = getattr(m, store)[key]
            arr = v.data if isinstance(v, Tensor) else v
            state[name] = np.array(to_device(arr, "cpu"), copy=True)
        return state

    def _state_entries(self):
        """Dotted name -> (module, store, key): where each saved array lives."""
        entries, seen = OrderedDict(), set()
        for mname, m in self.named_modules():
            for store in ("_parameters", "_buffers"):
                for k, v in getattr(m, store).items():
                    if v is not None and id(v) not in seen:  # tied weights are saved once
                        seen.add(id(v))
                        entries[f"{mname}.{k}" if mname else k] = (m, store, k)
        return entries

    def load_state_dict(self, state, strict=True):
        """Copy the arrays of ``state`` (name -> array) into this module's parameters and buffers.

        Every problem is reported at once, in one error: keys this module has but ``state``
        lacks (missing), keys ``state`` has that this module does not (unexpected), and arrays
        whose shape differs from the module's.  With ``strict=False`` missing and unexpected
        keys are allowed (and returned), but a wrong shape is always an error.  Values are
        copied in place, keeping each array's device and dtype, so Parameters keep identity.
        """
        state = {k: state[k] for k in state.keys()}  # also accepts np.load's NpzFile
        entries = self._state_entries()
        ignored = {f"{mname}.{k}" if mname else k
                   for mname, m in self.named_modules() for k in m.ignored_state_keys}
        missing = [k for k in entries if k not in state]
        unexpected = [k for k in state if k not in entries and k not in ignored]
        wrong = []
        for k, (m, store, key) in entries.items():
            if k in state:
                have = getattr(m, store)[key].shape
                got = tuple(np.shape(state[k]))
                if tuple(have) != got:
                    wrong.append(f"{k}: checkpoint {got} vs model {tuple(have)}")
        problems = []
        if strict and missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            problems.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong)}")
        if problems:
            raise KeyError(f"load_state_dict into {type(self).__name__} failed:\n  " + "\n  ".join(problems))
        for k, (m, store, key) in entries.items():
            if k not in state:
                continue
            target = getattr(m, store)[key]
            arr = target.data if isinstance(target, Tensor) else target
            value = state[k]
            value = value.data if isinstance(value, Tensor) else value
            arr[...] = to_device(value, device_of(arr)).astype(arr.dtype)
        return missing, unexpected

    def save(self, path):
        """Write ``state_dict()`` to ``path`` as ``.npz`` (atomically: see ``save_npz``)."""
        save_npz(path, self.state_dict())

    def load(self, path, strict=True):
        """Load a ``.npz`` written by ``save`` (either device) into this module."""
        return self.load_state_dict(load_npz(path), strict=strict)

    # ---- printing --------------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"({k}): " + repr(m).replace("\n", "\n  ") for k, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def state_dict_problems(expected, state, where="model", name=lambda k: k, unused_name=None,
                        missing_name=None):
    """What keeps ``state`` (name -> array, e.g. read from a file) from filling ``expected``
    (a ``state_dict()``) exactly: tensors with no place, places with no tensor, wrong shapes.
    One line per kind, naming every tensor (``name``/``unused_name``/``missing_name`` say how:
    the file's own names, say); an empty list when everything fits."""
    unused_name, missing_name = unused_name or name, missing_name or name
    unused = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    wrong = [f"{name(k)}: file {tuple(np.shape(state[k]))}, model {tuple(expected[k].shape)}"
             for k in state if k in expected and tuple(np.shape(state[k])) != tuple(expected[k].shape)]
    problems = []
    if unused:
        problems.append(f"{len(unused)} tensors of the file found no place in the {where}: "
                        f"{', '.join(unused_name(k) for k in unused)}")
    if missing:
        problems.append(f"{len(missing)} {where} tensors are missing from the file: "
                        f"{', '.join(missing_name(k) for k in missing)}")
    if wrong:
        problems.append(f"{len(wrong)} tensors have the wrong shape: {'; '.join(wrong)}")
    return problems


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open ``path`` for writing so that it is replaced whole or not at all.

    The data goes to a temporary file in the same folder (``.NAME.*.partial``), is flushed to
    the disk (``fsync``) and renamed over ``path`` with ``os.replace``, atomic on one file
    system: a crash or a kill mid-write leaves the old file intact instead of a truncated one,
    and after a power cut the new name never points at data still in the cache.  The folder is
    synced too, so the rename itself is on the disk when the block ends."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # ".model_0000010.npz.x1y2.partial": hidden, and not a .npz, so no one takes it for a checkpoint
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".partial")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def save_npz(path, arrays):
    """Write a dict of arrays to ``path`` (exactly that name) as ``.npz``, atomically
    (``atomic_write``)."""
    with atomic_write(path, "wb") as f:
        # A file object, not a name: np.savez would otherwise append ".npz" to the name.
        np.savez(f, **{k: to_device(v, "cpu") for k, v in arrays.items()})


def _fsync_folder(folder):
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_npz(path):
    """Read a ``.npz`` into a plain dict of NumPy arrays (no pickles)."""
    with np.load(path, allow_pickle=False) as f:
        return OrderedDict((k, f[k]) for k in f.files)


class Sequential(Module):
    """Modules applied one after another; children are named "0", "1", ... (as PyTorch)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                setattr(self, name, m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise TypeError(f"Sequential item {i} is a {type(m).__name__}, not a Module")
                setattr(self, str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleList(Module):
    """A list of modules, registered as children "0", "1", ... (for FPN levels, head blocks)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m):
        if not isinstance(m, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(m).__name__}")
        setattr(self, str(len(self._modules)), m)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
