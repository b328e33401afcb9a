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
   numpy's file writes, zlib's CRC and fsync release the GIL.
2. At most one write in flight: `submit` first waits for the previous one, so
   checkpoints land in order and memory holds at most two snapshots.
3. A failed write is never silent: its exception is raised on the training
   thread by the next `submit`, `wait` or `close`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping

import numpy as np

from cnn.checkpoint import save_checkpoint

__all__ = ["AsyncCheckpointWriter", "snapshot"]


def snapshot(tree):
    """A deep copy of nested dicts/lists/tuples whose arrays are copied."""
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, Mapping):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(snapshot(v) for v in tree)
    return tree


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

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.written = 0
        self.snapshot_s = 0.0
        self.write_s = 0.0

    def submit(self, path: str | os.PathLike, params: Mapping[str, np.ndarray],
               **kwargs) -> None:
        """Snapshot now, write in the background; arguments as `save_checkpoint`.

        Raises
        ------
        Exception
            Whatever the previous background write raised.
        """
        self.wait()
        start = time.perf_counter()
        params, kwargs = snapshot(dict(params)), snapshot(kwargs)
        self.snapshot_s += time.perf_counter() - start
        self._thread = threading.Thread(target=self._write, args=(path, params, kwargs),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, path, params, kwargs) -> None:
        start = time.perf_counter()
        try:
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
