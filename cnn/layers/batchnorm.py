"""Batch normalisation over (N, H, W) per channel, torch BatchNorm2d semantics.

Train: normalise with the batch mean and the biased batch variance, and move
the running statistics towards the batch ones with the *unbiased* variance:

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)

where M = N*H*W. Eval: normalise with the running statistics.

With xhat = (x - mean) / sqrt(var + eps) and y = gamma * xhat + beta, the train
input gradient is

    dx = gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat))

Each direction is one parallel region over channels, and per channel two
passes: a reduction, then an elementwise pass (y = x*scale + shift;
dx = dy*a + x*b + c) over the same values while they are still in cache.

``BatchNorm2d(C, relu=True)`` is batch norm followed by a ReLU, fused: the
elementwise pass writes max(y, 0), and backward masks dy with the kept output
(dy where y > 0, else 0, as `ReLU`) inside its own two passes. The separate
ReLU's extra read and write of the whole activation, and its two parallel
regions, are gone (resnet20 has ten such pairs: bn1 -> relu in every block and
the stem).
"""

import numpy as np
from numba import njit, prange, uint64

from .activation import relu_backward_reference, relu_forward_reference
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

# The per-row sums may be reassociated ("reassoc", the only fast-math flag
# used): in program order a float32 sum is one chain of dependent additions,
# one element per add latency; reassociated, LLVM keeps a vector of partial
# sums, about 8x faster measured. The order is fixed at compile time, so the
# bits are still the same run to run. Rows are summed in float64. Elementwise
# loops index with uint64 offsets (see cnn/layers/conv.py).

SERIAL_OPTIONS = {**NUMBA_OPTIONS, "parallel": False}
REDUCTION_OPTIONS = {**SERIAL_OPTIONS, "fastmath": {"reassoc"}}


@njit(**REDUCTION_OPTIONS)
def shifted_sums(row, shift):
    """(sum, sum of squares) of row - shift, 1-D float32 row, as float64."""
    s = np.float32(0.0)
    sq = np.float32(0.0)
    for p in range(uint64(row.size)):
        d = row[p] - shift
        s += d
        sq += d * d
    return np.float64(s), np.float64(sq)


@njit(**REDUCTION_OPTIONS)
def centred_dot_sums(dy_row, x_row, mu):
    """(sum dy, sum dy * (x - mu)) of two 1-D float32 rows, as float64."""
    s = np.float32(0.0)
    t = np.float32(0.0)
    for p in range(uint64(dy_row.size)):
        g = dy_row[p]
        s += g
        t += g * (x_row[p] - mu)
    return np.float64(s), np.float64(t)


@njit(**SERIAL_OPTIONS)
def affine_row(src, scale, offset, relu, dst):
    """dst = src * scale + offset, then max(., 0) when relu (1-D float32 rows)."""
    if relu:
        for p in range(uint64(src.size)):
            v = src[p] * scale + offset
            dst[p] = v if v > 0 else np.float32(0.0)
    else:
        for p in range(uint64(src.size)):
            dst[p] = src[p] * scale + offset


@njit(**NUMBA_OPTIONS)
def batchnorm2d_forward_train(x, gamma, beta, eps, relu, y, mean, var):
    """Batch statistics and y = gamma * xhat + beta (max(., 0) when relu) in
    one parallel region.

    x, y : (N, C, P) float32, y written; gamma, beta : (C,) float32;
    mean, var : (C,) float64, written (var biased). Each thread takes whole
    channels: a channel's N*P values come from memory once, for the (shifted,
    for accuracy) sums, and are still in cache when y is written from them.
    """
    n_batch, channels, plane = x.shape
    count = n_batch * plane
    for c in prange(channels):
        shift = x[0, c, 0]
        total = 0.0
        total_sq = 0.0
        for n in range(n_batch):
            s, sq = shifted_sums(x[n, c], shift)
            total += s
            total_sq += sq
        m = total / count
        mean[c] = shift + m
        var[c] = max(total_sq / count - m * m, 0.0)
        scale64 = gamma[c] / np.sqrt(var[c] + eps)
        scale = np.float32(scale64)
        offset = np.float32(beta[c] - mean[c] * scale64)
        for n in range(n_batch):
            affine_row(x[n, c], scale, offset, relu, y[n, c])


@njit(**NUMBA_OPTIONS)
def scale_shift(x, scale, shift, relu, y):
    """y[n, c, p] = x[n, c, p] * scale[c] + shift[c], max(., 0) when relu (eval mode)."""
    n_batch, channels, _ = x.shape
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        affine_row(x[n, c], scale[c], shift[c], relu, y[n, c])


@njit(**REDUCTION_OPTIONS)
def masked_centred_dot_sums(dy_row, y_row, x_row, mu):
    """`centred_dot_sums` of dy masked by the fused ReLU's output (dy where y > 0)."""
    s = np.float32(0.0)
    t = np.float32(0.0)
    for p in range(uint64(dy_row.size)):
        g = dy_row[p] if y_row[p] > 0 else np.float32(0.0)
        s += g
        t += g * (x_row[p] - mu)
    return np.float64(s), np.float64(t)


@njit(**NUMBA_OPTIONS)
def batchnorm2d_backward_kernel(dy, x, y, gamma, mean, invstd, train, relu, dx, dgamma, dbeta):
    """dgamma, dbeta and dx in one parallel region, whole channels per thread.

    dy, x, dx : (N, C, P) float32, dx written; gamma : (C,) float32;
    mean, invstd : (C,) float64; dgamma, dbeta : (C,) float64, written.
    relu: the layer's output y (N, C, P) went through the fused ReLU, and dy
    is first masked with it (dy where y > 0, else 0); y is not read otherwise.
    The sums dbeta = sum dy and dgamma = sum dy * xhat come first; then, from
    cache, dx = dy * a + x * b + c0 with (train; in eval b = c0 = 0)

        a = gamma * invstd,  b = -a * invstd * dgamma / M,  c0 = -a * dbeta / M - b * mean.
    """
    n_batch, channels, plane = x.shape
    count = n_batch * plane
    for c in prange(channels):
        mu = np.float32(mean[c])
        total = 0.0
        total_x = 0.0
        for n in range(n_batch):
            if relu:
                s, sx = masked_centred_dot_sums(dy[n, c], y[n, c], x[n, c], mu)
            else:
                s, sx = centred_dot_sums(dy[n, c], x[n, c], mu)
            total += s
            total_x += sx
        dbeta[c] = total
        dgamma[c] = total_x * invstd[c]
        a64 = gamma[c] * invstd[c]
        b64 = 0.0
        c64 = 0.0
        if train:
            b64 = -a64 * invstd[c] * dgamma[c] / count
            c64 = -a64 * dbeta[c] / count - b64 * mean[c]
        a = np.float32(a64)
        b = np.float32(b64)
        c0 = np.float32(c64)
        for n in range(n_batch):
            g = dy[n, c]
            src = x[n, c]
            dst = dx[n, c]
            if relu:
                mask = y[n, c]
                for p in range(uint64(plane)):
                    gp = g[p] if mask[p] > 0 else np.float32(0.0)
                    dst[p] = gp * a + src[p] * b + c0
            else:
                for p in range(uint64(plane)):
                    dst[p] = g[p] * a + src[p] * b + c0


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
    relu : bool
        Apply a ReLU to the output, fused into this layer's passes (the
        output is then kept for backward's mask, besides the input).

    Attributes
    ----------
    weight, bias : Parameter of shape (C,)
        gamma (ones) and beta (zeros).
    running_mean, running_var : ndarray of shape (C,), float32
        Buffers, updated in place in train mode.
    num_batches_tracked : ndarray of shape (), int64
        Buffer, incremented in place in train mode.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, relu=False):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.relu = bool(relu)
        self.weight = Parameter("weight", np.ones(self.num_features))
        self.bias = Parameter("bias", np.zeros(self.num_features))
        self.params = [self.weight, self.bias]
        self.running_mean = np.zeros(self.num_features, dtype=np.float32)
        self.running_var = np.ones(self.num_features, dtype=np.float32)
        self.num_batches_tracked = np.zeros((), dtype=np.int64)
        self._x = None
        self._y = None
        self._train = True

    def __repr__(self):
        fused = ", relu=True" if self.relu else ""
        return f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum}{fused})"

    def forward(self, x, train=True):
        x = self._check_input(x, 4, self.num_features)
        n, c, height, width = x.shape
        count = n * height * width
        if train and count < 2:
            raise ValueError(f"{self}: train mode needs more than one value per channel, "
                             f"got input shape {x.shape}")
        self._x = x
        self._train = train
        if self.reference:
            if train:
                mean, var = batch_statistics_reference(x.astype(np.float64))
                self._update_running_statistics(mean, var, count)
            else:
                mean = self.running_mean.astype(np.float64)
                var = self.running_var.astype(np.float64)
            self._mean, self._var = mean, var
            y = batchnorm2d_forward_reference(
                x, self.weight.data, self.bias.data, mean.astype(np.float32),
                var.astype(np.float32), np.float32(self.eps))
            y = relu_forward_reference(y) if self.relu else y
        else:
            y = np.empty_like(x)
            if train:
                mean = np.empty(c, dtype=np.float64)
                var = np.empty(c, dtype=np.float64)
                batchnorm2d_forward_train(x.reshape(n, c, -1), self.weight.data, self.bias.data,
                                          self.eps, self.relu, y.reshape(n, c, -1), mean, var)
                self._update_running_statistics(mean, var, count)
            else:
                mean = self.running_mean.astype(np.float64)
                var = self.running_var.astype(np.float64)
                invstd = 1.0 / np.sqrt(var + self.eps)
                scale = (self.weight.data * invstd).astype(np.float32)
                shift = (self.bias.data - mean * scale).astype(np.float32)
                scale_shift(x.reshape(n, c, -1), scale, shift, self.relu, y.reshape(n, c, -1))
            self._mean, self._var = mean, var
        self._y = y if self.relu else None  # the fused ReLU's mask
        return y

    def _update_running_statistics(self, mean, var, count):
        """Move the running statistics towards the batch ones (var unbiased)."""
        m = self.momentum
        self.running_mean *= 1.0 - m
        self.running_mean += (m * mean).astype(np.float32)
        self.running_var *= 1.0 - m
        self.running_var += (m * var * count / (count - 1)).astype(np.float32)
        self.num_batches_tracked += 1

    def backward(self, dy):
        dy = self._check_grad(dy, None if self._x is None else self._x.shape)
        x = self._x
        if self.reference:
            if self.relu:
                dy = relu_backward_reference(dy, self._y)
            dx, dgamma, dbeta = batchnorm2d_backward_reference(
                dy, x, self.weight.data, self._mean.astype(np.float32),
                self._var.astype(np.float32), np.float32(self.eps), self._train)
            self.weight.grad += dgamma
            self.bias.grad += dbeta
            return dx
        n, c = x.shape[:2]
        invstd = 1.0 / np.sqrt(self._var + self.eps)
        dbeta = np.empty(c, dtype=np.float64)
        dgamma = np.empty(c, dtype=np.float64)
        dx = np.empty_like(dy)
        y = self._y if self.relu else dy  # y is read only for the fused ReLU's mask
        batchnorm2d_backward_kernel(dy.reshape(n, c, -1), x.reshape(n, c, -1), y.reshape(n, c, -1),
                                    self.weight.data, self._mean, invstd, self._train, self.relu,
                                    dx.reshape(n, c, -1), dgamma, dbeta)
        self.weight.grad += dgamma.astype(np.float32)
        self.bias.grad += dbeta.astype(np.float32)
        return dx
