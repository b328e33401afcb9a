"""Which samples each rank trains on at each step.

Data-parallel SGD with global batch B over P ranks must be the *same*
algorithm as SGD with batch B on one process: at step k every rank draws
the same global batch (a shuffle seeded by the shared seed and the epoch,
needing no communication) and takes its own contiguous 1/P of it. The global
batch therefore does not depend on P, the union over ranks is exactly the
global batch, and resuming from (epoch, step) with any P continues the same
sample sequence::

    epoch permutation     [ 7 2 9 0 | 4 1 8 3 | 6 5 ... ]    steps of B = 4
    step 0, P = 2:          rank 0: 7 2   rank 1: 9 0
    step 0, P = 4:          rank 0: 7  rank 1: 2  rank 2: 9  rank 3: 0

The last ``N mod B`` samples of each epoch's permutation are dropped so that
every step has exactly B samples (they differ from epoch to epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ShardedSampler"]


class ShardedSampler:
    """Deterministic per-rank shards of shuffled global batches.

    Parameters
    ----------
    dataset_size : int
        N, the number of samples.
    global_batch : int
        B, samples per step summed over all ranks.
    rank, world_size : int
        This process's rank r and the number of ranks P; B must divide by P.
    seed : int
        Shared by all ranks; with the epoch it fixes the shuffle.
    shuffle : bool, default True
        False keeps the natural order (evaluation).

    Raises
    ------
    ValueError
        If B is not divisible by P, N < B, or the rank is out of range.
    """

    def __init__(self, dataset_size: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} out of range for world size "
                             f"{world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"ShardedSampler: global batch {global_batch} is not divisible by "
                             f"world size {world_size}; every rank needs the same local batch")
        if dataset_size < global_batch:
            raise ValueError(f"ShardedSampler: dataset of {dataset_size} samples is smaller "
                             f"than the global batch {global_batch}")
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = dataset_size // global_batch
        self._cached_epoch, self._cached_order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order, identical on every rank.

        Returns
        -------
        ndarray of shape (dataset_size,), int64
        """
        if epoch != self._cached_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(self.dataset_size)
            else:
                order = np.arange(self.dataset_size)
            self._cached_epoch, self._cached_order = epoch, order.astype(np.int64)
        return self._cached_order

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Samples of the whole global batch at (epoch, step), shape (B,), int64."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"ShardedSampler: step {step} out of range "
                             f"[0, {self.steps_per_epoch})")
        start = step * self.global_batch
        return self.order(epoch)[start:start + self.global_batch]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """This rank's samples at (epoch, step), shape (B / P,), int64."""
        start = self.rank * self.local_batch
        return self.global_indices(epoch, step)[start:start + self.local_batch]

    def iterate(self, start_epoch: int = 0, start_step: int = 0,
                num_epochs: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(epoch, step, indices)`` from a resume point on.

        Parameters
        ----------
        start_epoch, start_step : int
            Where to resume: the first batch yielded is the one the
            uninterrupted run took at this (epoch, step). From a global
            iteration count: ``divmod(iteration, sampler.steps_per_epoch)``.
        num_epochs : int, optional
            Stop before epoch ``num_epochs``; by default never stop.
        """
        if start_epoch < 0 or not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"ShardedSampler: cannot start at epoch {start_epoch}, step "
                             f"{start_step} ({self.steps_per_epoch} steps per epoch)")
        epoch, step = start_epoch, start_step
        while num_epochs is None or epoch < num_epochs:
            while step < self.steps_per_epoch:
                yield epoch, step, self.indices(epoch, step)
                step += 1
            epoch, step = epoch + 1, 0
