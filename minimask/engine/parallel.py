"""Data parallelism on the CPU's cores: one batch, ``cfg.data_parallel`` processes.

Why.  The shapes model is small: most of its matrix products are too small for two BLAS threads
to share well, and the Python glue between the layers runs on one core whatever BLAS does.  On
two cores, two single-threaded processes each working on half of the batch get through it
sooner than one process with two threads (``minimask bench train`` measures both; the numbers
are in README.md).  This is what PyTorch's ``DistributedDataParallel`` does across GPUs, here
across the cores of one machine.

How one iteration goes, with ``n = cfg.data_parallel`` processes (process 0 is the trainer's
own; processes 1..n-1 are forked once, before the first iteration):

1. the batch is cut into n equal shares, in order; process r gets share r;
2. each process runs ``model(images, targets)`` on its share, after ``model.reseed`` with the
   seed ``seed + r * RANK_SEED_STRIDE`` (process 0 draws exactly what a one-process run would),
   and backpropagates its own loss sum;
3. processes 1..n-1 write their gradients into shared memory and send their five loss values;
4. process 0 averages the n gradients (as DDP does) and the n loss values, checks that every
   value is finite (``FloatingPointError`` before any weight changes, as ``train_step``), and
   takes the optimizer and scheduler step.  The parameters live in shared memory, so the
   update is seen by every process without copying.

What differs from one process on the whole batch, as with DDP: each loss is a mean over its own
share's sampled anchors, RoIs and pixels, and batch norm (``norm="bn"``) normalises each share
with its own statistics (DDP without SyncBatchNorm).  Buffers (batch norm's running
statistics) are process 0's: before each step its values are copied to the other processes,
as DDP broadcasts rank 0's buffers before each forward, so the checkpoint (process 0's) holds
everything a resumed run needs.  So a run's losses depend on
``data_parallel``, which is why it is a config field: the same config gives the same losses on
any machine, and resuming keeps them bit for bit.

Processes are made with ``fork`` (Linux; elsewhere the trainer refuses, naming the setting).
On the GPU the trainer runs the whole batch in one process, and says so.  Each process runs BLAS
and Numba on one thread (``threadpoolctl`` pins the BLAS).
"""

import contextlib
import mmap
import multiprocessing as mp
import os
import signal
import traceback

import numpy as np

from .trainer import check_finite, loss_values, sum_losses

RANK_SEED_STRIDE = 1_000_003  # process r reseeds with seed + r * this (any fixed offset would do)


def fork_available():
    return "fork" in mp.get_all_start_methods()


def limit_threads(n=1):
    """Run NumPy's OpenBLAS and Numba on ``n`` threads in this process; returns a function that
    puts both back as they were.  (OpenBLAS only, by name: a torch loaded beside it for
    ``minimask bench`` keeps its own threads.)"""
    undo = []
    try:
        from threadpoolctl import ThreadpoolController

        limiter = ThreadpoolController().select(internal_api="openblas").limit(limits=n)
        undo.append(limiter.restore_original_limits)
    except ImportError:  # not installed: BLAS keeps its threads (OPENBLAS_NUM_THREADS=1 does it)
        pass
    try:
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        undo.append(lambda: numba.set_num_threads(threads))
    except ImportError:
        pass

    def restore():
        for fn in undo:
            fn()
    return restore


def _check_fork_safe():
    """Refuse to fork after Numba's GNU OpenMP layer has run (see ``minimask/kernels``)."""
    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # no Numba, or no parallel loop has run yet
        return
    if layer == "omp":
        raise RuntimeError("data_parallel: Numba's OpenMP threading layer is already running in this "
                           "process, and it is not safe across fork; unset NUMBA_THREADING_LAYER=omp "
                           "or use data_parallel=1")


class _SharedLayout:
    """Offsets of every array inside one flat shared buffer (64-byte aligned)."""

    def __init__(self, arrays):
        self.entries, offset = [], 0
        for a in arrays:
            self.entries.append((offset, a.shape, a.dtype))
            offset += -(-a.nbytes // 64) * 64
        self.nbytes = max(offset, 64)

    def views(self, buffer):
        return [np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)
                for off, shape, dtype in self.entries]


def _buffers(model):
    return [b for _, b in model.named_buffers() if b is not None]


def _worker(rank, model, params, grad_views, buffer_views, conn, seed):
    """Process ``rank``'s loop: a share of each batch in, its gradients and losses out."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the trainer's to handle: it stops this process
        signal.signal(signum, signal.SIG_IGN)
    limit_threads(1)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            break
        if message is None:
            break
        iteration, images, targets = message
        try:
            for b, v in zip(_buffers(model), buffer_views):  # process 0's, as DDP broadcasts them
                b[...] = v
            for p in params:
                p.grad = None
            model.reseed(seed + rank * RANK_SEED_STRIDE, iteration)
            losses = model(images, targets)
            values = loss_values(losses)
            has_grad = []
            if all(np.isfinite(v) for v in values.values()):
                sum_losses(losses).backward()
                for p, g in zip(params, grad_views):
                    has_grad.append(p.grad is not None)
                    if p.grad is not None:
                        g[...] = p.grad
            conn.send(("ok", values, has_grad))
        except Exception:
            conn.send(("error", traceback.format_exc(), None))
    conn.close()
    os._exit(0)  # no atexit handlers, no flushing of the trainer's files from this copy


class DataParallel:
    """``cfg.data_parallel`` processes sharing each training batch (see the module docstring).

    Use as a context manager around the training loop; ``step`` replaces ``train_step``:

        with DataParallel(model, n, seed) as dp:
            for it, (images, targets) in ...:
                values = dp.step(it, optimizer, scheduler, images, targets)
    """

    def __init__(self, model, processes, seed):
        self.model, self.n, self.seed = model, int(processes), seed
        self.params = list(model.parameters())
        self.workers, self._restore = [], None

    def __enter__(self):
        _check_fork_safe()
        layout = _SharedLayout([p.data for p in self.params])
        # Anonymous MAP_SHARED memory stays shared across fork: the parameters move into it, so
        # the optimizer's in-place update in process 0 is the update of every process.
        self._param_buffer = mmap.mmap(-1, layout.nbytes)
        for p, view in zip(self.params, layout.views(self._param_buffer)):
            view[...] = p.data
            p.data = view
        self._grad_buffers = [mmap.mmap(-1, layout.nbytes) for _ in range(self.n - 1)]
        self._grad_views = [layout.views(b) for b in self._grad_buffers]
        buffer_layout = _SharedLayout(_buffers(self.model))
        self._buffer_buffer = mmap.mmap(-1, buffer_layout.nbytes)
        self._buffer_views = buffer_layout.views(self._buffer_buffer)
        ctx = mp.get_context("fork")
        for rank in range(1, self.n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, name=f"minimask-dp{rank}",
                               args=(rank, self.model, self.params, self._grad_views[rank - 1],
                                     self._buffer_views, theirs, self.seed))
            proc.start()
            theirs.close()
            self.workers.append((proc, ours))
        self._restore = limit_threads(1)
        return self

    def __exit__(self, *exc):
        for proc, conn in self.workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self.workers = []
        for p in self.params:  # back into private memory, so the buffers can go
            p.data = np.array(p.data, copy=True)
        if self._restore is not None:
            self._restore()
        return False

    @contextlib.contextmanager
    def threads_released(self):
        """This process's threads as they were before, for a while (``bench train`` times
        torchvision between minimask's steps with it)."""
        self._restore()
        try:
            yield
        finally:
            self._restore = limit_threads(1)

    def shares(self, images, targets):
        k = len(images) // self.n
        return [(images[r * k:(r + 1) * k], targets[r * k:(r + 1) * k]) for r in range(self.n)]

    def step(self, iteration, optimizer, scheduler, images, targets):
        """One iteration over the whole batch; returns the averaged loss values (with ``total``)."""
        shares = self.shares(images, targets)
        for b, v in zip(_buffers(self.model), self._buffer_views):  # the buffers as this step starts
            v[...] = b
        for (proc, conn), (imgs, tgts) in zip(self.workers, shares[1:]):
            conn.send((iteration, imgs, tgts))
        optimizer.zero_grad()
        self.model.reseed(self.seed, iteration)
        losses = self.model(*shares[0])
        values = [loss_values(losses)]
        if all(np.isfinite(v) for v in values[0].values()):
            sum_losses(losses).backward()
        replies = []
        for proc, conn in self.workers:
            try:
                replies.append(conn.recv())
            except EOFError:
                raise RuntimeError(f"data-parallel process {proc.name} died (exit code {proc.exitcode})") \
                    from None
        for rank, (status, payload, has_grad) in enumerate(replies, 1):
            if status != "ok":
                raise RuntimeError(f"data-parallel process {rank} failed:\n{payload}")
            values.append(payload)
        mean = {k: sum(v[k] for v in values) / self.n for k in values[0]}
        mean["total"] = sum(mean.values())
        check_finite(mean)
        for i, p in enumerate(self.params):
            grads = [p.grad] if p.grad is not None else []
            grads += [views[i] for views, (_, _, has) in zip(self._grad_views, replies) if has[i]]
            if grads:
                total = np.array(grads[0], dtype=p.data.dtype, copy=True)
                for g in grads[1:]:
                    total += g
                total /= self.n  # DDP's mean over processes (a missing gradient counts as zero)
                p.grad = total
        optimizer.step()
        scheduler.step()
        return mean


__all__ = ["DataParallel", "fork_available", "limit_threads", "RANK_SEED_STRIDE"]
