"""Reading dataset files that users already have on disk, defensively.

Dataset files come from anywhere (half-finished downloads, the wrong file
renamed), so every reader checks the header against the actual amount of data
*before* allocating: a corrupt header claiming 10^12 images must give an error
naming the file, not a MemoryError or a killed process.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

__all__ = ["DatasetError", "open_maybe_gzip", "read_payload"]

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class DatasetError(ValueError):
    """A dataset file exists but is truncated, corrupt or not what it claims to be."""


def open_maybe_gzip(path: str | os.PathLike):
    """Open `path` for binary reading, decompressing if it starts with the gzip magic.

    Returns
    -------
    file : binary file object
    compressed : bool
        Whether the file is gzip; then its length on disk says nothing about
        the length of the data, and `read_payload` reads in chunks instead.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist (the message names it).
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return (gzip.open(path, "rb") if compressed else open(path, "rb")), compressed


def read_payload(f, path: str | os.PathLike, nbytes: int, compressed: bool) -> bytes:
    """Read exactly the `nbytes` of data that follow a parsed header.

    Parameters
    ----------
    f : binary file object
        Positioned just after the header.
    path : path-like
        For error messages.
    nbytes : int
        What the header promises.
    compressed : bool
        Uncompressed files are checked against their size on disk before
        anything is allocated; gzip streams are read in 1 MiB chunks and
        stopped one byte past `nbytes`, so memory never exceeds the data
        actually present.

    Raises
    ------
    DatasetError
        If the data is shorter or longer than the header says, or the gzip
        stream is corrupt.
    """
    path = Path(path)
    if not compressed:
        actual = os.fstat(f.fileno()).st_size - f.tell()
        if actual != nbytes:
            raise DatasetError(f"{path}: header promises {nbytes} bytes of data, "
                               f"the file holds {actual}")
        data = f.read(nbytes)
    else:
        chunks, got = [], 0
        try:
            while got <= nbytes:
                chunk = f.read(min(_CHUNK, nbytes + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt or truncated gzip stream ({e})") from e
        if got != nbytes:
            more = "more than " if got > nbytes else ""
            raise DatasetError(f"{path}: header promises {nbytes} bytes of data, "
                               f"the file holds {more}{min(got, nbytes)}")
        data = b"".join(chunks)
    if len(data) != nbytes:  # the file changed under us
        raise DatasetError(f"{path}: short read ({len(data)} of {nbytes} bytes)")
    return data
