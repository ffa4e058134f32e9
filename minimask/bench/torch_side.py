"""The PyTorch side of ``minimask bench gpu``: torch and torchvision doing the same work.

This is the one place in minimask's benchmarks that builds torchvision's Mask R-CNN, and only
to time it: torch and torchvision are imported inside ``load`` and nothing else in the package
imports this file, so ``import minimask`` never pulls torch in, and a machine without torch
just gets minimask's numbers.  (The model code never uses torch; see DESIGN.md.)

Like with like:
- torchvision's ``maskrcnn_resnet50_fpn`` as it is built with pretrained weights (frozen batch
  norm, the last 3 ResNet stages trainable), which is what the ``r50_fpn`` preset is; built
  here without weights (no download), then its random weights are copied into minimask's model
  (the parameter names are the same), so both run the same network on the same numbers;
- FP32 on both sides: ``torch.backends.cudnn.allow_tf32`` and
  ``torch.backends.cuda.matmul.allow_tf32`` are set False (cuDNN convolutions otherwise use
  TF32 by default), or True on both with ``--tf32`` (CuPy then runs with ``CUPY_TF32=1``).
"""


def load(device, tf32=False):
    """(torch, torchvision, problem): the modules ready for ``device``, or Nones and a reason."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        return None, None, f"torch is not importable ({type(e).__name__}: {e})"
    try:
        import torchvision
        import torchvision.ops  # noqa: F401  (fails here when torchvision does not match torch)
    except Exception as e:
        return torch, None, f"torchvision is not importable ({type(e).__name__}: {e})"
    if device == "gpu" and not torch.cuda.is_available():
        return None, None, "torch sees no CUDA device"
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = False  # the same algorithm choice on every call
    return torch, torchvision, None


def torch_device(device):
    return "cuda" if device == "gpu" else "cpu"


def sync(torch, device):
    if device == "gpu":
        torch.cuda.synchronize()


def build_maskrcnn(torch, torchvision, num_classes=91, min_size=800, max_size=1333):
    """torchvision's maskrcnn_resnet50_fpn as built for fine-tuning from ImageNet weights, but
    with random weights: FrozenBatchNorm2d, stem and layer1 frozen (3 trainable stages)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.ops import misc

    try:
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    except ImportError:  # older torchvision
        _resnet_fpn_extractor = None
    body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    if _resnet_fpn_extractor is not None:
        backbone = _resnet_fpn_extractor(body, 3)
    else:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        backbone = resnet_fpn_backbone("resnet50", pretrained=False, norm_layer=misc.FrozenBatchNorm2d,
                                       trainable_layers=3)
    return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size)


def state_dict_numpy(model):
    """torch state dict -> name: NumPy array (to load into minimask's model)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def images_and_targets(torch, images, targets, device):
    """minimask's inputs (uint8 HWC NumPy, target dicts) as torchvision takes them."""
    dev = torch_device(device)
    timages = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(dev) for im in images]
    ttargets = None
    if targets is not None:
        ttargets = [dict(boxes=torch.from_numpy(t["boxes"]).float().to(dev),
                         labels=torch.from_numpy(t["labels"]).long().to(dev),
                         masks=torch.from_numpy(t["masks"]).to(dev)) for t in targets]
    return timages, ttargets


def train_step(torch, model, optimizer, images, targets):
    losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return total


def peak_memory(torch, device):
    """(allocated, reserved) peak bytes of torch's caching allocator since the last reset."""
    if device != "gpu":
        return None, None
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def reset_memory(torch, device):
    if device == "gpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
