"""Data parallelism on the CPU (engine/parallel.py): ``cfg.data_parallel`` forked processes.

The claims tested: one step of n processes is exactly (bit for bit) the step of one process
that computes each share's loss and gradient in turn, with the seed each process uses, and
averages them; a run trained that way resumes to the same losses; a non-finite loss in a
share stops the step before any weight changes; and the settings that cannot work are refused.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from minimask.data import CocoDataset, DataLoader, make_split
from minimask.engine.parallel import RANK_SEED_STRIDE, DataParallel, fork_available
from minimask.engine.trainer import build_training, train
from minimask.models.config import preset

pytestmark = pytest.mark.skipif(not fork_available(), reason="data parallelism needs fork (Linux)")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_shapes")
    return (make_split(str(root), "train", 8, seed=1, size=64),
            make_split(str(root), "val", 2, seed=1, size=64))


def tiny_cfg(**changes):
    settings = dict(min_size=(64,), max_size=64, width=8, fpn_out_channels=16, box_head_dim=32,
                    mask_head_dim=8, batch_size=4, iters=4, warmup_iters=2, milestones=(3,),
                    checkpoint_period=2, data_parallel=2, seed=5)
    settings.update(changes)
    return dataclasses.replace(preset("shapes"), **settings)


def batches(train_json, cfg, count):
    ds = CocoDataset(train_json, train=True)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                        prefetch=False)
    return ds.class_names, [loader.load_batch(i) for i in range(count)]


def by_hand_step(model, optimizer, scheduler, images, targets, n, seed, it):
    """What n processes compute, in one process: each share's gradient in turn, then the mean."""
    params = list(model.parameters())
    k = len(images) // n
    grads, values = [], []
    for r in range(n):
        optimizer.zero_grad()
        model.reseed(seed + r * RANK_SEED_STRIDE, it)
        losses = model(images[r * k:(r + 1) * k], targets[r * k:(r + 1) * k])
        values.append({name: float(v.item()) for name, v in losses.items()})
        total = None
        for v in losses.values():
            total = v if total is None else total + v
        total.backward()
        grads.append([None if p.grad is None else p.grad.copy() for p in params])
    for i, p in enumerate(params):
        have = [g[i] for g in grads if g[i] is not None]
        if have:
            mean = np.array(have[0], copy=True)
            for g in have[1:]:
                mean += g
            p.grad = mean / n
    optimizer.step()
    scheduler.step()
    return {name: sum(v[name] for v in values) / n for name in values[0]}


@pytest.mark.parametrize("n", [2, 4])
def test_a_step_is_the_mean_of_the_shares_bit_for_bit(shapes, n):
    cfg = tiny_cfg(data_parallel=n)
    names, data = batches(shapes[0], cfg, 2)
    cfg = dataclasses.replace(cfg, class_names=names)
    ref, ref_opt, ref_sched = build_training(cfg, "cpu", log=lambda *a: None)
    model, opt, sched = build_training(cfg, "cpu", log=lambda *a: None)
    with DataParallel(model, n, cfg.seed) as dp:
        for it, (images, targets) in enumerate(data):
            expected = by_hand_step(ref, ref_opt, ref_sched, images, targets, n, cfg.seed, it)
            got = dp.step(it, opt, sched, images, targets)
            assert {k: got[k] for k in expected} == expected
            assert got["total"] == sum(expected.values())
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    # after the context the parameters are private arrays again (not views of the shared memory)
    assert all(p.data.base is None for p in model.parameters())


def test_a_non_finite_share_stops_before_the_update(shapes):
    cfg = tiny_cfg()
    names, data = batches(shapes[0], cfg, 1)
    cfg = dataclasses.replace(cfg, class_names=names)
    model, opt, sched = build_training(cfg, "cpu", log=lambda *a: None)
    images, targets = data[0]
    bad = [dict(t) for t in targets]
    bad[-1]["boxes"] = np.full_like(bad[-1]["boxes"], np.nan)  # the last share (process 1) only
    before = [p.data.copy() for p in model.parameters()]
    with DataParallel(model, 2, cfg.seed) as dp:
        with pytest.raises((FloatingPointError, RuntimeError)):
            dp.step(0, opt, sched, images, bad)
        for a, p in zip(before, model.parameters()):
            np.testing.assert_array_equal(a, p.data)


def test_a_parallel_run_resumes_to_the_same_losses(shapes, tmp_path):
    cfg = tiny_cfg()
    quiet = lambda *a: None  # noqa: E731
    train(cfg, shapes[0], out_dir=str(tmp_path / "a"), log=quiet, progress=False)
    os.makedirs(tmp_path / "b")
    os.link(tmp_path / "a" / "model_0000002.npz", tmp_path / "b" / "model_0000002.npz")
    train(cfg, shapes[0], out_dir=str(tmp_path / "b"), resume=True, log=quiet, progress=False)

    def losses(folder):
        with open(folder / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k.startswith("loss")} for line in f]

    whole, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(whole) == 4 and resumed == whole[2:]
    one = tiny_cfg(data_parallel=1)
    train(one, shapes[0], out_dir=str(tmp_path / "c"), log=quiet, progress=False)
    assert losses(tmp_path / "c")[0] != whole[0]  # the shares' statistics differ: data_parallel matters


def test_settings_that_cannot_work_are_refused(shapes, tmp_path):
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of data_parallel=3"):
        tiny_cfg(data_parallel=3)
    with pytest.raises(ValueError, match="data_parallel=0 must be >= 1"):
        tiny_cfg(data_parallel=0)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        train(tiny_cfg(), shapes[0], out_dir=str(tmp_path / "g"), device="tpu", log=lambda *a: None,
              progress=False)


def test_on_the_gpu_the_batch_runs_in_one_process(shapes, tmp_path):
    from minimask.engine.trainer import data_parallel_context  # the decision, without a GPU

    notes = []
    with data_parallel_context(tiny_cfg(), "gpu", None, 0, notes.append) as dp:
        assert dp is None
    assert "on the GPU the batch runs in one process" in notes[0]
