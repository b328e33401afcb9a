"""ReLU: y = max(x, 0), dx = dy where y > 0.

Also the residual block's output, y = max(x + r, 0): the addition is fused
into the ReLU's pass (``forward(x, residual=r)``), and so is its backward
counterpart, the sum of the two branches' input gradients (`add_into`).
"""

import numpy as np
from numba import njit, prange, uint64

from .base import NUMBA_OPTIONS, Layer


def relu_forward_reference(x):
    """y = max(x, 0), any shape."""
    return np.maximum(x, 0).astype(x.dtype)


def add_relu_forward_reference(x, r):
    """y = max(x + r, 0), same shapes."""
    return relu_forward_reference(x + r)


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
def add_relu_forward(x, r, y):
    """y = max(x + r, 0); x, r, y : 1-D views of the same length (y may be x)."""
    size = x.size
    for block in prange((size + BLOCK - 1) // BLOCK):
        lo = uint64(block * BLOCK)
        hi = uint64(min(size, (block + 1) * BLOCK))
        for i in range(lo, hi):
            v = x[i] + r[i]
            y[i] = v if v > 0 else np.float32(0.0)


@njit(**NUMBA_OPTIONS)
def add_into(a, b):
    """a += b on numba's threads; 1-D views of the same length."""
    size = a.size
    for block in prange((size + BLOCK - 1) // BLOCK):
        lo = uint64(block * BLOCK)
        hi = uint64(min(size, (block + 1) * BLOCK))
        for i in range(lo, hi):
            a[i] += b[i]


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

    Parameters
    ----------
    inplace : bool
        Write the output over the input array, as torch's ``ReLU(inplace=True)``:
        for inputs nothing else holds (a convolution's output, which the
        convolution does not keep). Saves an allocation and a write stream.
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = bool(inplace)
        self._y = None

    def __repr__(self):
        return "ReLU(inplace=True)" if self.inplace else "ReLU()"

    def forward(self, x, train=True, residual=None):
        """y = max(x, 0), or max(x + residual, 0) (a residual block's output)."""
        x = self._check_input(x, layout="(N, ...)")
        if residual is not None:
            if not isinstance(residual, np.ndarray) or residual.shape != x.shape:
                got = getattr(residual, "shape", type(residual).__name__)
                raise ValueError(f"{self}: residual must match the input shape {x.shape}, got {got}")
            if residual.dtype != np.float32:
                raise ValueError(f"{self}: expected a float32 residual, got {residual.dtype}")
            residual = np.ascontiguousarray(residual)
        if self.inplace and not x.flags.writeable:
            raise ValueError(f"{self}: the input is read-only, cannot write the output over it")
        if self.reference:
            self._y = (relu_forward_reference(x) if residual is None
                       else add_relu_forward_reference(x, residual))
            if self.inplace:
                x[...] = self._y
                self._y = x
            return self._y
        self._y = x if self.inplace else np.empty_like(x)
        if residual is None:
            relu_forward(x.reshape(-1), self._y.reshape(-1))
        else:
            add_relu_forward(x.reshape(-1), residual.reshape(-1), self._y.reshape(-1))
        return self._y

    def backward(self, dy):
        dy = self._check_grad(dy, None if self._y is None else self._y.shape)
        if self.reference:
            return relu_backward_reference(dy, self._y)
        dx = np.empty_like(dy)
        relu_backward(dy.reshape(-1), self._y.reshape(-1), dx.reshape(-1))
        return dx
