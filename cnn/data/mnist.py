"""MNIST in its original IDX format, raw or gzip-compressed.

IDX layout (LeCun's page): a 4-byte magic ``0x00 0x00 <type> <ndim>``, then
`ndim` big-endian uint32 dimensions, then the data in C order. MNIST images
are ``0x00000803`` (uint8, 3-D: N x 28 x 28), labels ``0x00000801`` (uint8,
1-D: N).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .files import DatasetError, open_maybe_gzip, read_payload

__all__ = ["load_mnist", "read_idx", "read_mnist_images", "read_mnist_labels"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read any IDX file.

    Returns
    -------
    ndarray of the header's shape, in native byte order

    Raises
    ------
    DatasetError
        Bad magic number, or a data length that disagrees with the header.
    FileNotFoundError
    """
    path = Path(path)
    f, compressed = open_maybe_gzip(path)
    with f:
        try:
            magic = f.read(4)
            dims = f.read(4 * magic[3]) if len(magic) == 4 else b""
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: unreadable header ({e})") from e
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] == 0:
            raise DatasetError(f"{path}: not an IDX file (magic bytes {magic.hex() or 'missing'})")
        ndim = magic[3]
        if len(dims) != 4 * ndim:
            raise DatasetError(f"{path}: truncated IDX header")
        shape = struct.unpack(f">{ndim}I", dims)
        dtype = np.dtype(_IDX_DTYPES[magic[2]])
        data = read_payload(f, path, math.prod(shape) * dtype.itemsize, compressed)
    return np.frombuffer(data, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_mnist_images(path: str | os.PathLike) -> np.ndarray:
    """Read an MNIST image file.

    Returns
    -------
    ndarray of shape (N, rows, cols), uint8
    """
    images = read_idx(path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(f"{Path(path)}: expected 3-D uint8 images, got {images.ndim}-D "
                           f"{images.dtype}")
    return images


def read_mnist_labels(path: str | os.PathLike, num_classes: int = 10) -> np.ndarray:
    """Read an MNIST label file.

    Returns
    -------
    ndarray of shape (N,), int64
        int64 because that is what losses index with.

    Raises
    ------
    DatasetError
        Also for labels outside ``[0, num_classes)``, which would otherwise
        surface much later as an index error deep in the loss.
    """
    labels = read_idx(path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{Path(path)}: expected 1-D uint8 labels, got {labels.ndim}-D "
                           f"{labels.dtype}")
    if labels.size and labels.max() >= num_classes:
        raise DatasetError(f"{Path(path)}: label {labels.max()} out of range [0, {num_classes})")
    return labels.astype(np.int64)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"MNIST: neither {root / name} nor {root / name}.gz exists")


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load the MNIST train (60000) or test (10000) split from a directory.

    Parameters
    ----------
    root : path-like
        Directory holding the four standard files, raw or with ``.gz``.
    split : {"train", "test"}

    Returns
    -------
    x : ndarray of shape (N, 1, 28, 28), float32 in [0, 1]
    y : ndarray of shape (N,), int64
    """
    if split not in _FILES:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images_path, labels_path = (_find(root, name) for name in _FILES[split])
    images = read_mnist_images(images_path)
    labels = read_mnist_labels(labels_path)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                           f"{len(labels)} labels")
    x = images[:, None].astype(np.float32)
    x *= np.float32(1 / 255)
    return x, labels
