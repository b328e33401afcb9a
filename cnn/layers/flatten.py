"""Flatten: (N, d1, d2, ...) -> (N, d1*d2*...), a view in both directions."""

import math

from .base import Layer


class Flatten(Layer):
    """Keep axis 0, merge the others (torch Flatten(start_dim=1))."""

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def __repr__(self):
        return "Flatten()"

    def forward(self, x, train=True):
        x = self._check_input(x, layout="(N, ...)", min_ndim=2)
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape = None
        if self._x_shape is not None:
            shape = (self._x_shape[0], math.prod(self._x_shape[1:]))
        dy = self._check_grad(dy, shape)
        return dy.reshape(self._x_shape)
