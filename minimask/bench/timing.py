"""Wall-clock medians for the benchmarks, with the device synchronized before each reading.

CUDA kernel launches return before the work is done, so every clock reading waits for the device
(``sync``); on the CPU ``sync`` does nothing.  The first call of a step is not timed: it compiles
or loads the Numba kernels, compiles the CUDA kernels, fills caches and makes cuBLAS handles.
"""

import time

import numpy as np


def medians_ms(steps, repeat, warmup=1):
    """Median ms of each ``(step, sync)`` pair over ``repeat`` runs.  The steps take turns within
    each repetition, so that load from other processes on a shared machine falls on all alike."""
    for step, sync in steps:
        for _ in range(warmup):
            step()
        sync()
    times = [[] for _ in steps]
    for _ in range(repeat):
        for (step, sync), ts in zip(steps, times):
            t0 = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - t0)
    return [1e3 * float(np.median(ts)) for ts in times]


def median_ms(step, repeat, sync, warmup=1):
    """Median ms of ``step`` over ``repeat`` runs, after ``warmup`` untimed calls."""
    return medians_ms([(step, sync)], repeat, warmup)[0]
