"""The losses of Eq. 1 (cross-entropy, smooth L1, binary cross-entropy with logits): gradients by
finite differences in every reduction, edge cases (huge logits, ignored labels, batch of 1, an
empty mean), values against the definitions, and PyTorch's numbers."""

import math

import numpy as np
import pytest

from minimask import F, Tensor, gradcheck

REDUCTIONS = ["mean", "sum", "none"]


def logits64(rng, *shape, scale=2.0):
    return Tensor(rng.standard_normal(shape) * scale, requires_grad=True)


# ---- cross-entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_gradient(rng, reduction):
    z = logits64(rng, 6, 4)
    target = np.array([0, 3, -1, 2, 1, -1])  # two ignored rows
    assert gradcheck(lambda z: F.cross_entropy(z, target, reduction=reduction), [z])


def test_cross_entropy_large_logits_and_batch_of_one(rng):
    z = Tensor(np.array([[50.0, -50.0, 3.0], [-50.0, 49.0, 50.0]]), requires_grad=True)
    assert gradcheck(lambda z: F.cross_entropy(z, np.array([1, 1])), [z])
    one = logits64(rng, 1, 5)
    assert gradcheck(lambda z: F.cross_entropy(z, np.array([4])), [one])


def test_cross_entropy_values_by_definition(rng):
    z = rng.standard_normal((5, 4)) * 3
    target = np.array([2, -1, 0, 3, 3])
    per_row = []
    for i, t in enumerate(target):
        if t == -1:
            per_row.append(0.0)
            continue
        per_row.append(-math.log(math.exp(z[i, t]) / sum(math.exp(v) for v in z[i])))
    zt = Tensor(z, dtype=np.float64)
    np.testing.assert_allclose(F.cross_entropy(zt, target, reduction="none").data, per_row, rtol=1e-12)
    assert F.cross_entropy(zt, target, reduction="sum").item() == pytest.approx(sum(per_row), rel=1e-12)
    assert F.cross_entropy(zt, target).item() == pytest.approx(sum(per_row) / 4, rel=1e-12)  # 4 kept rows


def test_cross_entropy_custom_ignore_index_and_huge_logits():
    z = Tensor(np.array([[1000.0, 0.0], [0.0, -1000.0], [5.0, 5.0]], dtype=np.float32), requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = F.cross_entropy(z, np.array([1, 0, 7]), ignore_index=7, reduction="none")
    np.testing.assert_allclose(loss.data, [1000.0, 0.0, 0.0], rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_without_nan(rng):
    z = logits64(rng, 3, 4)
    with np.errstate(invalid="raise", divide="raise"):
        loss = F.cross_entropy(z, np.array([-1, -1, -1]))
        loss.backward()
    assert loss.item() == 0.0
    np.testing.assert_array_equal(z.grad, np.zeros((3, 4)))
    assert F.cross_entropy(Tensor(np.zeros((0, 4))), np.zeros(0, np.int64)).item() == 0.0


def test_cross_entropy_errors(rng):
    z = Tensor(rng.standard_normal((3, 4)))
    with pytest.raises(ValueError, match="outside 0..3"):
        F.cross_entropy(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="outside"):
        F.cross_entropy(z, np.array([0, -2, 1]))
    with pytest.raises(ValueError, match="integer"):
        F.cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="target must be"):
        F.cross_entropy(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(z, np.array([0, 1, 2]), reduction="avg")


# ---- binary cross-entropy with logits ---------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_gradient(rng, reduction):
    x = logits64(rng, 3, 4, 5)
    t = rng.random((3, 4, 5))
    assert gradcheck(lambda x: F.binary_cross_entropy_with_logits(x, t, reduction=reduction), [x])


def test_bce_gradient_to_target_and_large_logits(rng):
    x = Tensor(np.array([50.0, -50.0, 30.0, -30.0, 0.7, -1.2]), requires_grad=True)
    t = Tensor(rng.random(6), requires_grad=True)
    assert gradcheck(F.binary_cross_entropy_with_logits, [x, t])


def test_bce_values_by_definition_and_huge_logits(rng):
    x = rng.standard_normal(8) * 3
    t = (rng.random(8) > 0.5).astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    expected = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    got = F.binary_cross_entropy_with_logits(Tensor(x, dtype=np.float64), Tensor(t), reduction="none")
    np.testing.assert_allclose(got.data, expected, rtol=1e-10)
    big = Tensor(np.array([1000.0, 1000.0, -1000.0, -1000.0], dtype=np.float32), requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        labels = np.array([1, 0, 1, 0], dtype=np.uint8)  # masks arrive as uint8
        loss = F.binary_cross_entropy_with_logits(big, labels, reduction="none")
        loss.backward(np.ones(4, np.float32))
    np.testing.assert_allclose(loss.data, [0.0, 1000.0, 1000.0, 0.0])
    np.testing.assert_allclose(big.grad, [0.0, 1.0, -1.0, 0.0])  # sigmoid(x) - t


def test_bce_empty_mean_and_errors():
    empty = Tensor(np.zeros((0, 28, 28)), requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(empty, np.zeros((0, 28, 28)))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 28, 28)
    with pytest.raises(ValueError, match="target shape"):
        F.binary_cross_entropy_with_logits(Tensor(np.zeros((2, 3))), np.zeros((3, 2)))


# ---- smooth L1 --------------------------------------------------------------------------------

def diffs_away_from_kinks(rng, shape, beta):
    """Targets such that |x - t| is at least 0.05 away from 0 and from beta."""
    d = rng.uniform(0.05, 3.0, shape) * rng.choice([-1.0, 1.0], shape)
    near_beta = np.abs(np.abs(d) - beta) < 0.05
    d[near_beta] += 0.1 * np.sign(d[near_beta])
    return d


@pytest.mark.parametrize("beta", [1.0, 0.5, 1 / 9, 0.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_gradient(rng, beta, reduction):
    x = logits64(rng, 4, 5)
    t = x.data - diffs_away_from_kinks(rng, (4, 5), beta)
    assert gradcheck(lambda x: F.smooth_l1_loss(x, t, beta=beta, reduction=reduction), [x])
    tt = Tensor(t, requires_grad=True)  # the target's gradient is the negative
    assert gradcheck(lambda x, t: F.smooth_l1_loss(x, t, beta=beta, reduction=reduction), [x, tt])


def test_smooth_l1_values_by_definition(rng):
    x, t = rng.standard_normal(10) * 2, rng.standard_normal(10)
    for beta in (1.0, 0.3, 0.0):
        expected = [0.5 * (a - b) ** 2 / beta if abs(a - b) < beta else abs(a - b) - 0.5 * beta
                    for a, b in zip(x, t)]
        got = F.smooth_l1_loss(Tensor(x, dtype=np.float64), Tensor(t, dtype=np.float64), beta=beta,
                               reduction="none")
        np.testing.assert_allclose(got.data, expected, rtol=1e-12)


def test_smooth_l1_errors():
    with pytest.raises(ValueError, match="beta"):
        F.smooth_l1_loss(Tensor(np.zeros(3)), np.zeros(3), beta=-1.0)
    with pytest.raises(ValueError, match="target shape"):
        F.smooth_l1_loss(Tensor(np.zeros(3)), np.zeros(4))


# ---- PyTorch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_losses_against_torch(rng, reduction):
    torch = pytest.importorskip("torch", reason="torch is only needed to compare results")
    tf = torch.nn.functional

    def compare(ours, theirs, x, *rest, grads_of=1):
        inputs = [Tensor(x, requires_grad=True)] + [Tensor(r, requires_grad=i < grads_of - 1)
                                                     for i, r in enumerate(rest)]
        tinputs = [torch.tensor(x, requires_grad=True)] + [torch.tensor(r, requires_grad=i < grads_of - 1)
                                                            for i, r in enumerate(rest)]
        y, ty = ours(*inputs), theirs(*tinputs)
        g = rng.standard_normal(y.shape).astype(np.float32)
        y.backward(g)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
        for a, t in zip(inputs[:grads_of], tinputs[:grads_of]):
            np.testing.assert_allclose(a.grad, t.grad.numpy(), rtol=1e-5, atol=1e-6)

    z = (rng.standard_normal((7, 5)) * 3).astype(np.float32)
    z[0, 0] = 60.0
    target = np.array([0, 4, -1, 2, 2, -1, 1])
    compare(lambda z: F.cross_entropy(z, target, reduction=reduction),
            lambda z: tf.cross_entropy(z, torch.tensor(target), ignore_index=-1, reduction=reduction), z)

    x = (rng.standard_normal((3, 8, 8)) * 4).astype(np.float32)
    x[0, 0, :2] = [80.0, -80.0]
    t = (rng.random((3, 8, 8)) > 0.5).astype(np.float32)
    compare(lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction=reduction),
            lambda x, t: tf.binary_cross_entropy_with_logits(x, t, reduction=reduction), x, t, grads_of=2)

    for beta in (1.0, 1 / 9, 0.0):
        x = rng.standard_normal((6, 4)).astype(np.float32)
        t = x - diffs_away_from_kinks(rng, (6, 4), beta).astype(np.float32)
        compare(lambda x, t: F.smooth_l1_loss(x, t, beta=beta, reduction=reduction),
                lambda x, t: tf.smooth_l1_loss(x, t, beta=beta, reduction=reduction), x, t, grads_of=2)


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    from minimask import to_device

    z = rng.standard_normal((6, 4)).astype(np.float32)
    target = np.array([0, 3, -1, 2, 1, 1])
    x = rng.standard_normal((2, 5, 5)).astype(np.float32)
    t = (rng.random((2, 5, 5)) > 0.5).astype(np.float32)
    results = []
    for device in ("cpu", "gpu"):
        a, b, c = (Tensor(to_device(v, device), requires_grad=True) for v in (z, x, x))
        loss = (F.cross_entropy(a, to_device(target, device))
                + F.binary_cross_entropy_with_logits(b, to_device(t, device))
                + F.smooth_l1_loss(c, to_device(t, device), beta=0.5))
        loss.backward()
        results.append([to_device(v, "cpu") for v in (loss.data, a.grad, b.grad, c.grad)])
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-6)
