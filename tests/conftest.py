"""Shared test settings: the ``gpu`` marker skips (with the reason) where no GPU is seen."""

import numpy as np
import pytest

from minimask.backend import gpu_available


def pytest_configure(config):
    # torchvision's compiled ops do not load against the CPU torch these machines hold, and a
    # plain ``import torchvision`` caches "no ops" for the whole session.  tests/tv_shim.py
    # stands in for those ops; importing torchvision through it here, before any test module
    # can import it plainly, makes every test see the same working torchvision.
    try:
        from tv_shim import import_torchvision

        import_torchvision()
    except ImportError:
        pass  # the tests that need torchvision skip, saying why (the ``torchvision`` fixture)


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


@pytest.fixture(scope="session")
def torchvision():
    """torchvision with tests/tv_shim.py's CPU operators; the test skips with the reason if absent."""
    from tv_shim import import_torchvision

    try:
        return import_torchvision()
    except ImportError as e:
        pytest.skip(f"torchvision unavailable: {e}")
