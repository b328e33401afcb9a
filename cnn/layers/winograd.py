"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).
Cut the output into 2x2 tiles; tile (a, b) reads the 4x4 input window d whose
top-left corner is (2a - ph, 2b - pw) in x (zeros outside). For a 3x3 filter g

    y_tile (2x2) = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise)

with the constant matrices below. Summed over input channels, the 16 entries of
the 4x4 products become 16 independent matrix products over all tiles:

    forward        M[k] (O, T) = U[k] (O, C) @ V[k] (C, T),  k = 0..15
                   U[k][o, c] = (G w[o, c] G^T)_k,  V[k][c, t] = (B^T d_ct B)_k
                   y = A^T M A per tile, + bias
    input grad     the forward on dy padded by 2 - p, with the kernel rotated
                   by 180 degrees and its channel axes swapped
    weight grad    dU[k] (O, C) = dM[k] (O, T) @ V[k].T,  dM = A dy_tile A^T
                   dw[o, c] = G^T dU[:, o, c] G

The SGEMMs do 16*O*C multiply-adds per tile of 4 outputs, against 9*4*O*C for
im2col: 2.25x fewer. The price is the transforms (memory-bound, linear in the
activations, not in O*C), so the method pays on layers with many channels
(`cnn.layers.conv.WINOGRAD_MIN_CHANNELS`). F(2x2, 3x3) keeps float32 errors
at the level of direct convolution (its transforms only add, subtract and
halve; tests/test_layers.py checks the error against float64); larger tiles
such as F(4x4, 3x3) save more multiplications but their transforms have
larger constants and lose accuracy quickly.

Threads: the batch is cut into chunks of whole samples, or of bands of tile
rows of one sample when a sample alone is larger than a chunk (sized from the
layer shape only, not the thread count); each chunk runs three parallel phases -
transform (split over channels), 16 SGEMMs (split over k, and over rows of
the result when there are more than 16 threads), inverse transform. Every
output element is computed by one thread in a fixed order, so the results are
the same bits for any number of threads, and the weight gradient needs no
per-thread partial sums. Layers with planes of at least
PIPELINE_MIN_OUTPUTS outputs a channel instead give each thread whole chunks
of a few samples and run all three phases of a chunk on it
(`winograd_pipelined` for the forward and dx, `winograd_weight_grad_pipelined`
for the weight gradient, whose chunks then write partial sums, added in chunk
order): V and M stay in that thread's cache. The choice depends on the layer
shape only, so the bits still do not depend on the thread count.
"""

import numba
import numpy as np
from numba import njit, prange, uint64
from numpy.lib.stride_tricks import sliding_window_view

from .base import NUMBA_OPTIONS, scratch
from .blas import SERIAL_OPTIONS, add_partials, next_chunk, sgemm, single_threaded_blas

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float32)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float32)

#: float32 elements of one chunk's V and M (16*(C + O) per tile): about 8 MB,
#: so a chunk's transforms stay in the last-level cache for its SGEMMs, while
#: the SGEMMs still see a few hundred tiles.
CHUNK_ELEMENTS = 1 << 21

#: Forward (and input-gradient) layers with at least this many outputs per
#: channel, whose samples fit a chunk, run `winograd_pipelined`, whose chunks
#: hold about PIPELINE_ELEMENTS values of V and M (at least one sample):
#: below 8x8 planes a sample has too few tiles for one chunk's SGEMMs
#: (docs/performance.md, "Winograd pipeline").
PIPELINE_MIN_OUTPUTS = 64
PIPELINE_ELEMENTS = 1 << 19

#: The weight gradient is pipelined too (`winograd_weight_grad_pipelined`)
#: where its per-chunk partial sums (16*O*C values a chunk) come to at most
#: PIPELINE_PARTIALS times the batch's transformed input V (16*C values a
#: tile): resnet20's 64-channel layers on 8x8 (4 chunks, 0.25), VGG's 64-channel
#: layer on 32x32 (64 chunks, 0.25); not VGG's 128- and 256-channel ones
#: (1-4), whose partials would outweigh the inputs.
PIPELINE_PARTIALS = 0.5


def tiles(h_out, w_out):
    """(tile rows, tile columns) of 2x2 output tiles covering H_out x W_out."""
    return (h_out + 1) // 2, (w_out + 1) // 2


# ---------------------------------------------------------------------------
# plain-numpy references (dtype-generic): the algorithm as written above
# ---------------------------------------------------------------------------


def _input_tiles(x, padding, tile_shape):
    """All 4x4 input windows, (N, C, tile rows, tile columns, 4, 4), zeros outside x."""
    n, c, height, width = x.shape
    (ph, pw), (th, tw) = padding, tile_shape
    xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2), dtype=x.dtype)
    xp[:, :, ph : ph + height, pw : pw + width] = x
    return sliding_window_view(xp, (4, 4), axis=(2, 3))[:, :, ::2, ::2]


def winograd_forward_reference(x, weight, bias, padding):
    """3x3 stride-1 conv of x (N, C, H, W) with weight (O, C, 3, 3), via F(2x2, 3x3).

    Returns y of shape (N, O, H + 2ph - 2, W + 2pw - 2), as
    `cnn.layers.conv.conv2d_forward_reference` with stride 1.
    """
    ph, pw = padding
    h_out, w_out = x.shape[2] + 2 * ph - 2, x.shape[3] + 2 * pw - 2
    dtype = x.dtype
    b_t, g, a_t = B_T.astype(dtype), G.astype(dtype), A_T.astype(dtype)
    d = _input_tiles(x, padding, tiles(h_out, w_out))
    v = np.einsum("ik,ncabkl,jl->ijcnab", b_t, d, b_t)          # B^T d B
    u = np.einsum("ik,ockl,jl->ijoc", g, weight, g)             # G g G^T
    m = np.einsum("ijoc,ijcnab->ijnoab", u, v)                  # sum over channels
    y_tiles = np.einsum("ri,ijnoab,sj->noarbs", a_t, m, a_t)    # A^T M A
    n, o, th, _, tw, _ = y_tiles.shape
    y = y_tiles.reshape(n, o, 2 * th, 2 * tw)[:, :, :h_out, :w_out]
    if bias is not None:
        y = y + bias[None, :, None, None]
    return np.ascontiguousarray(y)


def winograd_weight_grad_reference(dy, x, padding):
    """dweight (O, C, 3, 3) of `winograd_forward_reference`, via dU = sum dM * V."""
    ph, pw = padding
    n, o, h_out, w_out = dy.shape
    th, tw = tiles(h_out, w_out)
    dtype = x.dtype
    b_t, g, a_t = B_T.astype(dtype), G.astype(dtype), A_T.astype(dtype)
    v = np.einsum("ik,ncabkl,jl->ijcnab", b_t, _input_tiles(x, padding, (th, tw)), b_t)
    dy_pad = np.zeros((n, o, 2 * th, 2 * tw), dtype=dtype)
    dy_pad[:, :, :h_out, :w_out] = dy
    dy_tiles = dy_pad.reshape(n, o, th, 2, tw, 2)
    dm = np.einsum("ri,noarbs,sj->ijnoab", a_t, dy_tiles, a_t)  # A dy A^T
    du = np.einsum("ijnoab,ijcnab->ijoc", dm, v)
    return np.einsum("ik,ijoc,jl->ockl", g, du, g)               # G^T dU G


# ---------------------------------------------------------------------------
# numba kernels. The 1-D transforms below are the rows of B^T, G, A^T (and the
# adjoints A, G^T); each 2-D transform applies one along rows, then columns.
# ---------------------------------------------------------------------------

_HALF = np.float32(0.5)


@njit(inline="always")
def _b_t(d0, d1, d2, d3):
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(inline="always")
def _g(g0, g1, g2):
    return g0, _HALF * (g0 + g1 + g2), _HALF * (g0 - g1 + g2), g2


@njit(inline="always")
def _a_t(m0, m1, m2, m3):
    return m0 + m1 + m2, m1 - m2 - m3


@njit(inline="always")
def _a(e0, e1):
    return e0, e0 + e1, e0 - e1, -e1


@njit(inline="always")
def _g_t(u0, u1, u2, u3):
    return u0 + _HALF * (u1 + u2), _HALF * (u1 - u2), _HALF * (u1 + u2) + u3


@njit(inline="always")
def _transform_4x4(t, d):
    """Apply the 1-D transform t to the rows, then the columns, of the 4x4 tile
    d (16 scalars, row-major); returns the 16 results, row-major."""
    r00, r01, r02, r03 = t(d[0], d[1], d[2], d[3])
    r10, r11, r12, r13 = t(d[4], d[5], d[6], d[7])
    r20, r21, r22, r23 = t(d[8], d[9], d[10], d[11])
    r30, r31, r32, r33 = t(d[12], d[13], d[14], d[15])
    c00, c10, c20, c30 = t(r00, r10, r20, r30)
    c01, c11, c21, c31 = t(r01, r11, r21, r31)
    c02, c12, c22, c32 = t(r02, r12, r22, r32)
    c03, c13, c23, c33 = t(r03, r13, r23, r33)
    return (c00, c01, c02, c03, c10, c11, c12, c13,
            c20, c21, c22, c23, c30, c31, c32, c33)


@njit(inline="always")
def _store_16(dst, column, values):
    """dst[k, column] = values[k] for k = 0..15 (dst 2-D, 16 rows)."""
    (dst[0, column], dst[1, column], dst[2, column], dst[3, column],
     dst[4, column], dst[5, column], dst[6, column], dst[7, column],
     dst[8, column], dst[9, column], dst[10, column], dst[11, column],
     dst[12, column], dst[13, column], dst[14, column], dst[15, column]) = values


@njit(inline="always")
def _load_16(src, column):
    """(src[0, column], ..., src[15, column]) of src 2-D with 16 rows."""
    return (src[0, column], src[1, column], src[2, column], src[3, column],
            src[4, column], src[5, column], src[6, column], src[7, column],
            src[8, column], src[9, column], src[10, column], src[11, column],
            src[12, column], src[13, column], src[14, column], src[15, column])


@njit(inline="always")
def _filter_4x4(g):
    """G g G^T, g the 3x3 filter as 9 scalars (row-major); 16 results, row-major."""
    a0, a1, a2, a3 = _g(g[0], g[3], g[6])  # the columns of G g
    b0, b1, b2, b3 = _g(g[1], g[4], g[7])
    c0, c1, c2, c3 = _g(g[2], g[5], g[8])
    return _g(a0, b0, c0) + _g(a1, b1, c1) + _g(a2, b2, c2) + _g(a3, b3, c3)


@njit(**NUMBA_OPTIONS)
def filter_transform(weight, rotate, u):
    """u[k, o*C + c] = (G w G^T)_k for w = weight[o, c] (O, C, 3, 3).

    rotate=True: u[k, c*O + o] for w = weight[o, c] rotated by 180 degrees,
    the kernel of the input gradient. u : (16, >= O*C), written.
    """
    channels_out, channels = weight.shape[:2]
    w = weight.reshape(-1)
    if rotate:  # row c of U' is input channel c: loop so that writes run along rows
        for c in prange(channels):
            for o in range(channels_out):
                at = uint64((o * channels + c) * 9)
                g = (w[at + 8], w[at + 7], w[at + 6], w[at + 5], w[at + 4],
                     w[at + 3], w[at + 2], w[at + 1], w[at])
                _store_16(u, uint64(c * channels_out + o), _filter_4x4(g))
    else:
        for o in prange(channels_out):
            for c in range(channels):
                at = uint64((o * channels + c) * 9)
                g = (w[at], w[at + 1], w[at + 2], w[at + 3], w[at + 4],
                     w[at + 5], w[at + 6], w[at + 7], w[at + 8])
                _store_16(u, uint64(o * channels + c), _filter_4x4(g))


@njit(**NUMBA_OPTIONS)
def input_transform(x, ph, pw, a0, a1, tw, v):
    """v[k, c*T + (n*rows + a - a0)*tw + b] = (B^T d B)_k, d the 4x4 window of
    tile (a, b) of x[n, c], for the tile rows a0 <= a < a1 (rows = a1 - a0),
    T = N*rows*tw.

    x : (N, C, H, W); v : (16, >= C*T), written. Split over channels.
    """
    n_batch, channels, height, width = x.shape
    rows = a1 - a0
    per_channel = n_batch * rows * tw
    for c in prange(channels):
        # the band's input rows inside zeros; the zeros (padding, rows outside
        # x) are never written, so they stay zero from one sample to the next
        padded = np.zeros((2 * rows + 2, 2 * tw + 2), dtype=np.float32)
        first = 2 * a0 - ph  # input row of padded[0]
        for n in range(n_batch):
            for r in range(2 * rows + 2):
                h = first + r
                if 0 <= h < height:
                    src = x[n, c, h]
                    dst = padded[r]
                    for w in range(uint64(width)):
                        dst[w + pw] = src[w]
            for a in range(rows):
                r0, r1, r2, r3 = padded[2 * a], padded[2 * a + 1], padded[2 * a + 2], padded[2 * a + 3]
                t0 = uint64(c * per_channel + (n * rows + a) * tw)
                for b in range(uint64(tw)):
                    at = 2 * b
                    d = (r0[at], r0[at + 1], r0[at + 2], r0[at + 3],
                         r1[at], r1[at + 1], r1[at + 2], r1[at + 3],
                         r2[at], r2[at + 1], r2[at + 2], r2[at + 3],
                         r3[at], r3[at + 1], r3[at + 2], r3[at + 3])
                    _store_16(v, t0 + b, _transform_4x4(_b_t, d))


@njit(**NUMBA_OPTIONS)
def output_transform(m, bias, a0, a1, tw, y):
    """y[n, o, 2a + r, 2b + s] = (A^T M A)_rs + bias[o], M the 16 values of
    tile (a, b), for the tile rows a0 <= a < a1.

    m : (16, >= O*T), tile (a, b) of sample n, channel o in column
    o*T + (n*rows + a - a0)*tw + b, rows = a1 - a0, T = N*rows*tw;
    y : (N, O, H_out, W_out), those rows written (the parts of edge tiles
    outside y are dropped). Split over output channels.
    """
    n_batch, channels_out, h_out, w_out = y.shape
    rows = a1 - a0
    per_channel = n_batch * rows * tw
    for o in prange(channels_out):
        beta = bias[o]
        for n in range(n_batch):
            plane = y[n, o]
            for a in range(a0, a1):
                t0 = uint64(o * per_channel + (n * rows + a - a0) * tw)
                top = plane[2 * a]
                has_bottom = 2 * a + 1 < h_out
                bottom = plane[2 * a + 1] if has_bottom else top
                for b in range(uint64(tw)):
                    (m00, m01, m02, m03, m10, m11, m12, m13,
                     m20, m21, m22, m23, m30, m31, m32, m33) = _load_16(m, t0 + b)
                    s00, s10 = _a_t(m00, m10, m20, m30)
                    s01, s11 = _a_t(m01, m11, m21, m31)
                    s02, s12 = _a_t(m02, m12, m22, m32)
                    s03, s13 = _a_t(m03, m13, m23, m33)
                    y00, y01 = _a_t(s00, s01, s02, s03)
                    y10, y11 = _a_t(s10, s11, s12, s13)
                    w = 2 * b
                    right = w + 1 < w_out
                    top[w] = y00 + beta
                    if right:
                        top[w + 1] = y01 + beta
                    if has_bottom:
                        bottom[w] = y10 + beta
                        if right:
                            bottom[w + 1] = y11 + beta


@njit(**{**NUMBA_OPTIONS, "fastmath": {"reassoc"}})
def output_grad_transform(dy, a0, a1, tw, dm, dbias):
    """dm[k, o*T + (n*rows + a - a0)*tw + b] = (A e A^T)_k for e the 2x2 tile
    (a, b) of dy[n, o] (zeros outside), tile rows a0 <= a < a1, rows = a1 - a0,
    T = N*rows*tw; dbias[o] += the sum of those rows of dy[:, o] (float32, in a
    fixed order).

    dy : (N, O, H_out, W_out); dm : (16, >= O*T), written. Split over output
    channels.
    """
    n_batch, channels_out, h_out, w_out = dy.shape
    rows = a1 - a0
    per_channel = n_batch * rows * tw
    zero = np.float32(0.0)
    for o in prange(channels_out):
        total = zero
        for n in range(n_batch):
            plane = dy[n, o]
            for a in range(a0, a1):
                t0 = uint64(o * per_channel + (n * rows + a - a0) * tw)
                top = plane[2 * a]
                has_bottom = 2 * a + 1 < h_out
                bottom = plane[2 * a + 1] if has_bottom else top
                for b in range(uint64(tw)):
                    w = 2 * b
                    right = w + 1 < w_out
                    e00 = top[w]
                    e01 = top[w + 1] if right else zero
                    e10 = bottom[w] if has_bottom else zero
                    e11 = bottom[w + 1] if has_bottom and right else zero
                    total += (e00 + e01) + (e10 + e11)
                    c0, c1, c2, c3 = _a(e00, e10)
                    d0, d1, d2, d3 = _a(e01, e11)
                    _store_16(dm, t0 + b, _a(c0, d0) + _a(c1, d1) + _a(c2, d2) + _a(c3, d3))
        dbias[o] += total


@njit(**NUMBA_OPTIONS)
def weight_grad_transform(du, weight_grad):
    """weight_grad[o, c] += G^T dU[:, o*C + c] G (3x3 from 4x4); du : (16, >= O*C)."""
    channels_out, channels = weight_grad.shape[:2]
    for o in prange(channels_out):
        for c in range(channels):
            d = _load_16(du, uint64(o * channels + c))
            a0, a1, a2 = _g_t(d[0], d[4], d[8], d[12])
            b0, b1, b2 = _g_t(d[1], d[5], d[9], d[13])
            c0, c1, c2 = _g_t(d[2], d[6], d[10], d[14])
            e0, e1, e2 = _g_t(d[3], d[7], d[11], d[15])
            w = weight_grad[o, c]
            r0, r1, r2 = _g_t(a0, b0, c0, e0)
            w[0, 0] += r0
            w[0, 1] += r1
            w[0, 2] += r2
            r0, r1, r2 = _g_t(a1, b1, c1, e1)
            w[1, 0] += r0
            w[1, 1] += r1
            w[1, 2] += r2
            r0, r1, r2 = _g_t(a2, b2, c2, e2)
            w[2, 0] += r0
            w[2, 1] += r1
            w[2, 2] += r2


@njit(**SERIAL_OPTIONS)
def _sgemm_rows(trans_b, a, b, beta, c, r0, r1):
    sgemm(False, trans_b, 1.0, a[r0:r1], b, beta, c[r0:r1])


@njit(**NUMBA_OPTIONS)
def batched_sgemm(trans_b, a, b, beta, c, row_blocks):
    """c[k] = a[k] @ op(b[k]) + beta * c[k] for the 16 k, each split into
    `row_blocks` blocks of rows of c: one single-threaded SGEMM per block."""
    rows = c.shape[1]
    step = (rows + row_blocks - 1) // row_blocks
    for item in prange(c.shape[0] * row_blocks):
        k = item // row_blocks
        r0 = (item % row_blocks) * step
        r1 = min(rows, r0 + step)
        if r0 < r1:
            _sgemm_rows(trans_b, a[k], b[k], beta, c[k], r0, r1)


_input_transform_serial = njit(**SERIAL_OPTIONS)(input_transform.py_func)  # prange as range
_output_transform_serial = njit(**SERIAL_OPTIONS)(output_transform.py_func)
_output_grad_transform_serial = njit(**{**SERIAL_OPTIONS, "fastmath": {"reassoc"}})(
    output_grad_transform.py_func)


@njit(**NUMBA_OPTIONS)
def winograd_pipelined(x, u, bias, ph, pw, th, tw, chunk, v_scratch, m_scratch, y):
    """The forward of `winograd_conv`, one chunk of `chunk` whole samples per
    worker at a time, all three phases on that worker.

    u : (16, O, C) transformed filters; v_scratch, m_scratch : (workers, 16,
    >= stride) per-worker planes, stride >= max(C, O)*chunk*th*tw. Workers take
    chunks from a shared counter, as in the conv kernels.
    """
    n, channels = x.shape[:2]
    channels_out = y.shape[1]
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(v_scratch.shape[0]):
        v_flat = v_scratch[worker]
        m_flat = m_scratch[worker]
        while True:
            _, lo, hi = next_chunk(counter, n, chunk)
            if lo >= n:
                break
            t = (hi - lo) * th * tw
            _input_transform_serial(x[lo:hi], ph, pw, 0, th, tw, v_flat)
            for k in range(16):
                sgemm(False, False, 1.0, u[k], v_flat[k, : channels * t].reshape((channels, t)), 0.0,
                      m_flat[k, : channels_out * t].reshape((channels_out, t)))
            _output_transform_serial(m_flat, bias, 0, th, tw, y[lo:hi])


@njit(**NUMBA_OPTIONS)
def winograd_weight_grad_pipelined(x, dy, ph, pw, th, tw, chunk, v_scratch, m_scratch, du_partial,
                                   dbias_partial):
    """The sums of `winograd_weight_grad`, one chunk of `chunk` whole samples
    per worker at a time, all three phases on that worker: chunk c writes
    du_partial[c] (16, O, C), dU[k] = dM[k] @ V[k].T over its samples, and
    dbias_partial[c] (O,); the caller adds them up in chunk order, so the bits
    do not depend on which worker took which chunk. Scratch as in
    `winograd_pipelined`.
    """
    n, channels = x.shape[:2]
    channels_out = dy.shape[1]
    counter = np.zeros(1, dtype=np.int64)
    for worker in prange(v_scratch.shape[0]):
        v_flat = v_scratch[worker]
        m_flat = m_scratch[worker]
        while True:
            c, lo, hi = next_chunk(counter, n, chunk)
            if lo >= n:
                break
            t = (hi - lo) * th * tw
            _input_transform_serial(x[lo:hi], ph, pw, 0, th, tw, v_flat)
            dbias_partial[c][:] = 0.0
            _output_grad_transform_serial(dy[lo:hi], 0, th, tw, m_flat, dbias_partial[c])
            for k in range(16):
                sgemm(False, True, 1.0, m_flat[k, : channels_out * t].reshape((channels_out, t)),
                      v_flat[k, : channels * t].reshape((channels, t)), 0.0, du_partial[c, k])


# ---------------------------------------------------------------------------
# drivers: chunks of whole samples, three parallel phases each (or pipelined)
# ---------------------------------------------------------------------------


def _chunks(n, th, tw, channels):
    """(lo, hi, a0, a1): samples [lo, hi), tile rows [a0, a1), whose V and M
    (16*channels floats a tile) hold about CHUNK_ELEMENTS values. Whole
    samples while one fits; a larger sample (ImageNet-sized planes) is cut
    into bands of tile rows, at least one row each."""
    per_row = 16 * channels * tw
    rows = max(1, CHUNK_ELEMENTS // per_row)
    if rows < th:
        return [(lo, lo + 1, a0, min(th, a0 + rows)) for lo in range(n) for a0 in range(0, th, rows)]
    samples = max(1, min(n, CHUNK_ELEMENTS // (per_row * th)))
    return [(lo, min(n, lo + samples), 0, th) for lo in range(0, n, samples)]


def _row_blocks():
    """Blocks of rows per SGEMM so that 16 SGEMMs feed every thread."""
    return -(-numba.get_num_threads() // 16)


def _plane_stride(size):
    """Floats from one of the 16 planes to the next: at least `size`, and 64
    bytes past a multiple of 4 KiB - the transforms touch all 16 at once, and
    16 streams 4 KiB-aligned apart would fall into the same cache sets
    (measured 3-5x slower transforms)."""
    return -(-size // 1024) * 1024 + 16


def planes(name, rows, columns):
    """16 matrices (rows, columns) in a shared scratch buffer: (flat, matrices),
    flat (16, >= rows*columns) for the transforms, matrices (16, rows, columns)
    a view of it for the SGEMMs (planes `_plane_stride` apart)."""
    size = rows * columns
    flat = scratch(name, (16, _plane_stride(size)))
    return flat, flat[:, :size].reshape(16, rows, columns)


def _pipeline_chunk(n, channels, channels_out, h_out, w_out):
    """Samples per chunk of the pipelined kernels, or 0 where the layer runs
    the three parallel phases instead (see PIPELINE_MIN_OUTPUTS). From the
    layer shape only, never the thread count: the same bits on any."""
    th, tw = tiles(h_out, w_out)
    per_sample = 16 * (channels + channels_out) * th * tw
    if h_out * w_out < PIPELINE_MIN_OUTPUTS or per_sample > CHUNK_ELEMENTS:
        return 0
    return max(1, min(n, PIPELINE_ELEMENTS // per_sample))


def _pipeline_scratch(n, channels, channels_out, h_out, w_out, chunk):
    """Per-worker V and M planes of the pipelined kernels: (workers, 16, stride) each."""
    th, tw = tiles(h_out, w_out)
    workers = min(numba.get_num_threads(), -(-n // chunk))
    stride = _plane_stride(max(channels, channels_out) * chunk * th * tw)
    return scratch("winograd.v", (workers, 16, stride)), scratch("winograd.m", (workers, 16, stride))


def winograd_conv(x, weight, rotate, bias, padding, y):
    """y (N, O, H_out, W_out) = 3x3 stride-1 conv of x (N, C, H, W) + bias.

    weight : (O, C, 3, 3), or with rotate=True (C, O, 3, 3) used rotated by
    180 degrees with its channel axes swapped (the input gradient's kernel);
    padding (ph, pw) <= 2.
    """
    n, channels = x.shape[:2]
    channels_out, h_out, w_out = y.shape[1:]
    th, tw = tiles(h_out, w_out)
    ph, pw = padding
    u_flat, u = planes("winograd.u", channels_out, channels)
    filter_transform(weight, rotate, u_flat)
    chunk = _pipeline_chunk(n, channels, channels_out, h_out, w_out)
    if chunk:
        v, m = _pipeline_scratch(n, channels, channels_out, h_out, w_out, chunk)
        with single_threaded_blas():
            winograd_pipelined(x, u, bias, ph, pw, th, tw, chunk, v, m, y)
        return
    with single_threaded_blas():
        for lo, hi, a0, a1 in _chunks(n, th, tw, channels + channels_out):
            t = (hi - lo) * (a1 - a0) * tw
            v_flat, v = planes("winograd.v", channels, t)
            m_flat, m = planes("winograd.m", channels_out, t)
            input_transform(x[lo:hi], ph, pw, a0, a1, tw, v_flat)
            batched_sgemm(False, u, v, 0.0, m, _row_blocks())
            output_transform(m_flat, bias, a0, a1, tw, y[lo:hi])


def winograd_weight_grad(x, dy, padding, weight_grad, bias_grad):
    """weight_grad (O, C, 3, 3) += dw and bias_grad (O,) += db of `winograd_conv`."""
    n, channels = x.shape[:2]
    channels_out, h_out, w_out = dy.shape[1:]
    th, tw = tiles(h_out, w_out)
    ph, pw = padding
    chunk = _pipeline_chunk(n, channels, channels_out, h_out, w_out)
    n_chunks = -(-n // chunk) if chunk else 0
    if chunk and n_chunks * channels_out * channels <= PIPELINE_PARTIALS * n * channels * th * tw:
        v, m = _pipeline_scratch(n, channels, channels_out, h_out, w_out, chunk)
        du_partial = scratch("winograd.du", (n_chunks, 16, channels_out, channels))
        dbias_partial = scratch("winograd.dbias", (n_chunks, channels_out))
        with single_threaded_blas():
            winograd_weight_grad_pipelined(x, dy, ph, pw, th, tw, chunk, v, m, du_partial,
                                           dbias_partial)
        du = np.zeros((16, channels_out * channels), dtype=np.float32)
        add_partials(du, du_partial)  # in chunk order: the same bits run to run
        add_partials(bias_grad, dbias_partial)
        weight_grad_transform(du, weight_grad)
        return
    du_flat, du = planes("winograd.u", channels_out, channels)
    with single_threaded_blas():
        for index, (lo, hi, a0, a1) in enumerate(_chunks(n, th, tw, channels + channels_out)):
            t = (hi - lo) * (a1 - a0) * tw
            v_flat, v = planes("winograd.v", channels, t)
            dm_flat, dm = planes("winograd.m", channels_out, t)
            input_transform(x[lo:hi], ph, pw, a0, a1, tw, v_flat)
            output_grad_transform(dy[lo:hi], a0, a1, tw, dm_flat, bias_grad)
            batched_sgemm(True, dm, v, 0.0 if index == 0 else 1.0, du, _row_blocks())
    weight_grad_transform(du_flat, weight_grad)
