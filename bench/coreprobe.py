"""Do two threads of this process slow each other down right now? A probe
for shared machines.

    python -m bench.coreprobe [--value]

`two_thread_slowdown()` times 200 single-threaded SGEMMs of 16x16 @ 16x1088
(the tap product of resnet20's 16-channel convolutions, operands in L2) on one
thread alone, then on two threads at once, each on its own operands, and
returns the ratio of the two times: about 1.1 when the two threads have two
cores to themselves.

Why it exists: on the 2-vCPU VM where bench/results/ was measured, that ratio
switches every few seconds between about 1.1 and 3 (the host, not this
process: a 128^3 SGEMM, which works out of registers, slows only 1.00 ->
1.07x in the same spells, and a DRAM-sized stream not at all). In the slow
spells every 2-thread kernel that streams through L1/L2 slows down (resnet20's
16-channel convolutions 1.6x). bench/cnn_throughput.py runs the probe before
each round and records it beside the round's images/s, so that a round can be
read against the machine it got.
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


def two_thread_slowdown(repeats=3):
    """Time on two threads at once / time on one thread (best of `repeats`);
    None when numba has fewer than two threads."""
    if numba.get_num_threads() < 2:
        return None
    # padded rows: the two threads' operands share no cache line
    a = np.ones((2, 16, 80), dtype=np.float32)[:, :, :16]
    b = np.ones((2, 16, 1152), dtype=np.float32)[:, :, :1088]
    c = np.zeros((2, 16, 1152), dtype=np.float32)[:, :, :1088]
    best = []
    with single_threaded_blas():
        for workers in (1, 2):
            _products(a, b, c, 2, workers)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                _products(a, b, c, CALLS, workers)
                times.append(time.perf_counter() - start)
            best.append(min(times))
    return best[1] / best[0]


if __name__ == "__main__":
    import sys

    import cnn

    cnn.set_num_threads(2)
    ratio = two_thread_slowdown()
    if "--value" in sys.argv[1:]:  # machine-readable: the ratio, or "null"
        print("null" if ratio is None else f"{ratio:.3f}")
    else:
        print("fewer than 2 threads available" if ratio is None
              else f"two threads at once take {ratio:.2f}x as long as one alone "
                   "(~1.1: two cores of their own)")
