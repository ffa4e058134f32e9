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
    # the message names the op and what it had saved, and the way out
    with pytest.raises(RuntimeError, match=r"Sum a second time: what it saved for backward \(in_shape\) "
                                           r"was freed.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4.0)


# ---- saved state: what a node holds until backward, and its release -----------------------
def _arrays_held(f):
    """Names of the attributes of Function ``f`` that hold an array (directly or in a list/tuple)."""
    def has_array(v):
        if isinstance(v, (list, tuple)):
            return any(has_array(u) for u in v)
        return isinstance(v, np.ndarray) or isinstance(v, Tensor)
    return sorted(k for k, v in vars(f).items() if k != "inputs" and has_array(v))


def _functions(root):
    """Every Function of the graph that made ``root`` (walked before backward releases it)."""
    found, stack = {}, [root.creator]
    while stack:
        f = stack.pop()
        if f is None or id(f) in found:
            continue
        found[id(f)] = f
        stack.extend(x.creator for x in f.inputs)
    return list(found.values())


def _function_classes():
    """Every Function subclass defined in minimask (minimask.functional and anything it imports)."""
    import minimask.functional  # noqa: F401 - defines the subclasses

    classes, stack = set(), [mm.Function]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub.__module__.startswith("minimask."):
                classes.add(sub)
            stack.append(sub)
    return classes


def _small_detector_graph(rng):
    """A loss through one of each kind of op a Mask R-CNN step uses (float64, all inputs leaves)."""
    x = t64(rng, 2, 3, 8, 8)
    w, b = t64(rng, 4, 3, 3, 3), t64(rng, 4)
    gamma, beta = t64(rng, 4), t64(rng, 4)
    running_mean, running_var = np.zeros(4), np.ones(4)
    rois = np.array([[0, 0.5, 1.0, 6.0, 7.5], [1, 2.0, 1.5, 7.0, 5.0], [1, 0.0, 0.0, 3.0, 3.0]])
    fc = t64(rng, 5, 4 * 3 * 3)
    y = F.conv2d(x, w, b, padding=1)
    y = F.batch_norm(y, running_mean, running_var, gamma, beta, training=True)
    y = F.relu(y)
    y = F.max_pool2d(y, 2, stride=1)
    y = F.interpolate(y, size=(9, 10), mode="bilinear")
    y = F.frozen_batch_norm(y, np.zeros(4), np.ones(4), np.full(4, 2.0), np.zeros(4))
    feats = F.roi_align(y, rois, 3, spatial_scale=1.0, sampling_ratio=2)
    logits = F.flatten(feats, 1) @ fc.T
    loss = F.cross_entropy(logits, np.array([1, 4, -1])) + F.smooth_l1_loss(
        F.sigmoid(logits[:, :2]), rng.standard_normal((3, 2)), beta=0.5)
    return loss, [x, w, b, gamma, beta, fc]


def test_backward_frees_every_array_a_node_saved(rng):
    """After backward no Function of the graph holds an array: what each named with
    save_for_backward is gone, its inputs are stand-ins without data (the RoI boxes and the loss
    target too, which are constant inputs), and only plain settings (stride, eps) remain."""
    loss, leaves = _small_detector_graph(rng)
    nodes = _functions(loss)
    kinds = {type(f).__name__ for f in nodes}
    assert {"Conv2dFn", "BatchNormTrain", "ReLU", "MaxPool2dFn", "BilinearResize", "FrozenBatchNorm",
            "RoIAlignFn", "Reshape", "MatMul", "CrossEntropy", "SmoothL1", "Sigmoid", "GetItem"} <= kinds
    before = {id(f): _arrays_held(f) for f in nodes}
    assert type(loss.creator).__name__ == "Add" and before[id(loss.creator)] == []  # it saved shapes only
    for f in nodes:
        assert set(before[id(f)]) <= set(f.saved_names), type(f).__name__  # every array it holds is named
    assert any(before.values())
    loss.backward()
    for f in nodes:
        assert f.freed and _arrays_held(f) == [], (type(f).__name__, _arrays_held(f))
        assert not any(hasattr(f, k) for k in f.saved_names), type(f).__name__
        assert all(not hasattr(x, "data") for x in f.inputs)  # _Freed stand-ins
    assert all(t.grad is not None for t in leaves)


def _one_call_per_function_class(rng):
    """(class name, loss) pairs: a small graph through each Function subclass of minimask."""
    x4, x2 = t64(rng, 2, 3, 6, 6), t64(rng, 3, 4)
    pos = t64(rng, 3, 4, positive=True)
    w4 = t64(rng, 3, 3, 3, 3)
    rois = np.array([[0, 0.5, 1.0, 5.0, 4.5], [1, 1.0, 0.0, 5.5, 5.0]])
    c = np.ones(3)
    return [
        ("Add", x2 + pos), ("Sub", x2 - pos), ("Mul", x2 * pos), ("Div", x2 / pos), ("Neg", -x2),
        ("Pow", x2 ** 3), ("Exp", x2.exp()), ("Log", pos.log()), ("Sqrt", F.sqrt(pos)), ("Abs", F.abs(x2)),
        ("Cast", x2.astype(np.float32)), ("Sum", x2.sum(axis=1)), ("MatMul", x2 @ pos.T),
        ("Reshape", x2.reshape(12)), ("Transpose", x2.T), ("GetItem", x2[x2.data > 0]),
        ("Concat", F.concat([x2, pos], axis=1)), ("Stack", F.stack([x2, pos])),
        ("Pad", F.pad2d(x4, (1, 0, 0, 1))),
        ("ReLU", F.relu(x2)), ("AddReLU", F.add_relu(x2, x2 * 0.5)),
        ("Sigmoid", F.sigmoid(x2)), ("Softmax", F.softmax(x2)),
        ("LogSoftmax", F.log_softmax(x2)), ("Linear", F.linear(x2, pos, t64(rng, 3))),
        ("Conv2dFn", F.conv2d(x4, w4, stride=2)), ("ConvTranspose2dFn", F.conv_transpose2d(x4, w4, stride=2)),
        ("MaxPool2dFn", F.max_pool2d(x4, 3, 1, 1)),
        ("BatchNormTrain", F.batch_norm(x4, None, None, training=True)),
        ("BatchNormEval", F.batch_norm(x4, np.zeros(3), c, c, c)),
        ("FrozenBatchNorm", F.frozen_batch_norm(x4, np.zeros(3), c, c, c)),
        ("NearestResize", F.interpolate(x4, size=(7, 9))),
        ("BilinearResize", F.interpolate(x4, size=(4, 9), mode="bilinear")),
        ("CrossEntropy", F.cross_entropy(x2, np.array([0, 3, -1]))),
        ("BinaryCrossEntropyWithLogits", F.binary_cross_entropy_with_logits(x2, rng.random((3, 4)))),
        ("SmoothL1", F.smooth_l1_loss(x2, rng.standard_normal((3, 4)))),
        ("RoIAlignFn", F.roi_align(x4, rois, 2)), ("RoIPoolFn", F.roi_pool(x4, rois, 2)),
    ]


def test_every_function_class_releases_exactly(rng):
    """Each Function subclass of minimask, through one call: before backward every array it
    holds is named in saved_names; after backward none is left."""
    cases = _one_call_per_function_class(rng)
    assert {name for name, _ in cases} == {c.__name__ for c in _function_classes()}  # a new one needs a case
    for name, y in cases:
        f = y.creator
        assert type(f).__name__ == name
        assert set(_arrays_held(f)) <= set(f.saved_names), name
        y.backward(rng.standard_normal(y.shape).astype(y.dtype))
        assert f.freed and _arrays_held(f) == [], (name, _arrays_held(f))


def test_retain_graph_keeps_the_saved_state(rng):
    loss, leaves = _small_detector_graph(rng)
    nodes = _functions(loss)
    held = {id(f): _arrays_held(f) for f in nodes}
    loss.backward(retain_graph=True)
    first = [t.grad.copy() for t in leaves]
    for f in nodes:
        assert not f.freed and _arrays_held(f) == held[id(f)], type(f).__name__
    for t in leaves:
        t.grad = None
    loss.backward()  # the same graph again: the same gradients
    for t, g in zip(leaves, first):
        np.testing.assert_array_equal(t.grad, g)
    assert all(f.freed and _arrays_held(f) == [] for f in nodes)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()


def test_save_for_backward_refuses_to_shadow_a_setting():
    """release deletes what was saved, so saving under a setting's (or the engine's) name would
    lose the setting: refused."""
    class Scale(mm.Function):
        def __init__(self, k):
            self.k = k

        def forward(self, x):
            self.save_for_backward(k=x)
            return x * self.k

    with pytest.raises(AttributeError, match="'k' is already an attribute"):
        Scale(2.0)(Tensor(np.ones(2), requires_grad=True))

    class Inputs(mm.Function):
        def forward(self, x):
            self.save_for_backward(inputs=x)
            return x

    with pytest.raises(AttributeError, match="'inputs'"):
        Inputs()(Tensor(np.ones(2), requires_grad=True))


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
            self.save_for_backward(x=x)
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


def test_forward_knows_whether_it_is_recorded(rng):
    """``Function.recording``, set before forward: True when backward will run through this
    call, False under no_grad or when no input wants a gradient (ReLU then keeps no mask)."""
    from minimask.functional.activation import ReLU
    from minimask.tensor import Function

    class Probe(Function):
        def forward(self, x):
            self.seen = self.recording  # a plain attribute: not state for backward
            return x * 2

        def backward(self, gy):
            return gy * 2

    x = Tensor(rng.standard_normal(3), requires_grad=True)
    calls = [Probe(), Probe(), Probe()]
    calls[0](x)
    with no_grad():
        calls[1](x)
    calls[2](Tensor(x.data))  # a constant input
    assert [c.seen for c in calls] == [True, False, False]
    relu = ReLU()
    with no_grad():
        y = relu(x)
    assert not hasattr(relu, "positive") and y.creator is None
    np.testing.assert_array_equal(y.data, np.maximum(x.data, 0))
