"""SGEMM on the calling thread from numba kernels, and work sharing between
numba's threads: the plumbing under the conv kernels (conv.py, winograd.py).

numba cannot call numpy's BLAS from a kernel by itself; numpy's bundled
OpenBLAS exports ``cblas_sgemm`` under a prefixed name, which is registered
with LLVM here and declared as an external function. Inside a ``prange``
region every numba thread then runs its own single-threaded SGEMM while
OpenBLAS's pool stays parked (`single_threaded_blas`).
"""

import ctypes

import numba
import numpy as np
import threadpoolctl
from llvmlite import binding as llvm
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from .base import NUMBA_OPTIONS


def _numpy_openblas():
    """numpy's bundled OpenBLAS (ILP64, ``scipy_`` prefix and ``64_`` suffix)."""
    for info in threadpoolctl.threadpool_info():
        if info.get("internal_api") == "openblas":
            lib = ctypes.CDLL(info["filepath"])
            if hasattr(lib, "scipy_cblas_sgemm64_"):
                return lib
    raise ImportError("cnn.layers needs numpy's bundled OpenBLAS (scipy_cblas_sgemm64_)")


_openblas = _numpy_openblas()
_openblas.scipy_openblas_get_num_threads64_.restype = ctypes.c_int
_openblas.scipy_openblas_set_num_threads64_.argtypes = [ctypes.c_int]
# Compiled kernels name the symbol, not its address, so numba's on-disk cache
# stays valid across processes; the address is registered at every import.
llvm.add_symbol("scipy_cblas_sgemm64_",
                ctypes.cast(_openblas.scipy_cblas_sgemm64_, ctypes.c_void_p).value)
_float_pointer = types.CPointer(types.float32)
# cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
_cblas_sgemm = types.ExternalFunction("scipy_cblas_sgemm64_", types.void(
    types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
    types.float32, _float_pointer, types.int64, _float_pointer, types.int64,
    types.float32, _float_pointer, types.int64))
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

# Kernels called from inside a parallel region: serial themselves.
SERIAL_OPTIONS = {**NUMBA_OPTIONS, "parallel": False}
# Serial kernels with a float32 sum: "reassoc" lets LLVM keep a vector of
# partial sums (see cnn/layers/batchnorm.py); the order is fixed at compile time.
REDUCTION_OPTIONS = {**SERIAL_OPTIONS, "fastmath": {"reassoc"}}


@intrinsic
def _data_pointer(typingctx, array):
    """Address of array's first element, as float32*."""
    def codegen(context, builder, signature, args):
        return make_array(signature.args[0])(context, builder, value=args[0]).data
    return types.CPointer(array.dtype)(array), codegen


@njit(**SERIAL_OPTIONS)
def _leading(a):
    """Row stride of a in elements, as BLAS wants it: at least the row length
    (numpy gives a single row any stride)."""
    return max(1, a.shape[1], a.strides[0] // 4) if a.shape[0] <= 1 else a.strides[0] // 4


@njit(**SERIAL_OPTIONS)
def sgemm(trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha * op(a) @ op(b) + beta * c, op = transpose where asked.

    a, b, c : 2-D float32 with contiguous rows (row stride free: the leading
    dimension). Runs on the calling thread as long as OpenBLAS is limited to
    one thread (see `single_threaded_blas`).
    """
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    _cblas_sgemm(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
                 m, n, k, np.float32(alpha), _data_pointer(a), _leading(a),
                 _data_pointer(b), _leading(b), np.float32(beta), _data_pointer(c),
                 _leading(c))


class single_threaded_blas:
    """Limit OpenBLAS to one thread inside the block: its own pool must stay
    parked while numba's threads call it. Cheaper than threadpoolctl per call."""

    def __enter__(self):
        self.saved = _openblas.scipy_openblas_get_num_threads64_()
        if self.saved != 1:
            _openblas.scipy_openblas_set_num_threads64_(1)

    def __exit__(self, *exc):
        if self.saved != 1:
            _openblas.scipy_openblas_set_num_threads64_(self.saved)


@intrinsic
def take_chunk(typingctx, counter):
    """Atomically counter[0] += 1 and return the old value: the next chunk to do."""
    def codegen(context, builder, signature, args):
        data = make_array(signature.args[0])(context, builder, value=args[0]).data
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", data, one, "monotonic")
    return types.int64(counter), codegen


@njit(**SERIAL_OPTIONS)
def next_chunk(counter, n, chunk):
    """(c, lo, hi): the next chunk c from the shared counter (`take_chunk`),
    samples [lo, hi) of n in chunks of `chunk`; lo >= n when none is left."""
    c = take_chunk(counter)
    lo = c * chunk
    return c, lo, min(n, lo + chunk)


@njit(**NUMBA_OPTIONS)
def _split_sgemm(trans_a, trans_b, a, b, beta, c, by_rows, block):
    """c = op(a) @ op(b) + beta * c, c's rows (by_rows) or columns cut into
    blocks of `block`, one single-threaded SGEMM per block on numba's threads."""
    extent = c.shape[0] if by_rows else c.shape[1]
    for index in prange((extent + block - 1) // block):
        lo = index * block
        hi = min(extent, lo + block)
        if by_rows:
            if trans_a:
                sgemm(True, trans_b, 1.0, a[:, lo:hi], b, beta, c[lo:hi])
            else:
                sgemm(False, trans_b, 1.0, a[lo:hi], b, beta, c[lo:hi])
        elif trans_b:
            sgemm(trans_a, True, 1.0, a, b[lo:hi], beta, c[:, lo:hi])
        else:
            sgemm(trans_a, False, 1.0, a, b[:, lo:hi], beta, c[:, lo:hi])


def _as_operand(x):
    """(matrix with unit-stride rows, transposed?) for a 2-D float32 operand."""
    if x.strides[1] == x.itemsize:
        return x, False
    if x.strides[0] == x.itemsize:
        return x.T, True
    return np.ascontiguousarray(x), False


def matmul(a, b, out=None, accumulate=False):
    """out = a @ b (or out += a @ b), float32, on numba's threads.

    a : (M, K), b : (K, N), either may be a transposed view (``w.T``); out :
    (M, N) with unit-stride rows, allocated when None. The larger of M and N is
    cut into one block per thread, each block one single-threaded SGEMM. Used
    instead of numpy's matmul inside a training step: numpy hands the product
    to OpenBLAS's own thread pool, whose workers then spin for a while and
    take cores from the numba kernels that run next (measured on 2 cores:
    VGG's 512-channel conv backward after the classifier took 2x as long).
    """
    a_rows, trans_a = _as_operand(a)
    b_rows, trans_b = _as_operand(b)
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
        accumulate = False
    by_rows = m >= n
    extent = m if by_rows else n
    threads = numba.get_num_threads()
    block = max(16, -(-extent // threads))
    with single_threaded_blas():
        _split_sgemm(trans_a, trans_b, a_rows, b_rows, 1.0 if accumulate else 0.0, out,
                     by_rows, block)
    return out


def _add_partials(total, partials):
    """total += partials[0] + partials[1] + ..., in that order for every element."""
    flat_total = total.reshape(-1)
    size = flat_total.size
    block = 4096
    for start in prange((size + block - 1) // block):
        lo = start * block
        hi = min(size, lo + block)
        for g in range(partials.shape[0]):
            part = partials[g].reshape(-1)
            for k in range(lo, hi):
                flat_total[k] += part[k]


_add_partials_parallel = njit(**NUMBA_OPTIONS)(_add_partials)
_add_partials_serial = njit(**SERIAL_OPTIONS)(_add_partials)  # prange runs as range

#: Below this many partial elements `add_partials` stays on the calling thread:
#: a parallel region's start and end cost more than the sums (resnet20's
#: weight gradients, up to 9*64*64 per partial; ~16 regions per step).
SERIAL_PARTIALS = 1 << 17


def add_partials(total, partials):
    """total += partials[0] + partials[1] + ..., in that order for every element
    (the same bits whichever way it runs)."""
    if partials.size <= SERIAL_PARTIALS:
        _add_partials_serial(total, partials)
    else:
        _add_partials_parallel(total, partials)
