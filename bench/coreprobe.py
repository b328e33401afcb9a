"""Do two threads of this process slow each other down right now? A probe
for shared machines.

    python -m bench.coreprobe [--value]
    python -m bench.coreprobe --kernels [SAMPLES]

`two_thread_slowdown()` times 200 single-threaded SGEMMs of 16x16 @ 16x1088
(the tap product of resnet20's 16-channel convolutions, operands in L2) on one
thread alone, then on two threads at once, each on its own operands, and
returns the ratio of the two times: about 1.1 when the two threads have two
cores to themselves.

Why it exists: on the 2-vCPU VM where bench/results/ was measured, that ratio
switches every few seconds between about 1.1 and 3. bench/cnn_throughput.py
runs the probe before each round and records it beside the round's
images/s, so that a round can be read against the machine it got.

``--kernels`` prints, SAMPLES times (default 60), the same ratio for the SGEMM
probe and for three numba loops, each thread on its own arrays: an axpy over
L1-resident arrays (two loads and a store per element: bound by the core's
throughput), a dot product over the same arrays (bound by the latency of
its additions) and an axpy over L2-sized arrays (bound by L2 bandwidth). In
the slow spells of that VM (bench/results/coreprobe_kernels.txt, 5th-95th
percentiles of 360 samples): SGEMM 2.5-2.8x, L1 axpy 1.6-1.9x, L1 dot
1.00-1.03x, L2 axpy 1.02-1.13x. Only throughput-bound work slows, by about
half per thread: what two hyperthreads of one physical core would show. It
is the host's scheduling, not this process (transparent huge pages, the
allocator, thread pinning and spin-waits were ruled out).
"""

import time

import numba
import numpy as np
from numba import njit, prange

from cnn.layers.blas import sgemm, single_threaded_blas

#: SGEMMs per timing: ~0.5 ms on one thread.
CALLS = 200


@njit(parallel=True, nogil=True, cache=True)
def _products(a, b, c, calls, workers):
    """c[w] += a[w] @ b[w], `calls` times, on `workers` threads."""
    for w in prange(workers):
        for _ in range(calls):
            sgemm(False, False, 1.0, a[w], b[w], 1.0, c[w])


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _axpy(x, y, repeats, workers):
    """y[w] += 1.0001 * x[w], `repeats` times, on `workers` threads."""
    for w in prange(workers):
        xs, ys = x[w], y[w]
        for _ in range(repeats):
            for i in range(xs.size):
                ys[i] = np.float32(1.0001) * xs[i] + ys[i]


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _dot(x, y, repeats, workers):
    """x[w] . y[w], `repeats` times, on `workers` threads."""
    out = np.zeros(workers, dtype=np.float32)
    for w in prange(workers):
        xs, ys = x[w], y[w]
        total = np.float32(0.0)
        for _ in range(repeats):
            for i in range(xs.size):
                total += xs[i] * ys[i]
        out[w] = total
    return out


def _slowdown(run, repeats):
    """run(workers) timed on 2 workers / on 1 (best of `repeats` each)."""
    best = []
    for workers in (1, 2):
        run(workers)  # compiled and warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(workers)
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return best[1] / best[0]


def _rows(length):
    """Two contiguous float32 rows of `length` (+ 64: the two threads'
    operands share no cache line). A C-contiguous array, so that numba
    vectorizes the loops over its rows (a sliced one it would not)."""
    return np.ones((2, length + 64), dtype=np.float32)


def two_thread_slowdown(repeats=3):
    """Time on two threads at once / time on one thread (best of `repeats`);
    None when numba has fewer than two threads."""
    if numba.get_num_threads() < 2:
        return None
    a = np.ones((2, 16, 80), dtype=np.float32)[:, :, :16]
    b = np.ones((2, 16, 1152), dtype=np.float32)[:, :, :1088]
    c = np.zeros((2, 16, 1152), dtype=np.float32)[:, :, :1088]
    with single_threaded_blas():
        return _slowdown(lambda workers: _products(a, b, c, CALLS, workers), repeats)


def kernel_slowdowns(repeats=3):
    """{name: two-thread slowdown} for the SGEMM probe and the three loops
    of ``--kernels``; None with fewer than two threads."""
    if numba.get_num_threads() < 2:
        return None
    x1, y1 = _rows(4096), _rows(4096)  # 16 KB each: L1
    x2, y2 = _rows(65536), _rows(65536)  # 256 KB each: L2
    return {"sgemm": two_thread_slowdown(repeats),
            "axpy_l1": _slowdown(lambda w: _axpy(x1, y1, 400, w), repeats),
            "dot_l1": _slowdown(lambda w: _dot(x1, y1, 400, w), repeats),
            "axpy_l2": _slowdown(lambda w: _axpy(x2, y2, 25, w), repeats)}


if __name__ == "__main__":
    import sys

    import cnn
    from cnn.runtime import configure

    configure(progress_thread=False)    # as the throughput benchmark's process
    cnn.set_num_threads(2)
    args = sys.argv[1:]
    if "--kernels" in args:
        at = args.index("--kernels") + 1
        samples = int(args[at]) if at < len(args) else 60
        for index in range(samples):
            ratios = kernel_slowdowns()
            if ratios is None:
                sys.exit("fewer than 2 threads available")
            if index == 0:
                print(" ".join(f"{name:>8}" for name in ratios))
            print(" ".join(f"{value:8.2f}" for value in ratios.values()), flush=True)
        sys.exit(0)
    ratio = two_thread_slowdown()
    if "--value" in args:  # machine-readable: the ratio, or "null"
        print("null" if ratio is None else f"{ratio:.3f}")
    else:
        print("fewer than 2 threads available" if ratio is None
              else f"two threads at once take {ratio:.2f}x as long as one alone "
                   "(~1.1: two cores of their own)")
