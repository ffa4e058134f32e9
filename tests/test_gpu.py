"""The GPU path end to end (issue 10): every op's gradient on CuPy, the CUDA kernels against NumPy,
the model on CuPy against the model on NumPy, overfitting one image on the GPU, training with
checkpoints that move between devices, the CLI and the benchmarks.

Tests marked ``gpu`` skip (with the reason) where CuPy or a CUDA device is missing; the others
check, on any machine, what the GPU path does without a GPU (a clear error) and the plumbing of
the benchmarks on the CPU.  Op-level CuPy/NumPy comparisons of conv, norm, loss, resize, boxes,
anchors, matcher, NMS, RoIAlign/RoIPool and mask pasting live beside each op's other tests.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from minimask import Tensor, gradcheck
from minimask import functional as F
from minimask.backend import gpu_available, to_device
from minimask.functional.conv import Conv2dFn
from minimask.models import MaskRCNN, preset

gpu = pytest.mark.gpu


def on_gpu(a, requires_grad=True):
    return Tensor(to_device(np.asarray(a, dtype=np.float64), "gpu"), requires_grad=requires_grad)


def spread(rng, shape, gap=0.05):
    """Values with no ties and none within ``gap`` of 0 (max-pool and ReLU kinks)."""
    n = int(np.prod(shape))
    v = (np.arange(n) - n / 2 + 0.5) * 4 * gap / max(n / 20, 1)
    v = np.where(np.abs(v) < gap, np.sign(v + 1e-9) * (np.abs(v) + gap), v)
    return rng.permutation(v).reshape(shape)


# ---------------------------------------------------------------- 1. gradients on CuPy
ROIS = np.array([[0, 1.3, 0.7, 9.1, 8.6], [1, 0.0, 2.2, 5.5, 11.0], [0, 4.4, 3.0, 6.1, 4.9]])


def _cases(rng):
    """(name, fn, inputs) for every differentiable Function, inputs on the GPU in float64."""
    x34, b4 = on_gpu(rng.standard_normal((3, 4))), on_gpu(rng.standard_normal(4))
    pos = on_gpu(rng.uniform(0.5, 2.0, (3, 4)))
    img = on_gpu(rng.standard_normal((2, 3, 5, 6)))
    w = on_gpu(rng.standard_normal((4, 3, 3, 3)) * 0.3)
    b = on_gpu(rng.standard_normal(4))
    wt = on_gpu(rng.standard_normal((3, 2, 2, 2)) * 0.3)
    mean, var = to_device(rng.standard_normal(3), "gpu"), to_device(rng.uniform(0.5, 2, 3), "gpu")
    gamma, beta = on_gpu(rng.uniform(0.5, 1.5, 3)), on_gpu(rng.standard_normal(3))
    labels = to_device(np.array([2, -1, 0]), "gpu")
    targets01 = rng.uniform(0, 1, (3, 4))
    feat = on_gpu(rng.standard_normal((2, 2, 6, 7)))
    pool_feat = on_gpu(spread(rng, (2, 2, 6, 7)))
    rois = to_device(ROIS, "gpu")
    idx = to_device(np.array([2, 0, 2, 1]), "gpu")  # repeated: the backward is a scatter-add
    return [
        ("add broadcast", lambda a, c: a + c, [x34, b4]),
        ("sub", lambda a, c: a - c, [x34, b4]),
        ("mul", lambda a, c: a * c, [x34, b4]),
        ("div", lambda a, c: a / c, [x34, pos]),
        ("neg, pow, sqrt, exp, log, abs",
         lambda p: F.sqrt(p) + F.pow(p, 3) - F.exp(-p) + F.log(p) + F.abs(-p), [pos]),
        ("matmul", lambda a, c: a @ c, [x34, on_gpu(rng.standard_normal((4, 5)))]),
        ("sum, mean", lambda a: F.sum(a, axis=1) + F.mean(a, axis=1), [x34]),
        ("reshape, transpose, flatten", lambda a: F.flatten(F.transpose(F.reshape(a, (2, 3, 2)), (2, 0, 1))),
         [x34]),
        ("getitem with repeated indices", lambda a: a[idx], [x34]),
        ("getitem boolean mask", lambda a: a[to_device(np.array([True, False, True]), "gpu")], [x34]),
        ("concat, stack", lambda a, c: F.concat([a, c], axis=0) + F.stack([a, c], 0).sum(axis=0).sum(),
         [x34, on_gpu(rng.standard_normal((3, 4)))]),
        ("pad2d", lambda a: F.pad2d(a, (1, 0, 2, 1)), [img]),
        ("relu", lambda a: F.relu(a), [on_gpu(spread(rng, (3, 4)))]),
        ("sigmoid, softmax, log_softmax",
         lambda a: F.sigmoid(a) + F.softmax(a, 1) + F.log_softmax(a, 0), [x34]),
        ("linear", lambda a, m, c: F.linear(a, m, c), [x34, on_gpu(rng.standard_normal((5, 4))), on_gpu(
            rng.standard_normal(5))]),
        ("conv2d im2col", lambda a, k, c: F.conv2d(a, k, c, stride=2, padding=1), [img, w, b]),
        ("conv2d dilated", lambda a, k: F.conv2d(a, k, padding=2, dilation=2), [img, w]),
        ("conv2d shift", lambda a, k, c: Conv2dFn(1, 1, method="shift")(a, k, c), [img, w, b]),
        ("conv_transpose2d", lambda a, k: F.conv_transpose2d(a, k, stride=2), [img, wt]),
        ("max_pool2d", lambda a: F.max_pool2d(a, 3, 2, 1), [on_gpu(spread(rng, (2, 3, 5, 6)))]),
        ("batch_norm train", lambda a, g, c: F.batch_norm(a, None, None, g, c, training=True),
         [img, gamma, beta]),
        ("batch_norm eval", lambda a, g, c: F.batch_norm(a, mean, var, g, c, training=False),
         [img, gamma, beta]),
        ("frozen_batch_norm", lambda a: F.frozen_batch_norm(a, mean, var, to_device(np.ones(3), "gpu"),
                                                            to_device(np.zeros(3), "gpu")), [img]),
        ("interpolate nearest 2x", lambda a: F.interpolate(a, scale_factor=2), [img]),
        ("interpolate nearest 7x9", lambda a: F.interpolate(a, size=(7, 9)), [img]),
        ("interpolate bilinear", lambda a: F.interpolate(a, size=(8, 4), mode="bilinear"), [img]),
        ("cross_entropy", lambda a: F.cross_entropy(a, labels), [x34]),
        ("bce with logits", lambda a, t: F.binary_cross_entropy_with_logits(a, t),
         [x34, on_gpu(targets01)]),
        ("smooth_l1", lambda a, c: F.smooth_l1_loss(a, c, beta=0.5, reduction="sum"),
         [x34, on_gpu(rng.standard_normal((3, 4)))]),
        ("roi_align aligned", lambda a: F.roi_align(a, rois, (3, 2), 0.5, 2, True), [feat]),
        ("roi_align adaptive, not aligned", lambda a: F.roi_align(a, rois, (2, 3), 0.5, 0, False), [feat]),
        ("roi_pool", lambda a: F.roi_pool(a, rois, (2, 2), 0.5), [pool_feat]),
    ]



@gpu
def test_every_function_gradcheck_on_cupy(rng):
    """gradcheck (float64, random upstream gradient) of every Function with CuPy inputs, and the
    output and gradients equal to the same call on NumPy."""
    failures = []
    for name, fn, inputs in _cases(rng):
        try:
            assert all(type(t.data).__module__.startswith("cupy") for t in inputs)
            gradcheck(fn, inputs, directions=4 if max(t.size for t in inputs) > 60 else None)
            # the same numbers on the CPU
            cpu_inputs = [Tensor(t.numpy(), requires_grad=t.requires_grad) for t in inputs]
            out_g, out_c = fn(*inputs), fn(*cpu_inputs)
            assert type(out_g.data).__module__.startswith("cupy"), "output left the GPU"
            np.testing.assert_allclose(out_g.numpy(), out_c.data, rtol=1e-10, atol=1e-10)
        except Exception as e:  # collect all, so one run on a GPU machine shows every problem
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- 2. kernels: CuPy vs NumPy/Numba
@gpu
@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0)])
def test_roi_align_cuda_matches_numba_on_fpn_sized_maps(rng, aligned, ratio):
    from minimask.bench.kernels import random_boxes
    from minimask.kernels.roi_align import roi_align_backward, roi_align_forward

    x = rng.standard_normal((2, 16, 50, 84)).astype(np.float32)
    rois = random_boxes(rng, 200, 800, 1344)
    ref = roi_align_forward(x, rois, (7, 7), 1 / 16, ratio, aligned)
    out = roi_align_forward(to_device(x, "gpu"), to_device(rois, "gpu"), (7, 7), 1 / 16, ratio, aligned)
    np.testing.assert_allclose(to_device(out, "cpu"), ref, rtol=1e-4, atol=1e-5)
    gy = rng.standard_normal(ref.shape).astype(np.float32)
    gref = roi_align_backward(gy, rois, x.shape, 1 / 16, ratio, aligned)
    gx = roi_align_backward(to_device(gy, "gpu"), to_device(rois, "gpu"), x.shape, 1 / 16, ratio, aligned)
    np.testing.assert_allclose(to_device(gx, "cpu"), gref, rtol=1e-4, atol=1e-4)  # atomics: any order
    empty = roi_align_forward(to_device(x, "gpu"), to_device(np.zeros((0, 5)), "gpu"), (7, 7), 1 / 16)
    assert empty.shape == (0, 16, 7, 7)


@gpu
def test_nms_cuda_matches_numba_with_ties_and_many_boxes(rng):
    from minimask.kernels.nms import nms_cupy, nms_numba

    for n in (1, 63, 64, 65, 3000):
        boxes = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([boxes, boxes + rng.uniform(5, 60, (n, 2))], 1)
        scores = np.round(rng.uniform(0, 1, n), 2)  # many equal scores: input order must break ties
        for thr in (0.3, 0.7):
            expected = nms_numba(boxes, scores, thr)
            got = nms_cupy(to_device(boxes, "gpu"), to_device(scores, "gpu"), thr)
            np.testing.assert_array_equal(to_device(got, "cpu"), expected)


@gpu
def test_kernels_dispatch_to_cuda_for_cupy_arrays(rng, monkeypatch):
    """With the Numba kernels made to fail, every op still runs on CuPy arrays: nothing on the GPU
    path falls back to a Numba (host) kernel."""
    from minimask.kernels import nms, paste_masks, roi_align, roi_pool
    from minimask.ops import nms as ops_nms
    from minimask.ops.masks import paste_masks_in_image

    def refuse(*args, **kwargs):
        raise AssertionError("a Numba kernel was called on the GPU path")

    for module, name in [(roi_align, "_forward_numba"), (roi_align, "_backward_numba"),
                         (roi_pool, "_forward_numba"), (roi_pool, "_backward_numba"),
                         (nms, "_nms_sorted_numba"), (paste_masks, "_paste_numba")]:
        monkeypatch.setattr(module, name, refuse)
    x = on_gpu(rng.standard_normal((2, 2, 6, 7)))
    rois = to_device(ROIS, "gpu")
    F.roi_align(x, rois, (2, 2), 0.5, 2).sum().backward()
    F.roi_pool(x, rois, (2, 2), 0.5).sum().backward()
    boxes = to_device(ROIS[:, 1:], "gpu")
    ops_nms(boxes, to_device(np.array([0.9, 0.8, 0.7]), "gpu"), 0.5)
    masks = to_device(rng.uniform(0, 1, (3, 28, 28)).astype(np.float32), "gpu")
    out = paste_masks_in_image(masks, boxes, (20, 20))
    assert type(out).__module__.startswith("cupy")


# ---------------------------------------------------------------- 3. the model: CuPy vs NumPy
def _shapes_batch():
    from test_mask_rcnn import three_shapes_scene

    from minimask.data.transforms import hflip

    image, target = three_shapes_scene()
    flipped, flipped_target = hflip(image, target)
    return [image, flipped], [target, flipped_target]


@gpu
def test_model_forward_on_cupy_matches_numpy():
    """The same weights and inputs on both devices: FPN features agree to float32 rounding, the
    training losses (same seeds, so the same sampled anchors and RoIs) closely, and so do the
    gradients of the weights."""
    from minimask.engine.trainer import seed_samplers
    from minimask.models import LOSS_NAMES

    images, targets = _shapes_batch()
    cpu, gpu_model = MaskRCNN(preset("shapes")), MaskRCNN(preset("shapes"))
    gpu_model.to("gpu")
    assert all(p.device == "gpu" for p in gpu_model.parameters())

    batch, _, _ = cpu.transform(images)
    f_cpu = cpu.backbone(Tensor(batch))
    f_gpu = gpu_model.backbone(Tensor(to_device(batch, "gpu")))
    for a, b in zip(f_cpu, f_gpu):
        assert type(b.data).__module__.startswith("cupy")
        np.testing.assert_allclose(b.numpy(), a.data, rtol=1e-3, atol=1e-4)

    losses = {}
    for name, model in (("cpu", cpu), ("gpu", gpu_model)):
        model.train()
        seed_samplers(model, 0, 0)
        out = model(images, targets)
        total = out[LOSS_NAMES[0]]
        for k in LOSS_NAMES[1:]:
            total = total + out[k]
        total.backward()
        losses[name] = {k: float(v.item()) for k, v in out.items()}
    for k in LOSS_NAMES:
        assert losses["gpu"][k] == pytest.approx(losses["cpu"][k], rel=2e-3, abs=1e-4), k
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu_model.parameters()):
        if p_cpu.grad is not None:
            scale = max(np.abs(p_cpu.grad).max(), 1e-6)
            np.testing.assert_allclose(to_device(p_gpu.grad, "cpu") / scale, p_cpu.grad / scale, atol=2e-2,
                                       err_msg=name)

    cpu.eval()
    gpu_model.eval()
    p_cpu, p_gpu = cpu.predict(images[:1])[0], gpu_model.predict(images[:1])[0]
    assert all(type(v).__module__.startswith("cupy") for v in p_gpu.values())
    assert len(p_gpu["boxes"]) == len(p_cpu["boxes"])


@gpu
def test_overfits_one_image_on_gpu():
    """tests/test_mask_rcnn.py's overfit test with the model, data and every kernel on CuPy."""
    from test_mask_rcnn import OVERFIT_ITERS, OVERFIT_LR, mask_iou, three_shapes_scene, total_loss

    from minimask.optim import SGD

    image, target = three_shapes_scene()
    model = MaskRCNN(preset("shapes")).to("gpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=OVERFIT_LR, momentum=0.9)
    history = []
    for it in range(OVERFIT_ITERS):
        for g in opt.param_groups:
            g["lr"] = OVERFIT_LR * min(1.0, (it + 1) / 10)
        total = total_loss(model([to_device(image, "gpu")], [target]))
        assert type(total.data).__module__.startswith("cupy")
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.item()))
    assert all(type(b).__module__.startswith("cupy") for s in opt.state.values() for b in s.values())
    assert np.isfinite(history).all()
    assert np.mean(history[-5:]) < 0.5, f"loss did not fall enough: {history[::10]} ... {history[-5:]}"
    found = {k: to_device(v, "cpu") for k, v in model.predict([image])[0].items()}
    for k in range(3):
        of_class = np.nonzero(found["labels"] == target["labels"][k])[0]
        assert len(of_class), f"object {k} not found: labels {found['labels']}"
        assert found["scores"][of_class[0]] > 0.5
        assert mask_iou(found["masks"][of_class[0]], target["masks"][k]) > 0.8


# ---------------------------------------------------------------- 4. training, checkpoints, CLI
@pytest.fixture
def tiny_shapes(tmp_path):
    from minimask.data import make_split

    folder = tmp_path / "shapes"
    return make_split(folder, "train", 8, 0, 128), make_split(folder, "val", 4, 1, 128)


@gpu
def test_train_on_gpu_checkpoint_loads_on_cpu_and_resumes_from_cpu(tmp_path, tiny_shapes):
    from minimask.engine import Predictor
    from minimask.engine.checkpoint import load_checkpoint
    from minimask.engine.trainer import train

    train_ann, val_ann = tiny_shapes
    cfg = dataclasses.replace(preset("shapes"), iters=4, batch_size=2, checkpoint_period=2, eval_period=0)
    summary = train(cfg, train_ann, val_ann=val_ann, out_dir=str(tmp_path / "gpu"), device="gpu",
                    progress=False)
    assert summary["eval"] is not None
    state = load_checkpoint(summary["checkpoint"])  # saved from the GPU: plain NumPy arrays
    assert all(isinstance(v, np.ndarray) for v in state["model"].values())
    assert all(isinstance(v, np.ndarray) for s in state["optim"]["state"].values() for v in s.values())

    from minimask.data import CocoDataset

    image = CocoDataset(val_ann, train=False)[0][0]
    on_cpu = Predictor.from_checkpoint(summary["checkpoint"], device="cpu", score_thresh=0.0)(image)
    on_gpu_ = Predictor.from_checkpoint(summary["checkpoint"], device="gpu", score_thresh=0.0)(image)
    assert isinstance(on_gpu_["boxes"], np.ndarray)  # the predictor hands back NumPy
    n = min(len(on_cpu["scores"]), len(on_gpu_["scores"]), 5)
    np.testing.assert_allclose(on_gpu_["scores"][:n], on_cpu["scores"][:n], rtol=1e-2, atol=1e-3)

    # a CPU run's checkpoint continues on the GPU (momentum buffers moved to the device)
    cpu_dir = str(tmp_path / "cpu")
    train(dataclasses.replace(cfg, iters=2), train_ann, out_dir=cpu_dir, device="cpu", progress=False)
    resumed = train(cfg, train_ann, out_dir=cpu_dir, device="gpu", resume=True, progress=False)
    assert resumed["start_iter"] == 2 and np.isfinite(resumed["final_losses"]["total"])


@gpu
def test_cli_train_eval_predict_on_gpu(tmp_path, tiny_shapes, capsys):
    from minimask.cli import main

    train_ann, val_ann = tiny_shapes
    out = tmp_path / "run"
    assert main(["train", "--config", "shapes", "--device", "gpu", "--train-ann", train_ann,
                 "--val-ann", val_ann, "--iters", "3", "--set", "batch_size=2", "--out", str(out)]) == 0
    assert "segm AP" in capsys.readouterr().out
    ckpt = str(out / "model_0000003.npz")
    assert main(["eval", "--checkpoint", ckpt, "--ann", val_ann, "--device", "gpu",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "coco_eval.json").read_text())
    folder = os.path.join(os.path.dirname(val_ann), "images")
    image = os.path.join(folder, sorted(os.listdir(folder))[0])
    pred = str(tmp_path / "p")
    assert main(["predict", "--checkpoint", ckpt, image, "--device", "gpu", "--out", pred]) == 0
    assert (tmp_path / "p" / "detections.json").is_file()


@pytest.mark.skipif(gpu_available(), reason="checks the message given where there is no GPU")
def test_device_gpu_without_gpu_is_a_clear_error(capsys):
    from minimask.cli import main

    for argv in (["train", "--device", "gpu"],
                 ["eval", "--checkpoint", "x.npz", "--ann", "a.json", "--device", "gpu"],
                 ["predict", "--checkpoint", "x.npz", "a.png", "--device", "gpu"],
                 ["bench", "kernels", "--device", "gpu"],
                 ["bench", "gpu"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "gpu" in err and "CuPy" in err and "minimask[gpu]" in err, err
        assert "Traceback" not in err


# ---------------------------------------------------------------- 5. memory and benchmarks
@gpu
def test_r50_fpn_training_step_at_800x1333_fits_16_gb():
    """One SGD step of r50_fpn on two 800x1333 images: CuPy's pool stays under 16 GB (a user's
    GPU), and the estimate of ``minimask bench memory`` is not far below what was used."""
    import cupy

    from minimask.bench.memory import _synthetic_batch, estimate
    from minimask.optim import SGD

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    model = MaskRCNN(preset("r50_fpn")).to("gpu")
    opt = SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    images, targets = _synthetic_batch(2, 800, 1333)
    total = None
    for v in model(images, targets).values():
        total = v if total is None else total + v
    opt.zero_grad()
    total.backward()
    opt.step()
    cupy.cuda.Device().synchronize()
    used = pool.total_bytes()
    assert used < 16 * 2**30, f"{used / 2**30:.2f} GB"
    assert estimate()["peak"] > 0.5 * used


def test_memory_estimate_fits_16_gb_and_chunks_columns():
    """The shape-only estimate (small images, so it runs in seconds): columns are never built
    bigger than the GPU chunk budget, and the step fits in 16 GB."""
    from minimask.bench.memory import estimate
    from minimask.functional.conv import CHUNK_BYTES

    r = estimate(batch=1, size=(256, 384))
    assert r["fits"]
    assert r["largest_chunk"] <= CHUNK_BYTES["gpu"] < r["largest_full"]  # the P2 3x3 convs are cut up
    assert len(r["convs"]) > 60 and r["activations"] > 0
    assert all(np.isfinite(list(r["losses"].values())))


def test_bench_gpu_plumbing_on_the_cpu(tmp_path):
    """``bench gpu`` end to end on the CPU at a small size, the model part with the small
    ``shapes`` model (the r50_fpn run, beside torchvision, is for the GPU)."""
    from minimask.bench.gpu import main

    path = tmp_path / "bench.json"
    results = main(device="cpu", repeat=1, size=(64, 96), json_path=str(path), parts=("kernels", "model"),
                   config="shapes")
    names = [r["name"] for r in results["rows"]]
    assert any(n.startswith("RoIAlign") for n in names) and any(n.startswith("NMS") for n in names)
    assert any("inference" in n for n in names) and any("training step" in n for n in names)
    assert all(r["minimask"] > 0 for r in results["rows"])
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(results["rows"]))


@gpu
def test_bench_gpu_runs_on_the_gpu(tmp_path):
    from minimask.bench.gpu import main

    results = main(device="gpu", repeat=1, size=(128, 192), json_path=str(tmp_path / "b.json"))
    rows = {r["name"].split(" ")[0]: r for r in results["rows"]}
    assert "RoIAlign" in rows and "NMS" in rows
