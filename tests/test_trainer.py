"""Training engine: checkpoints, metrics, exact resume, NaN stop, clear errors.

The engine must not care which model it trains, so these tests use a tiny fake model whose
losses depend on the batch (pixel means, where the boxes are, so flips matter), on a running
buffer (like batch norm's statistics) and on a random sampler (like the RoI sampler): a resume
that got any of these wrong would give different losses.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from minimask import Tensor
from minimask.data import make_split
from minimask.engine.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from minimask.engine.trainer import train, train_step
from minimask.models.config import preset
from minimask.nn import Module, Parameter
from minimask.ops.matcher import BalancedPositiveNegativeSampler
from minimask.optim import SGD, WarmupMultiStepLR


class FakeModel(Module):
    """Regresses a number (about 0.8, nudged by where the first box is) from the mean colour."""

    def __init__(self, cfg, nan_at=None, fail_at=None):
        super().__init__()
        self.w = Parameter(np.array([[0.5], [-0.3], [0.2]], np.float32))
        self.bias = Parameter(np.array([0.1], np.float32))
        self.register_buffer("running", np.zeros(3, np.float32))
        self.sampler = BalancedPositiveNegativeSampler(8, 0.5, seed=cfg.seed)
        self.scale_rng = np.random.default_rng(cfg.seed)  # a generator held directly (as MaskRCNN's)
        self.nan_at, self.fail_at, self.calls = nan_at, fail_at, 0

    def reseed(self, seed, iteration):  # as MaskRCNN.reseed: every generator from (seed, iteration)
        self.sampler.rng = np.random.default_rng([seed, 2, iteration, 0])
        self.scale_rng = np.random.default_rng([seed, 2, iteration, 1])

    def forward(self, images, targets):
        it, self.calls = self.calls, self.calls + 1
        if it == self.fail_at:
            raise KeyboardInterrupt("the machine was switched off")
        feats = np.stack([im.reshape(-1, 3).mean(0) / 255.0 for im in images]).astype(np.float32)
        xs = np.array([t["boxes"][0, 0] / im.shape[1] for im, t in zip(images, targets)], np.float32)
        noise = self.sampler.rng.random(len(images)).astype(np.float32)  # random draws per iteration
        noise *= self.scale_rng.uniform(0.5, 1.5)
        self.running = 0.9 * self.running + 0.1 * feats.mean(0)
        pred = (Tensor(feats) @ self.w).reshape(-1) + self.bias
        loss_fit = ((pred - Tensor(0.8 + 0.05 * xs + 0.01 * noise)) ** 2).mean()
        loss_reg = (self.w * self.w).sum() * 0.01 + float(self.running.sum()) * 1e-3
        if it == self.nan_at:
            loss_reg = loss_reg * float("nan")
        return {"loss_fit": loss_fit, "loss_reg": loss_reg}

    def predict(self, images):
        empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                 "labels": np.zeros(0, np.int64)}
        return [dict(empty, masks=np.zeros((0,) + im.shape[:2], bool)) for im in images]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train_json = make_split(str(root), "train", 6, seed=0, size=64)
    val_json = make_split(str(root), "val", 3, seed=0, size=64)
    return train_json, val_json


def small_cfg(**changes):
    cfg = preset("shapes")
    settings = dict(batch_size=2, iters=20, lr=0.2, warmup_iters=5, warmup_factor=0.1, milestones=(15,),
                    checkpoint_period=5, keep_checkpoints=2, eval_period=0, hflip_prob=0.5, seed=3)
    settings.update(changes)
    return dataclasses.replace(cfg, **settings)


def run(shapes, out, cfg=None, resume=False, val=False, **model_kw):
    built = []

    def model_fn(c):
        built.append(FakeModel(c, **model_kw))
        return built[-1]

    summary = train(cfg or small_cfg(), shapes[0], val_ann=shapes[1] if val else None, out_dir=str(out),
                    resume=resume, log=lambda *a: None, model_fn=model_fn, progress=False)
    return summary, built[-1]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- a whole run


def test_run_writes_metrics_checkpoints_plot_and_follows_the_schedule(shapes, tmp_path):
    summary, model = run(shapes, tmp_path, val=True)
    cfg = small_cfg()

    records = read_metrics(tmp_path)
    assert [r["iter"] for r in records] == list(range(20))
    for r in records:
        assert set(r) >= {"loss_fit", "loss_reg", "total", "lr", "time"}
        assert r["total"] == pytest.approx(r["loss_fit"] + r["loss_reg"])
        # Warmup then one step down, from the formula (not from the scheduler's code).
        warm = cfg.warmup_factor * (1 - r["iter"] / 5) + r["iter"] / 5 if r["iter"] < 5 else 1.0
        assert r["lr"] == pytest.approx(cfg.lr * warm * (0.1 if r["iter"] >= 15 else 1.0))
    assert np.mean([r["loss_fit"] for r in records[-5:]]) < np.mean([r["loss_fit"] for r in records[:5]])

    # Checkpoints every 5, the newest 2 kept; the last one holds the final state.
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["model_0000015.npz", "model_0000020.npz"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    state = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert state["iteration"] == 20 and state["loader"]["seed"] == 3
    assert state["config"].class_names == ("circle", "triangle", "square")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(state["model"][k], v)
    assert len(state["optim"]["state"]) == 2  # the momentum buffers of w and bias

    with open(tmp_path / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The fake model finds nothing, so the final evaluation says AP 0 (and does not crash).
    assert summary["eval"]["bbox"]["AP"] == 0.0 and summary["eval"]["segm"]["AP"] == 0.0
    assert (tmp_path / "eval_0000020" / "coco_eval.json").exists()
    assert summary["final_losses"]["total"] == records[-1]["total"]
    assert summary["images_per_s"] > 0 and summary["checkpoint"].endswith("model_0000020.npz")


@pytest.mark.parametrize("how", ["stopped", "crashed"])
def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(shapes, tmp_path, how):
    _, whole_model = run(shapes, tmp_path / "whole")
    whole = read_metrics(tmp_path / "whole")

    part = tmp_path / "part"
    if how == "stopped":  # a 10-iteration run (checkpoint at 10), then asked for 20
        run(shapes, part, small_cfg(iters=10))
    else:  # killed during iteration 13: checkpoint at 10, metrics lines up to 12
        with pytest.raises(KeyboardInterrupt):
            run(shapes, part, fail_at=13)
        assert len(read_metrics(part)) == 13
    _, resumed_model = run(shapes, part, resume=True)
    resumed = read_metrics(part)

    keys = ("iter", "loss_fit", "loss_reg", "total", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
    for k, v in whole_model.state_dict().items():
        np.testing.assert_array_equal(resumed_model.state_dict()[k], v)


def test_nan_loss_stops_with_the_term_the_iteration_and_the_last_checkpoint(shapes, tmp_path):
    with pytest.raises(FloatingPointError) as err:
        run(shapes, tmp_path, nan_at=12)
    good = checkpoint_path(str(tmp_path), 10)
    assert str(err.value) == f"loss_reg is nan at iteration 12; the last good checkpoint is {good}"
    assert latest_checkpoint(str(tmp_path)) == good  # nothing written after the bad step
    assert len(read_metrics(tmp_path)) == 12
    state = load_checkpoint(good)
    assert all(np.isfinite(v).all() for v in state["model"].values())


def test_nan_before_any_checkpoint_says_so(shapes, tmp_path):
    with pytest.raises(FloatingPointError, match="loss_reg is nan at iteration 2; the last good checkpoint "
                                                 r"is none \(no checkpoint was written yet\)"):
        run(shapes, tmp_path, nan_at=2)


# ---------------------------------------------------------------- clear errors


def test_fresh_run_refuses_a_folder_with_checkpoints(shapes, tmp_path):
    run(shapes, tmp_path, small_cfg(iters=5))
    with pytest.raises(FileExistsError, match="already holds checkpoints .*model_0000005.npz.*--resume"):
        run(shapes, tmp_path)


def _with_bad_images(shapes, tmp_path):
    """The shapes set's JSON with image 0 missing, image 1 not an image and image 2 of another
    size than the JSON says, in a folder of its own (so the module's files stay intact)."""
    import shutil

    from PIL import Image

    with open(shapes[0]) as f:
        data = json.load(f)
    images = tmp_path / "images"
    shutil.copytree(os.path.join(os.path.dirname(shapes[0]), "images"), images)
    data["images"][0]["file_name"] = "no_such_image.png"
    (images / data["images"][1]["file_name"]).write_bytes(b"not a png at all")
    Image.new("RGB", (65, 64)).save(images / data["images"][2]["file_name"])
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    return str(ann), data


def test_bad_image_files_are_all_named_before_training(shapes, tmp_path):
    from minimask.data.coco import BadImagesError

    ann, data = _with_bad_images(shapes, tmp_path)
    with pytest.raises(BadImagesError) as err:
        train(small_cfg(), ann, out_dir=str(tmp_path / "run"), log=lambda *a: None, model_fn=FakeModel,
              progress=False)
    text = str(err.value)
    assert text.startswith(f"{ann}: 3 images cannot be used:")
    assert "no_such_image.png (image id 1): file not found" in text
    assert f"{data['images'][1]['file_name']} (image id 2): not an image Pillow can read" in text
    assert "(image id 3): is 65x64 pixels (width x height) but the JSON says 64x64" in text
    assert "--set skip_bad_images=True" in text
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_skip_bad_images_trains_on_the_rest(shapes, tmp_path):
    ann, _ = _with_bad_images(shapes, tmp_path)
    lines = []
    train(small_cfg(iters=3, skip_bad_images=True), ann, out_dir=str(tmp_path / "run"), log=lines.append,
          model_fn=FakeModel, progress=False)
    assert any("skipped 3 bad image files (skip_bad_images=True), 3 images left" in x for x in lines)
    assert len(read_metrics(tmp_path / "run")) == 3


def test_a_data_set_smaller_than_a_batch_trains_and_says_so(shapes, tmp_path):
    lines = []
    train(small_cfg(batch_size=8, iters=3), shapes[0], out_dir=str(tmp_path), log=lines.append,
          model_fn=FakeModel, progress=False)
    assert any("6 images are fewer than a batch of 8: each batch repeats them" in x for x in lines)
    assert [r["iter"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_no_usable_image_names_the_file(shapes, tmp_path):
    with open(shapes[0]) as f:
        data = json.load(f)
    for a in data["annotations"]:
        a["bbox"][2] = 0.5  # every box thinner than a pixel: all degenerate
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    images = os.path.join(os.path.dirname(shapes[0]), "images")
    with pytest.raises(ValueError, match=r"train\.json: no image with a usable annotation to train on \(of "
                                         r"its 6 images, 6 have no object"):
        train(small_cfg(), str(ann), images, out_dir=str(tmp_path / "run"), log=lambda *a: None,
              model_fn=FakeModel, progress=False)


def test_boxes_without_segmentations_refuse_a_mask_model_and_train_without_masks(shapes, tmp_path):
    with open(shapes[0]) as f:
        data = json.load(f)
    for a in data["annotations"]:
        del a["segmentation"]
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    images = os.path.join(os.path.dirname(shapes[0]), "images")
    kw = dict(log=lambda *a: None, model_fn=FakeModel, progress=False)
    with pytest.raises(ValueError, match="but no segmentation.*--set mask_on=False"):
        train(small_cfg(), str(ann), images, out_dir=str(tmp_path / "a"), **kw)
    train(small_cfg(iters=2, mask_on=False), str(ann), images, out_dir=str(tmp_path / "b"), **kw)
    assert len(read_metrics(tmp_path / "b")) == 2


def test_malformed_json_is_named(tmp_path):
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        train(small_cfg(), str(ann), out_dir=str(tmp_path / "run"), log=lambda *a: None,
              model_fn=FakeModel, progress=False)


def test_class_count_mismatch_says_what_to_set(shapes, tmp_path):
    with pytest.raises(ValueError, match=r"needs num_classes=4 .*--set num_classes=4"):
        run(shapes, tmp_path, small_cfg(num_classes=6))


# ---------------------------------------------------------------- interruptions


class SignalAt(FakeModel):
    """Sends this process ``signum`` while computing iteration ``at`` (as a Ctrl-C would)."""

    def __init__(self, cfg, at=None, signum=None):
        super().__init__(cfg)
        self.at, self.signum = at, signum

    def forward(self, images, targets):
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().forward(images, targets)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_iteration_saves_it_and_resume_is_exact(shapes, tmp_path, name):
    import signal

    from minimask.engine.trainer import TrainingInterrupted

    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    _, whole_model = run(shapes, tmp_path / "whole")
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted) as err:
        train(small_cfg(), shapes[0], out_dir=str(part), log=lambda *a: None, progress=False,
              model_fn=lambda c: SignalAt(c, at=7, signum=signum))
    # iteration 7 (sent during it) finished and was saved, between the periodic checkpoints
    assert err.value.signum == signum and err.value.iteration == 8 and not err.value.at_once
    assert err.value.checkpoint == checkpoint_path(str(part), 8) == latest_checkpoint(str(part))
    assert len(read_metrics(part)) == 8
    assert signal.getsignal(signum) is before  # the handler is put back
    _, resumed_model = run(shapes, part, resume=True)
    keys = ("iter", "loss_fit", "loss_reg", "total", "lr")
    assert [[r[k] for k in keys] for r in read_metrics(part)] == \
        [[r[k] for k in keys] for r in read_metrics(tmp_path / "whole")]
    for k, v in whole_model.state_dict().items():
        np.testing.assert_array_equal(resumed_model.state_dict()[k], v)


def test_resume_passes_over_an_unreadable_newest_checkpoint(shapes, tmp_path):
    run(shapes, tmp_path, small_cfg(iters=10, keep_checkpoints=0))   # checkpoints at 5 and 10
    with open(checkpoint_path(str(tmp_path), 10), "r+b") as f:
        f.truncate(1000)                                              # cut short
    (tmp_path / ".model_0000015.npz.abc.partial").write_bytes(b"half")  # left by a killed save
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 10, "loss_fi')                              # a line cut by a kill
    lines = []
    train(small_cfg(iters=12, keep_checkpoints=0), shapes[0], out_dir=str(tmp_path), resume=True,
          log=lines.append, model_fn=FakeModel, progress=False)
    text = "\n".join(lines)
    assert f"warning: {checkpoint_path(str(tmp_path), 10)}: not a readable minimask checkpoint" in text
    assert f"resuming from the previous good checkpoint, {checkpoint_path(str(tmp_path), 5)}" in text
    assert "removed 1 unfinished file(s) of a run killed while saving: " \
           ".model_0000015.npz.abc.partial" in text
    assert not (tmp_path / ".model_0000015.npz.abc.partial").exists()
    assert [r["iter"] for r in read_metrics(tmp_path)] == list(range(12))
    assert load_checkpoint(checkpoint_path(str(tmp_path), 10))["iteration"] == 10  # rewritten whole


def test_resume_with_no_readable_checkpoint_lists_them(shapes, tmp_path):
    run(shapes, tmp_path, small_cfg(iters=5))
    with open(checkpoint_path(str(tmp_path), 5), "wb") as f:
        f.write(b"PK\x03\x04 garbage")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be resumed from:\n  .*model_0000005\.npz"):
        run(shapes, tmp_path, resume=True)


# ---------------------------------------------------------------- pieces


def test_train_step_updates_once_and_refuses_a_nan_before_the_update():
    cfg = small_cfg()
    model = FakeModel(cfg, nan_at=1)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.0)
    scheduler = WarmupMultiStepLR(optimizer, (10,), warmup_iters=0)
    images = [np.full((8, 8, 3), 200, np.uint8)]
    targets = [{"boxes": np.array([[1.0, 1, 4, 4]], np.float32)}]
    w0 = model.w.data.copy()
    values = train_step(model, optimizer, scheduler, images, targets)
    assert set(values) == {"loss_fit", "loss_reg", "total"}
    assert values["total"] == pytest.approx(values["loss_fit"] + values["loss_reg"])
    assert not np.array_equal(model.w.data, w0) and scheduler.last_iter == 1
    w1 = model.w.data.copy()
    with pytest.raises(FloatingPointError, match="loss_reg is nan"):
        train_step(model, optimizer, scheduler, images, targets)
    np.testing.assert_array_equal(model.w.data, w1)  # no update from the bad step


def test_checkpoint_round_trip_and_pruning(tmp_path):
    cfg = small_cfg()
    model = FakeModel(cfg)
    opt = SGD([{"params": [model.w], "weight_decay": 1e-4}, {"params": [model.bias], "weight_decay": 0.0}],
              lr=0.1, momentum=0.9)
    sched = WarmupMultiStepLR(opt, [3], warmup_iters=2, warmup_factor=0.5)
    for _ in range(3):  # some momentum and a schedule position worth saving
        model.w.grad = np.full((3, 1), 0.25, np.float32)
        model.bias.grad = np.array([-1.0], np.float32)
        opt.step()
        sched.step()
    for it in (20, 100, 5):
        save_checkpoint(checkpoint_path(str(tmp_path), it), model, opt, sched, cfg, it)
    # Numeric order, not the order written.
    assert latest_checkpoint(str(tmp_path)).endswith("model_0000100.npz")
    state = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert state["iteration"] == 100 and state["config"] == cfg

    model2 = FakeModel(cfg)
    opt2 = SGD([{"params": [model2.w], "weight_decay": 1e-4}, {"params": [model2.bias], "weight_decay": 0.0}],
               lr=0.1, momentum=0.9)
    sched2 = WarmupMultiStepLR(opt2, [3], warmup_iters=2, warmup_factor=0.5)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    sched2.load_state_dict(state["scheduler"])
    np.testing.assert_array_equal(model2.w.data, model.w.data)
    np.testing.assert_array_equal(model2.running, model.running)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sched2.last_iter == 3
    np.testing.assert_array_equal(opt2.state[id(model2.w)]["momentum_buffer"],
                                  opt.state[id(model.w)]["momentum_buffer"])

    removed = prune_checkpoints(str(tmp_path), 2)
    assert [os.path.basename(p) for p in removed] == ["model_0000005.npz"]
    assert latest_checkpoint(str(tmp_path / "empty")) is None


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.npz"):
        load_checkpoint(tmp_path / "nope.npz")
    bare = tmp_path / "weights.npz"
    np.savez(bare, w=np.zeros(3))
    with pytest.raises(ValueError, match="not a minimask checkpoint"):
        load_checkpoint(bare)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz: not a readable minimask checkpoint"):
        load_checkpoint(junk)


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_shapes_model_trains_resumes_and_predicts(shapes, tmp_path):
    """3 iterations of the real MaskRCNN ('shapes' preset at 64 px) end to end; then the
    checkpoint after 2, copied into a fresh folder, resumes to the same third iteration."""
    import shutil

    from minimask.engine import Predictor
    from minimask.engine.predictor import load_image
    from minimask.models import LOSS_NAMES

    cfg = dataclasses.replace(preset("shapes"), batch_size=2, iters=3, checkpoint_period=2, warmup_iters=2,
                              min_size=(64,), max_size=64)
    quiet = lambda *a: None  # noqa: E731
    summary = train(cfg, shapes[0], val_ann=shapes[1], out_dir=str(tmp_path / "a"), log=quiet, progress=False)
    records = read_metrics(tmp_path / "a")
    assert [r["iter"] for r in records] == [0, 1, 2]
    for r in records:
        assert set(LOSS_NAMES) <= set(r) and all(np.isfinite(r[k]) for k in LOSS_NAMES)
    assert set(summary["eval"]) == {"bbox", "segm"}
    assert (tmp_path / "a" / "loss.png").exists()

    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "model_0000002.npz", tmp_path / "b")
    train(cfg, shapes[0], out_dir=str(tmp_path / "b"), resume=True, log=quiet, progress=False)
    (again,) = read_metrics(tmp_path / "b")
    assert {k: again[k] for k in LOSS_NAMES} == {k: records[2][k] for k in LOSS_NAMES}

    predictor = Predictor.from_checkpoint(tmp_path / "a" / "model_0000003.npz", score_thresh=0.0)
    image = load_image(os.path.join(os.path.dirname(shapes[1]), "images", "val_000000.png"))
    pred = predictor(image)
    n = len(pred["boxes"])
    assert pred["boxes"].shape == (n, 4) and pred["scores"].shape == (n,) and pred["labels"].shape == (n,)
    assert pred["masks"].shape == (n, 64, 64) and pred["masks"].dtype == bool
