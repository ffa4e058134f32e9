"""How much memory one R50-FPN training step needs at 800x1333: convolution columns and activations.

``minimask bench memory [--batch 2] [--size 800x1333]`` answers "does a step fit my GPU?"
without a GPU.  It runs one real training forward of the ``r50_fpn`` preset on the CPU with the
convolutions shape-only (``functional.conv.shapes_only``: they record their shapes and return
zeros of the right size; the other ops run for real, on zeros), so it takes seconds, not
minutes, and prints:

1. every convolution of the step with its im2col column matrix: the full size (what one GEMM
   over the whole batch would need) and the largest chunk actually built with the GPU's chunk
   budget (``functional/conv.py``: columns are built a few images, or a band of output rows,
   at a time, at most ``CHUNK_BYTES["gpu"]`` each, and rebuilt in backward instead of kept);
2. the arrays the autograd graph holds for backward when the forward is done (inputs and
   what every Function named with ``save_for_backward``, each buffer counted once): the
   activations;
3. an estimate of the step's peak: weights, gradients and momentum + activations + the
   largest column chunk + the largest activation gradient in flight, against 16 GB.

The paper's setting (Sec. 3.1): images resized to a shorter side of 800 (longer at most 1333),
two per GPU.  800x1333 pads to 800x1344 (a multiple of 32).
"""

import dataclasses

import numpy as np

GB = 2**30
MB = 2**20


def _buffer(a):
    """The array that owns a's memory (views share their base's)."""
    while isinstance(getattr(a, "base", None), np.ndarray):
        a = a.base
    return a


def _graph_arrays(roots):
    """Every distinct buffer reachable from the Functions that made ``roots`` (bytes by id)."""
    from ..tensor import Tensor

    seen_f, found, stack = set(), {}, [t.creator for t in roots if t.creator is not None]
    while stack:
        f = stack.pop()
        if id(f) in seen_f:
            continue
        seen_f.add(id(f))
        # what a node holds until backward: its inputs, and the state it named in save_for_backward
        values = [x.data for x in f.inputs] + [getattr(f, k) for k in f.saved_names]
        for v in values:
            v = v.data if isinstance(v, Tensor) else v
            if isinstance(v, np.ndarray):
                b = _buffer(v)
                found[id(b)] = b.nbytes
        stack.extend(x.creator for x in f.inputs if x.creator is not None)
    return found


def column_sizes(kind, x_shape, w_shape, g, itemsize=4, device="gpu"):
    """(full, chunk) bytes of the column matrices of one conv (forward and both gradients).

    For a conv the columns have C kh kw rows (C = input channels); for a transposed conv the
    roles swap (its forward is conv2d's input gradient: columns of its *output* channels).
    The chunk is the largest block ``functional.conv.column_chunks`` builds under ``device``'s budget.
    """
    from ..functional.conv import column_chunks

    if kind == "conv":
        n, c = x_shape[0], x_shape[1]
    else:
        n, c = x_shape[0], w_shape[1]
    if g.pointwise:
        return 0, 0
    per_row = c * g.kh * g.kw * g.wo * itemsize
    full = n * g.ho * per_row
    chunk = max((n1 - n0) * (u1 - u0) * per_row
                for n0, n1, u0, u1 in column_chunks(n, g, c, itemsize, device))
    return full, chunk


def synthetic_batch(n, height, width, seed=0, num_classes=81):
    """n noise images with three rectangles each (boxes, labels in 1..num_classes - 1, masks):
    a valid training batch."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        boxes, masks = [], []
        for _ in range(3):
            w, h = rng.integers(width // 8, width // 2), rng.integers(height // 8, height // 2)
            x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
            m = np.zeros((height, width), np.uint8)
            m[y0:y0 + h, x0:x0 + w] = 1
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks.append(m)
        targets.append(dict(boxes=np.array(boxes, np.float32), labels=rng.integers(1, num_classes, 3),
                            masks=np.stack(masks)))
    return images, targets


def estimate(batch=2, size=(800, 1333), config="r50_fpn", budget=16 * GB):
    """Run the shape-only step and return a dict of the numbers printed by ``main``."""
    from ..functional.conv import shapes_only
    from ..models import MaskRCNN, preset

    # Images of ``size`` are taken as they are (800x1333 is the paper's resized size already).
    cfg = dataclasses.replace(preset(config), min_size=(min(size),), max_size=max(size))
    model = MaskRCNN(cfg)
    model.train()
    images, targets = synthetic_batch(batch, *size, num_classes=cfg.num_classes)
    record = []
    with shapes_only(record):  # convolutions record their shapes and return zeros
        losses = model(images, targets)
    convs = []
    for kind, x_shape, w_shape, stride, padding, dilation, g in record:
        full, chunk = column_sizes(kind, x_shape, w_shape, g)
        convs.append(dict(kind=kind, x=tuple(x_shape), w=tuple(w_shape), stride=stride, out=(g.ho, g.wo),
                          full=full, chunk=chunk))
    activations = sum(_graph_arrays(list(losses.values())).values())
    weights = sum(p.data.nbytes for p in model.parameters())
    trainable = sum(p.data.nbytes for p in model.parameters() if p.requires_grad)
    buffers = sum(b.nbytes for b in model.buffers())
    # In backward an activation's gradient is as large as the activation; the largest conv
    # output (with its input gradient being built) bounds what is in flight at once.
    largest_output = max(c["x"][0] * c["w"][0] * c["out"][0] * c["out"][1] * 4 for c in convs)
    largest_chunk = max(c["chunk"] for c in convs)
    peak = weights + buffers + 2 * trainable + activations + largest_chunk + 3 * largest_output
    return dict(config=config, batch=batch, size=size, convs=convs, activations=activations,
                weights=weights, buffers=buffers, trainable=trainable, largest_chunk=largest_chunk,
                largest_full=max(c["full"] for c in convs), largest_output=largest_output,
                peak=peak, budget=budget, fits=peak <= budget,
                losses={k: float(v.item()) for k, v in losses.items()})


def main(batch=2, size=(800, 1333), config="r50_fpn", verbose=False):
    from ..functional.conv import CHUNK_BYTES

    r = estimate(batch, size, config)
    print(f"minimask bench memory: one training step of {config}, batch {batch}, images {size[0]}x{size[1]} "
          f"(shapes only, on the CPU)")
    print(f"conv columns are built in chunks of at most {CHUNK_BYTES['gpu'] / MB:.0f} MB on the GPU "
          f"({CHUNK_BYTES['cpu'] / MB:.0f} MB on the CPU)")
    big = sorted(r["convs"], key=lambda c: -c["full"])
    print(f"{len(r['convs'])} convolutions; the largest column matrices:")
    print(f"    {'input (N, C, H, W)':26s} {'weight':20s} {'stride':7s} {'full cols':>10s} {'chunk':>9s}")
    for c in big[:len(big) if verbose else 8]:
        print(f"    {str(c['x']):26s} {str(c['w']):20s} {str(c['stride']):7s} "
              f"{c['full'] / MB:8.0f} MB {c['chunk'] / MB:6.0f} MB")
    print(f"largest column matrix: {r['largest_full'] / GB:.2f} GB whole, {r['largest_chunk'] / MB:.0f} MB "
          f"as built (one chunk at a time, never kept for backward)")
    print(f"activations held for backward: {r['activations'] / GB:.2f} GB")
    print(f"weights {r['weights'] / MB:.0f} MB (+ {r['buffers'] / MB:.0f} MB buffers); gradients and "
          f"momentum of the trainable ones {2 * r['trainable'] / MB:.0f} MB")
    print(f"estimated peak of the step: {r['peak'] / GB:.2f} GB (activations + weights, gradients, "
          f"momentum + one column chunk + 3x the largest activation in flight in backward)")
    verdict = "fits" if r["fits"] else "does NOT fit"
    print(f"-> {verdict} in {r['budget'] / GB:.0f} GB (CuPy's pool adds rounding and caching on top: "
          f"compare with the measured peak of 'minimask bench gpu')")
    return r
