"""Time conv2d forward+backward at the shapes Mask R-CNN uses, next to PyTorch.

``minimask bench ops [--device cpu|gpu] [--repeat 5]`` prints, for each shape, the median
time of one forward and backward through minimask's conv2d by each method (im2col + GEMM,
shift-and-GEMM, and Winograd's F(2x2, 3x3) where it applies; ``minimask/functional/conv.py``
and ``winograd.py``), torch's time for the same
computation where torch is importable, and the ratio ours / torch.

On the CPU torch is limited to as many threads as NumPy's BLAS uses, so that both get the
same cores.  On the GPU the arrays are CuPy's and the device is synchronized before each clock
reading (GPU calls return before the work is done).
"""

import os

import numpy as np

from ..backend import gpu_available, to_device
from ..functional.conv import Conv2dFn
from ..functional.winograd import applies as winograd_applies
from ..tensor import Tensor
from .timing import medians_ms

# label, N, C, H=W, O, kernel, stride, padding
CASES = [
    ("res2 3x3", 8, 64, 32, 64, 3, 1, 1),
    ("fpn 3x3", 2, 256, 64, 256, 3, 1, 1),
    ("1x1", 2, 256, 64, 256, 1, 1, 0),
    ("3x3 stride 2", 2, 256, 64, 256, 3, 2, 1),
    ("mask head 3x3", 100, 256, 14, 256, 3, 1, 1),
    ("shapes mask head 3x3", 40, 32, 14, 32, 3, 1, 1),
]


def blas_threads():
    """Threads NumPy's BLAS uses: threadpoolctl's answer if installed, else the environment
    variables BLAS libraries read, else the CPUs this process may run on."""
    try:
        from threadpoolctl import threadpool_info

        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if counts:
            return counts[0]
    except ImportError:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _ours(arrays, stride, padding, method, device):
    x, w, b, gy = (to_device(a, device) for a in arrays)

    def step():
        ts = [Tensor(a, requires_grad=True) for a in (x, w, b)]
        Conv2dFn(stride, padding, method=method)(*ts).backward(gy)

    return step


def _torch(torch, arrays, stride, padding, device):
    dev = "cuda" if device == "gpu" else "cpu"
    x, w, b, gy = (torch.from_numpy(a).to(dev) for a in arrays)

    def step():
        ts = [t.detach().requires_grad_() for t in (x, w, b)]
        torch.nn.functional.conv2d(*ts, stride=stride, padding=padding).backward(gy)

    return step


def main(device="cpu", repeat=5):
    try:
        import torch
    except ImportError:
        torch = None
    sync = lambda: None  # noqa: E731
    if device == "gpu":
        if not gpu_available():
            raise SystemExit("minimask bench ops --device gpu: CuPy or a CUDA GPU is not available here")
        import cupy

        sync = cupy.cuda.get_current_stream().synchronize
        if torch is not None and not torch.cuda.is_available():
            torch = None
        torch_sync = torch.cuda.synchronize if torch is not None else sync
    else:
        threads = blas_threads()
        if torch is not None:
            torch.set_num_threads(threads)
        torch_sync = sync
        with_torch = f", torch with {threads}" if torch else ", torch not installed"
        print(f"CPU, {threads} BLAS thread(s){with_torch}")
    print(f"conv2d forward+backward, float32, median of {repeat} (ms)")
    torch_head = f" {'torch':>8s} {'im2col/torch':>13s}" if torch else ""
    print(f"{'shape':44s} {'im2col':>8s} {'shift':>8s} {'winograd':>8s}{torch_head}")
    rng = np.random.default_rng(0)
    for label, n, c, h, o, k, s, p in CASES:
        ho = (h + 2 * p - k) // s + 1
        arrays = [rng.standard_normal(shape).astype(np.float32)
                  for shape in ((n, c, h, h), (o, c, k, k), (o,), (n, o, ho, ho))]
        wino = device == "cpu" and winograd_applies((o, c, k, k), (s, s), (p, p), (1, 1))
        methods = ("im2col", "shift", "winograd") if wino else ("im2col", "shift")
        steps = [(_ours(arrays, s, p, m, device), sync) for m in methods]
        if torch is not None:
            steps.append((_torch(torch, arrays, s, p, device), torch_sync))
        times = medians_ms(steps, repeat)
        name = f"{label}: N={n} C={c} {h}x{h} -> {o}, {k}x{k}/{s}"
        row = f"{name:44s} {times[0]:8.1f} {times[1]:8.1f} " + (f"{times[2]:8.1f}" if wino else f"{'-':>8s}")
        if torch is not None:
            row += f" {times[-1]:8.1f} {times[0] / times[-1]:13.2f}"
        print(row)


if __name__ == "__main__":
    main()
