"""2-D convolution as im2col + one SGEMM, col2im for the input gradient.

Layout of the im2col matrix ("cols"): one row per (c, i, j) filter tap, one
column per output pixel of the whole batch, (C*kh*kw, N*H_out*W_out). Then

    forward         Y  = W (O, C*kh*kw) @ cols            -> (O, N*H_out*W_out)
    weight grad     dW = dY (O, N*P) @ cols.T             -> (O, C*kh*kw)
    input grad      dcols = W.T @ dY, dx = col2im(dcols)

are each a single large SGEMM over the batch (no per-sample loop), and the
channel-major Y is transposed to NCHW with the bias added on the way.
"""

import numpy as np
from numba import njit, prange, uint64
from numpy.lib.stride_tricks import sliding_window_view

from .base import NUMBA_OPTIONS, Layer, Parameter, output_size, pair, scratch

# ---------------------------------------------------------------------------
# plain-numpy references (dtype-generic: float64 serves gradient checks)
# ---------------------------------------------------------------------------


def _windows(x, kernel_size, stride, padding, pad_value=0.0):
    """Strided view of all windows: (N, C, H_out, W_out, kh, kw)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _scatter_windows(dwin, x_shape, kernel_size, stride, padding):
    """Adjoint of `_windows`: add window gradients (N, C, H_out, W_out, kh, kw)
    back onto the input positions they were read from."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, c, h, w = x_shape
    h_out, w_out = dwin.shape[2:4]
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dwin.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + sh * h_out : sh, j : j + sw * w_out : sw] += dwin[..., i, j]
    return dxp[:, :, ph : ph + h, pw : pw + w]


def conv2d_forward_reference(x, weight, bias, stride, padding):
    """Cross-correlation, as torch.nn.functional.conv2d.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    weight : ndarray of shape (O, C, kh, kw)
    bias : ndarray of shape (O,) or None
    stride, padding : (int, int)
        (vertical, horizontal); padding is zeros on both sides.

    Returns
    -------
    y : ndarray of shape (N, O, H_out, W_out)
        H_out = floor((H + 2*ph - kh) / sh) + 1, likewise W_out.
    """
    windows = _windows(x, weight.shape[2:], stride, padding)
    y = np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True)
    if bias is not None:
        y += bias[None, :, None, None]
    return np.ascontiguousarray(y, dtype=x.dtype)


def conv2d_backward_reference(dy, x, weight, stride, padding):
    """Gradients of `conv2d_forward_reference`.

    Parameters
    ----------
    dy : ndarray of shape (N, O, H_out, W_out)
    x : ndarray of shape (N, C, H, W)
    weight : ndarray of shape (O, C, kh, kw)

    Returns
    -------
    dx : ndarray of shape (N, C, H, W)
    dweight : ndarray of shape (O, C, kh, kw)
    dbias : ndarray of shape (O,)
    """
    kernel_size = weight.shape[2:]
    windows = _windows(x, kernel_size, stride, padding)
    dweight = np.einsum("nohw,nchwij->ocij", dy, windows, optimize=True)
    dbias = dy.sum(axis=(0, 2, 3))
    dwin = np.einsum("nohw,ocij->nchwij", dy, weight, optimize=True)
    dx = _scatter_windows(dwin, x.shape, kernel_size, stride, padding)
    return np.ascontiguousarray(dx), dweight, dbias


# ---------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------


# Inner loops index with uint64 offsets: numba checks signed indices for
# negative (wrap-around) values on every access, which stops LLVM from
# vectorising the copies (3-4x slower).


@njit(**NUMBA_OPTIONS)
def im2col(x, kh, kw, sh, sw, ph, pw, h_out, w_out, cols):
    """cols[(c*kh + i)*kw + j, (n*h_out + oh)*w_out + ow] = xpad[n, c, oh*sh + i, ow*sw + j].

    x : (N, C, H, W) float32; cols : (C*kh*kw, N*h_out*w_out) float32, written.
    Parallel over the rows (filter taps): each thread writes whole rows.
    """
    n_batch, channels, height, width = x.shape
    plane = h_out * w_out
    step = uint64(sw)
    flat_x = x.reshape(-1)
    for row in prange(channels * kh * kw):
        c = row // (kh * kw)
        i = (row // kw) % kh
        j = row % kw
        # output columns [ow_lo, ow_hi) read inside the image: 0 <= ow*sw - pw + j < W
        ow_lo = min(w_out, max(0, (pw - j + sw - 1) // sw))
        ow_hi = max(ow_lo, min(w_out, (width - 1 + pw - j) // sw + 1))
        inside = uint64(ow_hi - ow_lo)
        w0 = uint64(max(0, ow_lo * sw - pw + j))  # input column of output column ow_lo
        dst = cols[row]
        for n in range(n_batch):
            for oh in range(h_out):
                start = uint64(n * plane + oh * w_out)
                h = oh * sh - ph + i
                if h < 0 or h >= height:
                    for k in range(uint64(w_out)):
                        dst[start + k] = 0.0
                    continue
                for k in range(uint64(ow_lo)):
                    dst[start + k] = 0.0
                at = start + uint64(ow_lo)
                read = uint64(((n * channels + c) * height + h) * width) + w0
                if sw == 1:
                    for k in range(inside):
                        dst[at + k] = flat_x[read + k]
                else:
                    for k in range(inside):
                        dst[at + k] = flat_x[read + k * step]
                for k in range(uint64(ow_hi), uint64(w_out)):
                    dst[start + k] = 0.0


@njit(**NUMBA_OPTIONS)
def col2im(cols, kh, kw, sh, sw, ph, pw, h_out, w_out, dx):
    """Adjoint of `im2col`: dx[n, c] = sum of the cols entries read from it.

    cols : (C*kh*kw, N*h_out*w_out) float32; dx : (N, C, H, W) float32, written.
    Parallel over (n, c) planes, so no two threads add into the same element.
    """
    n_batch, channels, height, width = dx.shape
    plane = h_out * w_out
    step = uint64(sw)
    flat_dx = dx.reshape(-1)
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc % channels
        base = uint64(nc * height * width)
        for k in range(uint64(height * width)):
            flat_dx[base + k] = 0.0
        for i in range(kh):
            for j in range(kw):
                src = cols[(c * kh + i) * kw + j]
                ow_lo = min(w_out, max(0, (pw - j + sw - 1) // sw))
                ow_hi = max(ow_lo, min(w_out, (width - 1 + pw - j) // sw + 1))
                inside = uint64(ow_hi - ow_lo)
                w0 = uint64(max(0, ow_lo * sw - pw + j))
                for oh in range(h_out):
                    h = oh * sh - ph + i
                    if h < 0 or h >= height:
                        continue
                    at = uint64(n * plane + oh * w_out + ow_lo)
                    write = base + uint64(h * width) + w0
                    if sw == 1:
                        for k in range(inside):
                            flat_dx[write + k] += src[at + k]
                    else:
                        for k in range(inside):
                            flat_dx[write + k * step] += src[at + k]


@njit(**NUMBA_OPTIONS)
def channel_major_to_nchw(y2, bias, y):
    """y[n, o, p] = y2[o, n*P + p] + bias[o]; y2 (O, N*P), y (N, O, P)."""
    n_batch, channels, plane = y.shape
    for no in prange(n_batch * channels):
        n = no // channels
        o = no % channels
        b = bias[o]
        src = y2[o]
        dst = y[n, o]
        at = uint64(n * plane)
        for p in range(uint64(plane)):
            dst[p] = src[at + p] + b


@njit(**NUMBA_OPTIONS)
def nchw_to_channel_major(dy, dy2, dbias):
    """dy2[o, n*P + p] = dy[n, o, p] and dbias[o] = sum over n, p of dy."""
    n_batch, channels, plane = dy.shape
    for o in prange(channels):
        total = 0.0
        dst = dy2[o]
        for n in range(n_batch):
            src = dy[n, o]
            at = uint64(n * plane)
            partial = np.float32(0.0)
            for p in range(uint64(plane)):
                v = src[p]
                dst[at + p] = v
                partial += v
            total += partial
        dbias[o] = total


# ---------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------

#: Elements of the im2col matrix per batch chunk: small enough to stay in
#: cache between im2col, the SGEMMs and col2im, large enough for SGEMM speed.
CHUNK_ELEMENTS = 1 << 21


def _batch_chunks(n, elements_per_sample):
    """(lo, hi) sample ranges whose im2col holds about CHUNK_ELEMENTS values."""
    step = max(1, min(n, CHUNK_ELEMENTS // max(1, elements_per_sample)))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


class Conv2D(Layer):
    """2-D convolution (cross-correlation), torch semantics and layouts.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or (int, int)
        H_out = floor((H + 2*padding - kernel_size) / stride) + 1.
    bias : bool
    rng : numpy.random.Generator, optional
        For the He (kaiming-normal, fan_out, ReLU gain) initial weights, as
        torchvision's ResNet and VGG; the bias starts at zero. Default:
        ``np.random.default_rng(0)``.

    Attributes
    ----------
    weight : Parameter of shape (out_channels, in_channels, kh, kw)
    bias : Parameter of shape (out_channels,) or None
    skip_input_grad : bool
        When True, backward computes no dx and returns None (first layer).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, rng=None):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{self}: need kernel_size >= 1, stride >= 1, padding >= 0")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"{self}: need in_channels >= 1 and out_channels >= 1")
        rng = np.random.default_rng(0) if rng is None else rng
        kh, kw = self.kernel_size
        std = np.sqrt(2.0 / (self.out_channels * kh * kw))
        shape = (self.out_channels, self.in_channels, kh, kw)
        self.weight = Parameter("weight", rng.standard_normal(shape) * std)
        self.params = [self.weight]
        self.bias = None
        if bias:
            self.bias = Parameter("bias", np.zeros(self.out_channels))
            self.params.append(self.bias)
        self._zero_bias = np.zeros(self.out_channels, dtype=np.float32)
        self.skip_input_grad = False
        self._x = None
        self._y_shape = None

    def __repr__(self):
        return (f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None})")

    def forward(self, x, train=True):
        x = self._check_input(x, 4, self.in_channels)
        n, _, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h_out = output_size(height, kh, sh, ph)
        w_out = output_size(width, kw, sw, pw)
        if h_out < 1 or w_out < 1:
            raise ValueError(f"{self}: input {x.shape} is smaller than the kernel after padding")
        self._x = x
        self._y_shape = (n, self.out_channels, h_out, w_out)
        bias = None if self.bias is None else self.bias.data
        if self.reference:
            return conv2d_forward_reference(x, self.weight.data, bias, self.stride, self.padding)

        o, plane = self.out_channels, h_out * w_out
        taps = self.in_channels * kh * kw
        weight = self.weight.data.reshape(o, taps)
        bias = self._zero_bias if bias is None else bias
        y = np.empty(self._y_shape, dtype=np.float32)
        y3 = y.reshape(n, o, plane)
        for lo, hi in _batch_chunks(n, taps * plane):
            cols = scratch("conv.cols", (taps, (hi - lo) * plane))
            im2col(x[lo:hi], kh, kw, sh, sw, ph, pw, h_out, w_out, cols)
            y2 = scratch("conv.channel_major", (o, (hi - lo) * plane))
            np.matmul(weight, cols, out=y2)
            channel_major_to_nchw(y2, bias, y3[lo:hi])
        return y

    def backward(self, dy):
        dy = self._check_grad(dy, self._y_shape)
        if self.reference:
            dx, dweight, dbias = conv2d_backward_reference(
                dy, self._x, self.weight.data, self.stride, self.padding)
            self.weight.grad += dweight
            if self.bias is not None:
                self.bias.grad += dbias
            return None if self.skip_input_grad else dx

        x = self._x
        n, o, h_out, w_out = dy.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        plane = h_out * w_out
        taps = self.in_channels * kh * kw
        weight = self.weight.data.reshape(o, taps)
        weight_grad = self.weight.grad.reshape(o, taps)
        dy3 = dy.reshape(n, o, plane)
        dx = None if self.skip_input_grad else np.empty(x.shape, dtype=np.float32)
        dbias = np.empty(o, dtype=np.float32)
        for lo, hi in _batch_chunks(n, taps * plane):
            columns = (hi - lo) * plane
            dy2 = scratch("conv.channel_major", (o, columns))
            nchw_to_channel_major(dy3[lo:hi], dy2, dbias)
            if self.bias is not None:
                self.bias.grad += dbias
            # im2col again instead of keeping it from forward: the chunk is
            # cache-sized, rebuilding it is cheaper than a trip through memory
            cols = scratch("conv.cols", (taps, columns))
            im2col(x[lo:hi], kh, kw, sh, sw, ph, pw, h_out, w_out, cols)
            weight_grad += np.matmul(dy2, cols.T, out=scratch("conv.dweight", (o, taps)))
            if dx is not None:
                np.matmul(weight.T, dy2, out=cols)  # cols now holds dcols
                col2im(cols, kh, kw, sh, sw, ph, pw, h_out, w_out, dx[lo:hi])
        return dx
