"""Greedy non-maximum suppression: the loops behind ``minimask.ops.nms``.

Greedy NMS (Faster R-CNN Sec. 3.3; Mask R-CNN Sec. 3.1, "Inference"): visit the boxes by falling
score; keep a box unless a box kept before it overlaps it with IoU strictly greater than the
threshold.  Ties in score are visited in input order (a stable sort of -score), so the result
is fully determined, as torchvision's.

Three layers, each tested against the one before (tests/test_nms.py):

- ``nms_reference``: NumPy (or CuPy), one kept box at a time, vectorized over the later boxes.
  Reads like the definition above.
- ``nms_numba``: the same greedy loop under Numba, computing each IoU on the fly from the
  score-sorted boxes (no N x N matrix) and skipping boxes already suppressed.
- ``nms_cupy``: torchvision's CUDA design.  Sort by score; cut the boxes into blocks of 64; one
  CUDA block per (row block, column block) pair computes, for each of its 64 row boxes, a 64-bit
  word whose bit c says "this box suppresses column box c" -- all the IoUs in parallel, written as
  an ``(N, ceil(N / 64))`` uint64 mask.  Then a sequential pass walks the boxes in score order and
  ORs the mask row of every survivor into a "removed" bit set (``nms_gather_keep``, one CUDA block
  whose threads share the ORs of a row).  ``suppression_mask_reference`` and
  ``gather_keep_reference`` are that design in NumPy, so that it can be read and tested without
  a GPU.

IoU is computed in float64, in the same order of operations everywhere (the CUDA code is compiled
with ``--fmad=false`` so that ``a + b - w * h`` is not fused into one differently rounded
instruction), so every version keeps exactly the same boxes, even for IoUs a rounding error from
the threshold.  Where the union is 0 (zero-area boxes) the IoU counts as 0: such boxes never
suppress, as in torchvision where 0/0 = NaN fails the ``>`` test.
"""

import numpy as np
from numba import njit

from ..backend import get_array_module, is_cupy_array, to_device
from .cuda_sources import CudaSource, cuda_function

BLOCK = 64  # boxes per bitmask word: one bit per box of a column block
MAX_CUDA_BOXES = 48 * 1024 // 8 * BLOCK  # the gather pass keeps one word per block in 48 KiB


def stable_order_by_score(scores):
    """Indices sorting ``scores`` high to low, equal scores kept in input order."""
    if is_cupy_array(scores):
        import cupy

        return cupy.argsort(-scores)  # CuPy's sort is always stable
    return np.argsort(-scores, kind="stable")


def _sorted_boxes(boxes, scores):
    """Score order and the boxes in that order, as contiguous float64 (what every kernel takes)."""
    xp = get_array_module(boxes)
    order = stable_order_by_score(scores)
    return order, xp.ascontiguousarray(boxes[order], dtype=xp.float64)


# ---------------------------------------------------------------------------------------------
# 1. Reference: NumPy, readable.
# ---------------------------------------------------------------------------------------------

def iou_one_to_many(box, boxes):
    """IoU of one box with each of ``boxes`` (float64, 0 where the union is 0)."""
    xp = get_array_module(boxes)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = xp.maximum(xp.minimum(box[2], boxes[:, 2]) - xp.maximum(box[0], boxes[:, 0]), 0.0)
    h = xp.maximum(xp.minimum(box[3], boxes[:, 3]) - xp.maximum(box[1], boxes[:, 1]), 0.0)
    inter = w * h
    union = area + areas - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)


def nms_reference(boxes, scores, iou_threshold):
    """Kept indices (int64), by falling score.  Plain greedy NMS, one kept box at a time."""
    xp = get_array_module(boxes)
    order, sorted_boxes = _sorted_boxes(boxes, scores)
    n = sorted_boxes.shape[0]
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)  # the best box not yet suppressed survives ...
        iou = iou_one_to_many(sorted_boxes[i], sorted_boxes[i + 1:])
        suppressed[i + 1:] |= to_device(iou, "cpu") > iou_threshold  # ... and removes its overlaps
    return order[xp.asarray(keep, dtype=xp.int64)]


def suppression_mask_reference(sorted_boxes, iou_threshold):
    """The ``(N, ceil(N / 64))`` uint64 mask of the CUDA design, in NumPy.

    Bit c of word ``mask[i, b]`` is set when box i suppresses box ``j = 64 * b + c``, i.e. when
    ``j > i`` (later in score order) and ``IoU(i, j) > iou_threshold``.
    """
    sorted_boxes = np.asarray(sorted_boxes, dtype=np.float64)
    n = sorted_boxes.shape[0]
    col_blocks = (n + BLOCK - 1) // BLOCK
    mask = np.zeros((n, col_blocks), dtype=np.uint64)
    for i in range(n):
        later = np.arange(i + 1, n)
        hits = later[iou_one_to_many(sorted_boxes[i], sorted_boxes[i + 1:]) > iou_threshold]
        for j in hits:
            mask[i, j // BLOCK] |= np.uint64(1) << np.uint64(j % BLOCK)
    return mask


def gather_keep_reference(mask, n):
    """The sequential pass: walk boxes in score order, OR in the mask row of every survivor.

    Returns a boolean array: which of the ``n`` score-sorted boxes are kept.
    """
    removed = np.zeros(mask.shape[1], dtype=np.uint64)
    keep = np.zeros(n, dtype=bool)
    for i in range(n):
        word, bit = i // BLOCK, np.uint64(i % BLOCK)
        if (removed[word] >> bit) & np.uint64(1):
            continue  # suppressed by a box kept earlier
        keep[i] = True
        removed |= mask[i]  # everything this survivor suppresses is now removed
    return keep


# ---------------------------------------------------------------------------------------------
# 2. Numba: the greedy loop, IoU on the fly.
# ---------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def _suppress_overlaps(ax1, ay1, ax2, ay2, area_a, x1, y1, x2, y2, areas, threshold, suppressed):
    """Mark ``suppressed[j]`` where IoU(box a, box j) > threshold, for all j of the given arrays.

    The same operations as ``iou_one_to_many``.  Written without branches (``a if c else b``
    compiles to a select, not a jump) and on arrays sliced to start at 0, so that Numba/LLVM can
    vectorize the loop with SIMD instructions: about 6x faster than a plain loop over ``j > i``
    (which LLVM does not vectorize because a variable start could be negative, and negative
    indices wrap around in Numba).  ``error_model="numpy"`` lets ``inter / union`` divide by zero
    without a Python exception check in the loop; the select discards that lane.
    """
    for j in range(x1.shape[0]):
        right = ax2 if ax2 < x2[j] else x2[j]
        left = ax1 if ax1 > x1[j] else x1[j]
        bottom = ay2 if ay2 < y2[j] else y2[j]
        top = ay1 if ay1 > y1[j] else y1[j]
        w = right - left
        w = w if w > 0.0 else 0.0
        h = bottom - top
        h = h if h > 0.0 else 0.0
        inter = w * h
        union = area_a + areas[j] - inter
        iou = inter / union if union > 0.0 else 0.0
        suppressed[j] = suppressed[j] | (iou > threshold)


@njit(cache=True)
def _nms_sorted_numba(boxes, threshold):
    """Greedy NMS on score-sorted float64 boxes; returns the kept positions (in sorted order)."""
    n = boxes.shape[0]
    x1, y1, x2, y2 = boxes[:, 0].copy(), boxes[:, 1].copy(), boxes[:, 2].copy(), boxes[:, 3].copy()
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(n, dtype=np.uint8)
    keep = np.empty(n, dtype=np.int64)
    count = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[count] = i  # the best box not yet suppressed survives ...
        count += 1
        later = slice(i + 1, n)  # ... and removes its overlaps among the boxes after it
        _suppress_overlaps(x1[i], y1[i], x2[i], y2[i], areas[i], x1[later], y1[later], x2[later],
                           y2[later], areas[later], threshold, suppressed[later])
    return keep[:count]


def nms_numba(boxes, scores, iou_threshold):
    """``nms_reference`` on NumPy arrays, compiled."""
    order, sorted_boxes = _sorted_boxes(np.asarray(boxes), np.asarray(scores))
    return order[_nms_sorted_numba(sorted_boxes, float(iou_threshold))]


# ---------------------------------------------------------------------------------------------
# 3. CuPy: bitmask of suppressions in parallel, then one sequential pass on the device.
# ---------------------------------------------------------------------------------------------

_CUDA_SOURCE = r"""
#define BLOCK 64

__device__ bool suppresses(const double* a, const double* b, double threshold) {
    double area_a = (a[2] - a[0]) * (a[3] - a[1]);
    double area_b = (b[2] - b[0]) * (b[3] - b[1]);
    double w = fmax(fmin(a[2], b[2]) - fmax(a[0], b[0]), 0.0);
    double h = fmax(fmin(a[3], b[3]) - fmax(a[1], b[1]), 0.0);
    double inter = w * h;
    double uni = area_a + area_b - inter;
    if (uni > 0) return inter / uni > threshold;
    return 0.0 > threshold;
}

// Grid (col_blocks, col_blocks), BLOCK threads.  Block (x = column block, y = row block): thread t
// takes row box i = 64 * y + t and sets bit c of mask[i, x] when it suppresses box 64 * x + c.
extern "C" __global__ void nms_suppression_mask(const double* boxes, int n, double threshold,
                                                unsigned long long* mask) {
    const int row_block = blockIdx.y, col_block = blockIdx.x;
    if (row_block > col_block) return;  // a box only suppresses boxes after it in score order
    const int col_blocks = (n + BLOCK - 1) / BLOCK;
    const int rows = min(n - row_block * BLOCK, BLOCK);
    const int cols = min(n - col_block * BLOCK, BLOCK);

    __shared__ double col_boxes[BLOCK * 4];  // the 64 column boxes, read by every thread
    if (threadIdx.x < cols) {
        for (int k = 0; k < 4; k++)
            col_boxes[threadIdx.x * 4 + k] = boxes[(col_block * BLOCK + threadIdx.x) * 4 + k];
    }
    __syncthreads();

    if (threadIdx.x < rows) {
        const int i = row_block * BLOCK + threadIdx.x;
        const double* box = boxes + i * 4;
        unsigned long long bits = 0;
        const int start = (row_block == col_block) ? threadIdx.x + 1 : 0;  // only later boxes
        for (int c = start; c < cols; c++) {
            if (suppresses(box, col_boxes + c * 4, threshold)) bits |= 1ULL << c;
        }
        mask[(long long)i * col_blocks + col_block] = bits;
    }
}

// One block.  removed[] (shared) is the bit set of suppressed boxes.  The boxes are visited in
// score order by every thread (the decisions are the same in all of them); when a box survives,
// the threads OR its mask row into removed[], each thread its own words.
extern "C" __global__ void nms_gather_keep(const unsigned long long* mask, int n, bool* keep) {
    extern __shared__ unsigned long long removed[];
    const int col_blocks = (n + BLOCK - 1) / BLOCK;
    for (int b = threadIdx.x; b < col_blocks; b += blockDim.x) removed[b] = 0;
    __syncthreads();

    for (int word = 0; word < col_blocks; word++) {
        unsigned long long removed_here = removed[word];
        __syncthreads();
        for (int bit = 0; bit < BLOCK; bit++) {
            const int i = word * BLOCK + bit;
            if (i >= n) break;
            if (removed_here & (1ULL << bit)) continue;
            if (threadIdx.x == 0) keep[i] = true;
            const unsigned long long* row = mask + (long long)i * col_blocks;
            // Words before `word` hold boxes already decided; only later ones can change.
            for (int b = word + threadIdx.x; b < col_blocks; b += blockDim.x) removed[b] |= row[b];
            __syncthreads();
            removed_here = removed[word];
        }
    }
}
"""

CUDA_SOURCES = {
    # --fmad=false: keep a + b - w * h as separate roundings, as NumPy and Numba do.
    "nms": CudaSource(_CUDA_SOURCE, kernels=("nms_suppression_mask", "nms_gather_keep"),
                      options=("--fmad=false",)),
}


def suppression_mask_cupy(sorted_boxes, iou_threshold):
    """The ``(N, ceil(N / 64))`` uint64 suppression mask of score-sorted CuPy boxes."""
    import cupy

    sorted_boxes = cupy.ascontiguousarray(sorted_boxes, dtype=cupy.float64)
    n = sorted_boxes.shape[0]
    col_blocks = (n + BLOCK - 1) // BLOCK
    mask = cupy.zeros((n, col_blocks), dtype=cupy.uint64)
    if n:
        kernel = cuda_function(CUDA_SOURCES["nms"], "nms_suppression_mask")
        kernel((col_blocks, col_blocks), (BLOCK,),
               (sorted_boxes, np.int32(n), np.float64(iou_threshold), mask))
    return mask


def gather_keep_cupy(mask, n):
    """Which of the ``n`` score-sorted boxes survive, from the mask, on the device (bool array)."""
    import cupy

    keep = cupy.zeros(n, dtype=cupy.bool_)
    if n:
        col_blocks = mask.shape[1]
        kernel = cuda_function(CUDA_SOURCES["nms"], "nms_gather_keep")
        kernel((1,), (min(256, max(32, col_blocks)),),
               (cupy.ascontiguousarray(mask), np.int32(n), keep), shared_mem=col_blocks * 8)
    return keep


def nms_cupy(boxes, scores, iou_threshold):
    """``nms_reference`` on CuPy arrays, in torchvision's bitmask design."""
    import cupy

    if boxes.shape[0] > MAX_CUDA_BOXES:
        raise ValueError(f"nms on the GPU takes at most {MAX_CUDA_BOXES} boxes (its N x N/64 mask "
                         f"would not fit); got {boxes.shape[0]}: keep the top-scoring ones first")
    order, sorted_boxes = _sorted_boxes(boxes, scores)
    n = sorted_boxes.shape[0]
    keep = gather_keep_cupy(suppression_mask_cupy(sorted_boxes, iou_threshold), n)
    return order[cupy.nonzero(keep)[0]].astype(cupy.int64)


def nms_kernel(boxes, scores, iou_threshold):
    """Greedy NMS on the boxes' device: the CUDA kernels for CuPy arrays, Numba otherwise."""
    if is_cupy_array(boxes):
        return nms_cupy(boxes, scores, iou_threshold)
    return nms_numba(boxes, scores, iou_threshold)
