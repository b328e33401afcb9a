"""The input pipeline of ensemble training: read, decode, augment, normalise,
and how its batches reach the members (engine/ensemble.py).

Three deliveries with the same interface and bitwise the same batches:

- `SharedDelivery`: rank 0 runs the pipeline once per global batch and every
  rank receives its shard with a non-blocking ``MPI_Iscatter`` posted
  ``depth - 1`` steps ahead, so the transfer overlaps the members' compute and
  a member may run ahead of rank 0 by that many steps. Ranks of different
  members with the same rank inside their member receive the same shard; the
  pipeline work is done once for all K members.
- `DistributedDelivery`: the same single pipeline, its work spread over all
  ranks. The ranks that need the same shard (one per member) each make a
  piece of it and assemble the shard with a non-blocking ``MPI_Iallgatherv``,
  posted ahead like the scatters. Every sample is made once, and no rank
  makes more than B/P samples a step: the pipeline is nobody's extra work.
- `SeparateDelivery`: every rank runs the pipeline for its own shard, once per
  member it trains: K pipelines doing the same reading, decoding and
  augmentation, the baseline of Pittman et al. (SC18).

Both make their batches ahead on a background thread (`Prefetcher`) while
the members train, so the pipeline's CPU leaves the members' critical path
where a core is free, in the baseline as in the shared pipeline. A rank
waiting for its shard sleeps between tests of the scatter (`wait_quietly`):
MPICH's ``MPI_Waitall`` spins, and a member that is ahead would otherwise
burn the CPU the shared pipeline saves.

What makes the two equal: the augmentation's random draws (crop offsets and
flips) are made for the whole global batch from a generator seeded by
(seed, epoch, step), so any slice of the batch comes out the same whichever
rank computes it (`cnn.data.crop_flip`).
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI

from cnn.data import ShardedSampler, crop_flip

__all__ = ["CompressedImages", "DistributedDelivery", "Pipeline", "Prefetcher",
           "SeparateDelivery", "SharedDelivery", "wait_quietly"]


class CompressedImages:
    """CIFAR-shaped uint8 images stored one zlib stream per image, with labels.

    A stand-in for a JPEG dataset: reading a batch costs real CPU (inflating
    every image), as decoding does in the pipelines the SC18 paper shares.
    Each class has its own mean colour, so the data is learnable.

    Parameters
    ----------
    size : int
    shape : tuple of int, default (3, 32, 32)
    num_classes : int, default 10
    seed : int, default 0
    """

    def __init__(self, size: int, shape=(3, 32, 32), num_classes: int = 10, seed: int = 0):
        if size < 1:
            raise ValueError(f"CompressedImages: size must be >= 1, got {size}")
        rng = np.random.default_rng(seed)
        self.shape = tuple(shape)
        self.labels = rng.integers(0, num_classes, size).astype(np.int64)
        colours = np.random.default_rng(12345).integers(40, 216, (num_classes, shape[0]))
        self.blobs = []
        for label in self.labels:
            # Smooth noise around the class colour: compresses like a photo, not like noise.
            coarse = rng.normal(0, 30, (shape[0], shape[1] // 4, shape[2] // 4))
            image = colours[label][:, None, None] + np.kron(coarse, np.ones((4, 4)))
            image += rng.normal(0, 6, shape)
            self.blobs.append(zlib.compress(np.clip(image, 0, 255).astype(np.uint8).tobytes(), 6))

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Decode the images at `indices`: x of shape (B, *shape) uint8, y of shape (B,) int64."""
        indices = np.asarray(indices, np.int64)
        x = np.empty((len(indices), *self.shape), np.uint8)
        for k, i in enumerate(indices):
            x[k] = np.frombuffer(zlib.decompress(self.blobs[i]), np.uint8).reshape(self.shape)
        return x, self.labels[indices]


class Pipeline:
    """Global batches of a training set, read, decoded, augmented and normalised.

    Parameters
    ----------
    read : callable(indices) -> (x of shape (B, C, H, W), y of shape (B,) int64)
        Reads and decodes samples (any dtype; uint8 before `normalize`).
    size : int
        Samples in the training set.
    global_batch : int
    seed : int
        Data order and augmentation draws (the same for every member).
    crop_pad : int
        Random crop after zero padding by this many pixels plus a horizontal
        flip; 0 disables augmentation.
    normalize : callable(x) -> float32 array, optional

    Attributes
    ----------
    cpu_s : float
        CPU seconds this process spent in `batch` (thread time, summed over
        the threads that called it).
    samples : int
        Samples `batch` has made (a shard counts its own samples).
    """

    def __init__(self, read, size: int, global_batch: int, seed: int, crop_pad: int = 0,
                 normalize=None):
        self.read = read
        self.sampler = ShardedSampler(size, global_batch, 0, 1, seed=seed)
        self.global_batch = global_batch
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.seed = seed
        self.crop_pad = crop_pad
        self.normalize = normalize
        self.cpu_s = 0.0
        self.samples = 0
        self._cpu_lock = threading.Lock()      # batch may run on a prefetch thread too

    def batch(self, epoch: int, step: int, lo: int = 0, hi: int | None = None):
        """Samples ``lo:hi`` of the global batch at (epoch, step).

        Returns
        -------
        x : ndarray of shape (hi - lo, C, H, W), float32, C-contiguous
        y : ndarray of shape (hi - lo,), int64
        """
        start = time.thread_time()
        hi = self.global_batch if hi is None else hi
        indices = self.sampler.global_indices(epoch, step)
        x, y = self.read(indices[lo:hi])
        if self.crop_pad:
            # Drawn for the whole global batch, then sliced: see the module docstring.
            rng = np.random.default_rng([self.seed, epoch, step])
            offsets = rng.integers(0, 2 * self.crop_pad + 1, size=(self.global_batch, 2))
            flip = rng.random(self.global_batch) < 0.5
            x = crop_flip(x, offsets[lo:hi], flip[lo:hi], self.crop_pad)
        if self.normalize is not None:
            x = self.normalize(x)
        x = np.ascontiguousarray(x, np.float32)
        y = np.ascontiguousarray(y, np.int64)
        with self._cpu_lock:
            self.cpu_s += time.thread_time() - start
            self.samples += hi - lo
        return x, y


def wait_quietly(requests, first_sleep_s: float = 20e-6, max_sleep_s: float = 1e-3) -> None:
    """Complete `requests`, sleeping between ``MPI_Testall`` calls instead of spinning.

    MPICH's ``MPI_Waitall`` polls at full speed: a member waiting for rank 0's
    next batch would burn a core doing nothing. The sleep doubles from
    `first_sleep_s` up to `max_sleep_s`, which bounds the delay added to a
    wait (Linux oversleeps by ~50-60 us) while a wait costs a few tests of CPU.
    Each test also lets MPI move the transfer (rendezvous needs the root's
    progress as much as the receiver's).
    """
    delay = first_sleep_s
    while not MPI.Request.Testall(requests):
        time.sleep(delay)
        delay = min(2 * delay, max_sleep_s)


class Prefetcher:
    """Runs ``produce(position)`` for a sequence of positions on a background
    thread, up to `depth` results ahead of `get`.

    The pipeline's numpy, zlib and numba work releases the GIL for most of its
    time, so on a free core it overlaps the members' training (whose kernels
    release the GIL too). The thread never calls MPI, and the pipeline's
    steps are numpy and zlib only (no numba parallel kernel runs on two
    threads at once).

    Parameters
    ----------
    produce : callable(position) -> object
    positions : iterable of (epoch, step)
    depth : int
        Results made ahead; 0 makes each in `get`, on the calling thread.
    """

    _DONE = object()

    def __init__(self, produce, positions, depth: int):
        if depth < 0:
            raise ValueError(f"Prefetcher: depth must be >= 0, got {depth}")
        self._produce = produce
        self._positions = iter(positions)
        self._thread = None
        if depth:
            self._queue = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="pipeline-prefetch",
                                            daemon=True)
            self._thread.start()

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False if `close` stopped the thread first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for position in self._positions:
                if not self._put((self._produce(position), None)):
                    return
            item = (self._DONE, None)
        except BaseException as e:     # re-raised on the consuming thread by get()
            item = (None, e)
        self._put(item)

    def get(self):
        """The next position's result; StopIteration after the last one."""
        if self._thread is None:
            position = next(self._positions)
            return self._produce(position)
        result, error = self._queue.get()
        if error is not None:
            raise error
        if result is self._DONE:
            self._queue.put((self._DONE, None))     # later calls stop too
            raise StopIteration
        return result

    def close(self) -> None:
        """Stop the thread (it may be in the middle of a batch; that one is dropped)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


class SeparateDelivery:
    """Every rank runs its own pipeline for its shard, once per member it trains.

    Parameters
    ----------
    pipeline : Pipeline
    local_rank, group_size : int
        This rank's place in its member's group; its shard is samples
        ``local_rank * B/G : (local_rank + 1) * B/G`` of each global batch.
    copies : int, default 1
        Members trained on this rank: each runs its own pipeline, so each
        step's shard is made this many times.
    prefetch : int, default 0
        Steps made ahead on a background thread (`Prefetcher`); 0: each shard
        is made when its member asks for it.
    """

    def __init__(self, pipeline: Pipeline, local_rank: int, group_size: int, copies: int = 1,
                 prefetch: int = 0):
        if copies < 1:
            raise ValueError(f"SeparateDelivery: copies must be >= 1, got {copies}")
        self.pipeline = pipeline
        shard = pipeline.global_batch // group_size
        self.lo, self.hi = local_rank * shard, (local_rank + 1) * shard
        self.copies = copies
        self.prefetch = prefetch
        self._prefetcher = None

    def _make(self, position) -> list:
        return [self.pipeline.batch(*position, self.lo, self.hi) for _ in range(self.copies)]

    def start(self, positions) -> None:
        """The (epoch, step) sequence to deliver, identical on every rank."""
        self.close()
        self._prefetcher = Prefetcher(self._make, positions, self.prefetch)

    def next(self):
        """A function returning this rank's (x, y) of the next step: one call
        per member, each with its own pipeline's copy."""
        copies = iter(self._prefetcher.get())
        return lambda: next(copies)

    def progress(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


class _PostedDelivery:
    """What the deliveries through MPI share: receive slots used round-robin,
    collectives posted ``depth - 1`` steps ahead, quiet waits.

    A subclass says which ranks run the pipeline (`_makes_batches`), what they
    make for a step (`_make`, on the prefetch thread) and which non-blocking
    collectives move it into a slot (`_requests`). It owns `comm` and frees it.
    """

    def __init__(self, pipeline: Pipeline, comm, shard: int, sample_shape, depth: int,
                 prefetch: int):
        name = type(self).__name__
        problem = (f"depth must be >= 2 (double buffering), got {depth}" if depth < 2 else
                   f"prefetch must be >= 0, got {prefetch}" if prefetch < 0 else "")
        if problem:
            comm.Free()     # made for this delivery by the subclass
            raise ValueError(f"{name}: {problem}")
        self.pipeline = pipeline
        self.comm = comm
        self.shard = shard
        self.sample_shape = tuple(sample_shape)
        self.depth = depth
        self.prefetch = prefetch
        self._x = np.empty((depth, shard, *self.sample_shape), np.float32)
        self._y = np.empty((depth, shard), np.int64)
        self._posted = self._remaining = 0
        self._pending = deque()
        self._prefetcher = None

    def _makes_batches(self) -> bool:
        raise NotImplementedError

    def _make(self, position):
        raise NotImplementedError

    def _requests(self, made, x: np.ndarray, y: np.ndarray) -> list:
        raise NotImplementedError

    def start(self, positions) -> None:
        """Post the first ``depth - 1`` steps of the (epoch, step) sequence (every rank)."""
        positions = list(positions)
        self._remaining = len(positions)
        if self._makes_batches():
            self._prefetcher = Prefetcher(self._make, positions, self.prefetch)
        for _ in range(self.depth - 1):
            self._post()

    def _post(self) -> None:
        if not self._remaining:
            return
        self._remaining -= 1
        slot = self._posted % self.depth
        self._posted += 1
        x, y = self._x[slot], self._y[slot]
        made = self._prefetcher.get() if self._prefetcher is not None else None
        # `made` (the send buffers) stays referenced until the requests complete.
        self._pending.append((self._requests(made, x, y), x, y, made))

    def next(self):
        """Post the step ``depth - 1`` ahead, wait for this step's shard; a
        function returning (x, y), valid until the next call."""
        if not self._pending:
            raise RuntimeError(f"{type(self).__name__}: no step left to deliver")
        # This step's slot is not the one the new post fills: depth >= 2.
        requests, x, y, _ = self._pending.popleft()
        self._post()
        wait_quietly(requests)
        return lambda: (x, y)

    def progress(self) -> None:
        """Let MPI move the collectives in flight (called between layers)."""
        for requests, *_ in self._pending:
            MPI.Request.Testall(requests)

    def close(self) -> None:
        """Complete whatever is in flight (every rank posted the same steps), free the comm."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        while self._pending:
            wait_quietly(self._pending.popleft()[0])
        self.comm.Free()


class SharedDelivery(_PostedDelivery):
    """Rank 0 runs the pipeline; every rank gets its shard by ``Iscatter``,
    ``depth - 1`` steps ahead.

    Collective over `comm`: every rank must construct it, call `start`, and
    call `next` as often as the others.

    Parameters
    ----------
    pipeline : Pipeline
        Used on rank 0 only (other ranks may pass it too; they never call it).
    comm : mpi4py.MPI.Intracomm
        All ranks of the job (duplicated here, so its traffic is separate).
    local_rank, group_size : int
        As in `SeparateDelivery`; every member has the same group size.
    sample_shape : tuple of int
        (C, H, W) of one sample, for the receive buffers.
    depth : int, default 3
        Receive buffers per rank, used round-robin (no allocation per step):
        the scatters of the next ``depth - 1`` steps are in flight while this
        step computes, so a member runs up to that many steps ahead of rank 0
        before it waits (2 is double buffering, in lockstep with rank 0).
    prefetch : int, default 2
        Global batches rank 0 makes ahead on a background thread (0: on the
        main thread, when the step is posted).
    """

    ROOT = 0

    def __init__(self, pipeline: Pipeline, comm, local_rank: int, group_size: int,
                 sample_shape, depth: int = 3, prefetch: int = 2):
        super().__init__(pipeline, comm.Dup(), pipeline.global_batch // group_size,
                         sample_shape, depth, prefetch)
        # Root sends shard local_rank(r) to rank r: ranks of different members
        # with the same local rank get the same samples.
        self.shard_of_rank = np.asarray(self.comm.gather(local_rank, root=self.ROOT))
        self.group_size = group_size

    def _makes_batches(self) -> bool:
        return self.comm.rank == self.ROOT

    def _make(self, position):
        """Rank 0: the batch at `position`, laid out as (size, B/G, ...) send buffers."""
        bx, by = self.pipeline.batch(*position)
        # Rank r's row is its shard; the copy lets every rank's row be one
        # contiguous block of the scatter's send buffer.
        return (bx.reshape(self.group_size, self.shard, *self.sample_shape)[self.shard_of_rank],
                by.reshape(self.group_size, self.shard)[self.shard_of_rank])

    def _requests(self, made, x, y) -> list:
        send_x, send_y = made if made is not None else (None, None)
        return [self.comm.Iscatter(send_x, x, root=self.ROOT),
                self.comm.Iscatter(send_y, y, root=self.ROOT)]


class DistributedDelivery(_PostedDelivery):
    """The pipeline's work spread over every rank; each shard assembled by ``Iallgatherv``.

    The ranks that need the same shard (one per member: the "column" of
    local rank l) split it: column rank j makes samples
    ``partition(B/G, C)[j]`` of shard l, C ranks in the column, and an
    allgather inside the column gives each of them the whole shard, posted
    ``depth - 1`` steps ahead. Every sample is still made once, as in
    `SharedDelivery`, but no rank makes more than ``B/P`` of them per step
    (with K <= P), K times fewer than a rank of `SeparateDelivery` makes: the
    pipeline stops being one rank's extra work that the members wait for.

    Collective over `comm`; parameters as `SharedDelivery`.
    """

    def __init__(self, pipeline: Pipeline, comm, local_rank: int, group_size: int,
                 sample_shape, depth: int = 3, prefetch: int = 2):
        shard = pipeline.global_batch // group_size
        super().__init__(pipeline, comm.Split(local_rank, comm.rank), shard, sample_shape,
                         depth, prefetch)
        column = self.comm.size
        # The standard partition: the first shard % C pieces one sample larger.
        counts = [shard // column + (j < shard % column) for j in range(column)]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        j = self.comm.rank
        self.lo = local_rank * shard + starts[j]
        self.hi = self.lo + counts[j]
        per_sample = int(np.prod(self.sample_shape))
        self._counts_x = ([c * per_sample for c in counts], [s * per_sample for s in starts])
        self._counts_y = (counts, starts)

    def _makes_batches(self) -> bool:
        return True

    def _make(self, position):
        if self.hi == self.lo:      # a shard smaller than its column: nothing to make here
            return (np.empty((0, *self.sample_shape), np.float32), np.empty(0, np.int64))
        return self.pipeline.batch(*position, self.lo, self.hi)

    def _requests(self, made, x, y) -> list:
        piece_x, piece_y = made
        return [self.comm.Iallgatherv(piece_x, [x, *self._counts_x, MPI.FLOAT]),
                self.comm.Iallgatherv(piece_y, [y, *self._counts_y, MPI.INT64_T])]
