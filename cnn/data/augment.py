"""CIFAR-style augmentation: random crop after zero padding, and horizontal flip."""

from __future__ import annotations

import numpy as np

__all__ = ["crop_flip", "random_crop_flip"]


def random_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Randomly shift each image by up to `pad` pixels and mirror half of them.

    Equivalent to torchvision's ``RandomCrop(H, padding=pad)`` followed by
    ``RandomHorizontalFlip()``, but for a whole batch with one gather instead
    of a Python loop per image.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
        Any dtype; apply before normalising so the padding is black, as in
        the usual recipe.
    rng : numpy.random.Generator
        Consumed in a fixed order (offsets, then flips), so the result is a
        function of the generator's state.
    pad : int, default 4

    Returns
    -------
    ndarray of shape (N, C, H, W), same dtype as `x`
    """
    n = x.shape[0]
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flip = rng.random(n) < 0.5
    return crop_flip(x, offsets, flip, pad)


def crop_flip(x: np.ndarray, offsets: np.ndarray, flip: np.ndarray, pad: int = 4) -> np.ndarray:
    """The deterministic half of `random_crop_flip`: crop and flip as drawn.

    Drawing the offsets and flips of a whole global batch once and applying
    them to any slice of it gives every rank the same augmented samples
    whichever rank does the work (engine/ensemble.py relies on this).

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    offsets : ndarray of shape (N, 2), int
        Top-left corner of each crop in the zero-padded image, in [0, 2 * pad].
    flip : ndarray of shape (N,), bool
        Mirror the image horizontally.
    pad : int, default 4

    Returns
    -------
    ndarray of shape (N, C, H, W), same dtype as `x`
    """
    n, c, h, w = x.shape
    # np.pad costs ~50 us a call whatever the size: a lot for the few samples a
    # distributed pipeline makes per rank and step (engine/pipeline.py)
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = offsets[:, 0:1] + np.arange(h)                          # (N, H)
    cols = offsets[:, 1:2] + np.arange(w)                          # (N, W)
    cols[flip] = cols[flip, ::-1]
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
