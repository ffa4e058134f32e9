"""The CUDA C++ that minimask hands to CuPy, declared in one public place per kernel module.

Every kernel module with a CuPy path lists its sources in a module-level ``CUDA_SOURCES``, a dict
from a name to a ``CudaSource``: the code, the NVRTC options, the kernel names the CuPy path looks
up, and the dtypes that the code's ``T`` is compiled for (one ``typedef`` each).  The CuPy path
builds its kernels from exactly these with ``cuda_function`` (the only place that calls
``cupy.RawModule``), and ``tests/test_nvrtc.py`` compiles every variant of every source with NVRTC
to PTX for compute_80 and compute_90, which needs no GPU or driver.  So a kernel that does not
compile fails the tests on any machine, not at its first call on a user's GPU.

A source must be self-contained (no ``#include``): NVRTC then compiles it as it is, with or without
CuPy's headers beside it.
"""

from typing import NamedTuple

import numpy as np

# What CuPy's RawModule adds to the options it is given, before NVRTC sees them (CuPy 13 and 14:
# ``assemble_cupy_compiler_options`` and ``_compile_with_cache_cuda``): the C++ standard where the
# options name none, flush-to-zero for float, include paths (unused: no source includes anything)
# and the device's architecture.  tests/test_nvrtc.py compiles with these too.
CUPY_ADDED_OPTIONS = ("--std=c++14", "-ftz=true")

# The C type that ``T`` stands for, by NumPy dtype name.
C_TYPES = {"float32": "float", "float64": "double"}


class CudaSource(NamedTuple):
    """CUDA C++ for ``cupy.RawModule``.

    ``code``: the source; ``kernels``: the ``extern "C" __global__`` functions the CuPy path looks
    up; ``options``: NVRTC options, passed to CuPy as they are; ``dtypes``: the NumPy dtype names
    that ``T`` is compiled for (``typedef <C type> T;`` is put before the code), or ``()`` for code
    with no ``T``.
    """

    code: str
    kernels: tuple
    options: tuple = ()
    dtypes: tuple = ()

    def text(self, dtype=None):
        """The exact source CuPy compiles for ``dtype`` (None for code without ``T``)."""
        if not self.dtypes:
            if dtype is not None:
                raise TypeError(f"this CUDA source has no type parameter T (asked for {dtype})")
            return self.code
        if dtype is None:
            raise TypeError(f"this CUDA source is compiled for one of {self.dtypes}: give a dtype")
        return f"typedef {C_TYPES[np.dtype(dtype).name]} T;\n" + self.code

    def variants(self):
        """``{dtype name or None: source text}``, one entry per compiled variant."""
        if not self.dtypes:
            return {None: self.code}
        return {name: self.text(name) for name in self.dtypes}


_functions = {}


def cuda_function(source, name, dtype=None, what=None):
    """The compiled kernel ``name`` of ``source`` for ``dtype`` (compiled once, then cached).

    ``what`` names the operation in the error for a dtype the source is not compiled for.
    """
    if source.dtypes:
        dtype = np.dtype(dtype)
        if dtype.name not in source.dtypes:
            raise TypeError(f"{what or name} on the GPU supports {' and '.join(source.dtypes)}, got {dtype}")
        dtype = dtype.name
    key = (source.code, source.options, dtype, name)
    function = _functions.get(key)
    if function is None:
        import cupy

        if name not in source.kernels:
            raise KeyError(f"no kernel {name!r} in this CUDA source (it has {', '.join(source.kernels)})")
        module = cupy.RawModule(code=source.text(dtype), options=source.options)
        function = _functions[key] = module.get_function(name)
    return function
