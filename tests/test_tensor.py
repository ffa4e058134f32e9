"""The autograd core: every arithmetic and shape Function against finite differences, and the
engine's rules (accumulation, topological order, freed graphs, no_grad, dtypes)."""

import numpy as np
import pytest

import minimask as mm
from minimask import F, Tensor, gradcheck, no_grad


def t64(rng, *shape, positive=False):
    a = rng.standard_normal(shape)
    if positive:
        a = np.abs(a) + 0.5
    return Tensor(a, requires_grad=True)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_ops_with_broadcasting(rng, op):
    a = t64(rng, 3, 1, 4)
    b = t64(rng, 5, 1, positive=True)  # broadcast to (3, 5, 4): both inputs are stretched
    fn = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
          "mul": lambda a, b: a * b, "div": lambda a, b: a / b}[op]
    assert gradcheck(fn, [a, b])


def test_scalars_on_either_side(rng):
    x = t64(rng, 2, 3, positive=True)
    assert gradcheck(lambda x: 2.0 - x * 3 + 1 / x - (-x) ** 3, [x])


def test_pow_exp_log_sqrt_abs(rng):
    x = t64(rng, 4, 3, positive=True)
    assert gradcheck(lambda x: x ** 1.5 + x.exp() + x.log() + F.sqrt(x) + F.abs(x - 2.0), [x])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((4,), (4, 3)), ((3, 4), (4,)),
                                    ((2, 1, 3, 4), (5, 4, 2))])
def test_matmul(rng, shapes):
    a, b = t64(rng, *shapes[0]), t64(rng, *shapes[1])
    assert gradcheck(lambda a, b: a @ b, [a, b])


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_sum_and_mean(rng, axis, keepdims):
    x = t64(rng, 2, 3, 4)
    assert gradcheck(lambda x: x.sum(axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda x: x.mean(axis=axis, keepdims=keepdims), [x])
    expected = x.data.mean(axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(x.mean(axis=axis, keepdims=keepdims).data, expected)


def test_reshape_transpose_flatten(rng):
    x = t64(rng, 2, 3, 4)
    assert gradcheck(lambda x: x.reshape(4, 6).T.reshape(-1), [x])
    assert gradcheck(lambda x: x.permute(2, 0, 1), [x])
    assert gradcheck(lambda x: F.flatten(x, 1), [x])
    assert x.transpose(1, 2, 0).shape == (3, 4, 2)


@pytest.mark.parametrize("key", [
    1, (slice(None), 2), (slice(0, 2), slice(1, None, 2)), np.array([2, 0, 2, 2]),
    (np.array([0, 1, 1]), np.array([3, 0, 3])), "mask", (Ellipsis, 1), (None, 0),
])
def test_getitem(rng, key):
    x = t64(rng, 3, 4)
    if isinstance(key, str):
        key = x.data > 0  # a boolean mask
    assert gradcheck(lambda x: x[key], [x])


def test_getitem_repeated_index_accumulates():
    x = Tensor(np.zeros(3), requires_grad=True)
    x[np.array([0, 0, 2])].sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 0.0, 1.0])


def test_concat_and_stack(rng):
    a, b, c = t64(rng, 2, 3), t64(rng, 2, 1), t64(rng, 2, 3)
    assert gradcheck(lambda a, b: F.concat([a, b, a], axis=1), [a, b])
    assert gradcheck(lambda a, c: F.stack([a, c], axis=1), [a, c])
    assert F.stack([a, c], axis=0).shape == (2, 2, 3)


def test_pad2d(rng):
    x = t64(rng, 1, 2, 3, 3)
    y = F.pad2d(x, (1, 0, 2, 1))
    assert y.shape == (1, 2, 4, 6)
    assert gradcheck(lambda x: F.pad2d(x, (1, 2, 0, 1)), [x])


def test_cast_keeps_gradient_dtype(rng):
    x = t64(rng, 3)
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    (y * 2).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, 2.0)


def test_gradient_accumulates_over_uses_and_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x * x + x  # x used three times: dy/dx = 2x + 1
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 5.0])
    (x * 1.0).sum().backward()  # a second graph adds to .grad, as in PyTorch
    np.testing.assert_allclose(x.grad, [4.0, 6.0])


def test_diamond_graph_topological_order():
    # x -> a -> c, x -> b -> c, with a longer path through b: backward must wait for both.
    x = Tensor(np.array(2.0), requires_grad=True)
    a = x * 3.0
    b = ((x + 1.0) * 2.0) * x
    c = a * b
    c.backward()
    # c = 3x * 2x(x+1) = 6x^3 + 6x^2, dc/dx = 18x^2 + 12x = 96 at x = 2
    np.testing.assert_allclose(x.grad, 96.0)


def test_deep_chain_does_not_hit_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y * 1.0 + 0.0
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0)


def test_second_backward_on_freed_graph_raises():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4.0)


def test_intermediate_dropped_by_user_still_gets_gradient():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    loss = ((x * 2.0) * 3.0).sum()  # the intermediate x*2 is referenced by the graph only
    loss.backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])


def test_no_grad_records_nothing():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y.creator is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_backward_needs_scalar_or_gradient():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()
    y.backward(np.array([1.0, -1.0]))
    np.testing.assert_allclose(x.grad, [2.0, -2.0])


def test_default_dtype_is_float32_and_float64_is_kept():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert (Tensor([1.0]) + 1).dtype == np.float32
    assert (Tensor(np.ones(2)) * 2.5).dtype == np.float64
    assert Tensor(np.ones(2, np.float64)).sum().dtype == np.float64  # NumPy scalars keep float64


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(mm.Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, gy):
            return gy * self.x  # should be 2 x gy

    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    with pytest.raises(AssertionError, match="worst mismatch"):
        gradcheck(lambda x: WrongSquare()(x), [x])
    with pytest.raises(AssertionError, match="random direction"):
        gradcheck(lambda x: WrongSquare()(x), [x], directions=3)


def test_backend_without_gpu():
    from minimask.backend import get_array_module, to_device

    assert get_array_module(np.ones(2)) is np
    assert get_array_module(Tensor(np.ones(2))) is np
    assert isinstance(mm.gpu_available(), bool)
    assert to_device(np.ones(2), "cpu").shape == (2,)
    with pytest.raises(ValueError, match="unknown device"):
        to_device(np.ones(2), "tpu")
    if not mm.gpu_available():
        with pytest.raises(RuntimeError, match="CuPy"):
            to_device(np.ones(2), "gpu")


@pytest.mark.gpu
def test_core_ops_on_cupy_match_numpy(rng):
    import cupy

    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    results = {}
    for dev in ("cpu", "gpu"):
        x = Tensor(mm.to_device(a, dev), requires_grad=True)
        w = Tensor(mm.to_device(b, dev), requires_grad=True)
        y = ((x @ w).exp() * 2.0)[np.array([0, 0, 2])].sum()
        y.backward()
        results[dev] = [mm.to_device(v, "cpu") for v in (y.data, x.grad, w.grad)]
    for c, g in zip(results["cpu"], results["gpu"]):
        np.testing.assert_allclose(c, g, rtol=1e-10)
    assert gradcheck(lambda x: (x * x).sum(axis=0), [Tensor(cupy.asarray(a), requires_grad=True)])


def test_flatten_empty_batch():
    x = Tensor(np.zeros((0, 2, 3, 3)), requires_grad=True)
    y = F.flatten(x, 1)
    assert y.shape == (0, 18) and x.flatten(1).shape == (0, 18)
    y.sum().backward()
    assert x.grad.shape == (0, 2, 3, 3)
