"""Pretrained weights from torchvision: read a ``.pth``, rename, check, save as ``.npz``.

torchvision publishes a COCO-trained ``maskrcnn_resnet50_fpn`` (box AP 37.9, mask AP 34.6 on
val2017).  Its network is the paper's ResNet-50-FPN Mask R-CNN (Sec. 3, Fig. 4 right), with
torchvision's settings where implementations differ (RoIAlign with ``aligned=False`` and two
samples per bin side, frozen batch norms with eps 1e-5, shorter side 800 resized by flooring,
masks pasted the torchvision way): the ``torchvision_r50_fpn`` preset has all of them, so the
weights give the same detections here as there.

Module names in ``minimask.models`` were chosen as torchvision's, so the conversion is a
renaming of a few keys only.  Two naming schemes exist:

- the published v1 checkpoint (``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``, written by
  torchvision 0.3): ``rpn.head.conv.weight``, ``roi_heads.mask_head.mask_fcn1.weight``,
  ``backbone.fpn.inner_blocks.0.weight``: these are exactly our names;
- a current torchvision ``state_dict()``, where those layers became ``Conv2dNormActivation``
  blocks: ``rpn.head.conv.0.0.weight``, ``roi_heads.mask_head.0.0.weight``,
  ``backbone.fpn.inner_blocks.0.0.weight``.  They are renamed to the first scheme.

ImageNet backbones (the paper's models start from an ImageNet-pretrained ResNet, Sec. 3.1):
``convert_backbone`` turns torchvision's classification ResNet-18/34/50/101 ``state_dict``
(``resnet50-0676ba61.pth`` and the like) into a backbone ``.npz`` (the ``fc`` classifier
dropped), and ``load_backbone_weights`` puts it into a model's ResNet body before training:

    minimask convert-weights --backbone resnet50-0676ba61.pth resnet50_imagenet.npz
    minimask train --config r50_fpn --backbone-weights resnet50_imagenet.npz ...

``torch`` is needed only to unpickle the ``.pth``; the ``.npz`` written here, and everything
after it, needs NumPy alone.

    minimask convert-weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth coco_r50_fpn.npz
    minimask predict --weights coco_r50_fpn.npz street.jpg
    minimask eval --checkpoint coco_r50_fpn.npz --ann annotations/instances_val2017.json \\
        --images val2017
"""

import json
import os
import re
from collections import OrderedDict

import numpy as np

from .models.backbone_weights import (
    BACKBONE_META,
    BACKBONE_PREFIX,
    COUNTERS,
    load_backbone_weights,
    read_backbone,
)
from .nn import state_dict_problems

PRESET = "torchvision_r50_fpn"

# Current torchvision name -> v1 (= minimask) name.  Each rule is (pattern, replacement).
_RENAMES = [
    (re.compile(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$"), r"rpn.head.conv.\1"),
    (re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$"),
     lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"),
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.(weight|bias)$"),
     r"backbone.fpn.\1.\2.\3"),
]

# Bookkeeping tensors that carry no weights (BatchNorm2d's update counter).
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")

# Keys that only the "v2" model (Li et al. 2021 recipe: batch norm in the heads, a 4conv1fc box
# head) has: a different network, which we say plainly rather than list 100 unmatched names.
_V2_MARKERS = ("roi_heads.box_head.0.0.weight", "rpn.head.conv.1.0.weight",
               "backbone.fpn.inner_blocks.0.1.weight")


def minimask_name(key):
    """The minimask name of a torchvision state-dict key (either naming scheme)."""
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def read_pth(path):
    """A torchvision checkpoint as ``{name: float32 NumPy array}`` (needs torch, only here).

    Accepts a bare state dict or a dict holding one under ``"model"`` or ``"state_dict"``
    (torchvision's reference training scripts save ``{"model": ..., "optimizer": ...}``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a PyTorch .pth file needs PyTorch, which is not installed. "
                          "Install it (pip install torch), or convert on a machine that has it: the .npz "
                          "that convert-weights writes needs only NumPy.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a zip/pickle, truncated download, pickled code...
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    return state_dict_to_numpy(obj, path)


def state_dict_to_numpy(obj, source="state dict"):
    """``{name: tensor or array}`` (possibly under "model"/"state_dict") -> ``{name: ndarray}``."""
    if isinstance(obj, dict) and not any(hasattr(v, "shape") for v in obj.values()):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    out = OrderedDict()
    for name, value in obj.items():
        if not hasattr(value, "shape"):
            raise ValueError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        out[str(name)] = np.asarray(value)
    return out


def convert_state_dict(state, source="state dict"):
    """Rename a torchvision state dict to minimask's names; float tensors become float32.

    Returns ``(converted, renamed)`` where ``renamed`` maps each new name to its original one
    (so that errors can name the tensor as the user's file calls it).
    """
    hits = [k for k in _V2_MARKERS if k in state]
    if hits:
        raise ValueError(f"{source}: this is torchvision's maskrcnn_resnet50_fpn_v2 (it has {hits[0]}), a "
                         "different network (batch norm in the heads, 4conv1fc box head); only the v1 "
                         "model, maskrcnn_resnet50_fpn, maps onto minimask's torchvision_r50_fpn")
    converted, origin = OrderedDict(), {}
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        name = minimask_name(key)
        if name in converted:
            raise ValueError(f"{source}: both {origin[name]!r} and {key!r} map to {name!r} (a mix of the two "
                             "naming schemes?)")
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        converted[name] = value
        origin[name] = key
    return converted, origin


def check_weights(model, state, origin=None, source="weights"):
    """Every tensor of ``state`` must find its place in ``model``, and every place must be
    filled, with the same shape.  Raises ValueError naming each problem, else returns None."""
    origin = origin or {}
    problems = state_dict_problems(
        model.state_dict(), state, name=lambda k: origin.get(k, k),
        unused_name=lambda k: origin.get(k, k) + (f" (as {k})" if origin.get(k, k) != k else ""))
    if problems:
        raise ValueError(f"{source}: does not fit the model:\n  " + "\n  ".join(problems))


def load_weights(model, state, origin=None, source="weights"):
    """Check (``check_weights``) and copy ``state`` into ``model``; returns the model."""
    check_weights(model, state, origin, source)
    model.load_state_dict(state)
    return model


def torchvision_config():
    """The ``torchvision_r50_fpn`` preset with the names of its 91 outputs (COCO category ids;
    the unused ids "N/A", as torchvision names them): the converter knows the data its weights
    were trained on, the preset does not."""
    import dataclasses

    from .categories import coco_class_names
    from .models import preset

    return dataclasses.replace(preset(PRESET), class_names=coco_class_names(91))


def convert_weights(pth_path, npz_path, config=None):
    """``.pth`` -> minimask checkpoint ``.npz`` (weights + the config to rebuild the model).

    The weights are loaded into a model of ``config`` (default: the torchvision_r50_fpn preset)
    first, so that a file that does not fit fails here, naming the tensors, not later.  The
    result is an ordinary minimask checkpoint: ``minimask predict --weights`` or
    ``--checkpoint``, and ``minimask eval --checkpoint``, read it.  Returns a summary dict.
    """
    from .engine.checkpoint import save_checkpoint
    from .models import MaskRCNN

    config = config or torchvision_config()
    state, origin = convert_state_dict(read_pth(pth_path), source=os.fspath(pth_path))
    model = load_weights(MaskRCNN(config), state, origin, source=os.fspath(pth_path))
    renamed = sum(1 for k, v in origin.items() if k != v)
    save_checkpoint(npz_path, model, config=config,
                    extra={"converted_from": os.path.basename(os.fspath(pth_path)), "renamed_keys": renamed})
    return {"tensors": len(state), "renamed": renamed, "path": os.fspath(npz_path)}


def load_weights_file(path, config=None):
    """A model built and loaded from a weights ``.npz``: a minimask checkpoint (its config is
    used unless ``config`` is given) or a bare ``name -> array`` file in either torchvision
    naming (built with ``config`` or the torchvision_r50_fpn preset)."""
    from .engine.checkpoint import load_checkpoint
    from .models import MaskRCNN
    from .nn import load_npz

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith((".pth", ".pt")):
        raise ValueError(f"{path}: a PyTorch file; convert it first: minimask convert-weights {path} OUT.npz")
    try:
        arrays = load_npz(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz weights file ({type(e).__name__}: {e})") from None
    if BACKBONE_META in arrays:
        raise ValueError(f"{path}: an ImageNet backbone (convert-weights --backbone), for "
                         "train --backbone-weights; it holds no detector")
    if "meta" in arrays:
        ckpt = load_checkpoint(path)
        state, origin = ckpt["model"], None
        config = config or ckpt["config"] or torchvision_config()
    else:
        state, origin = convert_state_dict(arrays, source=path)
        config = config or torchvision_config()
    return load_weights(MaskRCNN(config), state, origin, source=path)


# ---------------------------------------------------------------- ImageNet backbones

# The ResNet body is ``backbone.body`` in every minimask model (and in torchvision's detectors).
# Reading a converted backbone into a model is the model's business (models/backbone_weights.py:
# read_backbone, load_backbone_weights); the file format's names are shared from there.


def resnet_architecture(state, source="state dict"):
    """``(depth, width)`` of a ResNet state dict in torchvision's names (``conv1.weight``,
    ``layer1.0.conv1.weight`` ...): blocks per stage and the block type (a ``conv3`` means a
    bottleneck) give the depth, the stem's output channels the width (64 for ImageNet's)."""
    from .models.resnet import DEPTHS

    if "conv1.weight" not in state:
        raise ValueError(f"{source}: not a torchvision ResNet state dict (no conv1.weight; keys start "
                         f"{', '.join(list(state)[:3])})")
    blocks = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(found))
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, counts in DEPTHS.items():
        if tuple(blocks) == counts and bottleneck == (depth >= 50):
            return depth, int(np.shape(state["conv1.weight"])[0])
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(f"{source}: a ResNet with {blocks} {kind} blocks per stage, which is none of minimask's "
                     f"depths {sorted(DEPTHS)}")


def backbone_state(state, source="state dict"):
    """An ImageNet classification ResNet's ``state_dict`` (torchvision's names) as the tensors of
    minimask's ResNet body: the classifier ``fc`` and the norms' update counters dropped, float
    tensors float32.  Returns ``(tensors, info)`` with ``info`` = depth, width, dropped names.

    The batch norms need no arithmetic: minimask's FrozenBatchNorm2d computes
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` from the same four tensors
    that torchvision's BatchNorm2d holds, so the ImageNet running statistics become the frozen
    statistics as they are (and a trainable ``norm="bn"`` body starts from them)."""
    # A model saved from inside nn.DataParallel has every name prefixed by "module.".
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    depth, width = resnet_architecture(state, source)
    tensors, dropped = OrderedDict(), []
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith(COUNTERS):
            dropped.append(key)
            continue
        value = np.asarray(value)
        tensors[key] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return tensors, {"depth": depth, "width": width, "dropped": dropped}


def convert_backbone(pth_path, npz_path):
    """torchvision's ImageNet ResNet-18/34/50/101 ``.pth`` -> a backbone ``.npz`` for
    ``minimask train --backbone-weights`` (needs torch to read the ``.pth``; ``pth_path`` may
    also be a state dict already in memory).  The file holds the body's tensors under
    torchvision's names and a ``backbone_meta`` record (depth, width, source).  Returns a
    summary dict."""
    from .nn import save_npz

    if isinstance(pth_path, dict):
        source, state = "state dict", state_dict_to_numpy(pth_path)
    else:
        source = os.fspath(pth_path)
        state = read_pth(source)
    tensors, info = backbone_state(state, source)
    meta = {"format": 1, "depth": info["depth"], "width": info["width"],
            "converted_from": os.path.basename(source)}
    save_npz(npz_path, {**tensors, BACKBONE_META: np.array(json.dumps(meta))})
    return {"path": os.fspath(npz_path), "tensors": len(tensors), "depth": info["depth"],
            "width": info["width"], "dropped": info["dropped"]}


__all__ = ["read_pth", "convert_state_dict", "state_dict_to_numpy", "check_weights", "load_weights",
           "convert_weights", "load_weights_file", "minimask_name", "PRESET", "torchvision_config",
           "resnet_architecture", "backbone_state", "convert_backbone", "read_backbone",
           "load_backbone_weights", "BACKBONE_META", "BACKBONE_PREFIX"]
