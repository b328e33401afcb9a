"""A small CNN framework on numpy + numba: leaf layers, losses, models.

`cnn` knows nothing of MPI; docs/cnn_contract.md lists what engine/ relies on.
"""

import ctypes
import os
import sys

# How numba's OpenMP workers wait between parallel regions. Left to libgomp's
# default they spin for ~300,000 iterations (~14 ms here) after every region
# and starve whatever else needs the cores (measured when conv SGEMMs still ran
# on OpenBLAS's own pool: resnet20 batch 64 on 2 threads took 3-16 s per step,
# 0.2-0.26 s without spinning). Fully passive, every region pays a futex wake-up
# and a sleep: resnet20's ~190 regions per step cost 8.0-8.6 ms at batch 2 on
# 2 threads, against 4.9 ms on 1 thread. So: PASSIVE (for any OpenMP runtime),
# and GNU libgomp spins GOMP_SPINCOUNT = 30,000 iterations (~1.4 ms of one
# core measured here) before it sleeps: batch 2 then took 3.5-4.8 ms, and
# libgomp cuts the spin to 1,000 when it has more threads than CPUs.
# engine/ asks for no spin at all: its progress thread needs the cores between
# kernels (engine/__init__.py, imported before this module when training).
# Set before numba starts OpenMP; an explicit setting by the user wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "30000"


import numba  # noqa: E402
import threadpoolctl  # noqa: E402

from . import layers, losses

__all__ = ["layers", "losses", "set_num_threads"]


def _keep_freed_heap():
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS.

    A training step allocates and frees the same activation-sized arrays every
    iteration. By default glibc gives the top of the heap back (trim) and
    maps large blocks afresh, so every step pays a few thousand page faults
    to get them back: measured 2,000-4,000 minor faults per resnet20 step
    (batch 64), 0-7 % of its time in A/B runs, and none with these settings. Peak memory
    is unchanged; the process just stays at its high-water mark, as a caching
    allocator would. Blocks over 32 MiB (glibc's largest dynamic threshold)
    are still mapped per allocation. Skipped off glibc, and when the user
    tunes malloc (``GLIBC_TUNABLES`` or ``MALLOC_*``) themselves.
    """
    if (not sys.platform.startswith("linux") or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(key.startswith("MALLOC_") for key in os.environ)):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_keep_freed_heap()

# Kept alive so the BLAS limit stays in force; replaced on every call.
_blas_limits = None


def set_num_threads(n):
    """Use `n` threads for numba kernels and for BLAS (SGEMM) in this process.

    Numba's count is capped at ``numba.config.NUMBA_NUM_THREADS`` (the pool size
    fixed at import time) and, as numba defines it, applies to the calling thread.

    Parameters
    ----------
    n : int
        Number of threads, at least 1.
    """
    global _blas_limits
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if _blas_limits is not None:
        _blas_limits.restore_original_limits()
    _blas_limits = threadpoolctl.threadpool_limits(limits=n, user_api="blas")
