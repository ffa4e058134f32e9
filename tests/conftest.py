"""Shared test settings: the ``gpu`` marker skips (with the reason) where no GPU is seen."""

import numpy as np
import pytest

from minimask.backend import gpu_available


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU; none is seen on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A seeded generator, so that a failure can be reproduced."""
    return np.random.default_rng(0)
