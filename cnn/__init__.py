"""A small CNN framework on numpy + numba: leaf layers, losses, models.

`cnn` knows nothing of MPI; docs/cnn_contract.md lists what engine/ relies on.
"""

import os

# numba's OpenMP workers spin-wait after each parallel region by default and
# starve whatever runs next on the same cores: the communication thread, and
# any other thread pool. Measured when conv SGEMMs still ran on OpenBLAS's own
# pool: resnet20 batch 64 on 2 threads took 3-16 s per step with spinning
# workers, 0.2-0.26 s without. (All SGEMMs now run on numba's workers, see
# cnn/layers/blas.py, but the communication thread still needs the cores.)
# Set before numba starts OpenMP; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import threadpoolctl  # noqa: E402

from . import layers, losses

__all__ = ["layers", "losses", "set_num_threads"]

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
