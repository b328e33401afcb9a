"""The gradient exchanger: non-blocking collectives driven by a progress thread.

Enqueue -> progress -> complete, with explicit handles::

    with Exchanger() as ex:          # 1 MiB chunks, credit 4 (DEFAULT_*)
        h = ex.allreduce_async(grad, op="mean", priority=layer_index)
        ...                    # compute; the C thread posts and tests chunks
        h.wait()               # grad now holds the mean over all ranks

The C side (ext/_progress.pyx) owns every MPI call of the engine. This module
checks arguments before anything is posted and turns C-level failures into
Python exceptions; the C-level Request owns its arrays, and the engine holds
every unfinished Request, so buffers live until MPI is done with them.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
import zlib

import numpy as np
from mpi4py import MPI

from engine.stall import StallError, StallWatch
from ext import _progress

__all__ = ["ALGORITHMS", "Exchanger", "Handle", "ExchangeError", "StallError", "partition"]

# Request kinds, states, algorithm codes and limits are the extension's C
# enums (ext/_progress.pxd), imported rather than retyped.
_OPS = ("mean", "sum")
ALGORITHMS = ("auto",) + tuple(_progress.ALGORITHM_CODES)
#: where "auto" reads the link's fitted alpha-beta-gamma unless told otherwise
DEFAULT_NETFIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "bench", "results", "netfit_loopback.json")
_INT_MAX = 2**31 - 1

# Engines (and their communicators, stall responders) abandoned by close()
# while MPI still owned buffers: kept for the life of the process. Their
# requests' arrays the extension keeps itself (_progress._LEAKED).
_ABANDONED: list = []
_LIVE: weakref.WeakSet = weakref.WeakSet()


class ExchangeError(RuntimeError):
    """A collective failed inside the progress thread (carries MPI's error string)."""


def partition(n: int, size: int) -> list[tuple[int, int]]:
    """Split n elements into `size` contiguous slices, the first ones one longer.

    With n = q*size + r, ranks 0..r-1 own q+1 elements and the others q: the
    layout of MPI_Reduce_scatter / MPI_Allgatherv used by the multi-step
    algorithm.

    Returns
    -------
    list of (offset, count), one per rank.
    """
    if n < 0 or size < 1:
        raise ValueError(f"partition needs n >= 0 and size >= 1, got n={n}, size={size}")
    q, r = divmod(n, size)
    out, offset = [], 0
    for rank in range(size):
        count = q + 1 if rank < r else q
        out.append((offset, count))
        offset += count
    return out


def _signature(kind: int, count: int, dtype: np.dtype, op: str, priority: int,
               algorithm: str = "mpi", row: int = 1) -> int:
    """A hash every rank computes alike for the same collective (checked across ranks).

    `row` is the partition's unit in elements (1: flat elements; an all-to-all
    of an (n, m) array partitions rows of m), so that two arrays of the same
    size split differently never pass for the same collective; `algorithm` is
    the allreduce algorithm, which every rank must run alike.
    """
    text = f"{kind}:{count}:{dtype.str}:{op}:{priority}:{algorithm}:{row}".encode()
    return (zlib.crc32(text) << 20) ^ (count & 0xFFFFF)


def _auto_thresholds(network, fixed, comm, chunk_bytes: int):
    """``algorithm="auto"``'s thresholds and, if they could not be found, why.

    Precedence: `fixed` (or $EXCHANGER_AUTO_THRESHOLDS); else the netfit file's
    timed sweep of the algorithms for this P and `chunk_bytes`
    (bench/netfit.py); else the cost model on its fitted network. The file is
    read on rank 0 and the result broadcast, so that every rank holds the same
    thresholds (each rank's own `fixed` is its own: a mismatch fails the
    request on every rank through the signature check). Collective over `comm`.

    Returns
    -------
    (AutoThresholds or None, Exception or None)
    """
    # imported here, not at the top: costmodel imports the strategies, which import us
    from analysis import costmodel as cm
    found = error = None
    if comm.Get_rank() == 0:
        try:
            net = network or os.environ.get("EXCHANGER_NETFIT") or DEFAULT_NETFIT
            if isinstance(net, cm.Network):
                auto = cm.auto_thresholds(net, comm.Get_size())
                found = auto.with_source("cost model from the given Network")
            elif not os.path.exists(net):
                raise FileNotFoundError(
                    f'algorithm="auto" needs the link\'s netfit: {net} does not exist. Run '
                    "bench/netfit.py, or pass network= or auto_thresholds= to the Exchanger")
            else:
                shown = os.path.relpath(net)        # as the user would type it, for printing
                found = cm.netfit_auto_thresholds(net if shown.startswith("..") else shown,
                                                  comm.Get_size(), chunk_bytes)
        except Exception as exc:     # raised on every rank, when "auto" is asked for
            error = exc
    found, error = comm.bcast((found, error), root=0)
    given = "given explicitly" if fixed else "from $EXCHANGER_AUTO_THRESHOLDS"
    fixed = fixed or os.environ.get("EXCHANGER_AUTO_THRESHOLDS")
    if isinstance(fixed, cm.AutoThresholds):
        return fixed, None
    if isinstance(fixed, str):
        auto = cm.AutoThresholds.parse(fixed)
    elif isinstance(fixed, dict):
        auto = cm.AutoThresholds(**fixed)
    elif fixed is not None:
        raise TypeError(f"auto_thresholds must be a str, dict or AutoThresholds, "
                        f"got {type(fixed).__name__}")
    else:
        return found, error
    return auto.with_source(given), None


def _check_array(name: str, a, *, writable: bool) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (got strides {a.strides}); "
                         "pass np.ascontiguousarray(...) and copy the result back")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; the collective writes its result into it")
    return a


def _address_range(a: np.ndarray) -> tuple[int, int]:
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


class Handle:
    """One posted collective: `test()`, `wait(timeout)`, `done`.

    The handle keeps the arrays it was posted with; the engine keeps them too
    until the progress thread has finished with them, so dropping a handle
    (and the arrays) early is safe.
    """

    __slots__ = ("_request", "_exchanger")

    def __init__(self, request, exchanger: Exchanger):
        self._request = request
        self._exchanger = exchanger

    @property
    def done(self) -> bool:
        """True once the collective finished (successfully or not)."""
        return self._request.finished()

    def test(self) -> bool:
        """Non-blocking check; raises ExchangeError if the collective failed."""
        if not self._request.finished():
            return False
        self._raise_if_failed()
        return True

    def wait(self, timeout: float | None = None, *, label: str | None = None) -> None:
        """Block until complete, releasing the GIL while waiting.

        Without a `timeout`, the exchanger's stall watch applies: after
        `stall_warn_s` a line names the ranks holding this request up, and
        after `stall_timeout_s` `StallError` is raised (see engine/stall.py).
        `label` (e.g. "allreduce layer 3") goes into those messages.

        Raises
        ------
        TimeoutError
            after `timeout` seconds, naming what is still pending (for example a
            peer rank that never posted the matching collective).
        StallError
            after the exchanger's `stall_timeout_s`, naming the culprit ranks.
        ExchangeError
            if MPI reported an error for this collective.
        """
        watch = self._exchanger._stall
        if timeout is None and watch is not None:
            what = self._request.description + (f" [{label}]" if label else "")
            watch.wait(self._request.wait, self._request.seq, what)
        elif not self._request.wait(timeout):
            raise TimeoutError(self._pending_message(timeout))
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._request.failed():
            raise ExchangeError(f"{self._request.description}: {self._request.error_message()}")

    def _pending_message(self, timeout) -> str:
        state, done, inflight, posted, total = self._request.progress()
        where = ("not yet enqueued by every rank (a peer has not posted the matching "
                 "collective)" if state == _progress.STATES["queued"] else
                 f"chunks {done}/{total} complete, {inflight} in flight, "
                 f"{total - posted} not yet posted")
        return (f"timed out after {timeout} s waiting for {self._request.description}: {where}; "
                f"{self._exchanger._pending_summary()}")

    def __repr__(self) -> str:
        return f"<Handle {self._request.description} done={self.done}>"


class Exchanger:
    """Non-blocking allreduce / reduce-scatter / allgather / all-to-all through a progress thread.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Defaults to MPI.COMM_WORLD. The exchanger works on a duplicate, so its
        collectives never interfere with the caller's own.
    chunk_bytes : int
        Allreduce buffers are split into chunks of at most this many bytes,
        one MPI_Iallreduce each, so that small urgent requests can overtake a
        large one between chunks. Default `ext._progress.DEFAULT_CHUNK_BYTES`
        (1 MiB), the engine's single source for it.
    min_piece_bytes : int
        Reduce-scatters, allgathers and all-to-alls are chunked along every
        rank's block: chunk c is piece c of each block, chunk_bytes / P bytes
        per block but never fewer than this (rounded down to whole elements;
        0: no minimum), since each chunk pays P - 1 messages' latency. Default
        `ext._progress.DEFAULT_MIN_PIECE_BYTES` (64 KiB). Must be the same on
        every rank, like `chunk_bytes` (checked at construction).
    max_inflight : int
        Most MPI requests outstanding at once (a credit, as in ByteScheduler):
        few enough that priorities still matter, enough to keep the link busy.
        At most `ext._progress.MAX_SLOTS`; default `DEFAULT_MAX_INFLIGHT` (4).
    poll_us : int
        Longest sleep between two polls of MPI while requests are in flight:
        after each event the thread polls again after 1 us, then doubles the
        sleep up to poll_us (its backoff, like Horovod's cycle time). Default
        `DEFAULT_POLL_US` (200).
    pin_cpu : int or None
        Pin the progress thread to this core (PCNN pins its thread); off by default.
    trace : bool
        Record every chunk's post and completion time (see `drain_trace`).
    close_timeout : float
        How long `close()` lets pending requests finish before failing them.
    slice_us : int
        Ask the kernel (Linux >= 6.12, EEVDF) for this scheduler slice for the
        progress thread, so that it preempts busy compute threads sooner when
        it wakes; 0 keeps the default. Ignored where unsupported.
    nice : int
        Nice value for the progress thread (negative values need privileges);
        0 leaves it unchanged.
    algorithm : {"mpi", "recursive_doubling", "ring", "auto"}
        How allreduce chunks run by default (``allreduce_async`` may override
        it per call): MPI_Iallreduce, where MPI picks its own algorithm; the
        progress thread's recursive doubling (latency-optimised, lg P
        messages) or ring (bandwidth-optimised, 2 (P-1) messages of 1/P of
        the chunk); or ``"auto"``, which picks one per request from the bytes
        of its chunk (see docs/allreduce_algorithms.md).
    network : str or costmodel.Network, optional
        ``"auto"`` only: the link's bench/netfit.py JSON file (its timed sweep
        of the algorithms for this P and `chunk_bytes` if it has one, else its
        fitted alpha-beta-gamma) or a Network. Default: $EXCHANGER_NETFIT,
        else bench/results/netfit_loopback.json. Read on rank 0.
    auto_thresholds : str, dict or costmodel.AutoThresholds, optional
        ``"auto"`` only: fixed thresholds instead of the ones from `network`,
        e.g. ``"recursive_doubling_below=65536,ring_from=inf"`` (also read from
        $EXCHANGER_AUTO_THRESHOLDS). See `auto`.
    stall_warn_s : float or None
        A `wait()` without timeout that lasts this long prints one line naming
        the ranks that have not posted the request, or do not answer at all
        (engine/stall.py), and again every as many seconds. None disables
        stall detection (and its responder thread).
    stall_timeout_s : float or None
        Such a wait raises `StallError` with that diagnosis after this many
        seconds; None (the default) waits forever.
    """

    def __init__(self, comm=None, *, chunk_bytes: int = _progress.DEFAULT_CHUNK_BYTES,
                 min_piece_bytes: int = _progress.DEFAULT_MIN_PIECE_BYTES,
                 max_inflight: int = _progress.DEFAULT_MAX_INFLIGHT,
                 poll_us: int = _progress.DEFAULT_POLL_US, pin_cpu: int | None = None,
                 trace: bool = False, close_timeout: float = 30.0, slice_us: int = 0, nice: int = 0,
                 algorithm: str = "mpi", network=None, auto_thresholds=None,
                 stall_warn_s: float | None = 60.0, stall_timeout_s: float | None = None):
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "MPI was initialised below MPI_THREAD_MULTIPLE "
                f"(level {MPI.Query_thread()}); the Exchanger's progress thread calls MPI "
                "while Python does too. Import mpi4py.MPI with its default "
                "(mpi4py.rc.thread_level = 'multiple') and use an MPI built with thread support.")
        if int(chunk_bytes) < 8:
            raise ValueError(f"chunk_bytes must be at least 8, got {chunk_bytes}")
        if int(chunk_bytes) // 4 > _INT_MAX:
            raise ValueError(f"chunk_bytes {chunk_bytes} exceeds MPI's int element count")
        if not 0 <= int(min_piece_bytes) <= 4 * _INT_MAX:
            raise ValueError(f"min_piece_bytes must be in [0, {4 * _INT_MAX}] (0: no minimum), "
                             f"got {min_piece_bytes}")
        if not 1 <= int(max_inflight) <= _progress.MAX_SLOTS:
            raise ValueError(f"max_inflight must be in [1, {_progress.MAX_SLOTS}], "
                             f"got {max_inflight}")
        if int(poll_us) < 0:
            raise ValueError(f"poll_us must be >= 0, got {poll_us}")
        if stall_warn_s is not None and not float(stall_warn_s) > 0:
            raise ValueError(f"stall_warn_s must be > 0 or None, got {stall_warn_s}")
        if stall_timeout_s is not None and not float(stall_timeout_s) > 0:
            raise ValueError(f"stall_timeout_s must be > 0 or None, got {stall_timeout_s}")
        base = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(base, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got {type(base).__name__}")
        self.algorithm = self._check_algorithm(algorithm)
        # chunking must agree, or ranks would post different numbers of chunks and hang
        chunking = base.allgather((int(chunk_bytes), int(min_piece_bytes)))
        if len(set(chunking)) > 1:
            raise ValueError("chunk_bytes and min_piece_bytes must be the same on every rank; "
                             "(chunk_bytes, min_piece_bytes) by rank: " + ", ".join(
                                 f"{r}: {c}" for r, c in enumerate(chunking)))
        # "auto"'s thresholds, found now (collectively) even if only a later call asks for
        # them; an error is raised then, or now if the exchanger's own algorithm is "auto"
        self._auto, self._auto_error = _auto_thresholds(network, auto_thresholds, base,
                                                        int(chunk_bytes))
        if self.algorithm == "auto" and self._auto_error is not None:
            raise self._auto_error
        self._comm = base.Dup()
        self._comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.size = self._comm.Get_size()
        self.rank = self._comm.Get_rank()
        self.chunk_bytes = int(chunk_bytes)
        self.min_piece_bytes = int(min_piece_bytes)
        self.max_inflight = int(max_inflight)
        self.poll_us = int(poll_us)
        self.close_timeout = float(close_timeout)
        self._partition_cache: dict[int, list[tuple[int, int]]] = {}
        self._auto_choices: dict[int, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._engine = _progress.Engine(self._comm, self.chunk_bytes, self.max_inflight,
                                        self.poll_us, -1 if pin_cpu is None else int(pin_cpu),
                                        bool(trace), int(slice_us), int(nice),
                                        self.min_piece_bytes)
        self._stall = None
        if stall_warn_s is not None or stall_timeout_s is not None:
            try:
                self._stall = StallWatch(self._engine, self._comm,
                                         stall_warn_s if stall_warn_s is not None else
                                         stall_timeout_s, stall_timeout_s)
            except BaseException:
                self._engine.close(self.close_timeout)     # nothing enqueued: exits at once
                raise
        _LIVE.add(self)

    # -- context manager ------------------------------------------------------
    def __enter__(self) -> Exchanger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- public API -------------------------------------------------------------
    def partition(self, n: int) -> list[tuple[int, int]]:
        """`engine.partition(n, self.size)`, cached."""
        p = self._partition_cache.get(n)
        if p is None:
            p = self._partition_cache[n] = partition(n, self.size)
        return p

    def allreduce_async(self, array: np.ndarray, *, op: str = "mean", priority: int = 0,
                        algorithm: str | None = None) -> Handle:
        """Average (or sum) `array` over all ranks, in place, in chunks of `chunk_bytes`.

        Parameters
        ----------
        array : ndarray of any shape, float32 or float64, C-contiguous, writable
        op : {"mean", "sum"}
        priority : int
            Lower values are posted first; equal priorities keep posting order.
        algorithm : {"mpi", "recursive_doubling", "ring", "auto"}, optional
            This request's algorithm; default the exchanger's. Every rank must
            pass the same (else the request fails on every rank).
        """
        _check_array("array", array, writable=True)
        self._check_op(op)
        algorithm = self.algorithm_for(array.nbytes, algorithm)
        return self._post("allreduce", array, None, array.size, op, priority, (array,),
                          algorithm=algorithm)

    def algorithm_for(self, nbytes: int, algorithm: str | None = None) -> str:
        """The algorithm an allreduce of `nbytes` bytes runs with: `algorithm` (default
        the exchanger's), "auto" resolved by the bytes of the whole request (every
        chunk of it runs the same algorithm). One rank has nothing to exchange:
        always "mpi"."""
        algorithm = self.algorithm if algorithm is None else self._check_algorithm(algorithm)
        if self.size == 1:
            return "mpi"
        if algorithm == "auto":
            # by the request, not its chunk: a 16 MiB request is 4 chunks in flight
            # at once, where the ring can win although a lone 4 MiB chunk would not
            chosen = self._auto_choices.get(nbytes)
            if chosen is None:
                # cached per size: at 4 KiB the lookup through the bands cost 5 % of the op
                chosen = self._auto_choices[nbytes] = self.auto.choose(nbytes)
            return chosen
        return algorithm

    @property
    def auto(self):
        """The thresholds ``algorithm="auto"`` uses (a costmodel.AutoThresholds; print it).

        `auto_thresholds` (or $EXCHANGER_AUTO_THRESHOLDS) if given; else the timed
        sweep of the algorithms in `network`'s netfit file for this
        communicator's size and `chunk_bytes`; else the cost model on its
        fitted alpha-beta-gamma. ``str()`` says which (its ``source``).
        """
        if self._auto_error is not None:
            raise self._auto_error
        return self._auto

    def reduce_scatter_async(self, array: np.ndarray, out: np.ndarray, *, op: str = "mean",
                             priority: int = 0, rows: bool = False) -> Handle:
        """Each rank receives the reduced slice it owns under `partition(array.size, P)`.

        Parameters
        ----------
        array : ndarray of n elements (any shape), float32 or float64, C-contiguous
            Read only; must not change until the handle completes.
        out : ndarray of partition(n, P)[rank].count elements, same dtype
        rows : bool
            Partition the first axis of `array` (shape (m, *rest)) instead of
            its flat elements: rank r owns rows ``partition(m, P)[r]`` and
            `out` holds count x prod(rest) elements.
        """
        _check_array("array", array, writable=False)
        _check_array("out", out, writable=True)
        self._check_op(op)
        self._check_same_dtype(array, out)
        counts, row = self._blocks(array, rows)
        offset, count = sum(counts[:self.rank]), counts[self.rank]
        if out.size != count:
            raise ValueError(f"out has {out.size} elements but rank {self.rank} owns {count} "
                             f"of {array.size} (slice [{offset}, {offset + count}))")
        return self._post("reduce_scatter", array, out, array.size, op, priority, (array, out),
                          counts=counts, row=row)

    def allgather_async(self, slice_array: np.ndarray, out: np.ndarray, *,
                        priority: int = 0, rows: bool = False) -> Handle:
        """Gather every rank's slice into `out` (n elements) under `partition(n, P)`.

        `slice_array` may be the view `out.reshape(-1)[offset:offset + count]`
        of this rank's own slice (then the gather runs in place). With
        ``rows=True`` the slices are the first-axis partition of `out`, as in
        `reduce_scatter_async`.
        """
        _check_array("slice_array", slice_array, writable=False)
        _check_array("out", out, writable=True)
        self._check_same_dtype(slice_array, out)
        counts, row = self._blocks(out, rows)
        offset, count = sum(counts[:self.rank]), counts[self.rank]
        if slice_array.size != count:
            raise ValueError(f"slice_array has {slice_array.size} elements but rank {self.rank} "
                             f"owns {count} of {out.size}")
        return self._post("allgather", slice_array, out, out.size, "sum", priority,
                          (slice_array, out), in_place_offset=offset, counts=counts, row=row)

    def alltoall_async(self, send: np.ndarray, recv: np.ndarray, *, priority: int = 0) -> Handle:
        """Block q of `send` goes to rank q; block r of every rank lands in this rank's `recv`.

        The blocks are the standard partition of `send`'s first axis: with
        ``send`` of shape (n, *rest), ``partition(n, P)[q]`` gives the rows of
        block q (a 1-D array: its elements). Rank r receives, from every rank
        p in rank order, p's block r: ``recv[p] = send_p[rows of block r]``,
        the transpose of the (sender, receiver) matrix of blocks
        (MPI_Ialltoallv, chunked: chunk c is piece c of every block).

        Parameters
        ----------
        send : ndarray of shape (n, *rest), float32 or float64, C-contiguous
            Read only; n and rest the same on every rank; must not change
            until the handle completes.
        recv : ndarray of shape (P, count, *rest) or any shape of that size, same dtype
            ``count = partition(n, P)[rank][1]``; must not overlap `send`.
        priority : int
            Lower values are posted first.
        """
        _check_array("send", send, writable=False)
        _check_array("recv", recv, writable=True)
        self._check_same_dtype(send, recv)
        counts, row = self._blocks(send, rows=True)
        if recv.size != self.size * counts[self.rank]:
            raise ValueError(
                f"recv has {recv.size} elements but rank {self.rank} receives {self.size} "
                f"blocks of {counts[self.rank] // max(row, 1)} rows x {row} = "
                f"{self.size * counts[self.rank]} (send of shape {send.shape} over "
                f"{self.size} ranks)")
        if max(send.size, recv.size) > _INT_MAX:
            raise ValueError(f"alltoall of {send.size} elements: exceeds MPI's int displacements")
        return self._post("alltoall", send, recv, send.size, "sum", priority, (send, recv),
                          counts=counts, row=row)

    def stats(self) -> dict:
        """Counters of this exchanger and the progress thread's CPU time.

        Keys: bytes_posted, chunks_posted, requests_enqueued, requests_completed,
        requests_failed, negotiation_rounds, chunk_seconds_in_flight,
        progress_thread_cpu_s.
        """
        return self._engine.stats()

    def wait_mpi(self, request, description: str) -> None:
        """Wait for an mpi4py request (an Ibarrier, an Iallreduce of the caller's)
        under this exchanger's stall watch, so that it too names a stopped rank
        and times out instead of hanging.

        Raises
        ------
        StallError
            after `stall_timeout_s`.
        """
        def poll(seconds: float) -> bool:
            deadline, nap = time.monotonic() + seconds, 50e-6
            while not request.Test():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(nap, left))
                nap = min(2 * nap, 0.01)
            return True

        if self._stall is None:
            request.Wait()
        else:
            self._stall.wait(poll, None, description)

    def drain_trace(self) -> list[tuple]:
        """Chunk events since the last call: (seq, chunk, kind, bytes, t_post, t_done),
        times on `time.monotonic()`'s clock. Empty unless built with trace=True."""
        return self._engine.drain_trace()

    def close(self, timeout: float | None = None) -> None:
        """Finish pending requests (failing them after `timeout`) and join the thread.

        Raises ExchangeError if requests had to be abandoned.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if timeout is None:
            # After a StallError the stalled request will likely never complete:
            # give the thread a moment to finish, not close_timeout.
            stalled = self._stall is not None and self._stall.stalled
            timeout = min(1.0, self.close_timeout) if stalled else self.close_timeout
        clean = self._engine.close(float(timeout))
        if self._stall is not None:
            keep = self._stall.close()
            if keep:
                _ABANDONED.append(keep)
        if self._engine.leaked:
            _ABANDONED.append((self._engine, self._comm))
        else:
            self._comm.Free()
        _LIVE.discard(self)
        if not clean:
            raise ExchangeError("close(): requests were still pending after the timeout and "
                                "were failed (a peer rank never posted the matching collective)")

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals ----------------------------------------------------------------
    @staticmethod
    def _check_algorithm(algorithm) -> str:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown allreduce algorithm {algorithm!r}; expected one of "
                             f"{ALGORITHMS}")
        return algorithm

    @staticmethod
    def _check_op(op: str) -> None:
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {_OPS}")

    def _blocks(self, array: np.ndarray, rows: bool) -> tuple[list[int], int]:
        """Elements per rank of `array`'s partition (flat, or by first-axis rows), and the row size."""
        if not rows:
            return [c for _, c in self.partition(array.size)], 1
        if array.ndim == 0:
            raise ValueError("a 0-d array has no first axis to partition")
        row = int(np.prod(array.shape[1:], dtype=np.int64))
        return [c * row for _, c in self.partition(array.shape[0])], row

    @staticmethod
    def _check_same_dtype(a: np.ndarray, b: np.ndarray) -> None:
        if a.dtype != b.dtype:
            raise TypeError(f"dtype mismatch: {a.dtype} input and {b.dtype} output")

    def _post(self, kind: str, buf: np.ndarray, out: np.ndarray | None, count: int, op: str,
              priority: int, arrays: tuple, in_place_offset: int = 0, fault: bool = False,
              algorithm: str = "mpi", counts: list[int] | None = None, row: int = 1) -> Handle:
        if self._closed:
            raise RuntimeError("the exchanger is closed; create a new Exchanger")
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
            raise TypeError(f"priority must be an int, got {type(priority).__name__}")
        if not -(2**31) <= int(priority) < 2**31:
            raise ValueError(f"priority {priority} does not fit in a C int")
        if kind != "allreduce" and max(counts) > _INT_MAX:
            raise ValueError(f"{kind} of {count} elements: a rank's slice exceeds MPI's int count")
        self._reject_overlap(kind, buf, out, in_place_offset)
        description = (f"{kind} #{{seq}} of {count} {buf.dtype} "
                       f"(op {op}, priority {int(priority)}"
                       + (f", {algorithm}" if algorithm != "mpi" else "")
                       + ")")   # seq filled in by the engine
        with self._lock:
            request = self._engine.enqueue(
                _progress.KINDS[kind], _address_range(buf)[0],
                0 if out is None else _address_range(out)[0], count, buf.itemsize, op,
                int(priority),
                _signature(_progress.KINDS[kind], count, buf.dtype, op, int(priority), algorithm,
                           row),
                counts, arrays, description, fault, _progress.ALGORITHM_CODES[algorithm])
        return Handle(request, self)

    def _reject_overlap(self, kind, buf, out, in_place_offset) -> None:
        """An array still in flight must not be posted again (MPI would race on it)."""
        ranges = [_address_range(buf)]
        if out is not None:
            o = _address_range(out)
            b = ranges[0]
            in_place = kind == "allgather" and b[0] == o[0] + in_place_offset * out.itemsize
            if not in_place and b[0] < o[1] and o[0] < b[1] and buf.nbytes and out.nbytes:
                raise ValueError(f"{kind}: input and output arrays overlap")
            ranges.append(o)
        with self._lock:
            for request in self._engine.pending():
                for a in request.arrays:
                    s, e = _address_range(a)
                    for lo, hi in ranges:
                        if lo < e and s < hi and hi > lo and e > s:
                            raise ValueError(
                                f"this array (or one sharing its memory) is still in flight in "
                                f"{request.description}; wait() for it before posting it again")

    def _pending_summary(self) -> str:
        with self._lock:
            pending = [r.description for r in self._engine.pending()]
        if not pending:
            return "nothing else pending"
        return f"{len(pending)} pending on this rank: " + ", ".join(pending[:8])

    def _post_faulty(self, array: np.ndarray) -> Handle:
        """Test hook: an allreduce the thread posts with MPI_OP_NULL, so
        that a real MPI error travels the real path to `wait()`. Every rank must call it."""
        _check_array("array", array, writable=True)
        return self._post("allreduce", array, None, array.size, "sum", 0, (array,), fault=True)


@atexit.register
def _close_all() -> None:
    """Join every progress thread before mpi4py finalizes MPI (atexit runs LIFO)."""
    for ex in list(_LIVE):
        try:
            ex.close(timeout=5.0)
        except Exception:
            pass
