"""GetItem's backward: an integer key that picks each element once assigns instead of np.add.at;
both paths give the finite-difference gradient and equal np.add.at's result."""
import numpy as np
import pytest

from minimask import Tensor, gradcheck
from minimask.functional.shape import _picks_each_once


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("key, once", [
    (np.array([2, 0, 1]), True),                                   # a permutation of rows
    (np.array([-1, 2]), False),                                    # -1 and 2 are the same row
    ((np.array([0, 1, 2]), np.array([3, 0, 3])), True),            # (row, class) pairs, all distinct
    ((np.array([0, 1, 1]), np.array([3, 0, 0])), False),
    ((np.array([[0], [2]]), np.array([1, 3])), True),              # broadcast to (2, 2)
    (np.array([1]), True), (np.array([], dtype=np.int64), True),
    ((np.array([0, 1]), slice(None)), False),                      # not arrays only: unsure
])
def test_getitem_unique_keys(rng, key, once):
    assert _picks_each_once(key, (3, 4)) is once
    x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    assert gradcheck(lambda x: x[key], [x])
    # the gradient equals np.add.at's, whichever way backward went
    gy = rng.standard_normal(x.data[key].shape)
    x.grad = None
    x[key].backward(gy)
    expected = np.zeros((3, 4))
    np.add.at(expected, key, gy)
    np.testing.assert_array_equal(x.grad, expected)
