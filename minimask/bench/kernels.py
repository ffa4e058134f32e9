"""Time the hand-written kernels: RoIAlign, RoIPool (paper Sec. 3) and NMS.

``minimask bench kernels [--device cpu|gpu] [--repeat 5]`` prints median times (ms) of:

- RoIAlign forward and backward, 512 boxes, 7x7 output, sampling_ratio 2, on one 2x256x50x84
  float32 map (stride 16 of an 800x1344 batch: the C4 setting of the paper's ablations);
- the same 512 boxes pooled from the four FPN levels P2-P5 of an 800x1333 batch of 2 (maps
  200x336 ... 25x42, 256 channels), each box on the level Eq. 1 of the FPN paper assigns it
  (k = floor(4 + log2(sqrt(w h) / 224)), clamped to 2..5), as the multi-level pooler does;
- RoIPool forward and backward on the single map;
- NMS of 10,000 random boxes at IoU 0.5.

On the CPU the first call compiles or loads the Numba kernels (cached on disk) and is not
timed.  On the GPU the device is synchronized before each clock reading, since kernel launches
return before the work is done.
"""

import numpy as np

from ..backend import to_device
from ..kernels.roi_align import roi_align_backward, roi_align_forward
from ..kernels.roi_pool import roi_pool_backward, roi_pool_forward
from .timing import median_ms


def random_boxes(rng, n, image_h, image_w, min_size=16, max_size=512):
    """n boxes [b, x1, y1, x2, y2] of log-uniform sizes, corners inside the image, b in {0, 1}."""
    w = np.exp(rng.uniform(np.log(min_size), np.log(max_size), n))
    h = w * np.exp(rng.uniform(-0.7, 0.7, n))  # aspect ratios about 1:2 to 2:1
    x1 = rng.uniform(0, 1, n) * np.maximum(image_w - w, 1)
    y1 = rng.uniform(0, 1, n) * np.maximum(image_h - h, 1)
    b = rng.integers(0, 2, n)
    return np.stack([b, x1, y1, np.minimum(x1 + w, image_w), np.minimum(y1 + h, image_h)], 1)


def fpn_levels(rois, k_min=2, k_max=5, canonical_size=224, canonical_level=4):
    """FPN paper Eq. 1: the pyramid level of each box (a 224x224 box goes to P4)."""
    size = np.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    k = np.floor(canonical_level + np.log2(size / canonical_size + 1e-8))
    return np.clip(k, k_min, k_max).astype(int)


def main(device="cpu", repeat=5):
    rng = np.random.default_rng(0)
    if device == "gpu":
        import cupy

        sync = cupy.cuda.Device().synchronize
    else:
        def sync():
            pass

    def dev(a):
        return to_device(np.ascontiguousarray(a), device)

    print(f"minimask bench kernels: device {device}, median of {repeat} runs, float32")

    # ---- RoIAlign and RoIPool on one stride-16 map -------------------------------------------
    x = dev(rng.standard_normal((2, 256, 50, 84)).astype(np.float32))
    rois_np = random_boxes(rng, 512, 800, 1344)
    rois = dev(rois_np)
    args = ((7, 7), 1 / 16, 2, True)
    y = roi_align_forward(x, rois, *args)
    gy = dev(rng.standard_normal(y.shape).astype(np.float32))
    fwd = median_ms(lambda: roi_align_forward(x, rois, *args), repeat, sync)
    bwd = median_ms(lambda: roi_align_backward(gy, rois, x.shape, 1 / 16, 2, True), repeat, sync)
    print(f"RoIAlign 512 boxes 7x7 sampling 2, map 2x256x50x84:  forward {fwd:8.2f} ms   "
          f"backward {bwd:8.2f} ms")

    # ---- RoIAlign over four FPN levels -----------------------------------------------------------
    rois_fpn_np = random_boxes(rng, 512, 800, 1333, min_size=16, max_size=800)
    levels = fpn_levels(rois_fpn_np)
    maps, per_level = {}, {}
    for k in range(2, 6):
        stride = 2 ** k
        h, w = -(-800 // stride), -(-1344 // stride)  # 800x1333 padded to a multiple of 32: 800x1344
        maps[k] = dev(rng.standard_normal((2, 256, h, w)).astype(np.float32))
        per_level[k] = dev(rois_fpn_np[levels == k])
    grads = {k: dev(rng.standard_normal((len(per_level[k]), 256, 7, 7)).astype(np.float32)) for k in maps}

    def fpn_forward():
        return [roi_align_forward(maps[k], per_level[k], (7, 7), 1 / 2 ** k, 2, True) for k in maps]

    def fpn_backward():
        return [roi_align_backward(grads[k], per_level[k], maps[k].shape, 1 / 2 ** k, 2, True) for k in maps]

    fwd = median_ms(fpn_forward, repeat, sync)
    bwd = median_ms(fpn_backward, repeat, sync)
    counts = ", ".join(f"P{k} {maps[k].shape[2]}x{maps[k].shape[3]}: {len(per_level[k])}" for k in maps)
    print(f"RoIAlign 512 boxes over FPN levels ({counts}):")
    print(f"    forward {fwd:8.2f} ms   backward {bwd:8.2f} ms")

    # ---- RoIPool on the single map -------------------------------------------------------------
    _, argmax = roi_pool_forward(x, rois, (7, 7), 1 / 16)
    fwd = median_ms(lambda: roi_pool_forward(x, rois, (7, 7), 1 / 16), repeat, sync)
    bwd = median_ms(lambda: roi_pool_backward(gy, rois, argmax, x.shape), repeat, sync)
    print(f"RoIPool  512 boxes 7x7, map 2x256x50x84:             forward {fwd:8.2f} ms   "
          f"backward {bwd:8.2f} ms")

    # ---- NMS -----------------------------------------------------------------------------------
    try:
        from ..ops import nms
    except ImportError:
        print("NMS: not available")
        return
    boxes = random_boxes(rng, 10000, 800, 1333, min_size=8, max_size=300)[:, 1:]
    boxes, scores = dev(boxes), dev(rng.uniform(0, 1, 10000))
    t = median_ms(lambda: nms(boxes, scores, 0.5), repeat, sync)
    kept = len(nms(boxes, scores, 0.5))
    print(f"NMS 10,000 boxes, IoU 0.5 ({kept} kept):                 {t:8.2f} ms")
