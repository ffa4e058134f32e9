"""Numba kernels (CPU) beside the CuPy sources they mirror (``cuda_sources.py``).

Numba's parallel loops (``prange``) run on a threading layer.  ``engine/parallel.py`` forks
training processes, and GNU OpenMP (Numba's "omp" layer on Linux) is not safe across ``fork``:
a forked process that runs a parallel loop after its parent did can compute garbage.  Numba's
own "workqueue" layer is safe across fork, so it is the one used here unless the environment
chooses (``NUMBA_THREADING_LAYER``).
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
