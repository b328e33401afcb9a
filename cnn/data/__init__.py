"""Data: synthetic, bundled digits, MNIST/CIFAR-10 readers, sharding, augmentation.

Every loader returns NCHW images and int64 labels as numpy arrays; training
code picks a batch with ``x[idx], y[idx]`` where ``idx`` comes from
`ShardedSampler`, which splits each global batch across ranks.
"""

from .augment import crop_flip, random_crop_flip
from .cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    load_cifar10,
    normalize_cifar10,
    read_cifar10_batch,
)
from .digits import DIGITS_PATH, load_digits
from .files import DatasetError
from .mnist import load_mnist, read_idx, read_mnist_images, read_mnist_labels
from .sharding import ShardedSampler
from .synthetic import SyntheticDataset

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "DIGITS_PATH", "crop_flip", "DatasetError", "ShardedSampler",
    "SyntheticDataset", "load_cifar10", "load_digits", "load_mnist", "normalize_cifar10",
    "random_crop_flip", "read_cifar10_batch", "read_idx", "read_mnist_images",
    "read_mnist_labels",
]
