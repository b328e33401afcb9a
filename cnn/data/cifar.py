"""CIFAR-10 "binary version" batches (data_batch_1.bin ... data_batch_5.bin, test_batch.bin).

Each record is 1 label byte followed by 3 x 32 x 32 pixel bytes (red plane,
green, blue; rows in order), so a file is a whole number of 3073-byte records
and needs no header.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import DatasetError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10", "normalize_cifar10",
           "read_cifar10_batch"]

_IMAGE_SHAPE = (3, 32, 32)
_RECORD = 1 + 3 * 32 * 32
_SPLITS = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}
# Per-channel statistics of the 50000 training images, in [0, 1] units.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def read_cifar10_batch(path: str | os.PathLike, num_classes: int = 10
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch file.

    Returns
    -------
    images : ndarray of shape (N, 3, 32, 32), uint8
    labels : ndarray of shape (N,), int64

    Raises
    ------
    DatasetError
        If the file is empty, not a whole number of records (truncated), or
        holds a label outside ``[0, num_classes)``.
    FileNotFoundError
    """
    path = Path(path)
    size = os.path.getsize(path)
    if size == 0 or size % _RECORD:
        raise DatasetError(f"{path}: {size} bytes is not a whole number of {_RECORD}-byte "
                           "CIFAR-10 records (truncated or not a CIFAR-10 binary batch)")
    records = np.fromfile(path, np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= num_classes:
        raise DatasetError(f"{path}: label {labels.max()} out of range [0, {num_classes})")
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, *_IMAGE_SHAPE)
    return images, labels


def load_cifar10(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load the CIFAR-10 train (50000) or test (10000) split.

    Images stay uint8: the float32 training set would take 600 MB per rank;
    convert each batch with `normalize_cifar10` after augmentation instead.

    Parameters
    ----------
    root : path-like
        The ``cifar-10-batches-bin`` directory, or a directory containing it.
    split : {"train", "test"}

    Returns
    -------
    images : ndarray of shape (N, 3, 32, 32), uint8
    labels : ndarray of shape (N,), int64
    """
    if split not in _SPLITS:
        raise ValueError(f"load_cifar10: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not (root / _SPLITS[split][0]).exists() and (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    batches = [read_cifar10_batch(root / name) for name in _SPLITS[split]]
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))


def normalize_cifar10(images: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] and standardise per channel.

    Parameters
    ----------
    images : ndarray of shape (N, 3, H, W), uint8

    Returns
    -------
    ndarray of shape (N, 3, H, W), float32
    """
    x = images.astype(np.float32)
    x *= np.float32(1 / 255)
    x -= CIFAR10_MEAN[:, None, None]
    x /= CIFAR10_STD[:, None, None]
    return x
