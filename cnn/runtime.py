"""The process's runtime configuration, set once by every entry point.

    from cnn.runtime import configure
    configure(progress_thread=True)     # first thing in main(), before any kernel

Two settings: how numba's OpenMP workers wait between parallel regions
(libgomp reads it once, when numba starts its workers), and glibc's malloc
keeping freed memory. Nothing is set at import, so the order in which `cnn`
and `engine` are imported does not matter; the entry point says what the
process is. Measurements behind the
two settings: docs/performance.md ("OpenMP wait policy").
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Compute alone: a bounded spin (~1.4 ms of one core), then sleep. Passive
#: waits alone made every parallel region pay a futex wake-up; libgomp's
#: default spin (~14 ms) starves anything else that needs the cores.
COMPUTE_ONLY = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"}

#: Beside the engine's progress thread: workers sleep at once, so the thread
#: gets a core between kernels.
WITH_PROGRESS_THREAD = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}

_KEYS = tuple(COMPUTE_ONLY)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def _openmp_started() -> bool:
    try:
        from numba.np.ufunc import parallel
    except ImportError:         # pragma: no cover - numba is a dependency
        return False
    return bool(getattr(parallel, "_is_initialized", False))


def _keep_freed_heap():
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS.

    A training step allocates and frees the same activation-sized arrays every
    iteration; by default glibc gives the top of the heap back and maps large
    blocks afresh, so every step pays page faults to get them back
    (docs/performance.md, "malloc"). Peak memory is unchanged: the process
    stays at its high-water mark, as a caching allocator would. Blocks over
    32 MiB (glibc's largest dynamic threshold) are still mapped per
    allocation. Skipped off glibc, and when the user tunes malloc
    (``GLIBC_TUNABLES`` or ``MALLOC_*``) themselves.
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


_heap_kept = False
_set_here: dict | None = None      # what configure() put in the environment


def configure(*, progress_thread: bool) -> dict:
    """Set the OpenMP wait policy (and the malloc tuning); returns the policy in force.

    Parameters
    ----------
    progress_thread : bool
        True where an engine progress thread shares the cores with the
        compute (training, the engine's benchmarks); False for compute alone.

    An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` that was in the environment
    before the first call wins (the user's choice, or a parent process's):
    then nothing is changed. Calling it again with the same argument is
    harmless.

    Raises
    ------
    RuntimeError
        if numba's workers already run with other settings: they read them
        once, so configure() must come before the first parallel kernel.
    """
    global _set_here, _heap_kept
    if not _heap_kept:
        _keep_freed_heap()
        _heap_kept = True
    wanted = WITH_PROGRESS_THREAD if progress_thread else COMPUTE_ONLY
    user_choice = _set_here is None and any(k in os.environ for k in _KEYS)
    if not user_choice and _set_here != wanted:
        if _openmp_started():
            raise RuntimeError(
                f"cnn.runtime.configure(progress_thread={progress_thread}) came after numba "
                "started its OpenMP workers, which read the wait policy once; call it at the "
                "start of the program, before any parallel kernel runs")
        os.environ.update(wanted)
        _set_here = wanted
    return {k: os.environ.get(k) for k in _KEYS}
