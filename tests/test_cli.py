"""The ``minimask`` command: help on every sub-command, clear errors with the right exit codes,
and train -> predict -> eval end to end with a tiny fake model (the real one is tested with
the models).  Also the drawings of ``viz`` that ``predict`` writes."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import minimask.models as models
from minimask import Tensor
from minimask.cli import main
from minimask.data import make_split
from minimask.engine.predictor import save_drawing
from minimask.models.config import PRESETS
from minimask.nn import Module, Parameter


class FakeModel(Module):
    """Trains a bias toward the mean pixel; always 'detects' one circle at (8, 8, 40, 40) with
    score 0.9 and one square with score 0.3 (under predict's default threshold)."""

    def __init__(self, cfg):
        super().__init__()
        self.bias = Parameter(np.zeros(1, np.float32))

    def reseed(self, seed, iteration):
        pass  # no random draws

    def forward(self, images, targets):
        mean = float(np.mean([im.mean() for im in images])) / 255.0
        return {"loss_fake": ((self.bias - mean) ** 2).sum(), "loss_const": Tensor(np.float32(0.5))}

    def predict(self, images):
        out = []
        for im in images:
            masks = np.zeros((2,) + im.shape[:2], bool)
            masks[0, 8:40, 8:40] = True
            masks[1, 2:6, 2:6] = True
            out.append({"boxes": np.array([[8, 8, 40, 40], [2, 2, 6, 6]], np.float32),
                        "scores": np.array([0.9, 0.3], np.float32), "labels": np.array([1, 3]),
                        "masks": masks})
        return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return (make_split(str(root), "train", 4, seed=0, size=64),
            make_split(str(root), "val", 2, seed=0, size=64))


def fail(argv, capsys):
    """Run a command that must fail on its flags: exit code 2 and the message on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["eval"], ["predict"], ["data", "shapes"], ["bench"], []])
def test_help_works_everywhere(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minimask")
    if command == ["train"]:
        assert "--resume" in out and "--set KEY=VALUE" in out and "--train-ann" in out
    if command == ["predict"]:
        assert "--score-thresh" in out and "IMAGE" in out


def test_unknown_preset_lists_the_valid_ones(capsys):
    err = fail(["train", "--config", "r101_magic"], capsys)
    assert f"unknown preset 'r101_magic': choose one of {sorted(PRESETS)}" in err
    assert "'shapes'" in err and "'r50_fpn'" in err
    assert "Traceback" not in err


def test_bad_flag_values_say_what_is_expected(capsys):
    assert "--set lrr: no such config field" in fail(["train", "--set", "lrr=0.1"], capsys)
    err = fail(["train", "--set", "norm=gn"], capsys)
    assert "norm='gn' is not one of ['frozen_bn', 'bn']" in err
    assert "expected key=value" in fail(["train", "--set", "lr"], capsys)
    assert "expected a positive whole number, got -3" in fail(["train", "--iters", "-3"], capsys)
    assert "invalid choice: 'tpu'" in fail(["train", "--device", "tpu"], capsys)
    assert "expected a number in [0, 1], got 2.0" in fail(["predict", "--checkpoint", "c.npz", "a.png",
                                                           "--score-thresh", "2"], capsys)
    assert "--train-ann is needed for --config r50_fpn" in fail(["train", "--config", "r50_fpn"], capsys)


def test_runtime_errors_are_one_line_with_exit_code_1(shapes, tmp_path, capsys):
    assert main(["predict", "--checkpoint", "c.npz", str(tmp_path / "nope.png")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"minimask predict: error: image file not found: {tmp_path / 'nope.png'}"

    assert main(["eval", "--checkpoint", str(tmp_path / "none.npz"), "--ann", shapes[1]]) == 1
    assert f"checkpoint not found: {tmp_path / 'none.npz'}" in capsys.readouterr().err

    broken = tmp_path / "broken.json"
    broken.write_text("{'images': []}")  # single quotes: not JSON
    assert main(["eval", "--checkpoint", "c.npz", "--ann", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "broken.json: not valid JSON" in err and "Traceback" not in err


def test_train_predict_eval_end_to_end(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "build_model", FakeModel)
    run = tmp_path / "run"
    assert main(["train", "--train-ann", shapes[0], "--val-ann", shapes[1], "--iters", "4", "--out", str(run),
                 "--set", "batch_size=2", "--set", "checkpoint_period=2", "--set", "warmup_iters=1"]) == 0
    assert sorted(f for f in os.listdir(run) if f.endswith(".npz")) == ["model_0000002.npz",
                                                                        "model_0000004.npz"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert (run / "loss.png").exists()
    assert json.loads((run / "config.json").read_text())["iters"] == 4
    assert "bbox AP" in capsys.readouterr().out

    # Continuing to 6 iterations from the checkpoint at 4.
    assert main(["train", "--train-ann", shapes[0], "--iters", "6", "--out", str(run), "--resume",
                 "--set", "batch_size=2", "--set", "checkpoint_period=2", "--set", "warmup_iters=1"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6

    images = os.path.join(os.path.dirname(shapes[1]), "images")
    image = os.path.join(images, "val_000000.png")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "model_0000006.npz"), image, "--out", str(out)]) == 0
    drawing = Image.open(out / "val_000000.png")
    assert drawing.size == (512, 512)  # a 64 px image drawn 8x larger (at least 512 px, whole pixels)
    (result,) = json.loads((out / "detections.json").read_text())
    # The square scored 0.3 < 0.5 is dropped; the names come from the data set.
    assert [(d["class"], d["score"]) for d in result["detections"]] == [("circle", pytest.approx(0.9))]
    assert result["detections"][0]["box_xyxy"] == [8, 8, 40, 40]

    ev = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "model_0000006.npz"), "--ann", shapes[1],
                 "--out", str(ev)]) == 0
    metrics = json.loads((ev / "coco_eval.json").read_text())
    assert set(metrics) == {"bbox", "segm"} and 0.0 <= metrics["bbox"]["AP"] <= 1.0
    assert len(json.loads((ev / "detections.json").read_text())) == 4  # 2 images x 2 detections


def test_train_without_data_flags_makes_shapes(tmp_path, monkeypatch):
    import minimask.data.synthetic as synthetic

    made = []

    def tiny_shapes(out_dir, **kw):  # the real defaults (1000 + 200 images) take a minute
        made.append(out_dir)
        return (make_split(out_dir, "train", 2, size=64), make_split(out_dir, "val", 1, size=64))

    monkeypatch.setitem(synthetic.GENERATORS, "shapes", tiny_shapes)
    monkeypatch.setattr(models, "build_model", FakeModel)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--iters", "1", "--set", "batch_size=1", "--set", "data_parallel=1"]
    assert main(argv) == 0
    assert made == ["data/shapes"]
    assert (tmp_path / "runs" / "shapes" / "model_0000001.npz").exists()
    # A second fresh run into the same folder is refused (and does not regenerate the data).
    assert main(argv) == 1
    assert made == ["data/shapes"]


def test_drawing_shows_masks_in_colour_and_leaves_the_rest(tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    masks = np.zeros((1, 48, 64), bool)
    masks[0, 10:30, 12:40] = True
    pred = {"boxes": np.array([[12, 10, 40, 30]], np.float32), "scores": np.array([0.93]),
            "labels": np.array([2]), "masks": masks}
    path = save_drawing(image, pred, ("circle", "triangle"), str(tmp_path / "d.png"))
    drawn = np.asarray(Image.open(path).convert("RGB")).astype(int)
    s = 8  # enlarged by a whole factor until the longer side is at least 512 px: 64 -> 512
    assert drawn.shape == (48 * s, 64 * s, 3)
    assert drawn[20 * s + 4, 26 * s + 4].sum() > 60      # inside the mask: tinted
    assert drawn[40 * s + 4, 55 * s + 4].sum() == 0      # far from everything: still black
    # Nearest neighbour: the pixels on either side of the mask's left edge are s x s blocks of one
    # colour each (a smoothing filter would blend them into a ramp).  The box's outline runs along
    # that edge (x = 12 is the left side of pixel 12), so the outside block stops 3 px short of it.
    outside, inside = drawn[20 * s:21 * s, 11 * s:12 * s - 3], drawn[20 * s:21 * s, 13 * s:14 * s]
    assert (outside == outside[0, 0]).all() and (inside == inside[0, 0]).all()
    assert outside[0, 0].sum() == 0 and inside[0, 0].sum() > 60


def test_an_interrupted_training_prints_the_command_that_resumes_it(monkeypatch, capsys):
    import signal

    import minimask.engine.trainer as trainer

    def stopped(*args, **kw):
        raise trainer.TrainingInterrupted(signal.SIGTERM, 5, "my runs/model_0000005.npz")

    monkeypatch.setattr(trainer, "train", stopped)
    argv = ["train", "--train-ann", "a.json", "--out", "my runs", "--set", "lr=0.01"]
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert err == ("minimask train: SIGTERM: stopped after iteration 5; checkpoint my runs/model_0000005.npz;"
                   " resume with: minimask train --train-ann a.json --out 'my runs' --set lr=0.01 --resume\n")


def test_ctrl_c_outside_the_training_loop_is_one_line_and_130(shapes, tmp_path, monkeypatch, capsys):
    import minimask.engine as engine

    def pressed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "build_model", pressed)
    argv = ["train", "--train-ann", shapes[0], "--out", str(tmp_path / "run"), "--set", "batch_size=2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("minimask train: interrupted; no checkpoint was written; "
                          "resume with: minimask train ")
    assert "Traceback" not in err
    monkeypatch.setattr(engine, "evaluate", pressed)
    loaded = classmethod(lambda cls, *a, **k: cls(FakeModel(None)))
    monkeypatch.setattr(engine.Predictor, "from_checkpoint", loaded)
    assert main(["eval", "--checkpoint", "c.npz", "--ann", shapes[1]]) == 130
    assert capsys.readouterr().err == "minimask eval: interrupted\n"


_REUSE = """
import numpy as np, resource, sys
from minimask.backend import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(3):
    a = np.ones(2**22); del a  # 32 MB, allocated and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = np.ones(2**22); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc; this is not Linux with glibc")
def test_keep_freed_memory_reuses_large_arrays_without_page_faults():
    """What the CLI sets at start-up (backend.keep_freed_memory): a freed 32 MB array's memory
    serves the next one, where by default each is fresh pages, a page fault per 4 KB (each
    setting in a process of its own: it lasts for the process)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)
    assert faults("keep") < 20  # fewer than one per array
    assert faults("default") >= 20  # at least one per fresh array (many more with 4 KB pages)
