"""Checkpoints: everything a run needs to stop and go on, in one ``.npz`` file.

Training Mask R-CNN takes hours (the paper's schedule is 90k iterations, Sec. 3.1), so a run
must survive being stopped.  Resuming *exactly* (the same losses as a run that never stopped)
needs more than the weights:

    model.<name>          every parameter and buffer (batch-norm running statistics too)
    optim.<i>.<key>       SGD's momentum buffers, parameter ``i`` in the optimizer's order
    meta                  one JSON string: the config, the iteration, the learning-rate
                          scheduler's state, the optimizer's settings, the data loader's seed

The data loader needs no state of its own: its order and flips are a pure function of
``(seed, iteration)`` (see ``data/loader.py``), so the seed and the iteration say where it was.

Arrays are stored as NumPy (copied off the GPU), so a checkpoint loads on either device.  The
file is written to a temporary name (``.model_*.npz.*.partial``) in the same folder, synced to disk and
renamed over the final name (``nn.save_npz``): a crash, a kill or a power cut while writing
leaves the previous checkpoints whole and no ``model_*.npz`` half written; a killed run leaves
at most its temporary file, which the next run removes (``remove_unfinished``).  Should a
checkpoint still be unreadable (a copied file cut short, a full disk elsewhere),
``resumable_checkpoint`` names it and falls back to the newest one that loads.

Files are named ``model_0000500.npz`` after the number of iterations *completed*, which is
also the iteration a resumed run starts from.
"""

import json
import os
import re

import numpy as np

from ..nn import load_npz, save_npz

_NAME = re.compile(r"^model_(\d{7})\.npz$")


def checkpoint_path(run_dir, iteration):
    """``run_dir/model_0000500.npz`` for ``iteration`` = 500 iterations done."""
    return os.path.join(run_dir, f"model_{int(iteration):07d}.npz")


def list_checkpoints(run_dir):
    """Checkpoint paths in ``run_dir``, oldest (fewest iterations) first."""
    if not os.path.isdir(run_dir):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _NAME.match(name)))
    return [os.path.join(run_dir, name) for _, name in found]


def latest_checkpoint(run_dir):
    """The checkpoint of ``run_dir`` with the most iterations, or None if there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _flatten_optimizer(state):
    """SGD's nested state dict -> (arrays, settings).  ``{"state": {3: {"momentum_buffer": a}}}``
    becomes the array ``optim.3.momentum_buffer``; the param groups (numbers only) go to JSON."""
    arrays = {f"optim.{i}.{key}": value for i, s in state["state"].items() for key, value in s.items()}
    return arrays, state["param_groups"]


def _unflatten_optimizer(arrays, param_groups):
    state = {}
    for name, value in arrays.items():
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = value
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(path, model, optimizer=None, scheduler=None, config=None, iteration=0,
                    loader=None, extra=None):
    """Write one checkpoint atomically.

    model, optimizer, scheduler: objects with ``state_dict()`` (optimizer and scheduler may be
    None, e.g. for a model exported for prediction only).
    config:   the run's ``MaskRCNNConfig`` (saved as a dict, so the model can be rebuilt).
    loader:   the training ``DataLoader``: its seed and batch size are saved (its position is
              ``iteration``).
    extra:    any JSON-able dict, kept under ``meta["extra"]``.
    """
    from ..models.config import to_dict

    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"iteration": int(iteration), "format": 1}
    if config is not None:
        meta["config"] = to_dict(config)
    if optimizer is not None:
        optim_arrays, meta["optim_param_groups"] = _flatten_optimizer(optimizer.state_dict())
        arrays.update(optim_arrays)
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    if loader is not None:
        meta["loader"] = {"seed": loader.seed, "batch_size": loader.batch_size, "position": int(iteration)}
    if extra is not None:
        meta["extra"] = extra
    # A 0-d string array: stored as plain text in the .npz, read back without pickle.
    arrays["meta"] = np.array(json.dumps(meta))
    save_npz(path, arrays)
    return path


def load_checkpoint(path):
    """Read a checkpoint into a dict: ``model`` (name -> array), ``optim`` (SGD's nested state
    dict, or None), ``scheduler`` (dict or None), ``config`` (a ``MaskRCNNConfig`` or None),
    ``iteration``, ``loader`` (dict or None), ``extra``."""
    from ..models.config import from_dict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        arrays = load_npz(path)
    except Exception as e:  # zip errors, pickled content, ...: say which file is bad
        raise ValueError(f"{path}: not a readable minimask checkpoint ({type(e).__name__}: {e})") from None
    if "meta" not in arrays:
        raise ValueError(f"{path}: not a minimask checkpoint (no 'meta' entry; a bare model "
                         f"state dict has only weights)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
        model = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
        optim_arrays = {k: v for k, v in arrays.items() if k.startswith("optim.")}
        optim = (_unflatten_optimizer(optim_arrays, meta["optim_param_groups"])
                 if "optim_param_groups" in meta else None)
        config = from_dict(meta["config"]) if "config" in meta else None
        iteration = int(meta.get("iteration", 0))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a damaged or foreign 'meta'
        raise ValueError(f"{path}: not a readable minimask checkpoint (its settings: "
                         f"{type(e).__name__}: {e})") from None
    return {
        "model": model,
        "optim": optim,
        "scheduler": meta.get("scheduler"),
        "config": config,
        "iteration": iteration,
        "loader": meta.get("loader"),
        "extra": meta.get("extra"),
    }


def resumable_checkpoint(run_dir, log=print):
    """``(path, state)`` of the newest checkpoint of ``run_dir`` that loads and holds a training
    state (optimizer, schedule, data seed), or ``(None, None)`` if there is no checkpoint.

    An unreadable newer one is named in a warning and passed over; if none can be used the
    error lists them all."""
    found = list_checkpoints(run_dir)
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
            missing = [k for k in ("optim", "scheduler", "loader") if state[k] is None]
            if missing:
                raise ValueError(f"{path}: holds no training state ({', '.join(missing)} missing), so "
                                 f"training cannot continue from it")
        except (ValueError, OSError) as e:
            problems.append(str(e))
            continue
        for problem in problems:
            log(f"warning: {problem}; resuming from the previous good checkpoint, {path}")
        return path, state
    if problems:
        raise ValueError(f"no checkpoint in {run_dir} can be resumed from:\n  " + "\n  ".join(problems) +
                         "\nremove them to start afresh, or choose another --out")
    return None, None


def remove_unfinished(run_dir):
    """Delete the temporary files (``.*.partial``) of saves that never finished (the process was
    killed while writing); return their paths."""
    if not os.path.isdir(run_dir):
        return []
    gone = [os.path.join(run_dir, name) for name in os.listdir(run_dir)
            if name.startswith(".") and name.endswith(".partial")]
    for path in gone:
        os.remove(path)
    return gone


def prune_checkpoints(run_dir, keep):
    """Delete all but the newest ``keep`` checkpoints of ``run_dir`` (keep <= 0 keeps all)."""
    if keep <= 0:
        return []
    old = list_checkpoints(run_dir)[:-keep]
    for path in old:
        os.remove(path)
    return old


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "checkpoint_path", "prune_checkpoints", "resumable_checkpoint", "remove_unfinished"]
