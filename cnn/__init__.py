"""A small CNN framework on numpy + numba: leaf layers, losses, models.

`cnn` knows nothing of MPI; docs/cnn_contract.md lists what engine/ relies on.
"""

import numba
import threadpoolctl

from . import layers, losses
from .runtime import configure

__all__ = ["configure", "layers", "losses", "set_num_threads"]



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
