"""Averaging correctness of the Exchanger, at any rank count.

Expectations are derived from comm.size and comm.rank: rank r contributes an
array every rank can rebuild, so each rank computes the exact expected mean or
sum itself. Integer-valued inputs must come out exact; random float inputs
within a tolerance; all ranks bitwise identical.
"""

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpi4py import MPI

from analysis import costmodel as cm
from engine import Exchanger, partition
from ext import _progress

COMM = MPI.COMM_WORLD
P, RANK = COMM.size, COMM.rank
WAIT_S = 120.0

PRIMES = [2, 3, 5, 7, 11, 13, 1009, 7919, 104729]
lengths = st.one_of(
    st.sampled_from([0, 1, P, P + 1, 2 * P - 1] + PRIMES),
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=5000, max_value=1_500_000),   # up to ~6 MB in float32
)
dtypes = st.sampled_from([np.float32, np.float64])
ops = st.sampled_from(["mean", "sum"])
chunk_sizes = st.sampled_from([8, 12, 100, 4096, 65536, 1 << 20, 4 << 20])
# least bytes per rank's piece of a reduce-scatter/allgather/alltoall chunk (0: none)
min_pieces = st.sampled_from([0, 12, 4096, _progress.DEFAULT_MIN_PIECE_BYTES])


def bounded(chunk_bytes, n, dtype):
    """Tiny chunks on multi-MB arrays would mean 10^5 collectives: cap at ~256 chunks."""
    return max(chunk_bytes, n * np.dtype(dtype).itemsize // 256)


def contribution(n, dtype, rank, integer, salt):
    """Rank `rank`'s input: integer-valued, or random floats from a shared seed."""
    if integer:
        return ((np.arange(n) * 7 + salt) % 13 + rank * 3).astype(dtype)
    rng = np.random.default_rng([salt, rank])
    return rng.standard_normal(n).astype(dtype)


def expected(n, dtype, op, integer, salt):
    total = sum(contribution(n, np.float64, r, integer, salt) for r in range(P)) if n else np.zeros(0)
    if op == "mean":
        # The engine divides the (exact, for integers) sum by P in the array's dtype.
        return (total.astype(dtype) / dtype(P)).astype(dtype)
    return total.astype(dtype)


def assert_same_on_every_rank(*arrays):
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    digests = COMM.allgather(digest)
    assert len(set(digests)) == 1, f"ranks disagree bitwise: {digests}"


def check_close(got, want, integer):
    if integer:
        np.testing.assert_array_equal(got, want)
    else:
        # Reduction order is MPI's; float32 sums of P standard normals agree to ~1e-6.
        tol = 1e-5 if got.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * P)


@given(
    sizes=st.lists(lengths, min_size=1, max_size=6),
    dtype=dtypes,
    op=ops,
    chunk_bytes=chunk_sizes,
    max_inflight=st.integers(1, 8),
    integer=st.booleans(),
    data=st.data(),
)
def test_allreduce_many_arrays_any_priority_any_wait_order(sizes, dtype, op, chunk_bytes,
                                                           max_inflight, integer, data):
    priorities = data.draw(st.lists(st.integers(-3, 3), min_size=len(sizes), max_size=len(sizes)))
    order = data.draw(st.permutations(range(len(sizes))))
    arrays = [contribution(n, dtype, RANK, integer, salt=i) for i, n in enumerate(sizes)]
    chunk_bytes = bounded(chunk_bytes, max(sizes), dtype)
    with Exchanger(chunk_bytes=chunk_bytes, max_inflight=max_inflight, poll_us=20) as ex:
        handles = [ex.allreduce_async(a, op=op, priority=p) for a, p in zip(arrays, priorities)]
        for i in order:
            handles[i].wait(WAIT_S)
    for i, n in enumerate(sizes):
        check_close(arrays[i], expected(n, dtype, op, integer, salt=i), integer)
    assert_same_on_every_rank(*arrays)


@given(n=lengths, dtype=dtypes, op=ops, integer=st.booleans(), chunk_bytes=chunk_sizes,
       max_inflight=st.integers(1, 8), min_piece_bytes=min_pieces)
def test_reduce_scatter_then_allgather(n, dtype, op, integer, chunk_bytes, max_inflight,
                                       min_piece_bytes):
    x = contribution(n, dtype, RANK, integer, salt=5)
    offset, count = partition(n, P)[RANK]
    mine = np.empty(count, dtype)
    full = np.full(n, np.nan, dtype)
    with Exchanger(chunk_bytes=bounded(chunk_bytes, n, dtype), max_inflight=max_inflight,
                   min_piece_bytes=min_piece_bytes) as ex:
        ex.reduce_scatter_async(x, mine, op=op).wait(WAIT_S)
        check_close(mine, expected(n, dtype, op, integer, salt=5)[offset:offset + count], integer)
        # in place: this rank's slice already sits in `full`
        full[offset:offset + count] = mine
        ex.allgather_async(full[offset:offset + count], full).wait(WAIT_S)
        check_close(full, expected(n, dtype, op, integer, salt=5), integer)
        # out of place
        other = np.zeros(n, dtype)
        ex.allgather_async(mine.copy(), other).wait(WAIT_S)
        np.testing.assert_array_equal(other, full)
    assert_same_on_every_rank(mine if P == 1 else full, other)


rows_shapes = st.sampled_from([(), (1,), (3,), (2, 5)])


@given(n=lengths, rest=rows_shapes, dtype=dtypes, chunk_bytes=chunk_sizes,
       max_inflight=st.integers(1, 8), priority=st.integers(-3, 3), min_piece_bytes=min_pieces)
def test_alltoall_delivers_the_transposed_blocks(n, rest, dtype, chunk_bytes, max_inflight,
                                                 priority, min_piece_bytes):
    n = n // max(1, int(np.prod(rest)))      # keep the message size of `lengths`
    def send_of(rank):
        # every value distinct across ranks and rows: a misplaced block cannot pass
        return (np.arange(n * int(np.prod(rest))).reshape((n,) + rest) * P + rank).astype(dtype)
    parts = partition(n, P)
    offset, count = parts[RANK]
    recv = np.full((P, count) + rest, np.nan, dtype)
    send = send_of(RANK)
    with Exchanger(chunk_bytes=bounded(chunk_bytes, send.size, dtype),
                   max_inflight=max_inflight, min_piece_bytes=min_piece_bytes) as ex:
        ex.alltoall_async(send, recv, priority=priority).wait(WAIT_S)
    for p in range(P):
        np.testing.assert_array_equal(recv[p], send_of(p)[offset:offset + count])
    np.testing.assert_array_equal(send, send_of(RANK))          # the send buffer is untouched
    # every rank's result is the same matrix of blocks, transposed
    everything = COMM.allgather(recv.tobytes())
    for r in range(P):
        o, c = parts[r]
        want = np.stack([send_of(p)[o:o + c] for p in range(P)])
        assert everything[r] == want.astype(dtype).tobytes()


@given(m=st.integers(0, 300), rest=rows_shapes, dtype=dtypes, chunk_bytes=chunk_sizes,
       min_piece_bytes=min_pieces)
def test_reduce_scatter_and_allgather_by_rows(m, rest, dtype, chunk_bytes, min_piece_bytes):
    """rows=True: rank r owns rows partition(m, P)[r] of an (m, *rest) array."""
    x = contribution(m * int(np.prod(rest)), dtype, RANK, True, salt=9).reshape((m,) + rest)
    offset, count = partition(m, P)[RANK]
    mine = np.empty((count,) + rest, dtype)
    with Exchanger(chunk_bytes=bounded(chunk_bytes, x.size, dtype),
                   min_piece_bytes=min_piece_bytes) as ex:
        ex.reduce_scatter_async(x, mine, op="sum", rows=True).wait(WAIT_S)
        want = expected(x.size, dtype, "sum", True, salt=9).reshape((m,) + rest)
        np.testing.assert_array_equal(mine, want[offset:offset + count])
        full = np.full_like(x, np.nan)
        full[offset:offset + count] = mine
        ex.allgather_async(full[offset:offset + count], full, rows=True).wait(WAIT_S)
    np.testing.assert_array_equal(full, want)
    assert_same_on_every_rank(full)


@pytest.mark.parametrize("min_piece_bytes", [0, 2048, 8192])
def test_min_piece_sets_the_chunks_as_the_cost_model_counts_them(min_piece_bytes):
    """chunk_bytes 4096: pieces of 4096 / P bytes per rank, unless min_piece_bytes is
    larger; the engine's chunks (its trace) are the cost model's (Channel.chunk_sizes)."""
    n = 10007                                      # float32: ~40 KiB, uneven slices
    x = np.full(n, RANK + 1, np.float32)
    offset, count = partition(n, P)[RANK]
    mine = np.empty(count, np.float32)
    full = np.empty(n, np.float32)
    recv = np.empty(P * count, np.float32)
    with Exchanger(chunk_bytes=4096, min_piece_bytes=min_piece_bytes, trace=True) as ex:
        ex.reduce_scatter_async(x, mine, op="sum").wait(WAIT_S)
        ex.allgather_async(mine, full).wait(WAIT_S)
        ex.alltoall_async(x, recv).wait(WAIT_S)
        events = ex.drain_trace()
    np.testing.assert_array_equal(mine, P * (P + 1) / 2)
    np.testing.assert_array_equal(full, P * (P + 1) / 2)
    np.testing.assert_array_equal(recv.reshape(P, count), np.repeat(np.arange(1.0, P + 1)[:, None], count, 1))
    chunks = {}
    for seq, chunk, *_ in events:
        chunks.setdefault(seq, set()).add(chunk)
    channel = cm.Channel(cm.Network(alpha=1e-6, beta=1e-9), P,
                         cm.Engine(chunk_bytes=4096, min_piece_bytes=min_piece_bytes))
    want = [len(channel.chunk_sizes(kind, 4 * n))
            for kind in ("reduce_scatter", "allgather", "alltoall")]
    piece = max(min_piece_bytes, 4096 // P // 4 * 4)
    assert want == [math.ceil(4 * partition(n, P)[0][1] / piece)] * 3
    if P > 1:          # one rank posts nothing
        assert [len(chunks[seq]) for seq in sorted(chunks)] == want
    assert len(set(COMM.allgather(repr(sorted((s, sorted(c)) for s, c in chunks.items()))))) == 1


def test_min_piece_bytes_is_checked():
    with pytest.raises(ValueError, match="min_piece_bytes must be in"):
        Exchanger(min_piece_bytes=-1)
    if P > 1:
        with pytest.raises(ValueError, match="the same on every rank"):
            Exchanger(min_piece_bytes=4096 * (RANK + 1))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 100])
def test_partition_covers_and_matches_mpi_layout(n):
    parts = partition(n, P)
    assert sum(c for _, c in parts) == n
    assert [o for o, _ in parts] == list(np.cumsum([0] + [c for _, c in parts])[:-1])
    q, r = divmod(n, P)
    assert [c for _, c in parts] == [q + 1] * r + [q] * (P - r)


@pytest.mark.skipif(P < 2, reason="one rank finishes the big request before the next "
                    "post: there is no queue to overtake without a peer holding it back")
def test_priority_overtakes_queued_chunks_identically_on_every_rank():
    """A small high-priority request posted after a big low-priority one is posted
    before most of the big one's chunks, and every rank posts in the same order."""
    big = np.ones(256 * 1024, np.float32)        # 256 chunks of 4 KiB
    small = np.ones(10, np.float32)
    with Exchanger(chunk_bytes=4096, max_inflight=2, trace=True) as ex:
        # Rank 0 enqueues both before any peer does, so nothing can be agreed
        # (and posted) until the peers have enqueued the big one at least.
        if RANK != 0:
            COMM.Barrier()
        h_big = ex.allreduce_async(big, priority=5)
        h_small = ex.allreduce_async(small, priority=0)
        if RANK == 0:
            COMM.Barrier()
        h_small.wait(WAIT_S)
        h_big.wait(WAIT_S)
        events = sorted(ex.drain_trace(), key=lambda e: e[4])
    order = [(seq, chunk) for seq, chunk, *_ in events]
    assert len(order) == 257
    position = order.index((1, 0))
    assert position < 64, f"the priority-0 chunk was posted {position}th of 257"
    assert len(set(map(tuple, COMM.allgather(order)))) == 1, "ranks posted chunks in different orders"
    np.testing.assert_array_equal(big, 1.0)


def test_stress_thousands_of_posts_memory_stable():
    """Thousands of random-size posts: correct, no deadlock, RSS does not grow."""
    rng = np.random.default_rng(1234)      # same on every rank
    sizes = rng.integers(0, 20000, size=3000)

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    with Exchanger(chunk_bytes=16384, max_inflight=4, poll_us=10) as ex:
        rss_after_warmup = None
        for batch_start in range(0, len(sizes), 50):
            batch = sizes[batch_start:batch_start + 50]
            arrays = [np.full(n, RANK + 1, np.float32) for n in batch]
            handles = [ex.allreduce_async(a, op="sum", priority=int(n) % 3)
                       for a, n in zip(arrays, batch)]
            for h in reversed(handles):
                h.wait(WAIT_S)
            want = P * (P + 1) / 2
            for a in arrays:
                assert a.size == 0 or (a.min() == want and a.max() == want)
            if batch_start == 500:
                rss_after_warmup = rss_kb()
        growth_mb = (rss_kb() - rss_after_warmup) / 1024
        stats = ex.stats()
    assert stats["requests_completed"] == len(sizes)
    assert stats["requests_failed"] == 0
    assert growth_mb < 20, f"RSS grew by {growth_mb:.1f} MB over 2500 posts"
