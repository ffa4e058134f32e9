"""Activations and the linear layer: gradients by finite differences, stability for huge
logits, and the same numbers as PyTorch."""

import numpy as np
import pytest

from minimask import F, Tensor, gradcheck


def away_from_zero(rng, *shape, margin=0.1):
    """Standard normal values pushed at least ``margin`` away from 0 (ReLU's kink)."""
    a = rng.standard_normal(shape)
    return a + np.sign(a) * margin + (a == 0) * margin


def test_relu_gradient_and_values(rng):
    x = Tensor(away_from_zero(rng, 3, 4, 5), requires_grad=True)
    assert gradcheck(F.relu, [x])
    np.testing.assert_array_equal(F.relu(x).data, np.where(x.data > 0, x.data, 0))


@pytest.mark.parametrize("b_shape", [(2, 3, 4, 5), (1, 3, 1, 1)])
def test_add_relu_is_relu_of_the_sum(rng, b_shape):
    """The fused residual end: its gradient by finite differences (float64, broadcasting too),
    and the same bits as relu(a + b) in float32, forward and backward."""
    b = rng.standard_normal(b_shape)
    a = away_from_zero(rng, 2, 3, 4, 5) - b  # a + b away from ReLU's kink
    a, b = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    assert gradcheck(F.add_relu, [a, b])
    a32, b32 = (Tensor(v.data.astype(np.float32), requires_grad=True) for v in (a, b))
    a2, b2 = (Tensor(v.data.copy(), requires_grad=True) for v in (a32, b32))
    gy = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    fused, plain = F.add_relu(a32, b32), F.relu(a2 + b2)
    np.testing.assert_array_equal(fused.data, plain.data)
    fused.backward(gy)
    plain.backward(gy)
    np.testing.assert_array_equal(a32.grad, a2.grad)
    np.testing.assert_array_equal(b32.grad, b2.grad)


def test_relu_keeps_float32():
    x = Tensor(np.array([-1.5, 2.0], dtype=np.float32))
    assert F.relu(x).dtype == np.float32


def test_sigmoid_gradient_including_large_logits(rng):
    x = Tensor(np.concatenate([rng.standard_normal(10) * 3, [50.0, -50.0, 30.0, -30.0]]), requires_grad=True)
    assert gradcheck(F.sigmoid, [x])


def test_sigmoid_is_stable_for_huge_logits():
    x = np.array([-1000.0, -88.0, -20.0, 0.0, 20.0, 88.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = F.sigmoid(Tensor(x)).data
    assert np.all(np.isfinite(y)) and y.dtype == np.float32
    assert y[0] == 0.0 and y[-1] == 1.0 and y[3] == 0.5
    mid = np.array([-20.0, 0.0, 20.0])
    expected = 1 / (1 + np.exp(-mid))
    np.testing.assert_allclose(F.sigmoid(Tensor(mid, dtype=np.float64)).data, expected, rtol=1e-15)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax_gradients(rng, axis):
    x = Tensor(rng.standard_normal((3, 4, 2)) * 2, requires_grad=True)
    assert gradcheck(lambda x: F.softmax(x, axis=axis), [x])
    assert gradcheck(lambda x: F.log_softmax(x, axis=axis), [x])


def test_softmax_with_logits_of_50(rng):
    x = Tensor(np.array([[50.0, -50.0, 0.3, 49.0], [-50.0, -49.5, 2.0, 50.0]]), requires_grad=True)
    assert gradcheck(F.softmax, [x])
    assert gradcheck(F.log_softmax, [x])


def test_softmax_values_against_definition(rng):
    x = rng.standard_normal((5, 6))
    p = F.softmax(Tensor(x, dtype=np.float64)).data
    expected = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(F.log_softmax(Tensor(x, dtype=np.float64)).data, np.log(expected), rtol=1e-12)


def test_log_softmax_is_finite_far_from_the_max():
    x = Tensor(np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = F.log_softmax(x).data
    np.testing.assert_allclose(y, [[0.0, -1000.0, -2000.0]], rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5), (1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradient(rng, shape, bias):
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 5)), requires_grad=True)
    if bias:
        b = Tensor(rng.standard_normal(3), requires_grad=True)
        assert gradcheck(F.linear, [x, w, b])
    else:
        assert gradcheck(F.linear, [x, w])


def test_linear_values_and_errors(rng):
    x, w, b = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    y = F.linear(Tensor(x, dtype=np.float64), Tensor(w, dtype=np.float64), Tensor(b, dtype=np.float64))
    expected = np.array([[sum(x[i, k] * w[j, k] for k in range(5)) + b[j] for j in range(3)]
                         for i in range(4)])
    np.testing.assert_allclose(y.data, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="features"):
        F.linear(Tensor(x), Tensor(w.T))
    with pytest.raises(ValueError, match="bias"):
        F.linear(Tensor(x), Tensor(w), Tensor(np.zeros(4)))


def test_against_torch(rng):
    torch = pytest.importorskip("torch", reason="torch is only needed to compare results")
    x = (rng.standard_normal((6, 7)) * 4).astype(np.float32)
    x[0, 0], x[1, 1] = 60.0, -60.0
    g = rng.standard_normal((6, 7)).astype(np.float32)
    ours = [F.relu, F.sigmoid, F.softmax, F.log_softmax]
    theirs = [torch.relu, torch.sigmoid, lambda t: torch.softmax(t, -1), lambda t: torch.log_softmax(t, -1)]
    for f, tf in zip(ours, theirs):
        a = Tensor(x, requires_grad=True)
        y = f(a)
        y.backward(g)
        t = torch.tensor(x, requires_grad=True)
        ty = tf(t)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.grad, t.grad.numpy(), rtol=1e-5, atol=1e-6)
    w, b = rng.standard_normal((4, 7)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    gl = rng.standard_normal((6, 4)).astype(np.float32)
    a, aw, ab = (Tensor(v, requires_grad=True) for v in (x, w, b))
    F.linear(a, aw, ab).backward(gl)
    t, tw, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    torch.nn.functional.linear(t, tw, tb).backward(torch.tensor(gl))
    for ours_g, theirs_g in ((a.grad, t.grad), (aw.grad, tw.grad), (ab.grad, tb.grad)):
        np.testing.assert_allclose(ours_g, theirs_g.numpy(), rtol=1e-5, atol=1e-4)
