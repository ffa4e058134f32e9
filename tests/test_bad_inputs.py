"""Bad inputs and accidents, from the command line: every one ends with the right exit status,
a message naming the culprit, and no Python traceback (issue 16).

Each case builds its own broken input (data, images, config, checkpoints) from a tiny shapes
set.  Most run ``minimask.cli.main`` in this process with a fake model (the engine does not
care which model it trains, and the checks all happen before or around the model); the
interruptions run the real command in a subprocess with a tiny real model, since signals,
exit codes and half-written files belong to a process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import minimask.models as models
from minimask.cli import main
from minimask.data import make_split
from minimask.engine.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from minimask.models.config import preset
from minimask.nn import Module, Parameter, load_npz


class FakeModel(Module):
    """One weight pulled toward the mean pixel; predicts nothing."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.bias = Parameter(np.zeros(1, np.float32))

    def reseed(self, seed, iteration):
        pass

    def forward(self, images, targets):
        mean = float(np.mean([im.mean() for im in images])) / 255.0
        return {"loss_fake": ((self.bias - mean) ** 2).sum()}

    def predict(self, images):
        return [{"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                 "labels": np.zeros(0, np.int64), "masks": np.zeros((0,) + im.shape[:2], bool)}
                for im in images]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train = make_split(str(root), "train", 4, seed=0, size=64)
    val = make_split(str(root), "val", 2, seed=0, size=64)
    return train, val, str(root / "images")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(models, "build_model", FakeModel)


def cli(argv, capsys):
    """Run the command in this process: (exit status, stdout + stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors (exit 2)
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def failed(argv, capsys, status=1):
    code, text = cli(argv, capsys)
    assert code == status, text
    assert "Traceback" not in text, text
    return text


def edited(shapes, tmp_path, edit, name="train.json", which=0):
    """A copy of the shapes JSON (train or val) changed by ``edit(data)``."""
    with open(shapes[which]) as f:
        data = json.load(f)
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def train_args(ann, images, out, *extra):
    return ["train", "--train-ann", ann, "--train-images", images, "--iters", "2", "--out", out,
            "--set", "batch_size=2", "--set", "warmup_iters=1", *extra]


def copied_images(shapes, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(shapes[2], folder)
    return folder


def cut_short(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("edit, culprit", [
    (lambda d: d["images"].append(dict(d["images"][0], file_name="copy.png")),
     r"image id 1 is listed twice \(file_name 'train_000000.png' and 'copy.png'\)"),
    (lambda d: d["annotations"][0].update(category_id=77), "annotation id 1 .*unknown category_id 77"),
    (lambda d: d["annotations"][1].update(bbox=[1.0, float("nan"), 3.0, 4.0]),
     "annotation id 2 .*bad bbox .*not finite"),
    (lambda d: d["annotations"][0].update(segmentation={"size": [10, 10], "counts": [100]}),
     r"annotation id 1 .*RLE size \[10, 10\] is not the image's"),
    (lambda d: d["annotations"][0].update(image_id=1234),
     r"annotation id 1 \(image id 1234\): unknown image_id"),
    (lambda d: [a["bbox"].__setitem__(3, 0.0) for a in d["annotations"]],
     "no image with a usable annotation to train on"),
    (lambda d: [a.pop("segmentation") for a in d["annotations"]],
     "boxes but no segmentation.*use --set mask_on=False"),
])
def test_structurally_wrong_data_is_named(shapes, tmp_path, capsys, fake, edit, culprit):
    import re

    ann = edited(shapes, tmp_path, edit)
    text = failed(train_args(ann, shapes[2], tmp_path / "run"), capsys)
    assert str(ann) in text and re.search(culprit, text), text
    assert not list_checkpoints(str(tmp_path / "run"))


def test_missing_and_malformed_annotation_files(shapes, tmp_path, capsys, fake):
    text = failed(train_args(tmp_path / "nope.json", shapes[2], tmp_path / "run"), capsys)
    assert f"annotation file not found: {tmp_path / 'nope.json'}" in text
    (tmp_path / "bad.json").write_text('{"images": [')
    assert f"{tmp_path / 'bad.json'}: not valid JSON" in failed(train_args(tmp_path / "bad.json", shapes[2],
                                                                          tmp_path / "run"), capsys)


def test_a_val_set_without_masks_is_refused_before_training(shapes, tmp_path, capsys, fake):
    val = edited(shapes, tmp_path, lambda d: [a.pop("segmentation") for a in d["annotations"]], "val.json",
                 which=1)
    text = failed(train_args(shapes[0], shapes[2], tmp_path / "run", "--val-ann", val, "--val-images",
                             shapes[2]), capsys)
    assert f"{val}: no annotation has a segmentation, so the mask AP" in text and "mask_on=False" in text
    assert not (tmp_path / "run").exists()


def test_a_wrong_image_folder_is_named(shapes, tmp_path, capsys, fake):
    text = failed(train_args(shapes[0], tmp_path / "pictures", tmp_path / "run"), capsys)
    assert f"image folder not found: {tmp_path / 'pictures'} (the images of {shapes[0]}" in text


def test_class_count_mismatch_says_the_set_that_fixes_it(shapes, tmp_path, capsys, fake):
    text = failed(train_args(shapes[0], shapes[2], tmp_path / "run", "--set", "num_classes=7"), capsys)
    assert "train.json has 3 classes" in text and "--set num_classes=4" in text


def test_degenerate_annotations_are_dropped_and_training_goes_on(shapes, tmp_path, capsys, fake):
    def edit(d):
        d["annotations"][0]["segmentation"] = [[1, 1, 5, 1]]   # two points
        d["annotations"][1]["bbox"][2] = 0.0                   # no width

    ann = edited(shapes, tmp_path, edit)
    code, text = cli(train_args(ann, shapes[2], tmp_path / "run"), capsys)
    assert code == 0 and "Traceback" not in text
    assert f"{ann}: dropped 2 of" in text and "first ids: 1, 2" in text


def test_boxes_only_trains_as_faster_rcnn_with_the_set(shapes, tmp_path, capsys, fake):
    ann = edited(shapes, tmp_path, lambda d: [a.pop("segmentation") for a in d["annotations"]])
    code, text = cli(train_args(ann, shapes[2], tmp_path / "run", "--set", "mask_on=False"), capsys)
    assert code == 0 and "Traceback" not in text and (tmp_path / "run" / "model_0000002.npz").exists()


def test_a_data_set_smaller_than_a_batch_trains(shapes, tmp_path, capsys, fake):
    code, text = cli(train_args(shapes[0], shapes[2], tmp_path / "run", "--set", "batch_size=8"), capsys)
    assert code == 0 and "Traceback" not in text
    assert "training on 4 images" in text
    assert "4 images are fewer than a batch of 8: each batch repeats them" in text


# ---------------------------------------------------------------- images


def test_every_bad_image_is_listed_before_training(shapes, tmp_path, capsys, fake):
    images = copied_images(shapes, tmp_path)
    (images / "train_000000.png").unlink()
    (images / "train_000001.png").write_text("not an image")
    cut_short(images / "train_000002.png")
    Image.new("RGB", (50, 64)).save(images / "train_000003.png")
    text = failed(train_args(shapes[0], images, tmp_path / "run"), capsys)
    assert f"{shapes[0]}: 4 images cannot be used:" in text
    for line in ("train_000000.png (image id 1): file not found",
                 "train_000001.png (image id 2): not an image Pillow can read",
                 "train_000002.png (image id 3): damaged or cut short",
                 "train_000003.png (image id 4): is 50x64 pixels (width x height) but the JSON says 64x64"):
        assert line in text
    assert "--set skip_bad_images=True" in text and not (tmp_path / "run").exists()


def test_skip_bad_images_trains_on_the_rest(shapes, tmp_path, capsys, fake):
    images = copied_images(shapes, tmp_path)
    (images / "train_000001.png").write_text("not an image")
    code, text = cli(train_args(shapes[0], images, tmp_path / "run", "--set", "skip_bad_images=True"), capsys)
    assert code == 0 and "Traceback" not in text
    assert "skipped 1 bad image files (skip_bad_images=True), 3 images left" in text
    assert "train_000001.png (not an image Pillow can read)" in text


def test_an_image_broken_after_the_check_is_named_from_the_loader_thread(shapes, tmp_path, capsys,
                                                                         monkeypatch):
    images = copied_images(shapes, tmp_path)

    def break_then_build(cfg):  # runs after the check, before the loader's thread reads anything
        for name in os.listdir(images):
            cut_short(images / name)
        return FakeModel(cfg)

    monkeypatch.setattr(models, "build_model", break_then_build)
    text = failed(train_args(shapes[0], images, tmp_path / "run"), capsys)
    assert "train_0000" in text and "png (image id" in text and "damaged or cut short" in text


def test_eval_names_a_bad_image_and_a_bad_annotation(shapes, tmp_path, capsys, fake):
    images = copied_images(shapes, tmp_path)
    cut_short(images / "val_000001.png")
    text = failed(["eval", "--checkpoint", tmp_path / "any.npz", "--ann", shapes[1], "--images", images],
                  capsys)
    assert "val_000001.png (image id 2 in" in text and "damaged or cut short" in text
    ann = edited(shapes, tmp_path, lambda d: d["images"].append(dict(d["images"][1])), "val.json", which=1)
    text = failed(["eval", "--checkpoint", tmp_path / "any.npz", "--ann", ann], capsys)
    assert f"{ann}: image id 2 is listed twice" in text
    boxes_only = edited(shapes, tmp_path, lambda d: [a.pop("segmentation") for a in d["annotations"]],
                        "boxes.json", which=1)
    text = failed(["eval", "--checkpoint", _checkpoint(tmp_path / "mask_model.npz"), "--ann", boxes_only,
                   "--images", shapes[2]], capsys)
    assert f"{boxes_only}: no annotation has a segmentation, so the mask AP of this mask model" in text


def test_predict_lists_every_bad_image_before_loading_the_model(shapes, tmp_path, capsys, fake):
    (tmp_path / "notes.png").write_text("not an image")
    cut = tmp_path / "cut.png"
    shutil.copy(os.path.join(shapes[2], "val_000000.png"), cut)
    cut_short(cut)
    text = failed(["predict", "--checkpoint", tmp_path / "none.npz", tmp_path / "notes.png", cut], capsys)
    assert f"2 images cannot be used:\n  {tmp_path / 'notes.png'}: not an image Pillow can read" in text
    assert f"{cut}: damaged or cut short" in text
    text = failed(["predict", "--checkpoint", tmp_path / "none.npz", tmp_path / "gone.png"], capsys)
    assert f"image file not found: {tmp_path / 'gone.png'}" in text


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("setting, message", [
    ("rpn_positive_fraction=1.5", "rpn_positive_fraction=1.5 must be in (0.0, 1.0]"),
    ("box_nms_thresh=-0.1", "box_nms_thresh=-0.1 must be in [0.0, 1.0]"),
    ("milestones=(100,50)", "milestones=(100, 50) must be whole numbers > 0, each larger than the one"),
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("momentum=1.0", "momentum=1.0 must be in [0.0, 1.0)"),
    ("rpn_bg_iou_thresh=0.9", "rpn_bg_iou_thresh=0.9 must not exceed rpn_fg_iou_thresh=0.7"),
    ("image_std=(0.2,0.0,0.2)", "image_std=(0.2, 0.0, 0.2) must be 3 positive finite numbers"),
    ("lr=-0.1", "lr=-0.1 must be > 0"),
    ("box_smooth_l1_beta=-0.5", "box_smooth_l1_beta=-0.5 must be >= 0"),
])
def test_config_values_are_checked_before_any_data_is_read(tmp_path, capsys, setting, message):
    # the annotation file does not exist: the config is refused first
    text = failed(["train", "--train-ann", tmp_path / "nope.json", "--set", setting], capsys, status=2)
    assert message in text and "nope.json" not in text


# ---------------------------------------------------------------- checkpoints


def _checkpoint(path, iteration=2):
    cfg = preset("shapes")
    model = FakeModel(cfg)
    from minimask.optim import SGD, WarmupMultiStepLR

    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = WarmupMultiStepLR(opt, cfg.milestones, warmup_iters=1)

    class Loader:
        seed, batch_size = cfg.seed, 2

    return save_checkpoint(path, model, opt, sched, cfg, iteration, Loader)


def test_unreadable_checkpoints_are_named(shapes, tmp_path, capsys, fake):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    text = failed(["eval", "--checkpoint", junk, "--ann", shapes[1]], capsys)
    assert f"{junk}: not a readable minimask checkpoint" in text
    cut = tmp_path / "cut.npz"
    _checkpoint(cut)
    cut_short(cut)
    text = failed(["predict", "--checkpoint", cut, os.path.join(shapes[2], "val_000000.png")], capsys)
    assert f"{cut}: not a readable minimask checkpoint" in text


def test_resume_falls_back_from_an_unreadable_newest_checkpoint(shapes, tmp_path, capsys, fake):
    run = tmp_path / "run"
    assert cli(train_args(shapes[0], shapes[2], run, "--set", "checkpoint_period=1"), capsys)[0] == 0
    cut_short(run / "model_0000002.npz")
    args = train_args(shapes[0], shapes[2], run, "--resume", "--iters", "3", "--set", "checkpoint_period=1")
    code, text = cli(args, capsys)
    assert code == 0 and "Traceback" not in text
    assert f"warning: {run / 'model_0000002.npz'}: not a readable minimask checkpoint" in text
    assert f"resuming from the previous good checkpoint, {run / 'model_0000001.npz'}" in text
    for path in list_checkpoints(str(run)):  # model_0000002 was written again, whole
        load_npz(path)


def test_resume_with_no_readable_checkpoint_lists_them(shapes, tmp_path, capsys, fake):
    run = tmp_path / "run"
    run.mkdir()
    for it in (1, 2):
        (run / f"model_000000{it}.npz").write_bytes(b"garbage")
    text = failed(train_args(shapes[0], shapes[2], run, "--resume"), capsys)
    assert f"no checkpoint in {run} can be resumed from:" in text
    assert "model_0000001.npz" in text and "model_0000002.npz" in text


def test_convert_weights_names_its_input(tmp_path, capsys):
    text = failed(["convert-weights", tmp_path / "none.pth", tmp_path / "out.npz"], capsys)
    assert f"{tmp_path / 'none.pth'}" in text and "not found" in text
    (tmp_path / "junk.pth").write_bytes(b"junk")
    text = failed(["convert-weights", tmp_path / "junk.pth", tmp_path / "out.npz"], capsys)
    assert f"{tmp_path / 'junk.pth'}" in text and not (tmp_path / "out.npz").exists()


SAVE_LOOP = """
import sys
import numpy as np
from minimask.nn import save_npz
folder, i = sys.argv[1], int(sys.argv[2])
big = np.arange(3_000_000, dtype=np.float32)
print("ready", flush=True)
while True:
    save_npz(f"{folder}/model_{i % 3:07d}.npz", {"i": np.array(i), "big": big + i})
    i += 1
"""


def test_a_kill_during_a_save_never_leaves_a_half_written_checkpoint(tmp_path):
    """A process saving 12 MB checkpoints in a loop (over three names, so the renames replace
    files), killed with SIGKILL at random moments, four times: every .npz left loads and holds
    what one save wrote; what a kill cut short is a hidden .partial file, not a checkpoint."""
    rng = np.random.default_rng(0)
    for k in range(4):
        child = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(tmp_path), str(100 * k)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.2, 0.6)))
        child.kill()
        child.wait()
    names = os.listdir(tmp_path)
    saved = [n for n in names if n.endswith(".npz")]
    assert saved and not [n for n in names if not n.endswith((".npz", ".partial"))]
    for name in saved:
        arrays = load_npz(tmp_path / name)
        np.testing.assert_array_equal(arrays["big"], np.arange(3_000_000, dtype=np.float32) + arrays["i"])
    # the kills did land inside saves (else this test would prove nothing)
    assert any(n.endswith(".partial") for n in names), names


def test_a_real_bug_keeps_its_traceback_and_asks_for_a_report(shapes, tmp_path, capsys, monkeypatch):
    def broken(cfg):
        raise TypeError("an internal mistake")

    monkeypatch.setattr(models, "build_model", broken)
    code, text = cli(train_args(shapes[0], shapes[2], tmp_path / "run"), capsys)
    assert code == 1 and "Traceback" in text and "TypeError: an internal mistake" in text
    assert "this is a bug in minimask" in text and "please report it" in text


# ---------------------------------------------------------------- signals (the real command)

# A tiny real model: one iteration takes a fraction of a second on a CPU.
TINY = ["--set", "width=8", "--set", "fpn_out_channels=16", "--set", "box_head_dim=32",
        "--set", "mask_head_dim=8",
        "--set", "rpn_pre_nms_top_n_train=50", "--set", "rpn_post_nms_top_n_train=20",
        "--set", "box_batch_size_per_image=8", "--set", "rpn_batch_size_per_image=32",
        "--set", "min_size=(64,)", "--set", "max_size=64", "--set", "warmup_iters=1", "--set", "batch_size=1",
        "--set", "data_parallel=1"]


class Training:
    """``minimask train`` in a subprocess, its output in files (so it can be read while it runs)."""

    def __init__(self, shapes, out, *extra, iters=1000):
        self.out = out
        self.argv = ["train", "--train-ann", shapes[0], "--iters", str(iters), "--out", str(out), *TINY,
                     *extra]
        self.log = open(str(out) + ".log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "minimask.cli", *self.argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, NUMBA_NUM_THREADS="1"))

    def iterations(self):
        path = os.path.join(self.out, "metrics.jsonl")
        return len(open(path).read().splitlines()) if os.path.exists(path) else 0

    def wait_for(self, test, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not test():
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text()}"
            time.sleep(0.01)

    def finish(self, timeout=120):
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.text()

    def text(self):
        self.log.seek(0)
        return self.log.read()


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_the_last_iteration_and_says_how_to_resume(shapes, tmp_path, name, status):
    run = Training(shapes, tmp_path / "run")
    run.wait_for(lambda: run.iterations() >= 2, "two iterations")
    run.proc.send_signal(getattr(signal, name))
    code, text = run.finish()
    assert code == status and "Traceback" not in text, text
    done = run.iterations()
    saved = checkpoint_path(str(tmp_path / "run"), done)
    resume = [line for line in text.splitlines() if "resume with:" in line]
    assert len(resume) == 1
    assert resume[0].startswith(f"minimask train: {name}: stopped after iteration {done}; "
                                f"checkpoint {saved}; resume with: minimask train ")
    assert resume[0].endswith(" --resume") and os.path.exists(saved)
    if name == "SIGTERM":  # the printed command continues the run (one more iteration here)
        again = Training(shapes, tmp_path / "run", "--resume", iters=done + 1)
        code, text = again.finish()
        assert code == 0 and f"resuming from {saved} (iteration {done})" in text, text
        assert run.iterations() == done + 1


def test_a_second_ctrl_c_quits_at_once(shapes, tmp_path):
    run = Training(shapes, tmp_path / "run", "--set", "batch_size=2")  # iterations of about a second
    run.wait_for(lambda: run.iterations() >= 1, "one iteration")
    n = run.iterations()
    run.wait_for(lambda: run.iterations() > n, "the end of an iteration")
    time.sleep(0.1)  # inside the next one: the first signal waits for it, the second does not
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(lambda: "Ctrl-C again to quit at once" in run.text(), "the first signal's notice")
    run.proc.send_signal(signal.SIGINT)
    code, text = run.finish()
    assert code == 130 and "Traceback" not in text, text
    assert "minimask train: SIGINT twice: stopped at once, the iteration in progress is lost; " \
           "no checkpoint yet; resume with: minimask train " in text, text
    assert not list_checkpoints(str(tmp_path / "run"))


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    run = Training(shapes, out, "--set", "checkpoint_period=2")
    run.wait_for(lambda: len(list_checkpoints(str(out))) >= 1 and run.iterations() >= 3, "a checkpoint")
    run.proc.kill()
    run.finish()
    last = list_checkpoints(str(out))[-1]
    start = int(os.path.basename(last)[6:13])
    again = Training(shapes, out, "--resume", "--set", "checkpoint_period=2", iters=start + 1)
    code, text = again.finish()
    assert code == 0 and "Traceback" not in text, text
    assert f"resuming from {last} (iteration {start})" in text
    assert again.iterations() == start + 1
