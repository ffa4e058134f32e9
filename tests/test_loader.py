"""DataLoader: seeded epoch orders, exact resume from an iteration, prefetch equal to no
prefetch and really ahead, errors raised in the worker surface in the main thread."""

import sys
import threading

import numpy as np
import pytest

from minimask.data import CocoDataset, DataLoader, RandomHorizontalFlip, make_split


class Numbered:
    """A tiny data set: image i is a 2x3 ramp whose first pixel is i (so flips show)."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at = n, fail_at
        self.loaded = []  # (index, thread name)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append((i, threading.current_thread().name))
        if i == self.fail_at:
            raise OSError(f"cannot read image {i}")
        image = np.zeros((2, 3, 3), np.uint8)
        image[0, :, 0] = [i, 200, 201]
        target = {"boxes": np.array([[0, 0, 1, 1]], np.float32), "masks": np.zeros((1, 2, 3), np.uint8),
                  "labels": np.array([1]), "index": i}
        return image, target


def ids(batch):
    images, targets = batch
    return [t["index"] for t in targets]


def flipped(batch):
    images, _ = batch
    return [bool(im[0, 0, 0] == 201) for im in images]


def take(gen, k):
    out = [b for _, b in zip(range(k), gen)]
    gen.close()
    return out


def test_same_seed_same_order_new_order_each_epoch():
    ds = Numbered(10)
    a = DataLoader(ds, batch_size=3, shuffle=True, seed=4, drop_last=True, prefetch=False)
    b = DataLoader(ds, batch_size=3, shuffle=True, seed=4, drop_last=True, prefetch=False)
    c = DataLoader(ds, batch_size=3, shuffle=True, seed=5, drop_last=True, prefetch=False)
    assert len(a) == 3
    ea = [ids(x) for x in take(a.batches(0), 6)]
    assert ea == [ids(x) for x in take(b.batches(0), 6)]
    assert ea != [ids(x) for x in take(c.batches(0), 6)]
    epoch0, epoch1 = sum(ea[:3], []), sum(ea[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # no repeats within an epoch
    assert epoch0 != epoch1
    # the order is the documented function of (seed, epoch)
    np.testing.assert_array_equal(epoch1, np.random.default_rng([4, 0, 1]).permutation(10)[:9])


def test_no_shuffle_keeps_order_and_last_batch():
    loader = DataLoader(Numbered(7), batch_size=3, prefetch=False)
    assert len(loader) == 3
    assert [ids(b) for b in loader] == [[0, 1, 2], [3, 4, 5], [6]]
    assert loader.epoch == 1
    assert [ids(b) for b in DataLoader(Numbered(7), 3, drop_last=True)] == [[0, 1, 2], [3, 4, 5]]


def test_resume_from_an_iteration_gives_the_same_batches_and_flips():
    ds = Numbered(11)
    make = lambda: DataLoader(ds, batch_size=2, shuffle=True, seed=1, drop_last=True,
                              train_transform=RandomHorizontalFlip(0.5))
    full = take(make().batches(0), 14)          # crosses two epoch boundaries (5 batches each)
    resumed = take(make().batches(7), 7)
    assert [ids(b) for b in resumed] == [ids(b) for b in full[7:]]
    assert [flipped(b) for b in resumed] == [flipped(b) for b in full[7:]]
    all_flips = sum((flipped(b) for b in full), [])
    assert 0 < sum(all_flips) < len(all_flips)
    assert make().position(7) == (1, 2)


def test_prefetch_gives_the_same_batches_as_no_prefetch():
    ds = Numbered(9)
    kw = dict(batch_size=4, shuffle=True, seed=2, train_transform=RandomHorizontalFlip(0.5))
    with_thread = take(DataLoader(ds, prefetch=True, **kw).batches(0), 7)
    without = take(DataLoader(ds, prefetch=False, **kw).batches(0), 7)
    assert [ids(b) for b in with_thread] == [ids(b) for b in without]
    for (ia, _), (ib, _) in zip(with_thread, without):
        for x, y in zip(ia, ib):
            np.testing.assert_array_equal(x, y)


def test_prefetch_loads_the_next_batch_in_a_thread_while_this_one_is_used():
    second_batch_loaded = threading.Event()

    class Watched(Numbered):
        def __getitem__(self, i):
            out = super().__getitem__(i)
            if i == 3:
                second_batch_loaded.set()
            return out

    ds = Watched(6)
    gen = DataLoader(ds, batch_size=2, prefetch=True).batches(0, 3)
    first = next(gen)
    # we hold batch 0 and have not asked for batch 1: the worker reads it anyway
    assert second_batch_loaded.wait(timeout=10)
    assert ids(first) == [0, 1]
    assert [ids(b) for b in gen] == [[2, 3], [4, 5]]
    assert {name for _, name in ds.loaded} == {"minimask-prefetch"}


@pytest.mark.parametrize("prefetch", [True, False])
def test_loading_error_surfaces_in_the_main_thread(prefetch):
    loader = DataLoader(Numbered(8, fail_at=5), batch_size=2, prefetch=prefetch)
    got = []
    with pytest.raises(OSError, match="cannot read image 5") as info:
        for batch in loader:
            got.append(ids(batch))
    assert got == [[0, 1], [2, 3]]
    if prefetch and sys.version_info >= (3, 11):  # exception notes are new in 3.11
        assert "prefetch thread, loading batch 2" in " ".join(info.value.__notes__)
    assert not any(t.name == "minimask-prefetch" for t in threading.enumerate())


def test_leaving_the_loop_early_stops_the_worker():
    gen = DataLoader(Numbered(50), batch_size=2, prefetch=True).batches(0)
    next(gen)
    gen.close()
    assert not any(t.name == "minimask-prefetch" for t in threading.enumerate())


def test_bad_settings():
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(Numbered(3), batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        DataLoader(Numbered(0), batch_size=1)
    with pytest.raises(ValueError, match="an epoch of 3 images makes no full batch of 4"):
        iter(DataLoader(Numbered(3), batch_size=4, drop_last=True))


def test_a_data_set_smaller_than_a_batch_trains_on_epochs_laid_end_to_end():
    """5 images, batches of 8 (drop_last, as in training): Detectron2's infinite stream.  Batch
    ``it`` is stream positions 8 it .. 8 it + 7, position p being image ``order(p // 5)[p % 5]``."""
    ds = Numbered(5)
    make = lambda: DataLoader(ds, batch_size=8, shuffle=True, seed=7, drop_last=True,  # noqa: E731
                              train_transform=RandomHorizontalFlip(0.5), prefetch=False)
    loader = make()
    assert loader.repeats and len(loader) == 0
    got = [ids(b) for b in take(loader.batches(0), 5)]
    stream = np.concatenate([np.random.default_rng([7, 0, e]).permutation(5) for e in range(8)])
    assert got == [list(stream[8 * it:8 * it + 8]) for it in range(5)]
    for batch in got:  # every image in every batch, 3 of them twice
        assert sorted(set(batch)) == [0, 1, 2, 3, 4] and len(batch) == 8
    # resumed at 3: the same batches and the same flips (a pure function of seed and iteration)
    full = take(make().batches(0), 5)
    resumed = take(make().batches(3), 2)
    assert [ids(b) for b in resumed] == got[3:]
    assert [flipped(b) for b in resumed] == [flipped(b) for b in full[3:]]
    assert make().position(3) == (4, 4)  # batch 3 starts at stream position 24 = epoch 4, image 4
    # a set of one image fills a batch with itself
    assert [ids(b) for b in take(DataLoader(Numbered(1), 3, shuffle=True, drop_last=True).batches(0), 2)] \
        == [[0, 0, 0], [0, 0, 0]]


def test_a_data_set_of_at_least_one_batch_keeps_the_per_epoch_order():
    """The rule for sets of a batch or more is unchanged (so earlier runs resume exactly):
    batch ``it`` is batch ``it % len`` of epoch ``it // len``, each epoch's remainder dropped."""
    loader = DataLoader(Numbered(8), batch_size=3, shuffle=True, seed=2, drop_last=True, prefetch=False)
    assert not loader.repeats and len(loader) == 2
    got = [ids(b) for b in take(loader.batches(0), 6)]
    expected = [list(np.random.default_rng([2, 0, it // 2]).permutation(8)[3 * (it % 2):3 * (it % 2) + 3])
                for it in range(6)]
    assert got == expected
    exact = DataLoader(Numbered(8), batch_size=8, shuffle=True, seed=2, drop_last=True, prefetch=False)
    assert not exact.repeats and len(exact) == 1


def test_on_a_real_coco_data_set(tmp_path):
    make_split(str(tmp_path), "train", 5, seed=0, size=64)
    ds = CocoDataset(tmp_path / "train.json")
    loader = DataLoader(ds, batch_size=2, shuffle=True, seed=0, drop_last=True,
                        train_transform=RandomHorizontalFlip(0.5))
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2
    for im, t in zip(images, targets):
        assert im.shape == (64, 64, 3) and t["masks"].shape[1:] == (64, 64)
        for box, m in zip(t["boxes"], t["masks"]):  # flipped or not, boxes enclose their masks
            ys, xs = np.nonzero(m)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
