"""minimask bench train: its fields and plumbing (not its timings), and the MAC count it rests on."""

import json

import numpy as np
import pytest

from minimask import Tensor
from minimask.bench import flops
from minimask.bench.train import image_size, run, sgemm_gflops, shapes_batches
from minimask.cli import main
from minimask.functional import conv2d, conv_transpose2d, linear
from minimask.models import preset

TINY = ["batch_size=2", "min_size=(64,)", "max_size=64"]  # the shapes model on 64 px images


def test_counting_counts_each_layer_kind():
    """Multiply-adds by hand: conv N O Ho Wo C kh kw, deconv N Cin H W Cout kh kw, fc rows in out."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 9, 8)).astype(np.float32))
    w = Tensor(rng.standard_normal((5, 3, 3, 3)).astype(np.float32))
    wt = Tensor(rng.standard_normal((5, 4, 2, 2)).astype(np.float32))
    fc = Tensor(rng.standard_normal((7, 6)).astype(np.float32))
    with flops.counting() as count:
        y = conv2d(x, w, stride=2, padding=1)            # (2, 5, 5, 4)
        conv_transpose2d(y, wt, stride=2)                # each of 2*5*5*4 inputs spreads 4 x 2x2
        linear(Tensor(np.ones((3, 10, 6), np.float32)), fc)
    assert y.shape == (2, 5, 5, 4)
    expected = {"Conv2dFn": 2 * 5 * 5 * 4 * 3 * 9, "ConvTranspose2dFn": 2 * 5 * 5 * 4 * 4 * 4,
                "Linear": 3 * 10 * 6 * 7}
    assert count.by_kind == expected and count.macs == sum(expected.values())
    assert flops.step_gflop(count.macs) == pytest.approx(6 * count.macs / 1e9)
    conv2d(x, w)  # outside the block: not counted, and the Functions are themselves again
    assert count.macs == sum(expected.values())


def test_inputs():
    cfg = preset("shapes")
    assert image_size(cfg) == (128, 128)
    assert image_size(preset("r50_fpn")) == (800, 1067)  # 3:4, as most COCO images
    (images, targets), = shapes_batches(1, 3, (40, 56))
    assert len(images) == 3 and all(im.shape == (40, 56, 3) and im.dtype == np.uint8 for im in images)
    for t in targets:
        m = t["masks"]
        assert m.shape[1:] == (40, 56) and len(m) == len(t["boxes"]) == len(t["labels"]) > 0
        assert (t["labels"] >= 1).all() and (t["labels"] <= 3).all()
        for box, mask in zip(t["boxes"], m):  # each box is its mask's
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert sgemm_gflops(n=64, repeat=2) > 0


def _check_side(side, gflop_expected=None):
    assert side["wall_ms"] > 0 and side["cpu_ms"] >= 0 and side["gflop"] > 0
    assert side["gflops_per_s"] == pytest.approx(side["gflop"] / side["wall_ms"] * 1e3)
    if gflop_expected is not None:
        assert side["gflop"] == gflop_expected


def test_bench_train_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "train", "--config", "shapes", "--repeat", "1", "--json", str(out)]
         + [a for kv in TINY for a in ("--set", kv)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["config"] == "shapes" and r["overrides"] == TINY and r["batch"] == 2 and r["size"] == [64, 64]
    assert r["sgemm_gflops"] > 0 and r["cpu"] and r["threads"]["blas"] >= 1 and r["threads"]["numba"] >= 1
    assert r["repeat"] == 1 and r["warmup"] >= 1
    _check_side(r["train"]["minimask"])
    _check_side(r["infer"]["minimask"])
    assert len(r["train"]["minimask"]["wall_all_ms"]) == 1
    assert np.isfinite(r["train"]["loss_first"]) and np.isfinite(r["train"]["loss_last"])
    assert {"backbone.body", "rpn", "roi_heads.mask_head", "rest"} <= set(r["infer"]["minimask"]["stages_ms"])
    for text in ("sgemm", "training step, 2 images 64x64", "inference, one 64x64 image", "GFLOP/s",
                 "inference by stage", f"wrote {out}"):
        assert text in printed
    tv = r["torchvision"]
    if tv["available"]:  # torchvision's compiled operators run here: both sides, and their ratio
        _check_side(r["train"]["torchvision"], r["train"]["minimask"]["gflop"])
        _check_side(r["infer"]["torchvision"], r["infer"]["minimask"]["gflop"])
        assert r["train"]["ratio_wall"] == pytest.approx(r["train"]["minimask"]["wall_ms"]
                                                         / r["train"]["torchvision"]["wall_ms"])
        assert "ratio" in printed
    else:  # no torch, or stand-in operators (the tests' tv_shim): said, and minimask's side only
        assert tv["problem"] and f"no torchvision side: {tv['problem']}" in printed
        assert "torchvision" not in r["train"] and "ratio_wall" not in r["train"]


def test_stage_times_time_the_shared_submodules_and_undo_it():
    """stage_times records each STAGES submodule's calls (inside the whole call's time) and
    leaves the model as it was; on torchvision's mirror through forward hooks, removed after."""
    import time

    from minimask.bench.train import STAGES, stage_summary, stage_times
    from minimask.models import build_model
    from minimask.models.config import override

    cfg = override(preset("shapes"), TINY)
    model = build_model(cfg)
    (images, _), = shapes_batches(1, 1, (64, 64))
    calls, totals = [], []
    for _ in range(2):
        with stage_times(model, {}) as seconds:
            t0 = time.perf_counter()
            model.predict(images)
            totals.append(time.perf_counter() - t0)
        calls.append(seconds)
    assert {"backbone.body", "backbone.fpn", "rpn", "roi_heads.box_head"} <= set(seconds) <= set(STAGES)
    assert all(v > 0 for v in seconds.values()) and sum(seconds.values()) < totals[-1]
    assert "forward" not in model.backbone.body.__dict__  # unwrapped, and the poolers put back
    assert type(model.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"
    summary = stage_summary(calls, totals)
    assert summary["rest"] > 0 and summary["backbone.body"] > 0

    from test_interop_training import torchvision_or_skip

    tv = torchvision_or_skip()
    import torch

    from minimask.bench.torch_side import build_mirror
    mirror = build_mirror(torch, tv, cfg).eval()
    with stage_times(mirror, {}) as seconds, torch.no_grad():
        mirror([torch.zeros(3, 64, 64)])
    assert {"backbone.body", "backbone.fpn", "rpn", "roi_heads.box_head"} <= set(seconds)
    assert not mirror.backbone.body._forward_hooks and not mirror.backbone.body._forward_pre_hooks


def test_bench_train_refuses_keypoint_configs():
    with pytest.raises(SystemExit, match="not a Mask R-CNN with masks"):
        main(["bench", "train", "--config", "figures", "--repeat", "1"])


def test_bench_train_without_torch_side():
    r = run("shapes", repeat=1, overrides=TINY, with_torch=False, log=lambda *a: None)
    assert r["torchvision"] == {"available": False, "problem": "not asked for"}
    assert len(r["infer"]["detections"]) == 1 + r["warmup"]


def test_torchvision_side_steps_and_predicts():
    """The torch side's plumbing, run on the tests' stand-in operators (tv_shim, with the NumPy
    RoIAlign backward of test_interop_training): the bench itself refuses stand-ins for timing."""
    from test_interop_training import torch, torchvision_or_skip

    from minimask.bench.train import TorchvisionSide, torchvision_problem
    from minimask.models import build_model
    from minimask.models.config import override

    tv = torchvision_or_skip()
    cfg = override(preset("shapes"), TINY)
    ours = build_model(cfg)
    side = TorchvisionSide(torch, tv, cfg, ours, 1e-4, threads=1)
    (images, targets), = shapes_batches(1, 2, (64, 64))
    side.step(0, *side.inputs(images, targets))
    assert len(side.losses) == 1 and np.isfinite(side.losses[0])
    assert side.predict(side.inputs(images[:1])[0]) >= 0
    problem = torchvision_problem(torch, tv)
    loaded = any("torchvision" in str(p) for p in torch.ops.loaded_libraries)
    assert (problem is None) == loaded or (loaded and "roi_align" in problem)
