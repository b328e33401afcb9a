"""Max, average and global-average pooling over NCHW.

Output size of a pooling window: H_out = floor((H + 2p - k) / s) + 1, as the
convolution (torch's ceil_mode=False). Max pooling pads with -inf, average
pooling with zeros counted in the divisor (torch's count_include_pad=True), so
every window divides by kh*kw.
"""

import numpy as np
from numba import njit, prange, uint64

from .base import NUMBA_OPTIONS, Layer, output_size, pair
from .conv import _scatter_windows, _windows

# ---------------------------------------------------------------------------
# plain-numpy references
# ---------------------------------------------------------------------------


def maxpool2d_forward_reference(x, kernel_size, stride, padding):
    """Max over each window.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    kernel_size, stride, padding : (int, int)

    Returns
    -------
    y : ndarray of shape (N, C, H_out, W_out)
        H_out = floor((H + 2*ph - kh) / sh) + 1, likewise W_out.
    argmax : ndarray of shape (N, C, H_out, W_out), int
        Position i*kw + j of the (first) maximum inside each window.
    """
    windows = _windows(x, kernel_size, stride, padding, pad_value=-np.inf)
    flat = windows.reshape(windows.shape[:4] + (-1,))
    argmax = flat.argmax(axis=-1)
    y = np.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0]
    return np.ascontiguousarray(y), argmax


def maxpool2d_backward_reference(dy, argmax, x_shape, kernel_size, stride, padding):
    """Route each output gradient to the input that was the window maximum.

    Parameters
    ----------
    dy, argmax : ndarray of shape (N, C, H_out, W_out)
    x_shape : (N, C, H, W)

    Returns
    -------
    dx : ndarray of shape (N, C, H, W)
    """
    kh, kw = kernel_size
    taps = np.arange(kh * kw).reshape(kh, kw)
    dwin = np.where(argmax[..., None, None] == taps, dy[..., None, None], 0.0).astype(dy.dtype)
    return np.ascontiguousarray(_scatter_windows(dwin, x_shape, kernel_size, stride, padding))


def avgpool2d_forward_reference(x, kernel_size, stride, padding):
    """Mean over each zero-padded window, divisor kh*kw (count_include_pad).

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)

    Returns
    -------
    y : ndarray of shape (N, C, H_out, W_out)
    """
    windows = _windows(x, kernel_size, stride, padding)
    return np.ascontiguousarray(windows.mean(axis=(4, 5), dtype=x.dtype))


def avgpool2d_backward_reference(dy, x_shape, kernel_size, stride, padding):
    """Spread each output gradient evenly over its window.

    Returns
    -------
    dx : ndarray of shape (N, C, H, W)
    """
    kh, kw = kernel_size
    dwin = np.broadcast_to((dy / (kh * kw))[..., None, None], dy.shape + (kh, kw))
    return np.ascontiguousarray(_scatter_windows(dwin, x_shape, kernel_size, stride, padding))


# ---------------------------------------------------------------------------
# numba kernels: parallel over (n, c) planes
# ---------------------------------------------------------------------------


@njit(**NUMBA_OPTIONS)
def maxpool2d_forward(x, kh, kw, sh, sw, ph, pw, y, argmax):
    """y = window maxima; argmax = flat index h*W + w of each maximum in x[n, c]."""
    n_batch, channels, height, width = x.shape
    h_out, w_out = y.shape[2], y.shape[3]
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        for oh in range(h_out):
            h_lo = max(oh * sh - ph, 0)
            h_hi = min(oh * sh - ph + kh, height)
            for ow in range(w_out):
                w_lo = max(ow * sw - pw, 0)
                w_hi = min(ow * sw - pw + kw, width)
                best = -np.inf
                where = h_lo * width + w_lo
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        v = x[n, c, h, w]
                        if v > best:
                            best = v
                            where = h * width + w
                y[n, c, oh, ow] = best
                argmax[n, c, oh, ow] = where


@njit(**NUMBA_OPTIONS)
def maxpool2x2_forward(x, y, argmax):
    """`maxpool2d_forward` for the common 2x2 window, stride 2, no padding.

    The four candidates of a window are compared with selects in a fixed
    order (first maximum wins, as the general kernel), so the loop over a row
    of outputs has no branches and no window loops and LLVM vectorises it.
    """
    n_batch, channels, height, width = x.shape
    h_out, w_out = y.shape[2], y.shape[3]
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        for oh in range(h_out):
            top = x[n, c, 2 * oh]
            bottom = x[n, c, 2 * oh + 1]
            dst = y[n, c, oh]
            where = argmax[n, c, oh]
            first = 2 * oh * width
            for ow in range(uint64(w_out)):
                left = uint64(2) * ow
                right = left + uint64(1)
                best = top[left]
                at = 0
                if top[right] > best:
                    best = top[right]
                    at = 1
                if bottom[left] > best:
                    best = bottom[left]
                    at = width
                if bottom[right] > best:
                    best = bottom[right]
                    at = width + 1
                dst[ow] = best
                where[ow] = first + 2 * ow + at


@njit(**NUMBA_OPTIONS)
def maxpool2d_backward(dy, argmax, dx):
    """dx[n, c].flat[argmax] += dy."""
    n_batch, channels, _, width = dx.shape
    h_out, w_out = dy.shape[2], dy.shape[3]
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        dx[n, c] = 0.0
        for oh in range(h_out):
            for ow in range(w_out):
                where = argmax[n, c, oh, ow]
                dx[n, c, where // width, where % width] += dy[n, c, oh, ow]


@njit(**NUMBA_OPTIONS)
def avgpool2d_forward(x, kh, kw, sh, sw, ph, pw, y):
    """y = window sums / (kh*kw); padding counts as zeros."""
    n_batch, channels, height, width = x.shape
    h_out, w_out = y.shape[2], y.shape[3]
    scale = np.float32(1.0 / (kh * kw))
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        for oh in range(h_out):
            h_lo = max(oh * sh - ph, 0)
            h_hi = min(oh * sh - ph + kh, height)
            for ow in range(w_out):
                w_lo = max(ow * sw - pw, 0)
                w_hi = min(ow * sw - pw + kw, width)
                total = np.float32(0.0)
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        total += x[n, c, h, w]
                y[n, c, oh, ow] = total * scale


@njit(**NUMBA_OPTIONS)
def avgpool2d_backward(dy, kh, kw, sh, sw, ph, pw, dx):
    """dx = each window's dy / (kh*kw), summed over overlapping windows."""
    n_batch, channels, height, width = dx.shape
    h_out, w_out = dy.shape[2], dy.shape[3]
    scale = np.float32(1.0 / (kh * kw))
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        dx[n, c] = 0.0
        for oh in range(h_out):
            h_lo = max(oh * sh - ph, 0)
            h_hi = min(oh * sh - ph + kh, height)
            for ow in range(w_out):
                w_lo = max(ow * sw - pw, 0)
                w_hi = min(ow * sw - pw + kw, width)
                g = dy[n, c, oh, ow] * scale
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        dx[n, c, h, w] += g


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------


class _Pool2D(Layer):
    name = "Pool2D"

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{self}: need kernel_size >= 1, stride >= 1, padding >= 0")
        if ph > kh // 2 or pw > kw // 2:
            raise ValueError(f"{self}: padding must be at most half the kernel size")
        self._x_shape = None
        self._y_shape = None

    def __repr__(self):
        return (f"{self.name}(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")

    def _output_shape(self, x):
        n, c, height, width = x.shape
        h_out = output_size(height, self.kernel_size[0], self.stride[0], self.padding[0])
        w_out = output_size(width, self.kernel_size[1], self.stride[1], self.padding[1])
        if h_out < 1 or w_out < 1:
            raise ValueError(f"{self}: input {x.shape} is smaller than the window after padding")
        self._x_shape = x.shape
        self._y_shape = (n, c, h_out, w_out)
        return self._y_shape


class MaxPool2D(_Pool2D):
    """Max pooling (torch MaxPool2d, ceil_mode=False).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to kernel_size.
    padding : int or (int, int)
        Implicit -inf padding, at most half the kernel.
    """

    name = "MaxPool2D"

    def forward(self, x, train=True):
        x = self._check_input(x, 4)
        y_shape = self._output_shape(x)
        if self.reference:
            y, self._argmax = maxpool2d_forward_reference(
                x, self.kernel_size, self.stride, self.padding)
            return y
        y = np.empty(y_shape, dtype=np.float32)
        self._argmax = np.empty(y_shape, dtype=np.int32)
        if self._fast_path():
            maxpool2x2_forward(x, y, self._argmax)
        else:
            maxpool2d_forward(x, *self.kernel_size, *self.stride, *self.padding, y, self._argmax)
        return y

    def backward(self, dy):
        dy = self._check_grad(dy, self._y_shape)
        if self.reference:
            return maxpool2d_backward_reference(
                dy, self._argmax, self._x_shape, self.kernel_size, self.stride, self.padding)
        dx = np.empty(self._x_shape, dtype=np.float32)
        maxpool2d_backward(dy, self._argmax, dx)
        return dx

    def _fast_path(self):
        """2x2 windows, stride 2, no padding: `maxpool2x2_forward`."""
        return self.kernel_size == (2, 2) and self.stride == (2, 2) and self.padding == (0, 0)


class AvgPool2D(_Pool2D):
    """Average pooling (torch AvgPool2d, count_include_pad=True, ceil_mode=False).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to kernel_size.
    padding : int or (int, int)
        Implicit zero padding, at most half the kernel; counted in the divisor.
    """

    name = "AvgPool2D"

    def forward(self, x, train=True):
        x = self._check_input(x, 4)
        y_shape = self._output_shape(x)
        if self.reference:
            return avgpool2d_forward_reference(x, self.kernel_size, self.stride, self.padding)
        y = np.empty(y_shape, dtype=np.float32)
        avgpool2d_forward(x, *self.kernel_size, *self.stride, *self.padding, y)
        return y

    def backward(self, dy):
        dy = self._check_grad(dy, self._y_shape)
        if self.reference:
            return avgpool2d_backward_reference(
                dy, self._x_shape, self.kernel_size, self.stride, self.padding)
        dx = np.empty(self._x_shape, dtype=np.float32)
        avgpool2d_backward(dy, *self.kernel_size, *self.stride, *self.padding, dx)
        return dx


class GlobalAvgPool2D(Layer):
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1), as AdaptiveAvgPool2d(1).

    Small and memory-bound, so plain numpy serves as both implementation and
    reference. Follow it with Flatten before a Linear layer.
    """

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def __repr__(self):
        return "GlobalAvgPool2D()"

    def forward(self, x, train=True):
        x = self._check_input(x, 4)
        self._x_shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)

    def backward(self, dy):
        n, c, height, width = self._x_shape or (None,) * 4
        dy = self._check_grad(dy, None if self._x_shape is None else (n, c, 1, 1))
        dx = np.empty(self._x_shape, dtype=np.float32)
        dx[...] = dy / np.float32(height * width)
        return dx
