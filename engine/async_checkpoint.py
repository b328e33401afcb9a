"""Checkpoints written in the background while training continues.

    writer = AsyncCheckpointWriter()
    writer.submit(path, params, buffers=..., optimizer=..., iteration=it)   # copies, returns
    ...                                                                      # training goes on
    writer.close()                                                           # the last write done

`submit` takes a snapshot (a copy of every array, so the next updates cannot
leak into the file) and hands it to one background thread, which writes it
with `cnn.checkpoint.save_checkpoint`: a temporary file, fsync, atomic rename.
Killing the process mid-write therefore leaves the previous checkpoint intact
and loadable, exactly as with synchronous saving.

Design constraints:

1. The training thread pays only for the copy; the file is written while the
   next iterations compute (the gaps between weight updates, Li et al. SC19).
   File writes, zlib's CRC and fsync release the GIL, and the writer thread
   runs at idle priority (`lower_thread_priority`), so on a busy core it
   yields to training instead of taking its share.
2. At most one write in flight: `submit` first waits for the previous one, so
   checkpoints land in order; the snapshot's arrays are reused by the next
   one, so memory holds one snapshot and the copy pays no page faults.
3. A failed write is never silent: its exception is raised on the training
   thread by the next `submit`, `wait` or `close`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from cnn.checkpoint import save_checkpoint

__all__ = ["AsyncCheckpointWriter", "lower_thread_priority", "snapshot"]


def snapshot(tree, reuse=None):
    """A deep copy of nested dicts/lists/tuples whose arrays are copied.

    Arrays are copied into the matching arrays of `reuse` (an earlier
    snapshot of the same structure, no longer in use) where shape and dtype
    agree: fresh 100 MB allocations cost more in page faults than the copy.
    """
    if isinstance(tree, np.ndarray):
        if (isinstance(reuse, np.ndarray) and reuse.shape == tree.shape
                and reuse.dtype == tree.dtype):
            np.copyto(reuse, tree)
            return reuse
        return tree.copy()
    if isinstance(tree, Mapping):
        reuse = reuse if isinstance(reuse, Mapping) else {}
        return {k: snapshot(v, reuse.get(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(tree) \
            else [None] * len(tree)
        return type(tree)(snapshot(v, r) for v, r in zip(tree, reuse, strict=True))
    return tree


def lower_thread_priority() -> str:
    """Make the calling thread run only when a core would otherwise idle.

    SCHED_IDLE where the OS has it (Linux), else the lowest nice value of the
    thread; returns which, or "" if neither could be set. The writer then
    fills the gaps in training (waits for communication, idle cores) instead
    of taking its share of a busy core.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))    # 0: this thread
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        pass
    try:
        # On Linux nice is per thread: the native id names this thread only.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return "nice 19"
    except (AttributeError, OSError):
        return ""


class AsyncCheckpointWriter:
    """Writes `save_checkpoint` snapshots on one background thread.

    Attributes
    ----------
    written : int
        Checkpoints completed so far.
    snapshot_s, write_s : float
        Seconds spent copying (on the caller's thread) and writing (on the
        background thread), summed over all checkpoints.
    """

    def __init__(self, background_priority: bool = True):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: tuple | None = None        # the previous snapshot, reused by the next
        self.background_priority = background_priority
        self.priority = ""
        self.written = 0
        self.snapshot_s = 0.0
        self.write_s = 0.0

    def submit(self, path: str | os.PathLike, params: Mapping[str, np.ndarray], *,
               before: Callable[[], None] | None = None, **kwargs) -> None:
        """Snapshot now, write in the background; arguments as `save_checkpoint`.

        `before`, if given, runs on the background thread first (housekeeping
        such as deleting older files, kept off the training thread); its
        error is reported like the write's.

        Raises
        ------
        Exception
            Whatever the previous background write raised.
        """
        self.wait()
        start = time.perf_counter()
        last_params, last_kwargs = self._last or (None, None)
        params, kwargs = snapshot(dict(params), last_params), snapshot(kwargs, last_kwargs)
        self._last = (params, kwargs)
        self.snapshot_s += time.perf_counter() - start
        self._thread = threading.Thread(target=self._write,
                                        args=(path, params, kwargs, before),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, path, params, kwargs, before) -> None:
        if self.background_priority:
            self.priority = lower_thread_priority()
        start = time.perf_counter()
        try:
            if before is not None:
                before()
            save_checkpoint(path, params, **kwargs)
            self.written += 1
        except BaseException as e:     # handed to the training thread by wait()
            self._error = e
        self.write_s += time.perf_counter() - start

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish the last write (same as `wait`)."""
        self.wait()

    def __enter__(self) -> AsyncCheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
