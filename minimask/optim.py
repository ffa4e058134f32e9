"""SGD with momentum and weight decay, and the warmup + step learning-rate schedule.

Mask R-CNN is trained with synchronized SGD, momentum 0.9, weight decay 1e-4, a learning rate
of 0.02 decreased by 10x at two milestones (He et al., ICCV 2017, Sec. 3.1, "Training"), after
a linear warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.2) that Detectron
uses so that the first large steps do not blow up a freshly initialised head.

The update is PyTorch's (torch.optim.SGD), per parameter p with gradient g:

    d   = g + weight_decay * p           (L2 regularisation folded into the gradient)
    buf = momentum * buf + d             (buf = d at the first step)
    d   = d + momentum * buf  if nesterov else  buf
    p   = p - lr * d

It works on the raw arrays (``p.data``, ``p.grad``) with array operators only, so the same
code updates NumPy and CuPy parameters, and records no graph.
"""

import bisect

import numpy as np

from .backend import to_device
from .tensor import Tensor, no_grad


class SGD:
    """Stochastic gradient descent over ``params``: an iterable of Parameters, or of dicts
    (param groups) ``{"params": [...], "lr": ..., "weight_decay": ...}`` whose settings
    override the defaults given here for that group only."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, "
                             f"got {lr}, {momentum}, {weight_decay}")
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        params = list(params)
        if not params:
            raise ValueError("SGD got an empty list of parameters")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        seen = set()
        for i, group in enumerate(params):
            unknown = set(group) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"param group {i} has unknown settings {sorted(unknown)}")
            g = dict(self.defaults, **group)
            g["params"] = list(g["params"])
            for p in g["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"param group {i} holds a {type(p).__name__}, not a Parameter/Tensor")
                if id(p) in seen:  # it would be updated twice per step
                    raise ValueError(f"a parameter appears in more than one group (group {i})")
                seen.add(id(p))
            if g["nesterov"] and g["momentum"] <= 0:
                raise ValueError(f"nesterov momentum needs momentum > 0 (param group {i})")
            self.param_groups.append(g)
        self.state = {}  # id(param) -> {"momentum_buffer": array}

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self):
        for p in self._params():
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient (parameters without one are left alone)."""
        with no_grad():
            for g in self.param_groups:
                lr, mom, wd = g["lr"], g["momentum"], g["weight_decay"]
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    d = p.grad
                    if wd != 0:
                        d = d + wd * p.data
                    if mom != 0:
                        st = self.state.setdefault(id(p), {})
                        buf = st.get("momentum_buffer")
                        if buf is None:
                            buf = st["momentum_buffer"] = d.copy()
                        else:
                            buf *= mom  # in place: the buffer stays on the parameter's device
                            buf += d
                        d = d + mom * buf if g["nesterov"] else buf
                    # In place, so that the Parameter (and anything sharing its array) sees it;
                    # the cast keeps float32 weights float32.
                    p.data -= (lr * d).astype(p.data.dtype, copy=False)

    def state_dict(self):
        """Settings and momentum buffers (NumPy copies), parameters named by their position in
        the groups, as PyTorch: ``{"state": {i: {"momentum_buffer": a}}, "param_groups": [...]}``."""
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {index[pid]: {k: np.array(to_device(v, "cpu"), copy=True) for k, v in s.items()}
                 for pid, s in self.state.items() if pid in index}
        groups = []
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = [index[id(p)] for p in g["params"]]
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore settings and momentum buffers, so that training resumes exactly.  Buffers go
        to the device and dtype of their parameter (a GPU run can resume a CPU checkpoint)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state does not match: group sizes "
                             f"{[len(g['params']) for g in groups]} saved vs "
                             f"{[len(g['params']) for g in self.param_groups]} here")
        for saved, g in zip(groups, self.param_groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        params = self._params()
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            # astype copies: the optimizer never shares an array with the saved dict.
            self.state[id(p)] = {k: to_device(v, p.device).astype(p.dtype) for k, v in s.items()}


def param_groups_no_decay(module, weight_decay, norm_and_bias_decay=0.0):
    """Two param groups for SGD: weights decayed by ``weight_decay``, and the parameters of
    normalisation layers plus every bias decayed by ``norm_and_bias_decay`` (Detectron2's
    WEIGHT_DECAY_NORM and WEIGHT_DECAY_BIAS).  Decaying a norm layer's scale or a bias toward 0
    does not regularise the function the way decaying a weight does; it only fights the
    normalisation."""
    from .nn.layers import BatchNorm2d, FrozenBatchNorm2d

    norm_types = (BatchNorm2d, FrozenBatchNorm2d)
    decay, no_decay, seen = [], [], set()
    for _, m in module.named_modules():
        for name, p in m._parameters.items():
            if p is None or id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if isinstance(m, norm_types) or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": norm_and_bias_decay}]
    return [g for g in groups if g["params"]]


class WarmupMultiStepLR:
    """Detectron2's schedule: at iteration ``it`` every group's lr is base_lr times

        warmup(it) * gamma ** (number of milestones <= it)

    with warmup(it) = warmup_factor * (1 - a) + a, a = it / warmup_iters, while
    it < warmup_iters ("linear"; "constant" uses warmup_factor), and 1 after.

    Call ``step()`` once after every ``optimizer.step()``; made at iteration 0, it has already
    set the lr for the first step (as PyTorch's schedulers do)."""

    def __init__(self, optimizer, milestones, gamma=0.1, warmup_iters=1000, warmup_factor=1.0 / 1000,
                 warmup_method="linear"):
        milestones = list(milestones)
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {milestones}")
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method must be 'linear' or 'constant', got {warmup_method!r}")
        self.optimizer = optimizer
        self.milestones, self.gamma = milestones, gamma
        self.warmup_iters, self.warmup_factor, self.warmup_method = warmup_iters, warmup_factor, warmup_method
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_iter = 0
        self._apply()

    def factor(self, it):
        """The multiplier of the base lr at iteration ``it``."""
        warm = 1.0
        if it < self.warmup_iters:
            if self.warmup_method == "constant":
                warm = self.warmup_factor
            else:
                a = it / self.warmup_iters
                warm = self.warmup_factor * (1 - a) + a
        # bisect_right counts the milestones <= it: the lr drops at the milestone itself.
        return warm * self.gamma ** bisect.bisect_right(self.milestones, it)

    def get_lr(self):
        """The lr of every group at the current iteration."""
        return [base * self.factor(self.last_iter) for base in self.base_lrs]

    def _apply(self):
        for g, lr in zip(self.optimizer.param_groups, self.get_lr()):
            g["lr"] = lr

    def step(self):
        self.last_iter += 1
        self._apply()

    def state_dict(self):
        return {"last_iter": self.last_iter, "base_lrs": list(self.base_lrs),
                "milestones": list(self.milestones),
                "gamma": self.gamma, "warmup_iters": self.warmup_iters, "warmup_factor": self.warmup_factor,
                "warmup_method": self.warmup_method}

    def load_state_dict(self, state):
        self.last_iter = int(state["last_iter"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self.milestones = [int(m) for m in state["milestones"]]
        self.gamma, self.warmup_iters = float(state["gamma"]), int(state["warmup_iters"])
        self.warmup_factor, self.warmup_method = float(state["warmup_factor"]), str(state["warmup_method"])
        self._apply()
