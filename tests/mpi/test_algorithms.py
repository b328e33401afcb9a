"""The progress thread's own allreduce algorithms against MPI's, at any rank count.

Every algorithm must give what algorithm="mpi" gives (exactly, for
integer-valued inputs; to rounding otherwise, since the order of the sums
differs) and the same bits on every rank. P = 3 exercises recursive
doubling's fold, P = 4 its plain form; arbitrary sizes put empty ring blocks
(n < P) and uneven ones (n % P != 0) through the ring.
"""

import hashlib
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpi4py import MPI

from analysis import costmodel as cm
from analysis.costmodel import AutoThresholds
from engine import ExchangeError, Exchanger, partition

COMM = MPI.COMM_WORLD
P, RANK = COMM.size, COMM.rank
WAIT_S = 120.0
OURS = ("recursive_doubling", "ring", "auto")

lengths = st.one_of(st.sampled_from([0, 1, P - 1, P, P + 1, 2 * P - 1, 7919]),
                    st.integers(0, 3000), st.integers(3000, 200_000))


def contribution(n, dtype, integer, salt):
    if integer:
        return ((np.arange(n) * 7 + salt) % 13 + RANK * 3).astype(dtype)
    return np.random.default_rng([salt, RANK]).standard_normal(n).astype(dtype)


def assert_same_on_every_rank(arrays):
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    digests = COMM.allgather(digest)
    assert len(set(digests)) == 1, f"ranks disagree bitwise: {digests}"


@given(sizes=st.lists(lengths, min_size=1, max_size=4),
       algorithms=st.lists(st.sampled_from(OURS), min_size=4, max_size=4),
       dtype=st.sampled_from([np.float32, np.float64]), op=st.sampled_from(["mean", "sum"]),
       chunk_bytes=st.sampled_from([8, 12, 100, 4096, 65536, 1 << 20]),
       max_inflight=st.integers(1, 6), integer=st.booleans(),
       thresholds=st.sampled_from([None, "recursive_doubling_below=2000,ring_from=40000"]))
def test_every_algorithm_equals_mpi(sizes, algorithms, dtype, op, chunk_bytes, max_inflight,
                                    integer, thresholds):
    inputs = [contribution(n, dtype, integer, salt=i) for i, n in enumerate(sizes)]
    # at most ~200 chunks per array: tiny chunks on long arrays would take minutes
    chunk_bytes = max(chunk_bytes, max(sizes) * np.dtype(dtype).itemsize // 200)
    with Exchanger(chunk_bytes=chunk_bytes, max_inflight=max_inflight, poll_us=20,
                   auto_thresholds=thresholds) as ex:
        references = [a.copy() for a in inputs]
        for a in references:
            ex.allreduce_async(a, op=op, algorithm="mpi").wait(WAIT_S)
        # all in flight together, with a reduce-scatter between them, priorities reversed
        ours = [a.copy() for a in inputs]
        handles = [ex.allreduce_async(a, op=op, priority=-i, algorithm=algorithms[i])
                   for i, a in enumerate(ours)]
        scattered = np.empty(partition(inputs[0].size, P)[RANK][1], dtype)
        handles.append(ex.reduce_scatter_async(inputs[0], scattered, op=op))
        for h in reversed(handles):
            h.wait(WAIT_S)
    offset, count = partition(inputs[0].size, P)[RANK]
    for got, want in zip(ours + [scattered], references + [references[0][offset:offset + count]]):
        if integer:
            np.testing.assert_array_equal(got, want)
        else:
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * P)
    assert_same_on_every_rank(ours)


def test_unknown_algorithm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown allreduce algorithm 'butterfly'"):
        Exchanger(algorithm="butterfly")
    with Exchanger() as ex:
        with pytest.raises(ValueError, match="unknown allreduce algorithm"):
            ex.allreduce_async(np.ones(4, np.float32), algorithm="Ring")
        assert ex.stats()["requests_enqueued"] == 0
    with pytest.raises(ValueError, match="bad auto threshold"):
        Exchanger(algorithm="auto", auto_thresholds="ring_from=1k")


@pytest.mark.skipif(P < 2, reason="a mismatch needs two ranks")
def test_algorithms_that_differ_across_ranks_fail_on_every_rank():
    with Exchanger(close_timeout=60) as ex:
        a = np.ones(1000, np.float32)
        h = ex.allreduce_async(a, algorithm="ring" if RANK == 0 else "recursive_doubling")
        with pytest.raises(ExchangeError, match="allreduce algorithm"):
            h.wait(WAIT_S)
        b = np.full(10, RANK, np.float64)       # the exchanger still works afterwards
        ex.allreduce_async(b, op="sum", algorithm="ring").wait(WAIT_S)
        np.testing.assert_array_equal(b, P * (P - 1) / 2)


def test_auto_follows_its_thresholds_by_request_bytes():
    """auto decides by the whole request: 1 MiB in 4 KiB chunks still takes the ring."""
    auto = "recursive_doubling_below=1024,ring_from=65536"
    with Exchanger(algorithm="auto", auto_thresholds=auto, chunk_bytes=4096) as ex:
        assert ex.auto == AutoThresholds(1024, 65536)
        picked = {}
        for n in (16, 4096, 1 << 18):
            a = np.full(n, RANK + 1, np.float32)
            h = ex.allreduce_async(a, op="sum")
            picked[n] = repr(h)
            h.wait(WAIT_S)
            np.testing.assert_array_equal(a, P * (P + 1) / 2)
    if P > 1:       # one rank always runs "mpi": there is nothing to exchange
        assert "recursive_doubling" in picked[16]
        assert "recursive_doubling" not in picked[4096] and "ring" not in picked[4096]
        assert "ring" in picked[1 << 18]


def netfit_on_rank_0(tmp_path, sweep_ranks, chunk_bytes, rd_wins_up_to):
    """A netfit JSON written by rank 0 only (the Exchanger reads it there), with a timed
    sweep at `sweep_ranks` in which recursive doubling wins up to `rd_wins_up_to` bytes
    and the ring from there on. The other ranks get a path to no file: the Exchanger
    reads rank 0's and broadcasts what it found."""
    if RANK == 0:
        sizes = [4096 << i for i in range(6)]           # 4 KiB .. 128 KiB
        sweep = {"ranks": sweep_ranks, "chunk_bytes": chunk_bytes, "sizes": sizes,
                 "median_s": {"mpi": [1.0] * 6,
                              "recursive_doubling": [0.5 if n <= rd_wins_up_to else 2.0
                                                     for n in sizes],
                              "ring": [2.0 if n <= rd_wins_up_to else 0.5 for n in sizes]}}
        path = tmp_path / "netfit.json"
        path.write_text(json.dumps({"network": {"alpha": 3e-6, "beta": 1e-9, "gamma": 3e-11},
                                    "algorithms": [sweep]}))
        return str(path)
    return str(tmp_path / "absent.json")


def test_auto_with_measured_thresholds_is_identical_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.delenv("EXCHANGER_AUTO_THRESHOLDS", raising=False)
    path = netfit_on_rank_0(tmp_path, P, 4096, rd_wins_up_to=16384)
    with Exchanger(algorithm="auto", network=path, chunk_bytes=4096) as ex:
        auto = ex.auto
        got = {}
        for n in (1024, 1 << 16):      # 4 KiB (recursive doubling), 256 KiB (ring)
            a = np.full(n, RANK + 1, np.float32)
            h = ex.allreduce_async(a, op="sum")
            got[n] = repr(h)
            h.wait(WAIT_S)
            np.testing.assert_array_equal(a, P * (P + 1) / 2)
    assert len(set(COMM.allgather((auto.spec(), str(auto))))) == 1
    if P > 1:
        assert auto == AutoThresholds(math.ceil(math.sqrt(16384 * 32768)),
                                      math.ceil(math.sqrt(16384 * 32768)))
        assert f"measured at P={P}, chunk 4 KiB" in str(auto)
        assert "recursive_doubling" in got[1024] and "ring" in got[1 << 16]


def test_auto_thresholds_precedence(tmp_path, monkeypatch):
    """explicit (or $EXCHANGER_AUTO_THRESHOLDS) > the netfit's sweep for this P and chunk
    > the cost model on the netfit's network."""
    monkeypatch.delenv("EXCHANGER_AUTO_THRESHOLDS", raising=False)
    path = netfit_on_rank_0(tmp_path, P, 4096, rd_wins_up_to=16384)
    explicit = "recursive_doubling_below=100,ring_from=inf"
    with Exchanger(algorithm="auto", network=path, chunk_bytes=4096,
                   auto_thresholds=explicit) as ex:
        assert ex.auto == AutoThresholds(100, math.inf) and "explicitly" in str(ex.auto)
    monkeypatch.setenv("EXCHANGER_AUTO_THRESHOLDS", explicit)
    with Exchanger(algorithm="auto", network=path, chunk_bytes=4096) as ex:
        assert ex.auto == AutoThresholds(100, math.inf) and "$EXCHANGER_AUTO" in str(ex.auto)
    monkeypatch.delenv("EXCHANGER_AUTO_THRESHOLDS")
    model = cm.auto_thresholds(cm.Network(alpha=3e-6, beta=1e-9, gamma=3e-11), P)
    with Exchanger(algorithm="auto", network=path, chunk_bytes=8192) as ex:    # another chunk
        assert ex.auto == model
        assert "not 8 KiB" in str(ex.auto) if P > 1 else "one rank" in str(ex.auto)
    other_p = netfit_on_rank_0(tmp_path, P + 1, 4096, rd_wins_up_to=16384)
    with Exchanger(algorithm="auto", network=other_p, chunk_bytes=4096) as ex:
        assert ex.auto == model
        assert f"not P={P}" in str(ex.auto) if P > 1 else "one rank" in str(ex.auto)
    # a missing file fails every rank, at once under "auto", at the first "auto" call
    # otherwise (one rank never asks: it has nothing to exchange)
    absent = str(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        Exchanger(algorithm="auto", network=absent)
    with Exchanger(network=absent) as ex:
        if P > 1:
            with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
                ex.allreduce_async(np.ones(4, np.float32), algorithm="auto")
        a = np.ones(4, np.float32)
        ex.allreduce_async(a, op="sum").wait(WAIT_S)
        np.testing.assert_array_equal(a, P)
