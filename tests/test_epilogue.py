"""The fused conv epilogue at inference, relu(conv(x) + b + residual) in one pass
(``kernels/epilogue.py``, ``F.conv2d_relu``, ``nn.conv_norm(..., relu=True)``): the Numba loop
against the NumPy steps, the fused path against the unfused ops bit for bit, the training path's
gradients, and the cases that must not take the fused path."""

import numpy as np
import pytest

from minimask import F, Tensor, gradcheck, nn
from minimask.kernels.epilogue import bias_relu_, epilogue_reference
from minimask.tensor import no_grad


def unfused(x, w, b=None, residual=None, stride=1, padding=0, dilation=1):
    y = F.conv2d(x, w, b, stride, padding, dilation)
    return F.relu(y) if residual is None else F.add_relu(y, residual)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_b, with_r", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 16, 1, 1), (0, 4, 3, 3)])
def test_kernel_matches_the_numpy_steps(rng, dtype, with_b, with_r, shape):
    y = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape[1]).astype(dtype) if with_b else None
    r = rng.standard_normal(shape).astype(dtype) if with_r else None
    expected = epilogue_reference(y, b, r)
    out = bias_relu_(y, b, r)
    assert out is y  # in place
    np.testing.assert_array_equal(y, expected)
    assert not np.signbit(y).any()  # max(-0.0, 0) is +0, as np.maximum gives


def test_kernel_refuses_a_strided_array(rng):
    y = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)[..., ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        bias_relu_(y)


# 1x1 (no columns), 3x3 by im2col (stride 2), Winograd F(2x2) (64 channels, enough tiles) and
# F(4x4) (a 100x100 map): each conv method's output goes through the same epilogue
CONVS = [((2, 8, 9, 7), (6, 8, 1, 1), 1, 0), ((2, 5, 9, 7), (4, 5, 3, 3), 2, 1),
         ((4, 64, 30, 30), (64, 64, 3, 3), 1, 1), ((1, 8, 100, 100), (8, 8, 3, 3), 1, 1)]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONVS)
@pytest.mark.parametrize("with_b, with_r", [(False, False), (True, False), (True, True), (False, True)])
def test_fused_is_the_unfused_ops_to_the_bit(rng, x_shape, w_shape, stride, padding, with_b, with_r):
    x = Tensor(rng.standard_normal(x_shape).astype(np.float32))
    w = Tensor((rng.standard_normal(w_shape) * 0.2).astype(np.float32))
    b = Tensor(rng.standard_normal(w_shape[0]).astype(np.float32)) if with_b else None
    out_shape = unfused(x, w, b, None, stride, padding).shape
    r = Tensor(rng.standard_normal(out_shape).astype(np.float32)) if with_r else None
    with no_grad():
        fused = F.conv2d_relu(x, w, b, r, stride, padding)
        plain = unfused(x, w, b, r, stride, padding)
    np.testing.assert_array_equal(fused.data, plain.data)
    assert (fused.data > 0).any() and (fused.data == 0).any()  # both sides of the ReLU occur


def test_training_path_is_recorded_with_its_gradient(rng):
    """With a gradient wanted, conv2d_relu is conv2d then add_relu, each with its backward."""
    x = Tensor(rng.standard_normal((2, 3, 6, 5)), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)) * 0.3, requires_grad=True)
    b = Tensor(rng.standard_normal(4) * 0.1, requires_grad=True)
    r = Tensor(rng.standard_normal((2, 4, 6, 5)), requires_grad=True)
    y = F.conv2d_relu(x, w, b, r, padding=1)
    assert y.creator is not None
    assert gradcheck(lambda *t: F.conv2d_relu(*t, padding=1), [x, w, b, r])
    assert gradcheck(lambda *t: F.conv2d_relu(*t, stride=2), [x, w, b])


def test_unusual_inputs_take_the_unfused_ops(rng):
    """A broadcast residual is added as add_relu adds it; a bias of the wrong shape or dtype
    gets conv2d's own error (the Numba loop would read past it)."""
    x = Tensor(rng.standard_normal((2, 3, 6, 5)).astype(np.float32))
    w = Tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    r = Tensor(rng.standard_normal((1, 4, 1, 1)).astype(np.float32))
    with no_grad():
        np.testing.assert_array_equal(F.conv2d_relu(x, w, None, r, padding=1).data,
                                      unfused(x, w, None, r, padding=1).data)
        with pytest.raises(ValueError, match="bias must have shape"):
            F.conv2d_relu(x, w, Tensor(np.zeros(3, np.float32)))
        with pytest.raises(TypeError, match="one float dtype"):
            F.conv2d_relu(x, w, Tensor(np.zeros(4, np.float64)))


@pytest.mark.parametrize("norm_kind", ["frozen", "bn_eval"])
@pytest.mark.parametrize("x_shape", [(2, 3, 9, 7), (1, 3, 5, 3)])  # folded into the conv, or not
def test_conv_norm_with_relu_and_residual(rng, norm_kind, x_shape):
    """conv_norm(..., relu=True, residual=r) == add_relu(conv_norm(...), r), folded and fused at
    inference or not; and its gradients where the norm is frozen."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).astype(np.float64)
    norm = (nn.FrozenBatchNorm2d(4) if norm_kind == "frozen" else nn.BatchNorm2d(4)).astype(np.float64)
    norm.running_mean[:] = rng.standard_normal(4)
    norm.running_var[:] = rng.uniform(0.5, 2, 4)
    norm.eval()
    x = rng.standard_normal(x_shape)
    r = rng.standard_normal(conv(Tensor(x)).shape)
    with no_grad():
        got = nn.conv_norm(conv, norm, Tensor(x), relu=True, residual=Tensor(r)).data
        want = F.add_relu(nn.conv_norm(conv, norm, Tensor(x)), Tensor(r)).data
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(nn.conv_norm(conv, norm, Tensor(x), relu=True).data,
                                   F.relu(nn.conv_norm(conv, norm, Tensor(x))).data, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="relu=True"):
        nn.conv_norm(conv, norm, Tensor(x), residual=Tensor(r))
    if norm_kind == "frozen":
        assert gradcheck(lambda t, s: nn.conv_norm(conv, norm, t, relu=True, residual=s),
                         [Tensor(x, requires_grad=True), Tensor(r, requires_grad=True)])


def test_the_shapes_model_predicts_the_same_with_and_without_fusion(monkeypatch):
    """Every fused site of the model (ResNet blocks and stem, RPN head, mask head) at once:
    the detections of an untrained shapes model are the same bits as with the unfused ops."""
    from minimask.models import build_model
    from minimask.models.config import preset

    model = build_model(preset("shapes"))
    model.eval()
    image = np.random.default_rng(3).uniform(0, 1, (128, 128, 3)).astype(np.float32)
    fused = model.predict([image])[0]
    monkeypatch.setattr(F, "conv2d_relu", unfused)
    plain = model.predict([image])[0]
    assert len(fused["boxes"]) > 0 and set(fused) == set(plain)
    for key in fused:
        np.testing.assert_array_equal(np.asarray(fused[key]), np.asarray(plain[key]), err_msg=key)
