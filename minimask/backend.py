"""One array API, two devices: NumPy on the CPU, CuPy on the GPU.

Every op in minimask asks ``xp = get_array_module(x)`` and then calls only what NumPy and
CuPy share, so the same code runs on either device.  CuPy is optional: where it is missing or
no GPU is seen, ``gpu_available()`` is False and everything runs on NumPy.
"""

import numpy as np

_cupy = None
_cupy_checked = False
_cupy_problem = None  # why there is no GPU, for the error message


def _try_cupy():
    """Import CuPy once; None where it is not installed or no CUDA device answers."""
    global _cupy, _cupy_checked, _cupy_problem
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
            else:
                _cupy_problem = "CuPy is installed but sees no CUDA device"
        except ImportError as e:
            _cupy_problem = f"CuPy is not installed ({e})"
        except Exception as e:  # CUDA driver or runtime errors: no GPU for us
            _cupy_problem = f"CuPy could not reach a CUDA device ({type(e).__name__}: {e})"
    return _cupy


def gpu_available():
    """True when CuPy imports and at least one CUDA device is present."""
    return _try_cupy() is not None


def require_gpu(what="device 'gpu'"):
    """Raise a RuntimeError saying why ``what`` cannot run here, unless a GPU is available."""
    if _try_cupy() is None:
        raise RuntimeError(f"{what} asked for, but {_cupy_problem}. Install the GPU extra "
                           f"(pip install 'minimask[gpu]', CuPy for CUDA 12) on a machine with an "
                           f"NVIDIA GPU, or use --device cpu")


def gpu_name():
    """The current CUDA device's name, e.g. "NVIDIA H100 80GB HBM3" (None without a GPU)."""
    cp = _try_cupy()
    if cp is None:
        return None
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def is_cupy_array(x):
    """True for a CuPy array, without importing CuPy when it is not already loaded."""
    return type(x).__module__.startswith("cupy")


def get_array_module(*arrays):
    """Return the ``cupy`` module if any argument is a CuPy array, else ``numpy``.

    Tensors are unwrapped, so ``get_array_module(tensor)`` works too.
    """
    for a in arrays:
        a = getattr(a, "data", a) if not isinstance(a, np.ndarray) else a
        if is_cupy_array(a):
            return _try_cupy()
    return np


def to_device(array, device):
    """Copy ``array`` to ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy); no copy if already there."""
    if device == "cpu":
        if is_cupy_array(array):
            return array.get()
        return np.asarray(array)
    if device == "gpu":
        require_gpu()
        return _cupy.asarray(array)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")


def device_of(array):
    """``"gpu"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "gpu" if is_cupy_array(array) else "cpu"


def scatter_add(target, index, values):
    """``target[index] += values`` with repeated indices summed (np.add.at / cupyx.scatter_add)."""
    if is_cupy_array(target):
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)
