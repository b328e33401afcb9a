"""Stall detection: a wait that lasts too long names the rank that holds it up.

Every rank runs a small C thread (`ext._progress.StallResponder`) that
answers queries on a communicator of its own with how many requests its
engine has enqueued. It never takes the GIL, so a rank whose Python is busy
or hung still answers; a rank that does not answer within `ANSWER_S` is
stopped (SIGSTOP, swapped out) or dead.

A rank that has waited `stall_warn_s` for request #k asks every peer:

- no answer:                 "rank 2 did not answer within 2 s (stopped, dead or unresponsive)"
- answered with count <= k:  "rank 1 has not posted request #k (allreduce of ... layer 3)"
- every rank posted it:      the transfer itself is stuck (network, MPI)
- an mpi4py request (`Exchanger.wait_mpi`, no request number): only the
  silent ranks can be named

and prints one line with that diagnosis; the line repeats every
`stall_warn_s`. After `stall_timeout_s` the wait raises `StallError` with the
same diagnosis. Nothing of this runs on the normal path: a wait that
finishes before `stall_warn_s` costs one extra timed wait, and the responder
thread costs one MPI_Iprobe every `RESPONDER_POLL_US`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

from ext import _progress

__all__ = ["StallError", "StallWatch", "ANSWER_S"]

ANSWER_S = 2.0               # how long a peer's responder thread has to answer
RESPONDER_POLL_US = 200_000  # the responder looks for a query 5 times a second


class StallError(TimeoutError):
    """A wait exceeded stall_timeout_s; the message names the ranks holding it up."""


class StallWatch:
    """The stall responder of one exchanger, and the queries its waits send.

    Parameters
    ----------
    engine : ext._progress.Engine
    comm : mpi4py.MPI.Intracomm
        Duplicated here (collective), so queries match nothing else.
    stall_warn_s : float
        Seconds a wait lasts before it prints a diagnosis (then every as many).
    stall_timeout_s : float or None
        Seconds after which the wait raises `StallError`; None waits forever.
    """

    def __init__(self, engine, comm, stall_warn_s: float, stall_timeout_s: float | None):
        if not stall_warn_s > 0:
            raise ValueError(f"stall_warn_s must be > 0 (or None to disable), got {stall_warn_s}")
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0 (or None), got {stall_timeout_s}")
        self.warn_s = float(stall_warn_s)
        self.timeout_s = None if stall_timeout_s is None else float(stall_timeout_s)
        self.engine = engine
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.responder = _progress.StallResponder(engine, self.comm, RESPONDER_POLL_US)
        self._next_query = 0
        # Sends to a peer that never took them stay here, so their buffers
        # outlive MPI's use of them.
        self._unfinished: list = []
        self.diagnoses = 0
        self.stalled = False      # a wait gave up: its request will not complete

    def close(self) -> list:
        """Stop the responder; returns what must be kept alive if sends are unfinished."""
        self.responder.stop()
        self._unfinished = [(r, b) for r, b in self._unfinished if not _test(r)]
        if self._unfinished:
            return [self.comm, self._unfinished]
        self.comm.Free()
        return []

    # -- waiting -----------------------------------------------------------------
    def wait(self, poll, seq: int | None, description: str) -> None:
        """Wait until ``poll(seconds)`` returns True, warning and timing out as configured.

        Parameters
        ----------
        poll : callable(float) -> bool
            Waits at most that many seconds; True once the operation finished.
        seq : int or None
            The request's number on this rank (None: not an engine request).
        description : str
            What is waited for, for the messages.
        """
        start = time.monotonic()
        next_warn = self.warn_s
        while True:
            limit = next_warn if self.timeout_s is None else min(next_warn, self.timeout_s)
            if poll(max(0.0, limit - (time.monotonic() - start))):
                return
            waited = time.monotonic() - start
            if self.timeout_s is not None and waited >= self.timeout_s:
                self.stalled = True
                raise StallError(f"rank {self.rank}: gave up after {waited:.0f} s (timeout "
                                 f"{self.timeout_s:g} s) waiting for {description}: "
                                 f"{self.diagnose(seq)}")
            if waited >= next_warn:
                print(f"engine: rank {self.rank}: stalled {waited:.0f} s waiting for "
                      f"{description}: {self.diagnose(seq)}", file=sys.stderr, flush=True)
                next_warn += self.warn_s

    # -- asking the peers -------------------------------------------------------------
    def query(self, answer_s: float = ANSWER_S) -> dict:
        """Ask every peer for its counters.

        Returns
        -------
        dict of rank -> (enqueued, completed, failed), or None for a peer that
        did not answer within `answer_s` (this rank answers itself).
        """
        self._next_query += 1
        qid = self._next_query
        tag_q, tag_r, n = (_progress.StallResponder.query_tag,
                           _progress.StallResponder.reply_tag,
                           _progress.StallResponder.reply_len)
        stats = self.engine.stats()
        answers = {self.rank: (stats["requests_enqueued"], stats["requests_completed"],
                               stats["requests_failed"])}
        peers = [p for p in range(self.size) if p != self.rank]
        receives = {}
        for p in peers:
            answers[p] = None     # until it answers; an MPI error (peer gone) leaves it so
            query = np.array([qid], np.int64)
            buf = np.zeros(n, np.int64)
            try:
                self._unfinished.append((self.comm.Isend(query, dest=p, tag=tag_q), query))
                receives[p] = (self.comm.Irecv(buf, source=p, tag=tag_r), buf)
            except MPI.Exception:
                pass
        deadline = time.monotonic() + answer_s
        while receives:
            for p, (req, buf) in list(receives.items()):
                try:
                    if not req.Test():
                        continue
                    if buf[0] == qid:
                        answers[p] = tuple(int(v) for v in buf[1:4])
                        del receives[p]
                    else:     # a late answer to an earlier query: wait for this one
                        receives[p] = (self.comm.Irecv(buf, source=p, tag=tag_r), buf)
                except MPI.Exception:
                    del receives[p]
            if not receives or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        for req, _ in receives.values():
            try:
                req.Cancel()
                req.Wait()
            except MPI.Exception:
                pass
        self._unfinished = [(r, b) for r, b in self._unfinished if not _test(r)]
        return answers

    def diagnose(self, seq: int | None) -> str:
        """One sentence naming the ranks that hold request `seq` up (see the module doc)."""
        self.diagnoses += 1
        answers = self.query()
        silent = sorted(p for p, a in answers.items() if a is None)
        behind = sorted(p for p, a in answers.items()
                        if a is not None and seq is not None and a[0] <= seq)
        parts = []
        if silent:
            parts.append(f"{_ranks(silent)} did not answer within {ANSWER_S:g} s (stopped, "
                         "dead or unresponsive: check that node, or resume from the last "
                         "checkpoint without it)")
        if behind:
            where = ", ".join(f"rank {p} at request #{answers[p][0]}" for p in behind)
            parts.append(f"{_ranks(behind)} {'has' if len(behind) == 1 else 'have'} not "
                         f"posted request #{seq} ({where}; their Python is busy, hung, or "
                         "took a different path)")
        if not parts and seq is None:
            # Not an engine request: the counters cannot tell who has reached it.
            parts.append("every rank answers; some rank has not reached this operation "
                         "(its Python is busy or hung), or the transfer is not progressing")
        elif not parts:
            parts.append("every rank has posted it; the transfer itself is not progressing "
                         "(network or MPI trouble)")
        return "; ".join(parts)


def _test(request) -> bool:
    """MPI_Test; a request that failed (peer gone) counts as finished."""
    try:
        return request.Test()
    except MPI.Exception:
        return True


def _ranks(ranks: list[int]) -> str:
    return (f"rank {ranks[0]}" if len(ranks) == 1
            else "ranks " + ", ".join(str(p) for p in ranks))
