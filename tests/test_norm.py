"""Batch normalization: gradients through the batch statistics (training) and through the fixed
running statistics (eval), running-statistic updates against a hand computation, the frozen
affine form, and PyTorch's numbers."""

import numpy as np
import pytest

from minimask import F, Tensor, gradcheck


def params(rng, c):
    w = Tensor(rng.uniform(0.5, 1.5, c), requires_grad=True)
    b = Tensor(rng.standard_normal(c), requires_grad=True)
    return w, b


@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (6, 3), (2, 3, 1, 1)])
def test_training_gradient_through_batch_statistics(rng, shape):
    x = Tensor(rng.standard_normal(shape) * 2 + 1, requires_grad=True)
    w, b = params(rng, shape[1])
    assert gradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), [x, w, b])


def test_training_gradient_without_affine(rng):
    x = Tensor(rng.standard_normal((4, 3, 2, 2)), requires_grad=True)
    assert gradcheck(lambda x: F.batch_norm(x, None, None, training=True), [x])


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (5, 3), (1, 3, 2, 2)])
def test_eval_gradient(rng, shape):
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    w, b = params(rng, 3)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    assert gradcheck(lambda x, w, b: F.batch_norm(x, mean, var, w, b, training=False), [x, w, b])


def test_training_output_is_normalized_per_channel(rng):
    x = rng.standard_normal((4, 3, 5, 6)) * np.array([1.0, 5.0, 0.1])[:, None, None] + 3.0
    y = F.batch_norm(Tensor(x, dtype=np.float64), None, None, training=True, eps=0.0).data
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-10)


def test_running_statistics_update_by_hand(rng):
    x = rng.standard_normal((3, 2, 4, 5)) * 3 + 1
    running_mean = Tensor(np.array([0.5, -1.0]), dtype=np.float64)
    running_var = np.array([2.0, 0.25])  # a plain array works too
    mean_buffer = running_mean.data
    momentum = 0.3
    old_mean, old_var = running_mean.data.copy(), running_var.copy()
    F.batch_norm(Tensor(x, dtype=np.float64), running_mean, running_var, None, None, training=True,
                 momentum=momentum)
    for c in range(2):
        values = [x[n, c, i, j] for n in range(3) for i in range(4) for j in range(5)]
        n = len(values)
        mu = sum(values) / n
        unbiased = sum((v - mu) ** 2 for v in values) / (n - 1)
        assert running_mean.data[c] == pytest.approx((1 - momentum) * old_mean[c] + momentum * mu, rel=1e-12)
        assert running_var[c] == pytest.approx((1 - momentum) * old_var[c] + momentum * unbiased, rel=1e-12)
    assert running_mean.data is mean_buffer  # updated in place: a module's buffer sees it


def test_eval_uses_running_statistics_and_leaves_them(rng):
    x = rng.standard_normal((2, 3, 2, 2))
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    mean0, var0 = mean.copy(), var.copy()
    y = F.batch_norm(Tensor(x, dtype=np.float64), mean, var, w, b, training=False, eps=1e-3).data
    for n, c, i, j in np.ndindex(x.shape):
        expected = (x[n, c, i, j] - mean[c]) / np.sqrt(var[c] + 1e-3) * w[c] + b[c]
        assert y[n, c, i, j] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(mean, mean0)
    np.testing.assert_array_equal(var, var0)


def test_float32_running_buffers_with_float64_input(rng):
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = F.batch_norm(Tensor(rng.standard_normal((4, 3)), dtype=np.float64), running_mean, running_var,
                     training=True)
    assert y.dtype == np.float64 and running_mean.dtype == np.float32 and np.any(running_mean != 0)


def test_errors(rng):
    x = Tensor(rng.standard_normal((1, 3, 1, 1)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="needs running_mean"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="one value per channel"):
        F.batch_norm(Tensor(rng.standard_normal((2, 3))), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        F.batch_norm(Tensor(rng.standard_normal(3)), np.zeros(3), np.ones(3))


def test_frozen_batch_norm_gradient_to_x_only(rng):
    x = Tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    w, b = params(rng, 3)
    assert gradcheck(lambda x: F.frozen_batch_norm(x, mean, var, w, b), [x])
    x.grad = None
    F.frozen_batch_norm(x, mean, var, w, b).sum().backward()
    assert w.grad is None and b.grad is None  # the affine is a constant
    scale = w.data / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(x.grad, np.broadcast_to(scale[:, None, None], x.shape))


def test_frozen_equals_eval_batch_norm(rng):
    x = Tensor(rng.standard_normal((2, 3, 4, 4)), dtype=np.float64)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    np.testing.assert_allclose(F.frozen_batch_norm(x, mean, var, w, b).data,
                               F.batch_norm(x, mean, var, w, b, training=False).data, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (8, 3)])
def test_training_against_torch(rng, shape):
    torch = pytest.importorskip("torch", reason="torch is only needed to compare results")
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    ours_rm, ours_rv = rm.copy(), rv.copy()
    a, aw, ab = (Tensor(v, requires_grad=True) for v in (x, w, b))
    y = F.batch_norm(a, ours_rm, ours_rv, aw, ab, training=True, momentum=0.2, eps=1e-5)
    y.backward(g)
    t, tw, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = torch.nn.functional.batch_norm(t, trm, trv, tw, tb, training=True, momentum=0.2, eps=1e-5)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_rm, trm.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_rv, trv.numpy(), rtol=1e-5, atol=1e-6)
    for ours_g, theirs_g in ((a.grad, t.grad), (aw.grad, tw.grad), (ab.grad, tb.grad)):
        np.testing.assert_allclose(ours_g, theirs_g.numpy(), rtol=1e-4, atol=1e-4)


def test_eval_and_frozen_against_torch(rng):
    torch = pytest.importorskip("torch", reason="torch is only needed to compare results")
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    a, aw, ab = (Tensor(v, requires_grad=True) for v in (x, w, b))
    F.batch_norm(a, rm, rv, aw, ab, training=False).backward(g)
    t, tw, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    ty = torch.nn.functional.batch_norm(t, torch.tensor(rm), torch.tensor(rv), tw, tb, training=False)
    ty.backward(torch.tensor(g))
    for ours_g, theirs_g in ((a.grad, t.grad), (aw.grad, tw.grad), (ab.grad, tb.grad)):
        np.testing.assert_allclose(ours_g, theirs_g.numpy(), rtol=1e-4, atol=1e-4)
    frozen = F.frozen_batch_norm(Tensor(x), rm, rv, w, b).data
    np.testing.assert_allclose(frozen, ty.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    from minimask import to_device

    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    for training in (True, False):
        results = []
        for device in ("cpu", "gpu"):
            rm, rv = to_device(np.zeros(3, np.float32), device), to_device(np.ones(3, np.float32), device)
            a = Tensor(to_device(x, device), requires_grad=True)
            aw, ab = (Tensor(to_device(v, device), requires_grad=True) for v in (w, b))
            y = F.batch_norm(a, rm, rv, aw, ab, training=training)
            y.backward(to_device(g, device))
            z = F.frozen_batch_norm(Tensor(to_device(x, device)), rm, rv, w, b)
            results.append([to_device(v, "cpu") for v in (y.data, a.grad, aw.grad, ab.grad, rm, rv, z.data)])
        for cpu, gpu in zip(*results):
            np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)
