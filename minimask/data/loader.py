"""Batches for training and evaluation: a seeded, resumable order and a background prefetch.

The paper trains with SGD on mini-batches of 16 images (Sec. 3.1, "2 images per GPU" on 8
GPUs), iterating over the data in a random order.  Two properties matter for a tool:

**Reproducible and resumable order.**  Everything random here is a pure function of
``(seed, iteration)``, never of a generator's running state:

- the order of epoch ``e`` is ``default_rng([seed, 0, e]).permutation(n)``;
- global batch ``it`` is batch ``it % len(loader)`` of epoch ``it // len(loader)``;
- the augmentation of the ``j``-th image of batch ``it`` draws from ``default_rng([seed, 1, it, j])``.

**A data set smaller than a batch still trains.**  With ``drop_last`` and fewer images than
``batch_size`` no epoch holds a full batch, so the training stream (``batches``) is cut instead
from the endless sequence of epochs laid end to end, as Detectron2's ``TrainingSampler``:
image ``p`` of that sequence is ``order(p // n)[p % n]``, and batch ``it`` is images
``it * batch_size`` to ``(it + 1) * batch_size - 1``.  Every batch then holds each image at
least once (some twice, each with its own flip draw), and the order is still a pure function of
``(seed, iteration)``.  Data sets of at least one batch keep the per-epoch rule above.

So a run stopped at iteration 5000 and resumed with ``loader.batches(start_iter=5000)`` sees
exactly the batches, flips included, it would have seen without stopping; the trainer saves
only ``seed`` and the iteration in its checkpoint.  (A running generator would have to be saved
and restored, and would depend on how many draws each image happened to take.)

**Prefetch.**  While the model computes on one batch, a background thread reads and decodes
the next: Pillow releases Python's lock (the GIL) while it decodes PNG/JPEG, so reading truly
overlaps with NumPy's work in the main thread.  The queue holds one ready batch, so memory
stays bounded.  An exception in the thread is passed through the queue and raised again in the
main thread, with a note naming the batch; the data set's own errors name the file (a file that
changed on disk after the check before training, say), so the command prints one line, not the
worker's traceback.

    loader = DataLoader(dataset, batch_size=8, shuffle=True, seed=0,
                        train_transform=RandomHorizontalFlip(0.5), drop_last=True)
    for it, (images, targets) in zip(range(start, iters), loader.batches(start)):
        ...                      # iteration-based training, as Detectron2
    for images, targets in loader:
        ...                      # one epoch (evaluation: shuffle=False, no transform)
"""

import queue
import threading

import numpy as np


class DataLoader:
    """Lists of (images, targets) from a data set (anything with ``__len__`` and ``__getitem__``
    returning ``(image, target)``).

    batch_size:      images per batch.
    shuffle:         a new seeded permutation each epoch; else the data set's order.
    seed:            the seed of the shuffle and of ``train_transform``'s random draws.
    train_transform: ``transform(image, target, rng) -> (image, target)``, e.g.
                     ``RandomHorizontalFlip(0.5)``; None for no augmentation (evaluation).
    drop_last:       drop each epoch's last, smaller batch (training: every batch full).
    prefetch:        prepare the next batch in a background thread.
    """

    def __init__(self, dataset, batch_size=1, shuffle=False, seed=0, train_transform=None,
                 drop_last=False, prefetch=True):
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.train_transform = train_transform
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.epoch = 0  # the epoch ``iter(loader)`` goes over next
        if len(dataset) == 0:
            raise ValueError("DataLoader: the data set has no images")

    @property
    def repeats(self):
        """True if training batches repeat images: ``drop_last`` with fewer images than a batch
        (batches cut across epochs, see the module's docstring)."""
        return self.drop_last and len(self.dataset) < self.batch_size

    def __len__(self):
        """Batches per epoch (0 for a data set smaller than one batch with ``drop_last``)."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # ------------------------------------------------------------------ the order

    def order(self, epoch):
        """The data set indices of ``epoch`` in the order they are visited."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, 0, epoch]).permutation(n)

    def position(self, iteration):
        """(epoch, batch within the epoch) of global batch ``iteration``; for a data set smaller
        than a batch (``repeats``), (epoch, image within it) of the batch's first image."""
        if self.repeats:
            return divmod(int(iteration) * self.batch_size, len(self.dataset))
        return divmod(int(iteration), len(self))

    def indices(self, iteration):
        """The data set indices of global batch ``iteration``."""
        if self.repeats:  # cut from the epochs laid end to end (Detectron2's infinite stream)
            n, first = len(self.dataset), int(iteration) * self.batch_size
            orders = {e: self.order(e) for e in range(first // n, (first + self.batch_size - 1) // n + 1)}
            return np.array([orders[p // n][p % n] for p in range(first, first + self.batch_size)])
        epoch, b = self.position(iteration)
        return self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def load_batch(self, iteration):
        """Read (and augment) global batch ``iteration``: ``(images, targets)``, two lists."""
        images, targets = [], []
        for j, index in enumerate(self.indices(iteration)):
            image, target = self.dataset[int(index)]
            if self.train_transform is not None:
                rng = np.random.default_rng([self.seed, 1, int(iteration), j])
                image, target = self.train_transform(image, target, rng)
            images.append(image)
            targets.append(target)
        return images, targets

    # ------------------------------------------------------------------ iterating

    def batches(self, start_iter=0, stop_iter=None):
        """Batches ``start_iter, start_iter + 1, ...`` across epochs (endless if ``stop_iter`` is None)."""
        if start_iter < 0:
            raise ValueError(f"DataLoader.batches: start_iter must be >= 0, got {start_iter}")

        def iterations():
            it = start_iter
            while stop_iter is None or it < stop_iter:
                yield it
                it += 1

        if not self.prefetch:
            return (self.load_batch(it) for it in iterations())
        return _prefetched(self.load_batch, iterations())

    def __iter__(self):
        """One epoch (``self.epoch``, then the next on the following ``iter``)."""
        if len(self) == 0:
            raise ValueError(f"DataLoader: an epoch of {len(self.dataset)} images makes no full batch of "
                             f"{self.batch_size} (drop_last=True); the training stream ``batches()`` "
                             f"repeats images to fill its batches")
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.batches(epoch * len(self), (epoch + 1) * len(self))

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __repr__(self):
        return (f"DataLoader({len(self.dataset)} images, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, transform={self.train_transform!r}, "
                f"drop_last={self.drop_last}, prefetch={self.prefetch})")


class _Failed:
    """An exception raised in the worker, carried to the main thread."""

    def __init__(self, error, iteration):
        self.error, self.iteration = error, iteration


_DONE = object()


def _prefetched(load, iterations):
    """Yield ``load(it)`` for each ``it``, each computed in a worker thread one step ahead."""
    ready = queue.Queue(maxsize=1)  # one batch waiting while the worker prepares the next
    stop = threading.Event()

    def put(item):
        # wait for room, but give up if the consumer has gone away (loop left early)
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work():
        it = None
        try:
            for it in iterations:
                if not put(load(it)):
                    return
        except BaseException as e:  # noqa: BLE001 - everything goes back to the main thread
            put(_Failed(e, it))
            return
        put(_DONE)

    worker = threading.Thread(target=work, name="minimask-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                err = item.error
                if hasattr(err, "add_note"):  # Python 3.11+
                    err.add_note(f"(raised in the data loader's prefetch thread, loading batch "
                                 f"{item.iteration})")
                raise err
            yield item
    finally:
        # the consumer stopped (end, break, or error): let the worker finish its batch and exit
        stop.set()
        worker.join(timeout=30)


__all__ = ["DataLoader"]
