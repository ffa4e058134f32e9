"""Every CUDA kernel compiles, on any machine: NVRTC needs no GPU and no driver.

Each kernel module's ``CUDA_SOURCES`` (see minimask/kernels/cuda_sources.py) is compiled with
NVRTC, every dtype variant, with the module's options plus what CuPy adds, to PTX for compute_80
(A100) and compute_90 (H100/H200) and to cubins for sm_80 and sm_90; a source that does not
compile fails with NVRTC's log.  The sources are found by walking the package
``minimask.kernels``, so a kernel added later is compiled too, and a guard fails if a CuPy
kernel is built anywhere but from those sources.

NVRTC comes from the ``nvidia-cuda-nvrtc-cu12`` wheel of the ``dev`` extra (or a CUDA toolkit),
loaded with ctypes; where it is missing the compiling tests skip, saying so.
"""

import ctypes
import ctypes.util
import glob
import importlib
import os
import pkgutil
import re
import sys
import types

import numpy as np
import pytest

import minimask
import minimask.kernels
from minimask.kernels import cuda_sources
from minimask.kernels.cuda_sources import CUPY_ADDED_OPTIONS, CudaSource, cuda_function

# PTX for the virtual architectures of the A100 and the H100/H200, and their cubins: CuPy asks
# NVRTC for a cubin of the device's sm_XX where NVRTC knows it (ptxas then runs too), else PTX.
ARCHS = ("compute_80", "compute_90", "sm_80", "sm_90")


def all_cuda_sources():
    """[(label, CudaSource)] of every ``CUDA_SOURCES`` in the modules of minimask.kernels."""
    found = []
    for info in pkgutil.iter_modules(minimask.kernels.__path__):
        module = importlib.import_module(f"minimask.kernels.{info.name}")
        for key, source in getattr(module, "CUDA_SOURCES", {}).items():
            found.append((f"{info.name}.{key}", source))
    return found


SOURCES = all_cuda_sources()
CASES = [(f"{label}[{dtype or 'no T'}]", source, dtype)
         for label, source in SOURCES for dtype in source.variants()]


# ---------------------------------------------------------------- NVRTC through ctypes
def _libnvrtc_candidates():
    """Paths or names of libnvrtc to try: the pip wheels' first, then a CUDA toolkit's."""
    found = []
    try:  # nvidia-cuda-nvrtc-cu12: nvidia/cuda_nvrtc/lib/libnvrtc.so.12; CUDA 13's: nvidia/cu13/lib/
        import nvidia

        for base in nvidia.__path__:
            found += sorted(glob.glob(os.path.join(base, "**", "libnvrtc.so.*"), recursive=True))
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            found += sorted(glob.glob(os.path.join(os.environ[var], "lib*", "libnvrtc.so*")))
    found += sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    return found


def load_nvrtc():
    """(libnvrtc as a ctypes CDLL, None), or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"this test loads libnvrtc.so (Linux); this is {sys.platform}"
    tried = []
    for path in _libnvrtc_candidates():
        try:
            # NVRTC dlopens its builtins library by name at the first compile; a wheel's lib/ is on
            # no search path (NVRTC 13's wheel has no rpath to it), so load the one beside it first.
            folder = os.path.dirname(path)
            beside = glob.glob(os.path.join(folder, "libnvrtc-builtins.so.*")) if folder else []
            for builtins in sorted(beside):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path}: {e}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib, None
    return None, ("NVRTC not found: install the dev extra (pip install -e '.[dev]', which has the "
                  "nvidia-cuda-nvrtc-cu12 wheel) or a CUDA toolkit" + (f"; tried {tried}" if tried else ""))


NVRTC, NO_NVRTC = load_nvrtc()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason=str(NO_NVRTC))


class NvrtcError(Exception):
    """A source that NVRTC did not compile; the message holds NVRTC's log."""


def nvrtc_version():
    major, minor = ctypes.c_int(), ctypes.c_int()
    NVRTC.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cuda(code, options, name="minimask_kernel.cu"):
    """What NVRTC makes of ``code`` with ``options``: PTX text for ``--gpu-architecture=compute_XX``,
    a cubin (bytes, through ptxas) for ``sm_XX``; NvrtcError with NVRTC's log where it fails."""
    prog = ctypes.c_void_p()
    status = NVRTC.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None)
    if status:
        raise NvrtcError(f"nvrtcCreateProgram: {NVRTC.nvrtcGetErrorString(status).decode()}")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = NVRTC.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(prog, log)
        if status:
            why = NVRTC.nvrtcGetErrorString(status).decode()
            raise NvrtcError(f"{why} with options {' '.join(options)}:\n{log.value.decode(errors='replace')}")
        cubin = any(o.startswith("--gpu-architecture=sm_") for o in options)
        get_size, get = ((NVRTC.nvrtcGetCUBINSize, NVRTC.nvrtcGetCUBIN) if cubin
                         else (NVRTC.nvrtcGetPTXSize, NVRTC.nvrtcGetPTX))
        get_size(prog, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        get(prog, out)
        return out.raw if cubin else out.value.decode()
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))


def cupy_options(source, arch):
    """The options NVRTC gets from CuPy for ``source``: the module's own, CuPy's, the architecture."""
    return tuple(source.options) + CUPY_ADDED_OPTIONS + (f"--gpu-architecture={arch}",)


# ---------------------------------------------------------------- the kernels compile
def test_the_kernel_modules_declare_their_sources():
    """The walk finds the four kernel families (a broken walk would make the compile test vacuous)."""
    labels = {label for label, _ in SOURCES}
    assert {"roi_align.roi_align", "roi_pool.roi_pool", "nms.nms", "paste_masks.paste_masks"} <= labels
    for label, source in SOURCES:
        assert isinstance(source, CudaSource), label
        for kernel in source.kernels:  # what the CuPy path looks up is an unmangled global function
            assert f'extern "C" __global__ void {kernel}(' in source.code, f"{label}: {kernel}"
        assert source.kernels, label
        assert "#include" not in source.code, f"{label}: sources are self-contained (see cuda_sources.py)"


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label,source,dtype", CASES, ids=[c[0] for c in CASES])
def test_cuda_source_compiles_with_nvrtc(label, source, dtype, arch):
    error = None
    try:
        out = compile_cuda(source.text(dtype), cupy_options(source, arch), name=f"{label}.cu")
    except NvrtcError as e:
        error = str(e)
    if error is not None:
        pytest.fail(f"{label} does not compile for {arch} (NVRTC {nvrtc_version()}): {error}", pytrace=False)
    for kernel in source.kernels:  # extern "C": the names CuPy's get_function looks up, unmangled
        if arch.startswith("sm_"):
            assert out.startswith(b"\x7fELF") and kernel.encode() in out, f"{label}: no {kernel} in the cubin"
        else:
            assert f".target sm_{arch.split('_')[1]}" in out
            assert re.search(rf"\.entry\s+{kernel}\s*\(", out), f"{label}: no kernel {kernel} in the PTX"


@needs_nvrtc
def test_a_broken_source_fails_with_nvrtcs_log():
    """The harness itself: a syntax error and an undeclared name are reported, with NVRTC's log."""
    good = CudaSource('extern "C" __global__ void k(T* x) { x[threadIdx.x] *= 2; }', kernels=("k",),
                      dtypes=("float32", "float64"))
    for dtype in good.dtypes:
        assert ".entry k(" in compile_cuda(good.text(dtype), cupy_options(good, "compute_80"))
    for broken in ('extern "C" __global__ void k(T* x) { x[threadIdx.x] *= 2 }',  # missing ';'
                   'extern "C" __global__ void k(T* x) { x[threadIdx.x] = undeclared; }'):
        with pytest.raises(NvrtcError, match="error"):
            compile_cuda(CudaSource(broken, ("k",), dtypes=("float32",)).text("float32"),
                        cupy_options(good, "compute_90"))


# ---------------------------------------------------------------- one source of truth
KERNEL_CONSTRUCTORS = re.compile(r"\b(RawModule|RawKernel|ElementwiseKernel|ReductionKernel)\s*\(")


def test_cupy_kernels_are_built_only_from_cuda_sources():
    """No module builds a CuPy kernel itself: they all go through ``cuda_function(CUDA_SOURCES[...]``,
    so what the NVRTC test compiles is what runs on the GPU."""
    root = os.path.dirname(minimask.__file__)
    helper = os.path.abspath(cuda_sources.__file__)
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        text = open(path).read()
        if os.path.abspath(path) != helper:
            assert not KERNEL_CONSTRUCTORS.search(text), \
                f"{path} builds a CuPy kernel itself: declare it in CUDA_SOURCES and use cuda_function"
        for call in re.finditer(r"\bcuda_function\(", text):
            if os.path.abspath(path) != helper:
                assert text.startswith("cuda_function(CUDA_SOURCES[", call.start()), \
                    f"{path}: cuda_function is called with a source not from the module's CUDA_SOURCES"


def test_cuda_function_hands_cupy_exactly_the_declared_text(monkeypatch):
    """With a stand-in for CuPy that records what RawModule gets: the code and options of each
    variant are exactly ``source.text(dtype)`` and ``source.options`` (what NVRTC compiles above)."""
    calls = []

    class RawModule:
        def __init__(self, code, options=()):
            calls.append((code, options))

        def get_function(self, name):
            return ("kernel", name)

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))
    monkeypatch.setattr(cuda_sources, "_functions", {})
    for label, source, dtype in CASES:
        for kernel in source.kernels:
            calls.clear()
            assert cuda_function(source, kernel, dtype) == ("kernel", kernel)
            assert calls == [(source.text(dtype), source.options)], label
            assert cuda_function(source, kernel, dtype) == ("kernel", kernel) and len(calls) == 1  # cached
    roi_align = dict(SOURCES)["roi_align.roi_align"]
    assert roi_align.text(np.float32).startswith("typedef float T;\n")
    assert roi_align.text(np.float64).startswith("typedef double T;\n")
    with pytest.raises(TypeError, match="roi_align on the GPU supports float32 and float64, got float16"):
        cuda_function(roi_align, "roi_align_forward", np.float16, "roi_align")
    with pytest.raises(KeyError, match="no kernel"):
        cuda_function(roi_align, "roi_align_sideways", np.float32)
