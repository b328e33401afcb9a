"""2-D convolution as im2col + SGEMM, col2im for the input gradient.

Layout of the im2col matrix ("cols") of a chunk of samples: one row per
(c, i, j) filter tap, one column per output pixel of the chunk,
(C*kh*kw, n_chunk*H_out*W_out). Then

    forward         Y  = W (O, C*kh*kw) @ cols            -> (O, n_chunk*H_out*W_out)
    weight grad     dW = dY (O, n_chunk*P) @ cols.T       -> (O, C*kh*kw)
    input grad      dcols = W.T @ dY, dx = col2im(dcols)

are each one SGEMM per chunk, and the channel-major Y is transposed to NCHW
with the bias added on the way.

Threads: one thread pool only. Inside a single ``prange`` region each numba
thread takes cache-sized chunks of samples from a shared counter and runs
im2col, a single-threaded SGEMM (numpy's own OpenBLAS, called from numba) and
the transposes on its own scratch. Handing each chunk from numba's pool to
OpenBLAS's pool and back made 2 threads several times slower than 1: the two
pools spin and park against each other. The weight and bias gradients are
summed per chunk and the chunks added in chunk order afterwards, so the result
is the same bits run to run for a given thread count (the chunking, hence the
rounding, depends on the thread count).

3x3 layers take one of two faster paths (`Conv2D.forward` picks): at stride 1
with 64 or more channels in and out, Winograd's F(2x2, 3x3), 2.25x fewer
multiplications (cnn/layers/winograd.py, `Conv2D._winograd`); at stride 1 or
2 with fewer channels but large enough output planes, 9 SGEMMs per sample on
shifted views of the zero-padded sample (at stride 2, of its 4 phases), no
im2col (`conv3x3_shifted_kernel`, `conv3x3_shifted_weight_grad_kernel`,
`conv3x3_shifted_input_grad_kernel`, `Conv2D._shifted`).
"""

import numba
import numpy as np
from numba import njit, prange, uint64
from numpy.lib.stride_tricks import sliding_window_view

from .base import NUMBA_OPTIONS, Layer, Parameter, output_size, pair, scratch
from .blas import (
    REDUCTION_OPTIONS,
    SERIAL_OPTIONS,
    add_partials,
    next_chunk,
    sgemm,
    single_threaded_blas,
    take_chunk,
)
from .winograd import winograd_conv, winograd_weight_grad

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
# numba kernels: the layout steps run on one thread each, inside the parallel
# drivers `conv2d_forward_kernel` / `conv2d_backward_kernel` below
# ---------------------------------------------------------------------------

# Inner loops index with uint64 offsets: numba checks signed indices for
# negative (wrap-around) values on every access, which stops LLVM from
# vectorising the copies (3-4x slower).


@njit(**SERIAL_OPTIONS)
def im2col(x, kh, kw, sh, sw, ph, pw, h_out, w_out, cols):
    """cols[(c*kh + i)*kw + j, (n*h_out + oh)*w_out + ow] = xpad[n, c, oh*sh + i, ow*sw + j].

    x : (N, C, H, W) float32; cols : (C*kh*kw, N*h_out*w_out) float32, written.
    """
    n_batch, channels, height, width = x.shape
    plane = h_out * w_out
    step = uint64(sw)
    flat_x = x.reshape(-1)
    for row in range(channels * kh * kw):
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


@njit(**SERIAL_OPTIONS)
def col2im(cols, kh, kw, sh, sw, ph, pw, h_out, w_out, dx):
    """Adjoint of `im2col`: dx[n, c] = sum of the cols entries read from it.

    cols : (C*kh*kw, N*h_out*w_out) float32; dx : (N, C, H, W) float32, written.
    """
    n_batch, channels, height, width = dx.shape
    plane = h_out * w_out
    step = uint64(sw)
    flat_dx = dx.reshape(-1)
    for nc in range(n_batch * channels):
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


@njit(**SERIAL_OPTIONS)
def channel_major_to_nchw(y2, bias, y):
    """y[n, o, p] = y2[o, n*P + p] + bias[o]; y2 (O, N*P), y (N, O, P)."""
    n_batch, channels, plane = y.shape
    for n in range(n_batch):
        at = uint64(n * plane)
        for o in range(channels):
            b = bias[o]
            src = y2[o]
            dst = y[n, o]
            for p in range(uint64(plane)):
                dst[p] = src[at + p] + b


@njit(**REDUCTION_OPTIONS)
def nchw_to_channel_major(dy, dy2, dbias):
    """dy2[o, n*P + p] = dy[n, o, p]; dbias[o] += sum over n, p of dy (accumulated)."""
    n_batch, channels, plane = dy.shape
    for o in range(channels):
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
        dbias[o] += total


@njit(**NUMBA_OPTIONS)
def conv2d_forward_kernel(x, weight, bias, kh, kw, sh, sw, ph, pw, h_out, w_out, chunk,
                          cols_scratch, y2_scratch, y):
    """y = conv(x) for the whole batch, chunk by chunk.

    x : (N, C, H, W); weight : (O, C*kh*kw); bias : (O,); y : (N, O, h_out*w_out), written.
    cols_scratch : (workers, >= C*kh*kw*chunk*P), y2_scratch : (workers, >= O*chunk*P):
    one row per worker (thread). Workers take chunks of `chunk` samples from a
    shared counter, so a thread that the OS (or the communication thread)
    holds up leaves its share to the others instead of stalling them.
    """
    n = x.shape[0]
    channels_out, taps = weight.shape
    plane = h_out * w_out
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(cols_scratch.shape[0]):
        while True:
            _, lo, hi = next_chunk(counter, n, chunk)
            if lo >= n:
                break
            columns = (hi - lo) * plane
            cols = cols_scratch[worker][: taps * columns].reshape((taps, columns))
            im2col(x[lo:hi], kh, kw, sh, sw, ph, pw, h_out, w_out, cols)
            y2 = y2_scratch[worker][: channels_out * columns].reshape((channels_out, columns))
            sgemm(False, False, 1.0, weight, cols, 0.0, y2)
            channel_major_to_nchw(y2, bias, y[lo:hi])


@njit(**NUMBA_OPTIONS)
def conv2d_backward_kernel(x, dy, weight, kh, kw, sh, sw, ph, pw, chunk, cols_scratch,
                           dy2_scratch, weight_grad, dweight_partial, dbias_partial, dx):
    """Gradients for the whole batch, chunk by chunk (workers as in the forward kernel).

    Chunk 0 accumulates straight into weight_grad (O, C*kh*kw); chunk c > 0
    writes its sum into dweight_partial[c - 1], added afterwards in chunk
    order by `add_partials` - the same bits whichever thread did which chunk.
    dbias_partial[c] (n_chunks, O) is overwritten with chunk c's bias
    gradient. dx (N, C, H, W) is written unless it has no samples (size 0).
    """
    n, channels_out, h_out, w_out = dy.shape
    taps = weight.shape[1]
    plane = h_out * w_out
    dy3 = dy.reshape((n, channels_out, plane))
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(cols_scratch.shape[0]):
        while True:
            c, lo, hi = next_chunk(counter, n, chunk)
            if lo >= n:
                break
            columns = (hi - lo) * plane
            dy2 = dy2_scratch[worker][: channels_out * columns].reshape((channels_out, columns))
            dbias_partial[c][:] = 0.0
            nchw_to_channel_major(dy3[lo:hi], dy2, dbias_partial[c])
            # im2col again instead of keeping it from forward: the chunk is
            # cache-sized, rebuilding it is cheaper than a trip through memory
            cols = cols_scratch[worker][: taps * columns].reshape((taps, columns))
            im2col(x[lo:hi], kh, kw, sh, sw, ph, pw, h_out, w_out, cols)
            if c == 0:
                sgemm(False, True, 1.0, dy2, cols, 1.0, weight_grad)
            else:
                sgemm(False, True, 1.0, dy2, cols, 0.0, dweight_partial[c - 1])
            if dx.shape[0] > 0:
                sgemm(True, False, 1.0, weight, dy2, 0.0, cols)  # cols now holds dcols
                col2im(cols, kh, kw, sh, sw, ph, pw, h_out, w_out, dx[lo:hi])


# ---------------------------------------------------------------------------
# 3x3 convolution, stride 1 or 2, as SGEMMs on shifted views of the padded input
# ---------------------------------------------------------------------------
#
# Stride 1. Zero-pad one sample and keep output pixel (h, w) at h*W_pad + w
# ("padded width"). Then tap (i, j) of every input channel is one matrix view
# of the padded sample, X_ij[c, q] = padded[c*plane + i*W_pad + j + q] (C rows
# of span = H_out*W_pad, row stride plane), and
#
#     forward       Y_w (O, span) = sum over taps of W_ij (O, C) @ X_ij
#     weight grad   dW_ij (O, C) += dY_w (O, span) @ X_ij.T
#     input grad    the forward on dy padded by 2 - p, with the kernel
#                   flipped and its channel axes swapped
#
# are 9 SGEMMs per sample with no im2col: the 9x larger cols matrix is never
# written, OpenBLAS reads the shifted views directly. The W_pad - W_out
# columns that wrap around a row are dropped on the way to y (and are zero in
# dY_w). The 9 SGEMMs run block by block over the columns (`shifted_block`),
# so that a block of Y_w (or dY_w) and of the taps stays in L1 for all 9.
# (Measurements, and the stacked-rows variant that lost: docs/performance.md.)
#
# Stride 2 ("polyphase"). Split the padded sample into its 4 phases, phase
# (p, q) holding the padded pixels (p + 2a, q + 2b) at a*W_2 + b, W_2 =
# ceil(W_pad / 2). Output pixel (h, w) reads padded pixel (2h + i, 2w + j),
# which is phase (i % 2, j % 2) at (h + i // 2, w + j // 2): tap (i, j) is a
# shifted view of one phase, and the products above hold as they are, with
# W_2 for W_pad (`phase_copy`, `tap_view`). The input gradient is the
# transposed product, dX_ij (C, span) = W_ij.T @ dY_w, added into the phases
# at the tap's shift (`conv3x3_shifted_input_grad_kernel`). No im2col and no
# multiplications by padding.


@njit(**SERIAL_OPTIONS)
def shifted_geometry(height, width, ph, pw, stride):
    """(W_s, plane): the width of one phase of the padded sample and the length
    of its plane, H_s*W_s + 2 (the 2 trailing zeros are read, for dropped
    columns, by the last row's taps); H_s, W_s = ceil((H, W + 2p) / stride)."""
    width_s = (width + 2 * pw + stride - 1) // stride
    return width_s, (height + 2 * ph + stride - 1) // stride * width_s + 2


@njit(**SERIAL_OPTIONS)
def phase_copy(x, ph, pw, stride, padded, to_padded):
    """Between a sample x (C, H, W) and its zero-padded phases (`padded`,
    stride*stride*C planes, see `shifted_geometry`), stride 1 or 2: with
    to_padded, write the phases (zeros where x has no pixel); else read x back
    from them.

    Padded pixel (hp, wp) = x[c, hp - ph, wp - pw] lives in phase (hp % s,
    wp % s), channel c, at (hp // s)*W_s + wp // s; its plane is row
    ((hp % s)*s + wp % s)*C + c of padded (s*s*C, plane). For s in (1, 2),
    v % s = v & (s - 1) and v // s = v >> (s - 1).
    """
    channels, height, width = x.shape
    width_s, plane = shifted_geometry(height, width, ph, pw, stride)
    if to_padded:
        for k in range(uint64(padded.size)):
            padded[k] = 0.0
    odd = uint64(channels * plane)  # phase (p, 1) from phase (p, 0)
    left = uint64(pw)
    for c in range(channels):
        for h in range(height):
            hp = h + ph
            at = uint64(((hp & (stride - 1)) * stride * channels + c) * plane
                        + (hp >> (stride - 1)) * width_s)
            row = x[c, h]
            if stride == 1 and to_padded:  # contiguous both sides: vectorized
                for w in range(uint64(width)):
                    padded[at + left + w] = row[w]
            elif stride == 1:
                for w in range(uint64(width)):
                    row[w] = padded[at + left + w]
            elif to_padded:
                for w in range(uint64(width)):
                    wp = w + left
                    padded[at + (wp & 1) * odd + (wp >> 1)] = row[w]
            else:
                for w in range(uint64(width)):
                    wp = w + left
                    row[w] = padded[at + (wp & 1) * odd + (wp >> 1)]


@njit(**SERIAL_OPTIONS)
def tap_view(rows, channels, width_s, stride, i, j, lo, hi):
    """Columns lo:hi of tap (i, j)'s view of the phases (rows: (s*s*C, plane))."""
    first = ((i % stride) * stride + j % stride) * channels
    start = (i // stride) * width_s + j // stride + lo
    return rows[first : first + channels, start : start + hi - lo]


@njit(**SERIAL_OPTIONS)
def from_padded_width(acc, bias, dst):
    """dst[h, w] = acc[h*W_pad + w] + bias: drop the wrapped-around columns."""
    h_out, w_out = dst.shape
    width_pad = acc.size // h_out
    for h in range(h_out):
        at = uint64(h * width_pad)
        row = dst[h]
        for w in range(uint64(w_out)):
            row[w] = acc[at + w] + bias


@njit(**NUMBA_OPTIONS)
def conv3x3_shifted_kernel(x, tap_weights, bias, ph, pw, stride, block, padded_scratch,
                           acc_scratch, y):
    """y = conv(x) + bias, 3x3 kernel, stride 1 or 2, sample by sample.

    x : (N, C, H, W); tap_weights : (9, O, C), tap i*3 + j = weight[:, :, i, j];
    bias : (O,); y : (N, O, H_out, W_out), written. padded_scratch : (workers,
    >= s*s*C*plane), acc_scratch : (workers, >= O*H_out*W_s), see
    `shifted_geometry`. The output columns go in blocks of `block`, all 9 taps
    per block (see `shifted_block`). Workers take samples from a shared
    counter, as in `conv2d_forward_kernel`.
    """
    n, channels, height, width = x.shape
    channels_out, h_out = tap_weights.shape[1], y.shape[2]
    width_s, plane = shifted_geometry(height, width, ph, pw, stride)
    span = h_out * width_s
    phases = stride * stride * channels
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(padded_scratch.shape[0]):
        rows = padded_scratch[worker][: phases * plane].reshape((phases, plane))
        acc = acc_scratch[worker][: channels_out * span].reshape((channels_out, span))
        while True:
            sample = take_chunk(counter)
            if sample >= n:
                break
            phase_copy(x[sample], ph, pw, stride, rows.reshape(-1), True)
            for lo in range(0, span, block):  # the 9 taps on one L1-sized block of columns
                hi = min(span, lo + block)
                for i in range(3):
                    for j in range(3):
                        sgemm(False, False, 1.0, tap_weights[i * 3 + j],
                              tap_view(rows, channels, width_s, stride, i, j, lo, hi),
                              0.0 if i + j == 0 else 1.0, acc[:, lo:hi])
            for o in range(channels_out):
                from_padded_width(acc[o], bias[o], y[sample, o])


@njit(**SERIAL_OPTIONS)
def zeroed_rows(buffer, rows, columns):
    """The first rows*columns values of the 1-D buffer, zeroed, as (rows, columns)."""
    flat = buffer[: rows * columns]
    flat[:] = 0.0
    return flat.reshape((rows, columns))


@njit(**REDUCTION_OPTIONS)
def to_padded_width(plane, dst):
    """dst[h*W_pad + w] = plane[h, w] for the (H, W) plane; returns its float32 sum.

    The other columns of dst (W_pad = dst.size // H wide rows) are left alone.
    """
    height, width = plane.shape
    width_pad = dst.size // height
    total = np.float32(0.0)
    for h in range(height):
        at = uint64(h * width_pad)
        row = plane[h]
        for w in range(uint64(width)):
            v = row[w]
            dst[at + w] = v
            total += v
    return total


@njit(**NUMBA_OPTIONS)
def conv3x3_shifted_weight_grad_kernel(x, dy, ph, pw, stride, chunk, block, padded_scratch,
                                      dy_scratch, dweight_partial, dbias_partial):
    """Weight and bias gradients of `conv3x3_shifted_kernel`, chunk by chunk.

    Per sample and tap dW_ij (O, C) += dY_w (O, span) @ X_ij.T, dY_w being dy
    in the padded-width layout with zeros in the dropped columns, X_ij the
    tap's shifted view of the padded sample's phases, in blocks of `block`
    columns (all 9 taps per block, see `shifted_block`). Chunk c of `chunk`
    samples writes dweight_partial[c] (9, O, C) and dbias_partial[c] (O,),
    summed in chunk order by the caller: the same bits whichever thread did
    which chunk.
    """
    n, channels, height, width = x.shape
    channels_out, h_out = dy.shape[1], dy.shape[2]
    width_s, plane = shifted_geometry(height, width, ph, pw, stride)
    span = h_out * width_s
    phases = stride * stride * channels
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(padded_scratch.shape[0]):
        rows = padded_scratch[worker][: phases * plane].reshape((phases, plane))
        dy_w = zeroed_rows(dy_scratch[worker], channels_out, span)  # dropped columns stay zero
        while True:
            c, lo, hi = next_chunk(counter, n, chunk)
            if lo >= n:
                break
            partial = dweight_partial[c]
            partial[:] = 0.0
            dbias_partial[c][:] = 0.0
            for sample in range(lo, hi):
                phase_copy(x[sample], ph, pw, stride, rows.reshape(-1), True)
                for o in range(channels_out):
                    dbias_partial[c][o] += to_padded_width(dy[sample, o], dy_w[o])
                for lo in range(0, span, block):  # the 9 taps on one L1-sized block of columns
                    hi = min(span, lo + block)
                    for i in range(3):
                        for j in range(3):
                            sgemm(False, True, 1.0, dy_w[:, lo:hi],
                                  tap_view(rows, channels, width_s, stride, i, j, lo, hi),
                                  1.0, partial[i * 3 + j])


@njit(**NUMBA_OPTIONS)
def conv3x3_shifted_input_grad_kernel(dy, tap_weights_t, ph, pw, stride, block, acc_scratch,
                                     dy_scratch, dx):
    """dx of `conv3x3_shifted_kernel`, the transposed products, sample by sample.

    Per sample and tap, dX_ij (C, span) = W_ij.T @ dY_w (O, span) is added into
    the tap's shifted view of the zeroed phases (`tap_view`), block by block
    of `block` columns; `phase_copy` then reads dx out of the phases, dropping
    the padding. tap_weights_t : (9, C, O), tap i*3 + j = weight[:, :, i, j].T;
    dx : (N, C, H, W), written. acc_scratch : (workers, >= s*s*C*plane),
    dy_scratch : (workers, >= O*H_out*W_s).
    """
    n, channels, height, width = dx.shape
    channels_out, h_out = dy.shape[1], dy.shape[2]
    width_s, plane = shifted_geometry(height, width, ph, pw, stride)
    span = h_out * width_s
    phases = stride * stride * channels
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(acc_scratch.shape[0]):
        acc = acc_scratch[worker][: phases * plane].reshape((phases, plane))
        dy_w = zeroed_rows(dy_scratch[worker], channels_out, span)  # dropped columns stay zero
        while True:
            sample = take_chunk(counter)
            if sample >= n:
                break
            for o in range(channels_out):
                to_padded_width(dy[sample, o], dy_w[o])
            acc[:] = 0.0
            for lo in range(0, span, block):
                hi = min(span, lo + block)
                for i in range(3):
                    for j in range(3):
                        sgemm(False, False, 1.0, tap_weights_t[i * 3 + j], dy_w[:, lo:hi], 1.0,
                              tap_view(acc, channels, width_s, stride, i, j, lo, hi))
            phase_copy(dx[sample], ph, pw, stride, acc.reshape(-1), False)


# ---------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------

#: Elements of one thread's im2col chunk: small enough to stay in cache between
#: im2col, the SGEMMs and col2im, large enough for SGEMM speed.
CHUNK_ELEMENTS = 1 << 19

#: ... but at least this many times the weight's elements: every chunk after
#: the first costs a weight-gradient partial of the weight's size.
CHUNK_WEIGHT_RATIO = 4

#: With several threads, cut the batch into at least this many chunks per
#: thread. More chunks balance better when the OS holds a thread up, but each
#: extra chunk costs a (O, C*kh*kw) weight-gradient partial.
CHUNKS_PER_THREAD = 1


#: 3x3 layers of stride 1 or 2 run `conv3x3_shifted_kernel` (no im2col) when
#: the output plane in the padded-width layout, span = H_out*W_s pixels (the
#: SGEMMs' columns, `shifted_geometry`), is at least SHIFTED_MIN_SPAN and at least
#: SHIFTED_SPAN_PER_CHANNEL * in_channels (each sample re-reads the whole
#: weight, so the columns must outnumber its depth), with at least
#: SHIFTED_MIN_CHANNELS input channels: where it beat im2col (docs/performance.md).
SHIFTED_MIN_SPAN = 64
SHIFTED_SPAN_PER_CHANNEL = 1
SHIFTED_MIN_CHANNELS = 8

#: The shifted-view SGEMMs go over the output columns in blocks of about
#: SHIFTED_BLOCK_ELEMENTS / (C + O), all 9 taps per block: a block's slice of
#: the accumulator and of the shifted input rows then stay in L1 across its 9
#: SGEMMs instead of streaming through L2 nine times. See `shifted_block`.
SHIFTED_BLOCK_ELEMENTS = 8192

#: ... and at most this many columns: two threads that stream the same L2
#: slow each other down where one does not (docs/performance.md).
SHIFTED_MAX_COLUMNS = 128


def shifted_block(channels, channels_out):
    """Columns per block of the shifted-view SGEMMs (a multiple of 16).

    Blocks whose operands fit L1 keep two threads from slowing each other
    down on L2 streams (docs/performance.md, "shifted-view blocks").
    """
    return max(16, min(SHIFTED_MAX_COLUMNS, SHIFTED_BLOCK_ELEMENTS // (channels + channels_out) // 16 * 16))


#: 3x3 stride-1 layers with at least this many input and output channels run
#: Winograd's F(2x2, 3x3) (cnn/layers/winograd.py) instead of either of the
#: above: the transforms cost per activation, the saving is per channel pair,
#: so below 64 channels the shifted SGEMMs stay ahead (docs/performance.md).
WINOGRAD_MIN_CHANNELS = 64


def _chunking(n, elements_per_sample, weight_elements=0):
    """(workers, chunk): the batch is cut into equal chunks of `chunk` samples
    whose im2col holds about max(CHUNK_ELEMENTS, CHUNK_WEIGHT_RATIO *
    weight_elements) values, into at least CHUNKS_PER_THREAD chunks per thread
    when there are several threads, and into a multiple of the thread count
    where the batch allows (5 chunks on 2 threads left one thread 3 chunks and
    the other 2: resnet20's stride-2 layers waited ~20 % on the slower one)."""
    threads = numba.get_num_threads()
    target = max(CHUNK_ELEMENTS, CHUNK_WEIGHT_RATIO * weight_elements)
    chunk = max(1, min(n, target // max(1, elements_per_sample)))
    n_chunks = -(-n // chunk)
    if threads > 1:
        n_chunks = max(n_chunks, CHUNKS_PER_THREAD * threads)
        n_chunks = min(n, -(-n_chunks // threads) * threads)
    chunk = -(-n // n_chunks)
    return min(threads, -(-n // chunk)), chunk


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
        bias = self._zero_bias if bias is None else bias
        y = np.empty(self._y_shape, dtype=np.float32)
        if self._winograd():
            winograd_conv(x, self.weight.data, False, bias, self.padding, y)
            return y
        if self._shifted(x.shape):
            tap_weights = self.weight.data.transpose(2, 3, 0, 1).reshape(9, o, self.in_channels)
            self._shifted_conv(x, np.ascontiguousarray(tap_weights), bias, ph, pw, sh, y)
            return y
        weight = self.weight.data.reshape(o, taps)
        workers, chunk = _chunking(n, taps * plane, o * taps)
        cols = scratch("conv.cols", (workers, taps * chunk * plane))
        y2 = scratch("conv.channel_major", (workers, o * chunk * plane))
        with single_threaded_blas():
            conv2d_forward_kernel(x, weight, bias, kh, kw, sh, sw, ph, pw, h_out, w_out, chunk,
                                  cols, y2, y.reshape(n, o, plane))
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

        if self._winograd():
            return self._winograd_backward(dy)
        if self._shifted(self._x.shape):
            return self._shifted_backward(dy)
        x = self._x
        shape = (0,) + x.shape[1:] if self.skip_input_grad else x.shape
        dx = np.empty(shape, dtype=np.float32)
        self._im2col_backward(dy, dx)
        return None if self.skip_input_grad else dx

    def _im2col_backward(self, dy, dx):
        """Weight and bias gradients, and dx (N, C, H, W) unless it has no samples."""
        x = self._x
        n, o, h_out, w_out = dy.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        plane = h_out * w_out
        taps = self.in_channels * kh * kw
        weight = self.weight.data.reshape(o, taps)
        weight_grad = self.weight.grad.reshape(o, taps)
        workers, chunk = _chunking(n, taps * plane, o * taps)
        n_chunks = -(-n // chunk)
        cols = scratch("conv.cols", (workers, taps * chunk * plane))
        dy2 = scratch("conv.channel_major", (workers, o * chunk * plane))
        dweight_partial = scratch("conv.dweight", (n_chunks - 1, o, taps))
        dbias_partial = scratch("conv.dbias", (n_chunks, o))
        with single_threaded_blas():
            conv2d_backward_kernel(x, dy, weight, kh, kw, sh, sw, ph, pw, chunk, cols, dy2,
                                   weight_grad, dweight_partial, dbias_partial, dx)
        # in chunk order: the same bits run to run
        if n_chunks > 1:
            add_partials(weight_grad, dweight_partial)
        if self.bias is not None:
            add_partials(self.bias.grad, dbias_partial)

    def _winograd_backward(self, dy):
        """Backward of a layer that runs Winograd's F(2x2, 3x3) (see `_winograd`)."""
        x = self._x
        bias_grad = np.zeros(self.out_channels, np.float32) if self.bias is None else self.bias.grad
        winograd_weight_grad(x, dy, self.padding, self.weight.grad, bias_grad)
        if self.skip_input_grad:
            return None
        # dx = dy (padded by 2 - p) correlated with the rotated kernel, channels swapped
        ph, pw = self.padding
        dx = np.empty(x.shape, dtype=np.float32)
        winograd_conv(dy, self.weight.data, True, np.zeros(self.in_channels, np.float32),
                      (2 - ph, 2 - pw), dx)
        return dx

    def _shifted_backward(self, dy):
        """Backward of a layer that runs `conv3x3_shifted_kernel` (see `_shifted`)."""
        x = self._x
        n, c, height, width = x.shape
        o, h_out = self.out_channels, dy.shape[2]
        (ph, pw), stride = self.padding, self.stride[0]
        width_s, plane = shifted_geometry(height, width, ph, pw, stride)
        block = shifted_block(c, o)
        workers, chunk = _chunking(n, 1)
        n_chunks = -(-n // chunk)
        padded = scratch("conv.padded", (workers, stride * stride * c * plane))
        dy_w = scratch("conv.accumulator", (workers, o * h_out * width_s))
        dweight_partial = scratch("conv.dweight", (n_chunks, 9, o, c))
        dbias_partial = scratch("conv.dbias", (n_chunks, o))
        with single_threaded_blas():
            conv3x3_shifted_weight_grad_kernel(x, dy, ph, pw, stride, chunk, block, padded, dy_w,
                                               dweight_partial, dbias_partial)
        # in chunk order: the same bits run to run
        dweight = np.zeros((9, o, c), dtype=np.float32)
        add_partials(dweight, dweight_partial)
        self.weight.grad += dweight.transpose(1, 2, 0).reshape(o, c, 3, 3)
        if self.bias is not None:
            add_partials(self.bias.grad, dbias_partial)
        if self.skip_input_grad:
            return None
        dx = np.empty(x.shape, dtype=np.float32)
        if stride == 2:
            # the transposed products, into the phases: tap (i, j) is weight[:, :, i, j].T
            tap_weights_t = self.weight.data.transpose(2, 3, 1, 0).reshape(9, c, o)
            workers = min(numba.get_num_threads(), n)
            with single_threaded_blas():
                conv3x3_shifted_input_grad_kernel(
                    dy, np.ascontiguousarray(tap_weights_t), ph, pw, stride, block,
                    scratch("conv.padded", (workers, stride * stride * c * plane)),
                    scratch("conv.accumulator", (workers, o * h_out * width_s)), dx)
            return dx
        # dx = dy (padded by 2 - p) correlated with the flipped kernel, channels swapped:
        # tap (i, j) of that kernel is weight[:, :, 2 - i, 2 - j].T, shape (C, O)
        flipped = self.weight.data[:, :, ::-1, ::-1].transpose(2, 3, 1, 0).reshape(9, c, o)
        self._shifted_conv(dy, np.ascontiguousarray(flipped), np.zeros(c, dtype=np.float32),
                           2 - ph, 2 - pw, 1, dx)
        return dx

    def _winograd(self):
        """Whether this layer runs Winograd's F(2x2, 3x3) (cnn/layers/winograd.py)."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and max(self.padding) <= 2
                and min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS)

    def _shifted(self, x_shape):
        """Whether input x_shape runs `conv3x3_shifted_kernel` instead of im2col."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if (kh, kw) != (3, 3) or sh != sw or sh > 2 or max(ph, pw) > 2:
            return False
        height, width = x_shape[2:]
        width_s = shifted_geometry(height, width, ph, pw, sh)[0]
        span = output_size(height, 3, sh, ph) * width_s
        return (span >= max(SHIFTED_MIN_SPAN, SHIFTED_SPAN_PER_CHANNEL * self.in_channels)
                and self.in_channels >= SHIFTED_MIN_CHANNELS)

    @staticmethod
    def _shifted_conv(x, tap_weights, bias, ph, pw, stride, y):
        """y (N, O, H_out, W_out) = 3x3 conv of x with tap_weights (9, O, C), stride 1 or 2."""
        n, c, height, width = x.shape
        width_s, plane = shifted_geometry(height, width, ph, pw, stride)
        workers = min(numba.get_num_threads(), n)
        padded = scratch("conv.padded", (workers, stride * stride * c * plane))
        acc = scratch("conv.accumulator", (workers, tap_weights.shape[1] * y.shape[2] * width_s))
        with single_threaded_blas():
            conv3x3_shifted_kernel(x, tap_weights, bias, ph, pw, stride,
                                   shifted_block(c, tap_weights.shape[1]), padded, acc, y)
