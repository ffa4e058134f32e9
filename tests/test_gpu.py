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
import sys

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


def _cases(rng, device="gpu"):
    """(name, fn, inputs) for every differentiable Function, inputs and constants on ``device``
    in float64 (the same seed gives the same numbers on either device)."""

    def param(a):  # a float64 input to differentiate
        return Tensor(to_device(np.asarray(a, dtype=np.float64), device), requires_grad=True)

    def dev(a):  # a constant
        return to_device(a, device)

    x34, b4 = param(rng.standard_normal((3, 4))), param(rng.standard_normal(4))
    pos = param(rng.uniform(0.5, 2.0, (3, 4)))
    img = param(rng.standard_normal((2, 3, 5, 6)))
    w = param(rng.standard_normal((4, 3, 3, 3)) * 0.3)
    b = param(rng.standard_normal(4))
    wt = param(rng.standard_normal((3, 2, 2, 2)) * 0.3)
    mean, var = dev(rng.standard_normal(3)), dev(rng.uniform(0.5, 2, 3))
    gamma, beta = param(rng.uniform(0.5, 1.5, 3)), param(rng.standard_normal(3))
    labels = dev(np.array([2, -1, 0]))
    targets01 = rng.uniform(0, 1, (3, 4))
    feat = param(rng.standard_normal((2, 2, 6, 7)))
    pool_feat = param(spread(rng, (2, 2, 6, 7)))
    rois = dev(ROIS)
    idx = dev(np.array([2, 0, 2, 1]))  # repeated: the backward is a scatter-add
    return [
        ("add broadcast", lambda a, c: a + c, [x34, b4]),
        ("sub", lambda a, c: a - c, [x34, b4]),
        ("mul", lambda a, c: a * c, [x34, b4]),
        ("div", lambda a, c: a / c, [x34, pos]),
        ("neg, pow, sqrt, exp, log, abs",
         lambda p: F.sqrt(p) + F.pow(p, 3) - F.exp(-p) + F.log(p) + F.abs(-p), [pos]),
        ("matmul", lambda a, c: a @ c, [x34, param(rng.standard_normal((4, 5)))]),
        ("sum, mean", lambda a: F.sum(a, axis=1) + F.mean(a, axis=1), [x34]),
        ("reshape, transpose, flatten", lambda a: F.flatten(F.transpose(F.reshape(a, (2, 3, 2)), (2, 0, 1))),
         [x34]),
        ("getitem with repeated indices", lambda a: a[idx], [x34]),
        ("getitem boolean mask", lambda a: a[dev(np.array([True, False, True]))], [x34]),
        ("concat, stack", lambda a, c: F.concat([a, c], axis=0) + F.stack([a, c], 0).sum(axis=0).sum(),
         [x34, param(rng.standard_normal((3, 4)))]),
        ("pad2d", lambda a: F.pad2d(a, (1, 0, 2, 1)), [img]),
        ("relu", lambda a: F.relu(a), [param(spread(rng, (3, 4)))]),
        ("sigmoid, softmax, log_softmax",
         lambda a: F.sigmoid(a) + F.softmax(a, 1) + F.log_softmax(a, 0), [x34]),
        ("linear", lambda a, m, c: F.linear(a, m, c), [x34, param(rng.standard_normal((5, 4))), param(
            rng.standard_normal(5))]),
        ("conv2d im2col", lambda a, k, c: F.conv2d(a, k, c, stride=2, padding=1), [img, w, b]),
        ("conv2d dilated", lambda a, k: F.conv2d(a, k, padding=2, dilation=2), [img, w]),
        ("conv2d shift", lambda a, k, c: Conv2dFn(1, 1, method="shift")(a, k, c), [img, w, b]),
        ("conv_transpose2d", lambda a, k: F.conv_transpose2d(a, k, stride=2), [img, wt]),
        ("max_pool2d", lambda a: F.max_pool2d(a, 3, 2, 1), [param(spread(rng, (2, 3, 5, 6)))]),
        ("batch_norm train", lambda a, g, c: F.batch_norm(a, None, None, g, c, training=True),
         [img, gamma, beta]),
        ("batch_norm eval", lambda a, g, c: F.batch_norm(a, mean, var, g, c, training=False),
         [img, gamma, beta]),
        ("frozen_batch_norm", lambda a: F.frozen_batch_norm(a, mean, var, dev(np.ones(3)),
                                                            dev(np.zeros(3))), [img]),
        ("interpolate nearest 2x", lambda a: F.interpolate(a, scale_factor=2), [img]),
        ("interpolate nearest 7x9", lambda a: F.interpolate(a, size=(7, 9)), [img]),
        ("interpolate bilinear", lambda a: F.interpolate(a, size=(8, 4), mode="bilinear"), [img]),
        ("cross_entropy", lambda a: F.cross_entropy(a, labels), [x34]),
        ("bce with logits", lambda a, t: F.binary_cross_entropy_with_logits(a, t),
         [x34, param(targets01)]),
        ("smooth_l1", lambda a, c: F.smooth_l1_loss(a, c, beta=0.5, reduction="sum"),
         [x34, param(rng.standard_normal((3, 4)))]),
        ("roi_align aligned", lambda a: F.roi_align(a, rois, (3, 2), 0.5, 2, True), [feat]),
        ("roi_align adaptive, not aligned", lambda a: F.roi_align(a, rois, (2, 3), 0.5, 0, False), [feat]),
        ("roi_pool", lambda a: F.roi_pool(a, rois, (2, 2), 0.5), [pool_feat]),
    ]



@gpu
def test_every_function_gradcheck_on_cupy():
    """gradcheck (float64, random upstream gradient) of every Function with CuPy inputs, and the
    output and gradients equal to the same call on NumPy."""
    failures = []
    gpu_cases, cpu_cases = (_cases(np.random.default_rng(0), d) for d in ("gpu", "cpu"))
    for (name, fn, inputs), (_, cpu_fn, cpu_inputs) in zip(gpu_cases, cpu_cases):
        try:
            assert all(type(t.data).__module__.startswith("cupy") for t in inputs)
            gradcheck(fn, inputs, directions=4 if max(t.size for t in inputs) > 60 else None)
            # the same numbers on the CPU: output and every input's gradient
            outs = []
            for f, xs in ((fn, inputs), (cpu_fn, cpu_inputs)):
                for t in xs:
                    t.grad = None
                out = f(*xs)
                g = np.random.default_rng(1).standard_normal(out.shape)
                out.backward(g)
                outs.append([out.numpy()] + [to_device(t.grad, "cpu") for t in xs])
            assert type(fn(*inputs).data).__module__.startswith("cupy"), "output left the GPU"
            for a, b in zip(*outs):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
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
    """The same weights and inputs on both devices: FPN features agree to float32 rounding, and
    so do the RPN's losses (same seeds: the same sampled anchors), the heads' losses on the same
    proposals (the RPN's own proposals could differ where two scores tie at the top-k cut), the
    gradients of every weight, and the top detection scores."""

    images, targets = _shapes_batch()
    rng = np.random.default_rng(3)
    proposals = []
    for t in targets:  # the gt boxes, jittered, plus random boxes: positives and negatives
        jitter = t["boxes"] + rng.uniform(-4, 4, t["boxes"].shape)
        xy = rng.uniform(0, 100, (40, 2))
        random = np.concatenate([xy, xy + rng.uniform(8, 28, (40, 2))], 1)
        proposals.append(np.clip(np.concatenate([jitter, random]), 0, 128).astype(np.float32))
    cpu, gpu_model = MaskRCNN(preset("shapes")), MaskRCNN(preset("shapes"))
    gpu_model.to("gpu")
    assert all(p.device == "gpu" for p in gpu_model.parameters())

    results = {}
    for name, model in (("cpu", cpu), ("gpu", gpu_model)):
        model.train()
        model.reseed(0, 0)
        batch, sizes, moved = model.transform(images, targets)
        features = model.backbone(Tensor(batch))
        _, rpn_losses = model.rpn(features, sizes, batch.shape[-2:], moved)
        _, head_losses = model.roi_heads(features, proposals, sizes, moved)
        losses = {**rpn_losses, **head_losses}
        total = None
        for v in losses.values():
            total = v if total is None else total + v
        total.backward()
        results[name] = dict(features=[f.numpy() for f in features],
                             losses={k: float(v.item()) for k, v in losses.items()},
                             device={type(v.data).__module__.split(".")[0] for v in losses.values()})
    assert results["gpu"]["device"] == {"cupy"} and results["cpu"]["device"] == {"numpy"}
    for a, b in zip(results["cpu"]["features"], results["gpu"]["features"]):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    for k, v in results["cpu"]["losses"].items():
        assert results["gpu"]["losses"][k] == pytest.approx(v, rel=1e-3, abs=1e-5), k
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu_model.parameters()):
        if p_cpu.grad is not None:
            scale = max(np.abs(p_cpu.grad).max(), 1e-6)
            np.testing.assert_allclose(to_device(p_gpu.grad, "cpu") / scale, p_cpu.grad / scale, atol=1e-2,
                                       err_msg=name)

    found = [m.predict(images[:1])[0] for m in (cpu, gpu_model)]
    assert all(type(v).__module__.startswith("cupy") for v in found[1].values())
    s_cpu, s_gpu = found[0]["scores"], to_device(found[1]["scores"], "cpu")
    n = min(len(s_cpu), len(s_gpu), 5)
    np.testing.assert_allclose(s_gpu[:n], s_cpu[:n], rtol=1e-3, atol=1e-4)


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
        assert "gpu" in err and "CuPy" in err and "minimask[gpu-cuda1" in err, err
        assert "Traceback" not in err


@pytest.fixture
def cupy_fails_to_import(monkeypatch):
    """``import cupy`` raises ImportError, and the backend has not looked for CuPy yet."""
    from minimask import backend

    monkeypatch.setitem(sys.modules, "cupy", None)  # a None entry makes the import fail
    for name, value in (("_cupy", None), ("_cupy_checked", False), ("_cupy_problem", None)):
        monkeypatch.setattr(backend, name, value)
    monkeypatch.setattr(backend, "_installed_cupy_wheels", lambda: [])
    return backend


@pytest.mark.parametrize("driver,wheel,extra", [((13, 0), "cupy-cuda13x", "gpu-cuda13"),
                                                ((12, 4), "cupy-cuda12x", "gpu-cuda12")])
def test_require_gpu_names_the_cupy_wheel_for_the_drivers_cuda(cupy_fails_to_import, monkeypatch, driver,
                                                               wheel, extra):
    backend = cupy_fails_to_import
    monkeypatch.setattr(backend, "driver_cuda_version", lambda: driver)
    with pytest.raises(RuntimeError) as e:
        backend.require_gpu("--device gpu")
    message = str(e.value)
    assert "--device gpu asked for, but CuPy is not installed or does not load" in message
    assert f"CUDA {driver[0]}.{driver[1]}" in message and f"minimask[{extra}]" in message and wheel in message
    (other,) = {"cupy-cuda12x", "cupy-cuda13x"} - {wheel}
    assert other not in message, message
    # the other wheel installed: say to remove it (two CuPy wheels break each other)
    monkeypatch.setattr(backend, "_installed_cupy_wheels", lambda: [other])
    assert f"pip uninstall {other}" in backend.cupy_wheel_advice()


def test_require_gpu_without_a_driver_lists_both_extras_and_how_to_tell(cupy_fails_to_import, monkeypatch):
    backend = cupy_fails_to_import
    monkeypatch.setattr(backend, "driver_cuda_version", lambda: None)
    with pytest.raises(RuntimeError) as e:
        backend.require_gpu("minimask bench gpu")
    message = str(e.value)
    assert "minimask[gpu-cuda12]" in message and "minimask[gpu-cuda13]" in message
    assert "nvidia-smi" in message and "CUDA Version" in message and "--device cpu" in message
    assert "driver runs CUDA 11.8 at most" in backend.cupy_wheel_advice((11, 8))


def test_driver_cuda_version_read_from_libcuda_or_nvidia_smi(monkeypatch):
    """cuDriverGetVersion's integer (12040 is CUDA 12.4), else nvidia-smi's header line."""
    import ctypes
    import shutil
    import subprocess

    from minimask import backend

    class FakeLibcuda:
        def __init__(self, name):
            pass

        def cuDriverGetVersion(self, ref):
            ref._obj.value = 12040
            return 0

    monkeypatch.setattr(ctypes, "CDLL", FakeLibcuda)
    assert backend.driver_cuda_version() == (12, 4)

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    header = ("+-----------------------------------------------------------------------------------------+\n"
              "| NVIDIA-SMI 580.159.03             Driver Version: 580.159.03     CUDA Version: 13.0     |\n")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, header, ""))
    assert backend.driver_cuda_version() == (13, 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert backend.driver_cuda_version() is None


def test_gpu_check_script_records_every_step_even_out_of_time(tmp_path):
    """scripts/gpu_check.sh with no time budget: no step starts, yet each is in the summary with
    exit 124, and the script fails (the real run is for a GPU machine)."""
    import shutil
    import subprocess

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GPU_CHECK_BUDGET_S="0", PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    names = [s["step"] for s in summary["steps"]]
    assert names == ["wheels", "environment", "nvrtc", "pytest_gpu", "bench_fp32", "data", "train_gpu",
                     "loss_falls", "eval_cpu", "same_ap", "bench_tf32"]
    assert all(s["exit"] == 124 for s in summary["steps"]) and summary["failed"] == names
    assert "budget" in (tmp_path / "out" / "train_gpu.log").read_text()


# ---------------------------------------------------------------- 5. memory and benchmarks
@gpu
def test_r50_fpn_training_step_at_800x1333_fits_16_gb():
    """One SGD step of r50_fpn on two 800x1333 images: CuPy's pool stays under 16 GB (a user's
    GPU), and the estimate of ``minimask bench memory`` is not far below what was used."""
    import cupy

    from minimask.bench.memory import estimate, synthetic_batch
    from minimask.optim import SGD

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    model = MaskRCNN(preset("r50_fpn")).to("gpu")
    opt = SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    images, targets = synthetic_batch(2, 800, 1333)
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


def test_memory_estimate_fits_16_gb_and_chunks_columns(monkeypatch):
    """The shape-only estimate (small images and a small chunk budget, so it runs in seconds):
    columns are never built bigger than the GPU chunk budget, and the step fits in 16 GB."""
    from minimask.bench.memory import estimate
    from minimask.functional.conv import CHUNK_BYTES

    monkeypatch.setitem(CHUNK_BYTES, "gpu", 8 * 2**20)
    r = estimate(batch=1, size=(256, 384))
    assert r["fits"]
    assert r["largest_chunk"] <= CHUNK_BYTES["gpu"] < r["largest_full"]  # the P2 3x3 convs are cut up
    assert len(r["convs"]) > 60 and r["activations"] > 0
    assert all(np.isfinite(list(r["losses"].values())))


def test_bench_timing_medians_wait_for_the_device_and_skip_the_warmup(monkeypatch):
    """A fake clock: each step advances it by its own durations; the warm-up call is not timed,
    every reading comes after ``sync``, and the steps of ``medians_ms`` take turns."""
    from minimask.bench import timing

    clock, log = [0.0], []

    def make(name, durations):
        durations = iter(durations)

        def step():
            log.append(name)
            clock[0] += next(durations)

        def sync():
            log.append(name + " sync")
            clock[0] += 0.001  # the device finishing: inside the timed interval

        return step, sync

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    a, b = make("a", [9.0, 0.010, 0.030, 0.020]), make("b", [7.0, 0.1, 0.3, 0.2])
    assert timing.medians_ms([a, b], repeat=3) == pytest.approx([21.0, 201.0])
    assert log[:4] == ["a", "a sync", "b", "b sync"] and log[4:8] == ["a", "a sync", "b", "b sync"]
    step, sync = make("c", [5.0, 5.0, 0.004, 0.002, 0.006, 0.008])
    assert timing.median_ms(step, 4, sync, warmup=2) == pytest.approx(6.0)


@pytest.mark.slow
def test_bench_gpu_plumbing_on_the_cpu(tmp_path, monkeypatch):
    """``bench gpu`` end to end on the CPU at a small size, the model part with the small
    ``shapes`` model (the r50_fpn run, beside torchvision, is for the GPU).  The torchvision side
    is switched off: on this CPU build its operators are tests/tv_shim.py's stand-ins, which have
    no backward, and timing them would mean nothing."""
    from minimask.bench import torch_side
    from minimask.bench.gpu import main

    monkeypatch.setattr(torch_side, "load", lambda device, tf32=False: (None, None, "off in this CPU test"))

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
