"""Fully connected layer: y = x @ W.T + b, torch layouts (W is out x in)."""

import numpy as np

from .base import Layer, Parameter
from .blas import matmul


def linear_forward_reference(x, weight, bias):
    """y = x @ weight.T + bias.

    Parameters
    ----------
    x : ndarray of shape (N, in_features)
    weight : ndarray of shape (out_features, in_features)
    bias : ndarray of shape (out_features,) or None

    Returns
    -------
    y : ndarray of shape (N, out_features)
    """
    y = x @ weight.T
    return y if bias is None else y + bias


def linear_backward_reference(dy, x, weight):
    """dx = dy @ W, dW = dy.T @ x, db = sum_n dy: three arrays."""
    return dy @ weight, dy.T @ x, dy.sum(axis=0)


class Linear(Layer):
    """Fully connected layer: three SGEMMs (`cnn.layers.blas.matmul`), nothing to fuse.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    rng : numpy.random.Generator, optional
        torch's default init: weight and bias uniform in
        [-1/sqrt(in_features), 1/sqrt(in_features)]. Default:
        ``np.random.default_rng(0)``.

    Attributes
    ----------
    weight : Parameter of shape (out_features, in_features)
    bias : Parameter of shape (out_features,) or None
    input : ndarray of shape (N, in_features)
        The last forward input (the multi-step algorithm reads it).
    skip_weight_grad : bool
        When True, backward accumulates no weight gradient (bias gradient and
        dx are still computed).
    """

    def __init__(self, in_features, out_features, bias=True, rng=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"{self}: need in_features >= 1 and out_features >= 1")
        rng = np.random.default_rng(0) if rng is None else rng
        bound = 1.0 / np.sqrt(self.in_features)
        self.weight = Parameter(
            "weight", rng.uniform(-bound, bound, (self.out_features, self.in_features)))
        self.params = [self.weight]
        self.bias = None
        if bias:
            self.bias = Parameter("bias", rng.uniform(-bound, bound, self.out_features))
            self.params.append(self.bias)
        self.skip_weight_grad = False
        self.input = None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"

    def forward(self, x, train=True):
        x = self._check_input(x, 2, self.in_features, layout="(N, in_features)")
        self.input = x
        y = matmul(x, self.weight.data.T)
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dy):
        shape = None if self.input is None else (self.input.shape[0], self.out_features)
        dy = self._check_grad(dy, shape)
        if self.bias is not None:
            self.bias.grad += dy.sum(axis=0)
        if not self.skip_weight_grad:
            matmul(dy.T, self.input, out=self.weight.grad, accumulate=True)
        return matmul(dy, self.weight.data)
