"""Stalls: a wait that lasts too long names the rank that holds it up
(one that has not posted the request, or one that is stopped), and times out."""

import os
import signal

import numpy as np
import pytest
from mpi4py import MPI

from engine import Exchanger, StallError

COMM = MPI.COMM_WORLD
P, RANK = COMM.size, COMM.rank
LAST = P - 1
needs_peers = pytest.mark.skipif(P < 2, reason="needs a peer rank to stall")


@pytest.fixture
def ex():
    exchanger = Exchanger(chunk_bytes=4096, close_timeout=30, stall_warn_s=0.3,
                          stall_timeout_s=1.5)
    yield exchanger
    exchanger.close()


def test_stall_options_are_checked():
    for bad in ({"stall_warn_s": 0}, {"stall_warn_s": -1.0}, {"stall_timeout_s": 0}):
        with pytest.raises(ValueError, match="stall_"):
            Exchanger(**bad)


def test_a_wait_that_finishes_prints_nothing(ex, capsys):
    a = np.full(1000, RANK + 1.0, np.float32)
    ex.allreduce_async(a, op="sum").wait()
    np.testing.assert_array_equal(a, P * (P + 1) / 2)
    assert "stalled" not in capsys.readouterr().err
    assert ex._stall.diagnoses == 0


@needs_peers
def test_a_rank_that_has_not_posted_is_named(ex, capsys):
    a = np.full(64, RANK + 1.0, np.float32)
    if RANK == LAST:
        COMM.Barrier()        # held back until every other rank has timed out
        h = ex.allreduce_async(a, op="sum")
    else:
        h = ex.allreduce_async(a, op="sum")
        with pytest.raises(StallError) as info:
            h.wait(label="allreduce layer 7")
        message = str(info.value)
        assert f"rank {LAST} has not posted request #0" in message
        assert f"rank {LAST} at request #0" in message
        assert "allreduce #0 of 64 float32" in message and "layer 7" in message
        assert "did not answer" not in message
        assert ex._stall.stalled     # close() will not wait close_timeout for it
        warning = capsys.readouterr().err
        assert f"engine: rank {RANK}: stalled" in warning
        assert f"rank {LAST} has not posted" in warning
        COMM.Barrier()
    h.wait()                  # the late rank posts: the request completes everywhere
    np.testing.assert_array_equal(a, P * (P + 1) / 2)


@needs_peers
def test_a_stopped_rank_is_named(ex):
    pids = COMM.allgather(os.getpid())
    waiters = COMM.Split(0 if RANK < LAST else 1, RANK)
    a = np.full(64, 1.0, np.float32)
    if RANK == LAST:
        COMM.Barrier()        # stopped somewhere before or in here
        h = ex.allreduce_async(a, op="sum")
    else:
        if RANK == 0:
            os.kill(pids[LAST], signal.SIGSTOP)
        try:
            h = ex.allreduce_async(a, op="sum")
            with pytest.raises(StallError) as info:
                h.wait()
            waiters.Barrier()     # every waiter has its diagnosis before the rank resumes
        finally:
            if RANK == 0:
                os.kill(pids[LAST], signal.SIGCONT)
        message = str(info.value)
        assert f"rank {LAST} did not answer" in message
        assert "stopped, dead or unresponsive" in message
        others = [p for p in range(P - 1) if p != RANK]
        assert all(f"rank {p} " not in message.split(":", 2)[-1] for p in others)
        COMM.Barrier()
    h.wait()
    waiters.Free()
    np.testing.assert_array_equal(a, P)


@needs_peers
def test_a_blocking_collective_under_the_watch_times_out(ex):
    if RANK == LAST:
        COMM.Barrier()
        request = ex._comm.Ibarrier()
        request.Wait()
    else:
        request = ex._comm.Ibarrier()
        with pytest.raises(StallError, match="waiting for checkpoint barrier") as info:
            ex.wait_mpi(request, "checkpoint barrier")
        assert "some rank has not reached this operation" in str(info.value)
        COMM.Barrier()
        request.Wait()


@needs_peers
def test_a_trainer_left_on_a_stall_raises_the_stall_promptly():
    import time

    from cnn import models
    from cnn.optim import SGD
    from engine import Trainer

    model = models.build("digits", seed=0)
    x = np.zeros((2, 1, 8, 8), np.float32)
    y = np.zeros(2, np.int64)
    start = time.monotonic()
    if RANK == LAST:         # builds its trainer (collective) but never steps
        with Trainer(model, SGD(model.parameters(), lr=0.1), "blocking", COMM,
                     stall_warn_s=0.3, stall_timeout_s=1.0):
            COMM.Barrier()
    else:
        with pytest.raises(StallError, match=f"rank {LAST} has not posted"):
            with Trainer(model, SGD(model.parameters(), lr=0.1), "blocking", COMM,
                         stall_warn_s=0.3, stall_timeout_s=1.0) as trainer:
                trainer.step(x, y)
        # Not close_timeout (30 s) for the request that will never complete.
        assert time.monotonic() - start < 15
        COMM.Barrier()
