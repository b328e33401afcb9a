"""Inverted dropout: zero with probability p, scale survivors by 1/(1-p)."""

import numpy as np

from .base import Layer


class Dropout(Layer):
    """Dropout (torch semantics): identity in eval mode.

    Parameters
    ----------
    p : float
        Probability of zeroing an element, 0 <= p <= 1.
    rng : numpy.random.Generator, optional
        Source of the masks. Default: ``np.random.default_rng(0)``.

    Notes
    -----
    Small layer (classifier head), so plain numpy: the mask is drawn with
    ``rng.random`` and kept, pre-scaled, for backward.
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(0) if rng is None else rng
        self._mask = None
        self._shape = None

    def __repr__(self):
        return f"Dropout(p={self.p})"

    def forward(self, x, train=True):
        x = self._check_input(x, layout="(N, ...)")
        self._shape = x.shape
        if not train or self.p == 0.0:
            self._mask = None
            return x.copy()
        if self.p == 1.0:
            self._mask = np.zeros(x.shape, dtype=np.float32)
        else:
            keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
            self._mask = keep.astype(np.float32) * np.float32(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, dy):
        dy = self._check_grad(dy, self._shape)
        if self._mask is None:
            return dy.copy()
        return dy * self._mask
