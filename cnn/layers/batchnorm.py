"""Batch normalisation over (N, H, W) per channel, torch BatchNorm2d semantics.

Train: normalise with the batch mean and the biased batch variance, and move
the running statistics towards the batch ones with the *unbiased* variance:

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)

where M = N*H*W. Eval: normalise with the running statistics.

With xhat = (x - mean) / sqrt(var + eps) and y = gamma * xhat + beta, the train
input gradient is

    dx = gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat))

Each direction is two passes over the data: one reduction per channel, then
one elementwise pass (y = x*scale + shift; dx = dy*a + x*b + c).
"""

import numpy as np
from numba import njit, prange

from .base import NUMBA_OPTIONS, Layer, Parameter

# ---------------------------------------------------------------------------
# plain-numpy references
# ---------------------------------------------------------------------------


def batchnorm2d_forward_reference(x, gamma, beta, mean, var, eps):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    gamma, beta, mean, var : ndarray of shape (C,)
        Batch statistics (train) or running statistics (eval).

    Returns
    -------
    y : ndarray of shape (N, C, H, W)
    """
    shape = (1, -1, 1, 1)
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return (gamma.reshape(shape) * xhat + beta.reshape(shape)).astype(x.dtype)


def batch_statistics_reference(x):
    """Per-channel mean and biased variance of x (N, C, H, W): two arrays (C,)."""
    return x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))


def batchnorm2d_backward_reference(dy, x, gamma, mean, var, eps, train):
    """Gradients of `batchnorm2d_forward_reference`.

    Parameters
    ----------
    dy, x : ndarray of shape (N, C, H, W)
    gamma, mean, var : ndarray of shape (C,)
    train : bool
        True: mean and var are the batch statistics of x and depend on it.
        False: they are constants (running statistics).

    Returns
    -------
    dx : ndarray of shape (N, C, H, W)
    dgamma, dbeta : ndarray of shape (C,)
    """
    shape = (1, -1, 1, 1)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    dbeta = dy.sum(axis=(0, 2, 3))
    dgamma = (dy * xhat).sum(axis=(0, 2, 3))
    scale = (gamma * invstd).reshape(shape)
    if train:
        m = x.size // x.shape[1]
        dx = scale * (dy - dbeta.reshape(shape) / m - xhat * dgamma.reshape(shape) / m)
    else:
        dx = scale * dy
    return dx.astype(dy.dtype), dgamma, dbeta


# ---------------------------------------------------------------------------
# numba kernels: x viewed as (N, C, P), parallel over channels
# ---------------------------------------------------------------------------


@njit(**NUMBA_OPTIONS)
def batch_statistics(x, mean, var):
    """mean[c], var[c] (biased) over (N, P), float64 sums shifted by x[0, c, 0]."""
    n_batch, channels, plane = x.shape
    count = n_batch * plane
    for c in prange(channels):
        shift = x[0, c, 0]
        total = 0.0
        total_sq = 0.0
        for n in range(n_batch):
            # float32 partial sums per row keep the inner loop vectorisable
            s = np.float32(0.0)
            sq = np.float32(0.0)
            for p in range(plane):
                d = x[n, c, p] - shift
                s += d
                sq += d * d
            total += s
            total_sq += sq
        m = total / count
        mean[c] = shift + m
        var[c] = max(total_sq / count - m * m, 0.0)


@njit(**NUMBA_OPTIONS)
def scale_shift(x, scale, shift, y):
    """y[n, c, p] = x[n, c, p] * scale[c] + shift[c]."""
    n_batch, channels, plane = x.shape
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        a = scale[c]
        b = shift[c]
        for p in range(plane):
            y[n, c, p] = x[n, c, p] * a + b


@njit(**NUMBA_OPTIONS)
def batchnorm2d_backward_sums(dy, x, mean, invstd, dbeta, dgamma):
    """dbeta[c] = sum dy, dgamma[c] = sum dy * xhat over (N, P)."""
    n_batch, channels, plane = x.shape
    for c in prange(channels):
        mu = np.float32(mean[c])
        total = 0.0
        total_x = 0.0
        for n in range(n_batch):
            s = np.float32(0.0)
            sx = np.float32(0.0)
            for p in range(plane):
                g = dy[n, c, p]
                s += g
                sx += g * (x[n, c, p] - mu)
            total += s
            total_x += sx
        dbeta[c] = total
        dgamma[c] = total_x * invstd[c]


@njit(**NUMBA_OPTIONS)
def affine_backward(dy, x, a, b, c0, dx):
    """dx[n, c, p] = dy * a[c] + x * b[c] + c0[c]."""
    n_batch, channels, plane = x.shape
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        ac = a[c]
        bc = b[c]
        cc = c0[c]
        for p in range(plane):
            dx[n, c, p] = dy[n, c, p] * ac + x[n, c, p] * bc + cc


# ---------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------


class BatchNorm2d(Layer):
    """Batch normalisation for NCHW, torch BatchNorm2d (affine, tracked stats).

    Parameters
    ----------
    num_features : int
        Channels C.
    eps : float
    momentum : float

    Attributes
    ----------
    weight, bias : Parameter of shape (C,)
        gamma (ones) and beta (zeros).
    running_mean, running_var : ndarray of shape (C,), float32
        Buffers, updated in place in train mode.
    num_batches_tracked : ndarray of shape (), int64
        Buffer, incremented in place in train mode.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.weight = Parameter("weight", np.ones(self.num_features))
        self.bias = Parameter("bias", np.zeros(self.num_features))
        self.params = [self.weight, self.bias]
        self.running_mean = np.zeros(self.num_features, dtype=np.float32)
        self.running_var = np.ones(self.num_features, dtype=np.float32)
        self.num_batches_tracked = np.zeros((), dtype=np.int64)
        self._x = None
        self._train = True

    def __repr__(self):
        return f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum})"

    def forward(self, x, train=True):
        x = self._check_input(x, 4, self.num_features)
        n, c, height, width = x.shape
        count = n * height * width
        if train and count < 2:
            raise ValueError(f"{self}: train mode needs more than one value per channel, "
                             f"got input shape {x.shape}")
        self._x = x
        self._train = train
        if train:
            if self.reference:
                mean, var = batch_statistics_reference(x.astype(np.float64))
            else:
                mean = np.empty(c, dtype=np.float64)
                var = np.empty(c, dtype=np.float64)
                batch_statistics(x.reshape(n, c, -1), mean, var)
            m = self.momentum
            self.running_mean *= 1.0 - m
            self.running_mean += (m * mean).astype(np.float32)
            self.running_var *= 1.0 - m
            self.running_var += (m * var * count / (count - 1)).astype(np.float32)
            self.num_batches_tracked += 1
        else:
            mean = self.running_mean.astype(np.float64)
            var = self.running_var.astype(np.float64)
        self._mean = mean
        self._var = var
        if self.reference:
            return batchnorm2d_forward_reference(
                x, self.weight.data, self.bias.data, mean.astype(np.float32),
                var.astype(np.float32), np.float32(self.eps))
        invstd = 1.0 / np.sqrt(var + self.eps)
        scale = (self.weight.data * invstd).astype(np.float32)
        shift = (self.bias.data - mean * scale).astype(np.float32)
        y = np.empty_like(x)
        scale_shift(x.reshape(n, c, -1), scale, shift, y.reshape(n, c, -1))
        return y

    def backward(self, dy):
        dy = self._check_grad(dy, None if self._x is None else self._x.shape)
        x = self._x
        if self.reference:
            dx, dgamma, dbeta = batchnorm2d_backward_reference(
                dy, x, self.weight.data, self._mean.astype(np.float32),
                self._var.astype(np.float32), np.float32(self.eps), self._train)
            self.weight.grad += dgamma
            self.bias.grad += dbeta
            return dx
        n, c = x.shape[:2]
        count = x.size // c
        invstd = 1.0 / np.sqrt(self._var + self.eps)
        dbeta = np.empty(c, dtype=np.float64)
        dgamma = np.empty(c, dtype=np.float64)
        batchnorm2d_backward_sums(dy.reshape(n, c, -1), x.reshape(n, c, -1),
                                  self._mean, invstd, dbeta, dgamma)
        self.weight.grad += dgamma.astype(np.float32)
        self.bias.grad += dbeta.astype(np.float32)
        scale = self.weight.data * invstd
        if self._train:
            # dx = scale*dy - scale*invstd*dgamma/M * (x - mean) - scale*dbeta/M
            b = -scale * invstd * dgamma / count
            c0 = -scale * dbeta / count - b * self._mean
        else:
            b = np.zeros(c)
            c0 = np.zeros(c)
        dx = np.empty_like(dy)
        affine_backward(dy.reshape(n, c, -1), x.reshape(n, c, -1), scale.astype(np.float32),
                        b.astype(np.float32), c0.astype(np.float32), dx.reshape(n, c, -1))
        return dx
