"""ReLU: y = max(x, 0), dx = dy where y > 0."""

import numpy as np
from numba import njit, prange, uint64

from .base import NUMBA_OPTIONS, Layer


def relu_forward_reference(x):
    """y = max(x, 0), any shape."""
    return np.maximum(x, 0).astype(x.dtype)


def relu_backward_reference(dy, y):
    """dx = dy where the output y is positive, else 0 (torch's choice at 0)."""
    return np.where(y > 0, dy, 0).astype(dy.dtype)


#: Elements per parallel task: whole cache lines, and few enough tasks that
#: scheduling them costs nothing next to the copy.
BLOCK = 1 << 14


@njit(**NUMBA_OPTIONS)
def relu_forward(x, y):
    """x, y : 1-D views of the same length.

    Blocks of BLOCK elements in parallel; the inner loop indexes with uint64
    offsets so that numba adds no negative-index check and LLVM vectorises it.
    """
    size = x.size
    for block in prange((size + BLOCK - 1) // BLOCK):
        lo = uint64(block * BLOCK)
        hi = uint64(min(size, (block + 1) * BLOCK))
        for i in range(lo, hi):
            v = x[i]
            y[i] = v if v > 0 else np.float32(0.0)


@njit(**NUMBA_OPTIONS)
def relu_backward(dy, y, dx):
    """dy, y, dx : 1-D views of the same length; the mask comes from y."""
    size = dy.size
    for block in prange((size + BLOCK - 1) // BLOCK):
        lo = uint64(block * BLOCK)
        hi = uint64(min(size, (block + 1) * BLOCK))
        for i in range(lo, hi):
            dx[i] = dy[i] if y[i] > 0 else np.float32(0.0)


class ReLU(Layer):
    """Rectified linear unit, any input shape (float32).

    Keeps a reference to its output for the backward mask.
    """

    def __init__(self):
        super().__init__()
        self._y = None

    def __repr__(self):
        return "ReLU()"

    def forward(self, x, train=True):
        x = self._check_input(x, layout="(N, ...)")
        if self.reference:
            self._y = relu_forward_reference(x)
        else:
            self._y = np.empty_like(x)
            relu_forward(x.reshape(-1), self._y.reshape(-1))
        return self._y

    def backward(self, dy):
        dy = self._check_grad(dy, None if self._y is None else self._y.shape)
        if self.reference:
            return relu_backward_reference(dy, self._y)
        dx = np.empty_like(dy)
        relu_backward(dy.reshape(-1), self._y.reshape(-1), dx.reshape(-1))
        return dx
