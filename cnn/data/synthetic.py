"""Synthetic ("ghost") data: random inputs of any shape with valid labels.

For benchmarks and tests that need the training step, not learning: no file,
no I/O. Sample i is a function of (seed, i) alone, so the same global batch
yields the same samples whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SyntheticDataset"]


class SyntheticDataset:
    """Standard-normal inputs and uniform labels, generated per index.

    Parameters
    ----------
    size : int
        Number of samples (for samplers; nothing is stored).
    input_shape : sequence of int
        Shape of one sample, e.g. (3, 224, 224).
    num_classes : int
    seed : int, default 0
    """

    def __init__(self, size: int, input_shape: Sequence[int], num_classes: int, seed: int = 0):
        if size < 1 or num_classes < 1:
            raise ValueError(f"SyntheticDataset: need size >= 1 and num_classes >= 1, "
                             f"got {size}, {num_classes}")
        self.size = size
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Samples at `indices`.

        Parameters
        ----------
        indices : array-like of int, shape (B,)

        Returns
        -------
        x : ndarray of shape (B, *input_shape), float32
        y : ndarray of shape (B,), int64 in [0, num_classes)
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise IndexError(f"SyntheticDataset: index out of range [0, {self.size})")
        x = np.empty((len(indices), *self.input_shape), np.float32)
        y = np.empty(len(indices), np.int64)
        for k, i in enumerate(indices):
            # One small generator per sample: costs microseconds, and makes
            # sample i independent of which other samples share its batch.
            rng = np.random.default_rng([self.seed, int(i)])
            x[k] = rng.standard_normal(self.input_shape, np.float32)
            y[k] = rng.integers(self.num_classes)
        return x, y
