"""The scikit-learn "digits" dataset, bundled: 1797 8x8 grey images, 10 classes.

A real dataset small enough to train on in seconds, for tests and examples
that must show learning without any download.

Origin of ``digits.csv.gz``: the test set of the UCI "Optical Recognition of
Handwritten Digits" dataset (E. Alpaydin, C. Kaynak, 1998;
https://archive.ics.uci.edu/dataset/80), as shipped by scikit-learn 1.9.1
(``sklearn/datasets/data/digits.csv.gz``, BSD-3-Clause, Copyright (c)
2007-2026 The scikit-learn developers), copied unchanged. Each line holds 64
pixel counts in 0..16 followed by the label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import DatasetError

__all__ = ["DIGITS_PATH", "load_digits"]

DIGITS_PATH = Path(__file__).with_name("digits.csv.gz")
_NUM_SAMPLES, _NUM_CLASSES = 1797, 10
_HELD_OUT_EVERY = 5


def load_digits(split: str = "train", standardize: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Load a fixed split of the bundled digits.

    The split holds out every fifth sample of each class, in file order
    (1442 train, 355 held out): a rule rather than a random permutation, so
    it cannot change with the numpy version, and stratified so that the
    held-out accuracy is not skewed by class balance.

    Parameters
    ----------
    split : {"train", "test", "all"}
        "test" is the held-out fifth.
    standardize : bool, default False
        If True, subtract the training split's mean pixel and divide by its
        standard deviation (one scalar each) instead of scaling to [0, 1].

    Returns
    -------
    x : ndarray of shape (N, 1, 8, 8), float32
    y : ndarray of shape (N,), int64 in [0, 10)
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    try:
        table = np.loadtxt(DIGITS_PATH, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{DIGITS_PATH}: unreadable ({e})") from e
    if (table.shape != (_NUM_SAMPLES, 65) or table[:, :64].min() < 0 or table[:, :64].max() > 16
            or table[:, 64].min() < 0 or table[:, 64].max() >= _NUM_CLASSES):
        raise DatasetError(f"{DIGITS_PATH}: not the expected 1797 x 65 table of pixels in "
                           "0..16 and labels in 0..9")
    x = table[:, :64].reshape(-1, 1, 8, 8).astype(np.float32) / np.float32(16)
    y = table[:, 64]
    held_out = np.zeros(_NUM_SAMPLES, bool)
    for c in range(_NUM_CLASSES):
        held_out[np.flatnonzero(y == c)[_HELD_OUT_EVERY - 1::_HELD_OUT_EVERY]] = True
    if standardize:
        train = x[~held_out]
        x = (x - train.mean(dtype=np.float64)) / train.std(dtype=np.float64)
        x = x.astype(np.float32)
    keep = {"train": ~held_out, "test": held_out, "all": slice(None)}[split]
    return np.ascontiguousarray(x[keep]), y[keep].copy()
