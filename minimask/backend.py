"""One array API, two devices: NumPy on the CPU, CuPy on the GPU.

Every op in minimask asks ``xp = get_array_module(x)`` and then calls only what NumPy and
CuPy share, so the same code runs on either device.  CuPy is optional: where it is missing or
no GPU is seen, ``gpu_available()`` is False and everything runs on NumPy.
"""

import os
import re
import shutil
import subprocess

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
            _cupy_problem = f"CuPy is not installed or does not load ({e})"
        except Exception as e:  # CUDA driver or runtime errors: no GPU for us
            _cupy_problem = f"CuPy could not reach a CUDA device ({type(e).__name__}: {e})"
    return _cupy


def gpu_available():
    """True when CuPy imports and at least one CUDA device is present."""
    return _try_cupy() is not None


# The CuPy wheel, and minimask's extra that installs it, for each CUDA major version.
CUPY_WHEELS = {12: ("gpu-cuda12", "cupy-cuda12x"), 13: ("gpu-cuda13", "cupy-cuda13x")}


def _driver_cuda_from_libcuda():
    """The driver's CUDA version from libcuda's cuDriverGetVersion (no CuPy, no device needed)."""
    import ctypes
    import ctypes.util

    if os.name == "nt":
        names = ["nvcuda.dll"]
    else:
        names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    for name in filter(None, names):
        try:
            version = ctypes.c_int(0)
            if ctypes.CDLL(name).cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return version.value // 1000, version.value % 1000 // 10  # 13000 -> (13, 0)
        except (OSError, AttributeError):
            continue
    return None


def _driver_cuda_from_nvidia_smi():
    """The "CUDA Version: 13.0" that ``nvidia-smi`` prints at its top, as (13, 0)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        text = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def driver_cuda_version():
    """(major, minor) of the newest CUDA the NVIDIA driver runs, read without CuPy; None without a
    driver.  CUDA is backward compatible: a 13.0 driver also runs programs built for CUDA 12."""
    return _driver_cuda_from_libcuda() or _driver_cuda_from_nvidia_smi()


def _installed_cupy_wheels():
    """Names of the installed CuPy distributions (cupy-cuda12x, cupy-cuda13x, ...)."""
    from importlib import metadata

    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    return sorted(n for n in names if n == "cupy" or n.startswith("cupy-cuda") or n.startswith("cupy-rocm"))


def cupy_wheel_advice(driver=None):
    """Which CuPy wheel fits this machine, in a sentence: by the driver's CUDA version where one is
    found (``driver`` overrides it), otherwise both extras and how to tell which."""
    driver = driver or driver_cuda_version()
    installed = _installed_cupy_wheels()
    have = f" (installed now: {', '.join(installed)})" if installed else ""
    if driver is None:
        return (f"No NVIDIA driver was found here{have}. On a machine with an NVIDIA GPU, nvidia-smi prints "
                f"'CUDA Version: X.Y' at its top: pip install 'minimask[gpu-cuda12]' for 12.x, "
                f"'minimask[gpu-cuda13]' for 13.x")
    major, minor = driver
    if major < min(CUPY_WHEELS):
        return (f"This machine's NVIDIA driver runs CUDA {major}.{minor} at most{have}; minimask's CuPy "
                f"wheels need CUDA 12 or 13: update the driver, then pip install 'minimask[gpu-cuda12]'")
    cuda = min(major, max(CUPY_WHEELS))  # a newer driver runs the newest wheel there is
    extra, wheel = CUPY_WHEELS[cuda]
    others = [n for n in installed if n != wheel]
    swap = f"; pip uninstall {' '.join(others)} first (two CuPy wheels break each other)" if others else ""
    return (f"This machine's NVIDIA driver runs CUDA {major}.{minor}{have}: the CuPy wheel that fits is "
            f"{wheel}, pip install 'minimask[{extra}]'{swap}. It loads the CUDA {cuda} toolkit's libraries "
            f"(or PyPI's, with pip install '{wheel}[ctk]')")


def require_gpu(what="device 'gpu'"):
    """Raise a RuntimeError saying why ``what`` cannot run here, and which CuPy wheel would fit,
    unless a GPU is available."""
    if _try_cupy() is None:
        raise RuntimeError(f"{what} asked for, but {_cupy_problem}. {cupy_wheel_advice()}; "
                           f"or use --device cpu")


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


# glibc's malloc hands a freed block of 128 KB or more (an mmap of its own) straight back to
# the system, and trims the top of its heap when that much is free there.  The next array of
# that size then gets fresh pages: the kernel zeroes and maps each 4 KB page on first touch,
# a page fault each, which in a virtual machine costs microseconds.  A network allocates and
# frees the same large arrays layer after layer, so by default one r50_fpn inference took
# about 11,000 faults (3 with the settings below) and the same conv, its columns in a fresh
# array, twice the time of one reusing a buffer (measured on 2 cores, in a VM).  These settings
# (the environment's MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...) keep freed memory in the
# process for the next array: the resident size stays at its peak instead of shrinking.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse (no mmap per large array, no heap
    trimming); True where it took effect.  The CLI calls it once at start-up (forked workers
    inherit it); elsewhere (not Linux/glibc) it does nothing and returns False."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False
