"""Backbone weights: a converted ImageNet ResNet (``minimask convert-weights --backbone``) read
into a model's ResNet body, every tensor checked (the paper starts from ImageNet, Sec. 3.1).

The file is an ``.npz`` of minimask-named ResNet tensors (torchvision's ``layer1.0.conv1.weight``
...) plus a JSON string under ``BACKBONE_META`` (depth, width, where it came from).  Writing one
from a torchvision ``.pth`` is ``interop.convert_backbone``; reading it is here, so the trainer
loads it without reaching into the tools above it.
"""

import json
import os

from ..nn import state_dict_problems

BACKBONE_PREFIX = "backbone.body."
BACKBONE_META = "backbone_meta"  # the 0-d JSON string of a converted backbone file
COUNTERS = "num_batches_tracked"  # BatchNorm2d's update counter: no weights, never transferred


def read_backbone(path):
    """``(tensors, meta)`` of a backbone ``.npz`` written by ``convert_backbone``."""
    from ..nn import load_npz

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.endswith((".pth", ".pt")):
        raise ValueError(f"{path}: a PyTorch file; convert it first: minimask convert-weights --backbone "
                         f"{path} OUT.npz")
    try:
        arrays = dict(load_npz(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if BACKBONE_META not in arrays:
        what = "a minimask checkpoint" if "meta" in arrays else "not a converted backbone"
        raise ValueError(f"{path}: {what} (no {BACKBONE_META}); make one with minimask convert-weights "
                         f"--backbone RESNET.pth {path}")
    meta = json.loads(str(arrays.pop(BACKBONE_META)))
    return arrays, meta


def load_backbone_weights(model, path):
    """Load a backbone ``.npz`` (``convert_backbone``) into ``model``'s ResNet body (a model with
    ``backbone.body``, or a ResNet itself).  Every tensor of the file must find its place, and
    every tensor of the body be filled, with the same shape; else ValueError naming each one
    (after a first line that compares depth and width when those differ).  Returns a summary."""
    path = os.fspath(path)
    state, meta = read_backbone(path)
    body = model.backbone.body if hasattr(model, "backbone") else model
    entries = {k: v for k, v in body.state_dict().items() if not k.endswith(COUNTERS)}
    cfg = getattr(model, "cfg", None)
    if cfg is not None and (meta.get("depth"), meta.get("width")) != (cfg.depth, cfg.width):
        depth, width = meta.get("depth"), meta.get("width")
        raise ValueError(f"{path}: a ResNet-{depth} of width {width}, but the model's is a "
                         f"ResNet-{cfg.depth} of width {cfg.width} "
                         f"(use --set depth={depth} --set width={width})")
    problems = state_dict_problems(entries, state, where="ResNet",
                                   missing_name=lambda k: BACKBONE_PREFIX + k)
    if problems:
        raise ValueError(f"{path}: does not fit the model's backbone:\n  " + "\n  ".join(problems))
    body.load_state_dict(state, strict=False)  # strict=False: the counters stay the model's own
    return {"path": path, "tensors": len(state), "depth": meta.get("depth"), "width": meta.get("width"),
            "converted_from": meta.get("converted_from")}


__all__ = ["read_backbone", "load_backbone_weights", "BACKBONE_META", "BACKBONE_PREFIX", "COUNTERS"]
