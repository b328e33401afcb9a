"""The input pipeline of ensemble training: read, decode, augment, normalise,
and how its batches reach the members (engine/ensemble.py).

Two deliveries with the same interface and bitwise the same batches:

- `SharedDelivery`: rank 0 runs the pipeline once per global batch and every
  rank receives its shard with a non-blocking ``MPI_Iscatter`` posted one step
  ahead (double buffering), so the transfer overlaps the members' compute.
  Ranks of different members with the same rank inside their member receive
  the same shard; the pipeline work is done once for all K members.
- `SeparateDelivery`: every rank runs the pipeline for its own shard, once per
  member it trains: K pipelines doing the same reading, decoding and
  augmentation, the baseline of Pittman et al. (SC18).

What makes the two equal: the augmentation's random draws (crop offsets and
flips) are made for the whole global batch from a generator seeded by
(seed, epoch, step), so any slice of the batch comes out the same whichever
rank computes it (`cnn.data.crop_flip`).
"""

from __future__ import annotations

import time
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI

from cnn.data import ShardedSampler, crop_flip

__all__ = ["CompressedImages", "Pipeline", "SeparateDelivery", "SharedDelivery"]


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
        CPU seconds this process spent in `batch` (thread time).
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
        self.cpu_s += time.thread_time() - start
        return x, y


class SeparateDelivery:
    """Every rank runs its own pipeline for its shard, once per member it trains.

    Parameters
    ----------
    pipeline : Pipeline
    local_rank, group_size : int
        This rank's place in its member's group; its shard is samples
        ``local_rank * B/G : (local_rank + 1) * B/G`` of each global batch.
    """

    def __init__(self, pipeline: Pipeline, local_rank: int, group_size: int):
        self.pipeline = pipeline
        shard = pipeline.global_batch // group_size
        self.lo, self.hi = local_rank * shard, (local_rank + 1) * shard

    def start(self, positions) -> None:
        """The (epoch, step) sequence to deliver, identical on every rank."""
        self._positions = iter(positions)

    def next(self):
        """A function returning this rank's (x, y) of the next step, run per member."""
        epoch, step = next(self._positions)
        return lambda: self.pipeline.batch(epoch, step, self.lo, self.hi)

    def progress(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        pass


class SharedDelivery:
    """Rank 0 runs the pipeline; every rank gets its shard by ``Iscatter``, a step ahead.

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
    depth : int, default 2
        Receive buffers in use: 2 is double buffering (the next step's shard
        arrives while this step computes on the other buffer).
    """

    ROOT = 0

    def __init__(self, pipeline: Pipeline, comm, local_rank: int, group_size: int,
                 sample_shape, depth: int = 2):
        self.pipeline = pipeline
        self.comm = comm.Dup()
        # Root sends shard local_rank(r) to rank r: ranks of different members
        # with the same local rank get the same samples.
        self.shard_of_rank = self.comm.gather(local_rank, root=self.ROOT)
        self.group_size = group_size
        self.shard = pipeline.global_batch // group_size
        self.sample_shape = tuple(sample_shape)
        self.depth = depth
        self._pending = deque()
        self._positions = iter(())

    def start(self, positions) -> None:
        """Post the first ``depth - 1`` steps of the (epoch, step) sequence (every rank)."""
        self._positions = iter(positions)
        for _ in range(self.depth - 1):
            self._post()

    def _post(self) -> None:
        position = next(self._positions, None)
        if position is None:
            return
        x = np.empty((self.shard, *self.sample_shape), np.float32)
        y = np.empty(self.shard, np.int64)
        send_x = send_y = None
        if self.comm.rank == self.ROOT:
            bx, by = self.pipeline.batch(*position)
            shards = np.asarray(self.shard_of_rank)
            # (size, B/G, ...): rank r's row is its shard; the copy lets every
            # rank's row be one contiguous block of the scatter's send buffer.
            send_x = bx.reshape(self.group_size, self.shard, *self.sample_shape)[shards]
            send_y = by.reshape(self.group_size, self.shard)[shards]
        requests = [self.comm.Iscatter(send_x, x, root=self.ROOT),
                    self.comm.Iscatter(send_y, y, root=self.ROOT)]
        # The send buffers stay referenced until the requests complete.
        self._pending.append((requests, x, y, send_x, send_y))

    def next(self):
        """Post the step ``depth - 1`` ahead, wait for this step's shard; a
        function returning (x, y), valid until the next call."""
        self._post()
        if not self._pending:
            raise RuntimeError("SharedDelivery: no step left to deliver")
        requests, x, y, _, _ = self._pending.popleft()
        MPI.Request.Waitall(requests)
        return lambda: (x, y)

    def progress(self) -> None:
        """Let MPI move the scatters in flight (called between layers)."""
        for requests, *_ in self._pending:
            MPI.Request.Testall(requests)

    def close(self) -> None:
        """Complete whatever is in flight (every rank posted the same steps), free the comm."""
        while self._pending:
            MPI.Request.Waitall(self._pending.popleft()[0])
        self.comm.Free()
