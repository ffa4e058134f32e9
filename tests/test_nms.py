"""NMS: every layer (NumPy reference, bitmask design, Numba, CUDA) against a brute-force loop."""

import numpy as np
import pytest

from minimask.backend import to_device
from minimask.kernels.nms import (
    gather_keep_reference,
    nms_numba,
    nms_reference,
    stable_order_by_score,
    suppression_mask_reference,
)
from minimask.ops import batched_nms, nms

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


def brute_force_nms(boxes, scores, threshold):
    """Greedy NMS in plain Python: by falling score (ties: lower index first), drop IoU > threshold."""
    boxes = [[float(c) for c in box] for box in boxes]
    order = sorted(range(len(boxes)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        survives = True
        for k in keep:
            a, b = boxes[k], boxes[i]
            w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
            h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
            inter = w * h
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            iou = inter / union if union > 0 else 0.0
            if iou > threshold:
                survives = False
                break
        if survives:
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def hard_boxes(rng, n=300):
    """Boxes in clusters (many suppressions), with exact duplicates, zero-area boxes, tied scores."""
    centres = rng.uniform(0, 200, (12, 2))
    xy = centres[rng.integers(0, 12, n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(8, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[n - 40:n - 20] = boxes[:20]  # exact duplicates
    boxes[n - 20:n - 10, 2] = boxes[n - 20:n - 10, 0]  # zero width
    boxes[n - 10:n - 5, 2:] = boxes[n - 10:n - 5, :2]  # points
    boxes[n - 5:] = boxes[n - 10:n - 5]  # duplicated points: union 0
    scores = rng.choice(np.linspace(0.05, 1.0, 40), n)  # only 40 distinct values: many ties
    scores[n - 40:n - 20] = scores[:20]  # duplicates with equal scores too
    return boxes.astype(np.float32), scores.astype(np.float32)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_every_cpu_layer_matches_brute_force(rng, threshold):
    boxes, scores = hard_boxes(rng)
    expected = brute_force_nms(boxes, scores, threshold)
    assert 0 < len(expected) < len(boxes) or threshold == 1.0

    np.testing.assert_array_equal(nms_reference(boxes, scores, threshold), expected)
    np.testing.assert_array_equal(nms_numba(boxes, scores, threshold), expected)
    keep = nms(boxes, scores, threshold)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, expected)

    # The CUDA design (a suppression bitmask, then a sequential pass over it), in NumPy.
    order = stable_order_by_score(scores)
    mask = suppression_mask_reference(boxes[order].astype(np.float64), threshold)
    assert mask.shape == (len(boxes), (len(boxes) + 63) // 64) and mask.dtype == np.uint64
    np.testing.assert_array_equal(order[gather_keep_reference(mask, len(boxes))], expected)


def test_nms_on_uniform_random_boxes(rng):
    xy = rng.uniform(0, 400, (600, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (600, 2))], axis=1)
    scores = rng.random(600)
    for threshold in (0.2, 0.6):
        expected = brute_force_nms(boxes, scores, threshold)
        np.testing.assert_array_equal(nms(boxes, scores, threshold), expected)


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10],  # score 0.9
                      [1, 0, 11, 10],  # IoU with box 0: 90 / 110 = 0.818
                      [20, 20, 30, 30]], dtype=np.float32)  # far away, best score
    scores = np.array([0.9, 0.8, 0.95], dtype=np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [2, 0])
    np.testing.assert_array_equal(nms(boxes, scores, 0.85), [2, 0, 1])
    # IoU exactly at the threshold does not suppress (strictly greater does).
    nested = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], dtype=np.float64)  # IoU = 1 / 2 exactly
    np.testing.assert_array_equal(nms(nested, np.array([0.9, 0.8]), 0.5), [0, 1])
    np.testing.assert_array_equal(nms(nested, np.array([0.9, 0.8]), 0.4999), [0])
    # Equal scores: the earlier box wins.
    twins = np.array([[0, 0, 5, 5], [0, 0, 5, 5]], dtype=np.float32)
    np.testing.assert_array_equal(nms(twins, np.array([0.5, 0.5], np.float32), 0.5), [0])


def test_nms_empty_and_bad_shapes():
    keep = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert keep.shape == (0,) and keep.dtype == np.int64
    with pytest.raises(ValueError, match="scores"):
        nms(np.zeros((3, 4)), np.zeros(2), 0.5)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        nms(np.zeros((3, 5)), np.zeros(3), 0.5)


def per_group_nms(boxes, scores, groups, threshold):
    kept = []
    for g in np.unique(groups):
        members = np.nonzero(groups == g)[0]
        kept.extend(members[brute_force_nms(boxes[members], scores[members], threshold)])
    return np.array(sorted(kept, key=lambda i: (-float(scores[i]), i)), dtype=np.int64)


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_batched_nms_matches_per_group_nms(rng, threshold):
    boxes, scores = hard_boxes(rng, 200)
    boxes -= 100  # negative coordinates below -1: torchvision's `max + 1` offset would mix groups
    groups = rng.integers(0, 5, len(boxes))
    keep = batched_nms(boxes, scores, groups, threshold)
    np.testing.assert_array_equal(keep, per_group_nms(boxes, scores, groups, threshold))
    assert len(keep) > len(nms(boxes, scores, threshold))  # groups do keep overlapping boxes


def test_batched_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.7], dtype=np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5), [1, 2])
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 0, 0]), 0.5), [1])
    empty = batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.5)
    assert empty.shape == (0,) and empty.dtype == np.int64


def test_nms_matches_torchvision(rng, torchvision):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    xy = rng.uniform(0, 300, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (500, 2))], axis=1)
    scores = rng.random(500)  # distinct scores: torchvision's order on ties is its own business
    for threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold)
        np.testing.assert_array_equal(nms(boxes, scores, threshold), expected.numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_cuda_nms_matches_numpy(rng, threshold):
    from minimask.kernels.nms import suppression_mask_cupy

    boxes, scores = hard_boxes(rng, 700)  # 11 blocks of 64, the last one partial
    gpu_boxes, gpu_scores = to_device(boxes, "gpu"), to_device(scores, "gpu")
    order = stable_order_by_score(scores)
    np.testing.assert_array_equal(
        to_device(suppression_mask_cupy(gpu_boxes[to_device(order, "gpu")], threshold), "cpu"),
        suppression_mask_reference(boxes[order].astype(np.float64), threshold))
    keep = nms(gpu_boxes, gpu_scores, threshold)
    assert type(keep).__module__.startswith("cupy") and keep.dtype == np.int64
    np.testing.assert_array_equal(to_device(keep, "cpu"), nms(boxes, scores, threshold))
    groups = rng.integers(0, 4, len(boxes))
    np.testing.assert_array_equal(
        to_device(batched_nms(gpu_boxes, gpu_scores, to_device(groups, "gpu"), threshold), "cpu"),
        batched_nms(boxes, scores, groups, threshold))


@pytest.mark.gpu
def test_cuda_nms_many_boxes(rng):
    xy = rng.uniform(0, 1000, (20000, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (20000, 2))], axis=1).astype(np.float32)
    scores = rng.random(20000).astype(np.float32)
    keep = nms(to_device(boxes, "gpu"), to_device(scores, "gpu"), 0.5)
    np.testing.assert_array_equal(to_device(keep, "cpu"), nms(boxes, scores, 0.5))


EMULATOR_MAIN = r"""
#include <cstdio>
#include <vector>
int main() {
    int n; double thr;
    if (scanf("%d %lf", &n, &thr) != 2) return 1;
    std::vector<double> boxes(4 * n);
    for (auto& v : boxes) if (scanf("%lf", &v) != 1) return 1;
    int col_blocks = (n + 63) / 64;
    std::vector<unsigned long long> mask((size_t)n * col_blocks, 0);
    blockDim.x = 64;
    for (int y = 0; y < col_blocks; y++) for (int x = 0; x < col_blocks; x++) {
        blockIdx.x = x; blockIdx.y = y;
        // Threads run one after another; a second pass sees the shared boxes all loaded.
        for (int pass = 0; pass < 2; pass++)
            for (int t = 0; t < 64; t++) {
                threadIdx.x = t;
                nms_suppression_mask(boxes.data(), n, thr, mask.data());
            }
    }
    std::vector<char> keep(n, 0);
    blockDim.x = 1; threadIdx.x = 0;  // one thread: the gather pass runs exactly as written
    nms_gather_keep(mask.data(), n, (bool*)keep.data());
    for (int i = 0; i < n; i++) printf("%d", (int)keep[i]);
    printf("\n");
    for (auto word : mask) printf("%llu ", word);
    printf("\n");
}
"""


def test_cuda_source_emulated_on_cpu(rng, tmp_path):
    """Without a GPU: compile the CUDA kernels as C++ (threads run in turn) and check their logic."""
    import shutil
    import subprocess

    from minimask.kernels import nms as nms_kernels

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed; the CUDA kernels are checked on a GPU instead")
    prelude = ("#include <cmath>\n#include <algorithm>\nusing std::min; using std::fmax; using std::fmin;\n"
               "#define __device__\n#define __global__\nstruct Dim { int x, y, z; };\n"
               "static Dim blockIdx, threadIdx, blockDim;\nstatic void __syncthreads() {}\n")
    source = (nms_kernels.CUDA_SOURCES["nms"].code.replace('extern "C" __global__', "__global__")
              .replace("__shared__ double", "static double")
              .replace("extern __shared__ unsigned long long removed[];",
                       "static unsigned long long removed[4096];"))
    (tmp_path / "emu.cpp").write_text(prelude + source + EMULATOR_MAIN)
    exe = tmp_path / "emu"
    # -ffp-contract=off: no fused multiply-add, as --fmad=false on the GPU.
    subprocess.run([compiler, "-O1", "-ffp-contract=off", "-o", str(exe), str(tmp_path / "emu.cpp")],
                   check=True)

    boxes, scores = hard_boxes(rng, 200)  # 4 blocks of 64, the last one partial
    order = stable_order_by_score(scores)
    sorted_boxes = boxes[order].astype(np.float64)
    for threshold in (0.0, 0.5, 1.0):
        text = f"{len(boxes)} {threshold!r}\n" + " ".join(repr(float(v)) for v in sorted_boxes.ravel())
        result = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
        lines = result.stdout.split("\n")
        mask = np.array(lines[1].split(), dtype=np.uint64).reshape(len(boxes), -1)
        np.testing.assert_array_equal(mask, suppression_mask_reference(sorted_boxes, threshold))
        keep = np.array([c == "1" for c in lines[0]])
        np.testing.assert_array_equal(order[keep], brute_force_nms(boxes, scores, threshold))
