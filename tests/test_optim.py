"""SGD and the warmup + multistep schedule: each update against the formula written out here,
per-group settings, and a save / resume that continues exactly."""

import copy

import numpy as np
import pytest

from minimask import Tensor, nn, no_grad
from minimask.optim import SGD, WarmupMultiStepLR, param_groups_no_decay


def make_params(rng, dtype=np.float64):
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in [(3, 2), (4,)]]


def grads_for(rng, params, steps):
    """A different random gradient for every parameter at every step."""
    return [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]


def sgd_by_hand(p0, grads, lr, momentum, wd, nesterov):
    """PyTorch's SGD for one parameter, written element-free in plain NumPy."""
    p, buf = p0.copy(), None
    for g in grads:
        d = g + wd * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


@pytest.mark.parametrize("momentum,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.0, 1e-2, False),
                                                  (0.9, 1e-2, False), (0.9, 1e-2, True)])
def test_sgd_three_steps_match_the_formula(rng, momentum, wd, nesterov):
    params = make_params(rng)
    start = [p.data.copy() for p in params]
    grads = grads_for(rng, params, 3)
    opt = SGD(params, lr=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.copy()
        opt.step()
    for i, p in enumerate(params):
        want = sgd_by_hand(start[i], [s[i] for s in grads], 0.1, momentum, wd, nesterov)
        np.testing.assert_allclose(p.data, want, rtol=1e-12, atol=1e-12)


def test_sgd_matches_torch(rng):
    torch = pytest.importorskip("torch", reason="torch is only used as an independent reference")
    params = make_params(rng)
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    grads = grads_for(rng, params, 3)
    opt = SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    topt = torch.optim.SGD(tparams, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for step in grads:
        for p, tp, g in zip(params, tparams, step):
            p.grad = g.copy()
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_per_group_settings_and_no_decay_group(rng):
    w, b = make_params(rng)
    w0, b0 = w.data.copy(), b.data.copy()
    grads = grads_for(rng, [w, b], 3)
    opt = SGD([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lr": 0.3}], lr=0.1, momentum=0.9,
              weight_decay=0.05)
    for gw, gb in grads:
        w.grad, b.grad = gw.copy(), gb.copy()
        opt.step()
    want_w = sgd_by_hand(w0, [g[0] for g in grads], 0.1, 0.9, 0.05, False)
    want_b = sgd_by_hand(b0, [g[1] for g in grads], 0.3, 0.9, 0.0, False)  # its own lr, no decay
    np.testing.assert_allclose(w.data, want_w, rtol=1e-12)
    np.testing.assert_allclose(b.data, want_b, rtol=1e-12)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.frozen = nn.FrozenBatchNorm2d(3)
        self.fc = nn.Linear(3, 4)


def test_param_groups_no_decay_puts_norm_and_bias_apart():
    m = ConvBN()
    groups = param_groups_no_decay(m, weight_decay=1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(m.conv.weight), id(m.fc.weight)}
    assert ids[1] == {id(m.bn.weight), id(m.bn.bias), id(m.fc.bias)}  # frozen BN has no parameters

    # With zero gradients, only decay moves a parameter: the weights shrink, the rest stay.
    before = {n: p.data.copy() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = np.zeros_like(p.data)
    SGD(groups, lr=0.5).step()
    for n, p in m.named_parameters():
        if n in ("conv.weight", "fc.weight"):
            np.testing.assert_allclose(p.data, before[n] * (1 - 0.5 * 1e-4), rtol=1e-6)
        else:
            np.testing.assert_array_equal(p.data, before[n])


def test_step_skips_params_without_grad_and_records_no_graph(rng):
    a, b = make_params(rng)
    b0 = b.data.copy()
    a.grad = rng.standard_normal(a.shape)
    opt = SGD([a, b], lr=0.1, momentum=0.9)
    with no_grad():  # stepping inside no_grad is fine too
        opt.step()
    np.testing.assert_array_equal(b.data, b0)
    assert a.creator is None and a.requires_grad and isinstance(a, nn.Parameter)
    opt.zero_grad()
    assert a.grad is None


def test_float32_params_stay_float32(rng):
    p = nn.Parameter(rng.standard_normal((5,)).astype(np.float32))
    arr = p.data
    p.grad = rng.standard_normal((5,))  # a float64 gradient must not promote the weight
    SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4).step()
    assert p.dtype == np.float32 and p.data is arr  # updated in place


def test_sgd_rejects_bad_settings(rng):
    a, b = make_params(rng)
    with pytest.raises(ValueError, match="nesterov"):
        SGD([a], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="more than one group"):
        SGD([{"params": [a]}, {"params": [a, b]}], lr=0.1)
    with pytest.raises(ValueError, match="unknown settings"):
        SGD([{"params": [a], "betas": 0.9}], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)


# ---- the schedule ---------------------------------------------------------------------------------

def test_warmup_multistep_values_by_hand(rng):
    a, b = make_params(rng)
    opt = SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.02)
    sched = WarmupMultiStepLR(opt, milestones=[10, 20], gamma=0.1, warmup_iters=5, warmup_factor=0.001)
    # factor(it) = (0.001 * (1 - it/5) + it/5 while it < 5, else 1) * 0.1 ** #{milestones <= it}
    want = {0: 0.001, 2: 0.001 * 0.6 + 0.4, 4: 0.001 * 0.2 + 0.8, 5: 1.0, 9: 1.0,
            10: 0.1, 19: 0.1, 20: 0.01, 25: 0.01}
    seen = {}
    for it in range(26):
        if it in want:
            seen[it] = [g["lr"] for g in opt.param_groups]
            assert sched.get_lr() == seen[it]
        sched.step()
    for it, f in want.items():
        np.testing.assert_allclose(seen[it], [0.02 * f, 0.01 * f], rtol=1e-12)


def test_warmup_constant_and_milestone_inside_warmup(rng):
    opt = SGD(make_params(rng), lr=1.0)
    sched = WarmupMultiStepLR(opt, milestones=[2], gamma=0.5, warmup_iters=4, warmup_factor=0.25,
                              warmup_method="constant")
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(lrs, [0.25, 0.25, 0.125, 0.125, 0.5, 0.5])
    with pytest.raises(ValueError, match="increasing"):
        WarmupMultiStepLR(opt, milestones=[5, 3])
    with pytest.raises(ValueError, match="warmup_method"):
        WarmupMultiStepLR(opt, milestones=[5], warmup_method="cosine")


# ---- resuming -----------------------------------------------------------------------------------

def make_run(seed):
    nn.init.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = SGD(param_groups_no_decay(model, 1e-2), lr=0.1, momentum=0.9, nesterov=True)
    sched = WarmupMultiStepLR(opt, milestones=[3], warmup_iters=2, warmup_factor=0.1)
    return model, opt, sched


def train_steps(model, opt, sched, grads):
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g.astype(np.float32)
        opt.step()
        sched.step()


def test_state_dicts_resume_exactly(rng, tmp_path):
    model, opt, sched = make_run(0)
    grads = grads_for(rng, list(model.parameters()), 5)
    train_steps(model, opt, sched, grads[:2])
    model.save(tmp_path / "model.npz")
    opt_state, sched_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    train_steps(model, opt, sched, grads[2:])  # the run we should reproduce

    model2, opt2, sched2 = make_run(1)  # different weights, fresh momentum and schedule
    model2.load(tmp_path / "model.npz")
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)  # iteration 2: warmup over, no milestone yet
    train_steps(model2, opt2, sched2, grads[2:])
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=n)
    assert sched2.get_lr() == sched.get_lr()


def test_optimizer_state_dict_is_a_copy_and_checks_groups(rng):
    params = make_params(rng)
    opt = SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1] and sd["param_groups"][0]["params"] == [0, 1]
    opt.step()  # must not change the snapshot
    np.testing.assert_array_equal(sd["state"][0]["momentum_buffer"], np.ones((3, 2)))
    with pytest.raises(ValueError, match="group sizes"):
        SGD(params[:1], lr=0.1).load_state_dict(sd)


@pytest.mark.gpu
def test_sgd_on_gpu_matches_cpu(rng):
    params = make_params(rng)
    gparams = [nn.Parameter(p.data.copy()) for p in params]
    for p in gparams:
        p.data = p.to("gpu").data
    grads = grads_for(rng, params, 3)
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    gopt = SGD(gparams, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    for step in grads:
        for p, gp, g in zip(params, gparams, step):
            p.grad = g.copy()
            gp.grad = Tensor(g).to("gpu").data
        opt.step()
        gopt.step()
    for p, gp in zip(params, gparams):
        assert gp.device == "gpu"
        np.testing.assert_allclose(gp.numpy(), p.data, rtol=1e-12)
    # A GPU optimizer resumes from a CPU state dict: buffers move to the parameters' device.
    gopt.load_state_dict(opt.state_dict())
    assert all(type(s["momentum_buffer"]).__module__.startswith("cupy") for s in gopt.state.values())
