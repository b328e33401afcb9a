"""The cost model's textbook limits (analysis/costmodel.py); pure Python, no MPI ranks."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import costmodel as cm

ALL = cm.STRATEGIES + cm.FC_VARIANTS
FREE = cm.Network(alpha=0.0, beta=0.0, gamma=0.0, poll_s=0.0)
GIGABIT = cm.Network(alpha=20e-6, beta=8e-9, gamma=0.3e-9, chunk_overhead_s=10e-6, poll_s=25e-6)


def net_layers(n=8, grad=1 << 20, fwd=0.01, bwd=0.02, update=0.001, kinds=None):
    kinds = kinds or ["conv"] * n
    return [cm.LayerCost(f"l{i}", i, kinds[i], grad // 4, grad, fwd, bwd, update,
                         in_features=512, out_features=512) for i in range(n)]


def compute(layers):
    return sum(l.fwd_s + l.bwd_s + l.update_s for l in layers)


#: 6 conv + 2 Linear 512 x 512 layers: multistep's auto takes the activation path for
#: the Linear ones at B < 256 (B (512 + 512) < 512 x 512)
MIXED = ["conv"] * 6 + ["linear"] * 2


def vgg16_layers(fwd=0.01, bwd=0.02):
    """VGG-16's parameter layers (13 3x3 convs, fc6 25088 -> 4096, fc7, fc8), made-up times."""
    channels = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512)] + [(512, 512)] * 5
    layers = [cm.LayerCost(f"conv{i}", i, "conv", 9 * a * b + b, 4 * (9 * a * b + b), fwd, bwd,
                           0.0, param_bytes=(4 * 9 * a * b, 4 * b))
              for i, (a, b) in enumerate(channels)]
    for n_in, n_out in ((25088, 4096), (4096, 4096), (4096, 1000)):
        i = len(layers)
        layers.append(cm.LayerCost(f"fc{i}", i, "linear", n_in * n_out + n_out,
                                   4 * (n_in * n_out + n_out), fwd, bwd, 0.0,
                                   param_bytes=(4 * n_in * n_out, 4 * n_out),
                                   in_features=n_in, out_features=n_out))
    return layers


layer_lists = st.lists(
    st.tuples(st.integers(4, 8 << 20), st.floats(1e-5, 0.05), st.floats(1e-5, 0.05),
              st.floats(0.0, 0.01), st.sampled_from(["conv", "linear", "batchnorm"])),
    min_size=1, max_size=12,
).map(lambda rows: [cm.LayerCost(f"l{i}", i, k, g // 4, g, f, b, u, in_features=64,
                                 out_features=64)
                    for i, (g, f, b, u, k) in enumerate(rows)])


# -- collective formulas (Thakur, Rabenseifner & Gropp 2005) --------------------------

def test_collectives_one_rank_cost_nothing():
    for fn in (cm.allreduce_time, cm.reduce_scatter_time, cm.allgather_time):
        assert fn(1 << 20, 1, GIGABIT) == 0.0


def test_allreduce_textbook_forms():
    net = cm.Network(alpha=1e-6, beta=1e-9, gamma=1e-10)
    n, P = 8 << 20, 8
    assert cm.allreduce_time(n, P, net) == pytest.approx(
        2 * 3 * 1e-6 + 2 * 7 / 8 * n * 1e-9 + 7 / 8 * n * 1e-10)
    ring = cm.Network(alpha=1e-6, beta=1e-9, gamma=1e-10, allreduce_large="ring")
    assert cm.allreduce_time(n, P, ring) == pytest.approx(
        2 * 7 * 1e-6 + 2 * 7 / 8 * n * 1e-9 + 7 / 8 * n * 1e-10)
    small = 1024      # below MPICH's 2 KiB threshold: recursive doubling
    assert cm.allreduce_time(small, P, net) == pytest.approx(3 * (1e-6 + small * 1.1e-9))


def test_reduce_scatter_plus_allgather_moves_what_allreduce_moves():
    net = cm.Network(alpha=0.0, beta=1e-9, gamma=1e-10)
    for P in (2, 5, 64, 8192):
        n = 64 << 20
        assert (cm.reduce_scatter_time(n, P, net) + cm.allgather_time(n, P, net)
                == pytest.approx(cm.ring_time(n, P, net)))
        if P & (P - 1) == 0:      # MPICH's Rabenseifner folds the ranks beyond a power of two
            assert cm.allreduce_time(n, P, net) == pytest.approx(cm.ring_time(n, P, net))


def test_non_power_of_two_fold_and_the_engine_algorithms():
    net = cm.Network(alpha=1e-6, beta=1e-9, gamma=1e-10)
    n, P = 8 << 20, 6              # P' = 4: two ranks fold in and get the result back
    fold = 2 * 1e-6 + n * (2e-9 + 1e-10)
    assert cm.allreduce_time(n, P, net) == pytest.approx(
        2 * 2 * 1e-6 + 2 * 3 / 4 * n * 1e-9 + 3 / 4 * n * 1e-10 + fold)
    assert cm.recursive_doubling_time(n, P, net) == pytest.approx(2 * (1e-6 + n * 1.1e-9) + fold)
    assert cm.ring_time(n, P, net) == pytest.approx(
        2 * 5 * 1e-6 + 2 * 5 / 6 * n * 1e-9 + 5 / 6 * n * 1e-10)
    for algorithm in ("mpi", "recursive_doubling", "ring"):
        assert cm.algorithm_time(1024, 1, net, algorithm) == 0.0
    with pytest.raises(ValueError, match="unknown allreduce algorithm"):
        cm.algorithm_time(n, P, net, "auto")


@pytest.mark.parametrize("P", [2, 3, 4, 5, 8, 64])
def test_auto_thresholds_pick_the_cheapest_algorithm_of_the_model(P):
    net = cm.Network(alpha=3e-6, beta=1e-9, gamma=3e-11)
    auto = cm.auto_thresholds(net, P)
    # below MPICH's short threshold "mpi" is recursive doubling too, unless the ring wins there
    assert (auto.recursive_doubling_below >= net.allreduce_short_bytes
            or auto.ring_from <= net.allreduce_short_bytes)
    for n in [2 ** k for k in range(3, 30)]:
        chosen = auto.choose(n)
        times = {a: cm.algorithm_time(n, P, net, a) for a in ("mpi", "recursive_doubling", "ring")}
        assert times[chosen] <= 1.01 * min(times.values()), (n, chosen, times)
    assert (auto.ring_from == math.inf) == (P & (P - 1) == 0)   # the ring only beats the fold


def test_auto_thresholds_parse_and_print():
    auto = cm.AutoThresholds.parse("recursive_doubling_below=65536, ring_from=inf")
    assert auto == cm.AutoThresholds(65536, math.inf)
    assert [auto.choose(n) for n in (100, 65536)] == ["recursive_doubling", "mpi"]
    assert "65536 B" in str(auto) and "never" in str(auto)
    with pytest.raises(ValueError, match="bad auto threshold"):
        cm.AutoThresholds.parse("rd=5")


KIB = 1 << 10


def test_measured_thresholds_follow_the_fastest_with_ties_to_mpi():
    sizes = [4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB]
    times = {"mpi": [1.0, 2.0, 3.0, 4.0, 5.0],
             "recursive_doubling": [0.5, 1.5, 3.05, 5.0, 9.0],     # 16 KiB: within 3 % of mpi
             "ring": [2.0, 3.0, 4.0, 3.0, 4.0]}
    auto = cm.measured_auto_thresholds(sizes, times, source="synthetic")
    # RD below the midpoint of 8 and 16 KiB, ring from that of 16 and 32 KiB
    assert auto == cm.AutoThresholds(math.ceil(math.sqrt(8 * KIB * 16 * KIB)),
                                     math.ceil(math.sqrt(16 * KIB * 32 * KIB)))
    assert [auto.choose(n) for n in sizes] == ["recursive_doubling"] * 2 + ["mpi"] + ["ring"] * 2
    assert "synthetic" in str(auto)
    assert cm.AutoThresholds.parse(auto.spec()) == auto


@given(st.lists(st.tuples(st.floats(0.1, 10), st.floats(0.1, 10), st.floats(0.1, 10)),
                min_size=1, max_size=12),
       st.sampled_from([0.0, 0.03, 0.1]))
def test_measured_thresholds_never_lose_more_than_the_tie_to_mpi_or_the_best(rows, tie):
    """Any timing table: at every measured size the pick is within `tie` of the
    fastest and of mpi (noise below `tie` goes to mpi)."""
    sizes = [4 * KIB << i for i in range(len(rows))]
    times = {a: [r[i] for r in rows] for i, a in enumerate(("mpi", "recursive_doubling", "ring"))}
    auto = cm.measured_auto_thresholds(sizes, times, tie=tie)
    assert auto.recursive_doubling_below <= auto.ring_from or auto.ring_from == math.inf
    for i, n in enumerate(sizes):
        t = {a: times[a][i] for a in times}
        chosen = t[auto.choose(n)]
        assert chosen <= (1 + tie) * t["mpi"] + 1e-12
        assert chosen <= (1 + tie) * min(t.values()) + 1e-12
    assert cm.AutoThresholds.parse(auto.spec()) == auto


def test_measured_picks_out_of_the_model_order_become_bands():
    """As measured on the 2-core VM's loopback: recursive doubling small, the
    ring at a few MiB, MPI's own at 64 MiB; two thresholds cannot say that."""
    sizes = [256 * KIB, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
    times = {"mpi": [3.3, 7.2, 43.0, 117.0, 409.0],
             "recursive_doubling": [2.6, 7.0, 34.9, 89.7, 427.0],
             "ring": [3.1, 7.1, 35.3, 98.3, 464.0]}
    auto = cm.measured_auto_thresholds(sizes, times, source="loopback")
    mid = [math.ceil(math.sqrt(a * b)) for a, b in zip(sizes, sizes[1:])]
    assert auto.bands == ((mid[0], "recursive_doubling"), (mid[1], "mpi"),
                          (mid[3], "recursive_doubling"), (math.inf, "mpi"))
    assert [auto.choose(n) for n in sizes] == ["recursive_doubling", "mpi", "recursive_doubling",
                                               "recursive_doubling", "mpi"]
    assert "recursive_doubling below" in str(auto) and "mpi above (loopback)" in str(auto)
    assert cm.AutoThresholds.parse(auto.spec()) == auto
    with pytest.raises(ValueError, match="ending with inf"):
        cm.AutoThresholds(bands=((10.0, "ring"),))
    with pytest.raises(ValueError, match="unknown algorithms"):
        cm.AutoThresholds.parse("bands=ring:10;tree:inf")
    with pytest.raises(ValueError, match="ALGORITHM:BYTES"):
        cm.AutoThresholds.parse("bands=ring:ten;mpi:inf")


def test_measured_thresholds_edge_cases():
    sizes = [4 * KIB, 64 * KIB, 1 << 20]
    fast, slow = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
    always_rd = cm.measured_auto_thresholds(sizes, {"mpi": slow, "recursive_doubling": fast,
                                                    "ring": slow})
    assert always_rd.recursive_doubling_below == math.inf and always_rd.ring_from == math.inf
    assert always_rd.choose(1 << 30) == "recursive_doubling" and "any size" in str(always_rd)
    never_ring = cm.measured_auto_thresholds(sizes, {"mpi": fast, "recursive_doubling": slow,
                                                     "ring": slow})
    assert never_ring == cm.AutoThresholds(0, math.inf)
    always_ring = cm.measured_auto_thresholds(sizes, {"mpi": slow, "recursive_doubling": slow,
                                                      "ring": fast})
    assert always_ring == cm.AutoThresholds(0, 0) and always_ring.choose(1) == "ring"
    # noise: ring 2 % faster than mpi is a tie, which goes to mpi
    noisy = cm.measured_auto_thresholds(sizes, {"mpi": fast, "recursive_doubling": slow,
                                                "ring": [0.98 * t for t in fast]})
    assert noisy == cm.AutoThresholds(0, math.inf)
    with pytest.raises(ValueError, match="increasing"):
        cm.measured_auto_thresholds([2, 1, 3], {a: fast for a in ("mpi", "recursive_doubling",
                                                                  "ring")})
    with pytest.raises(ValueError, match="lack ring"):
        cm.measured_auto_thresholds(sizes, {"mpi": fast, "recursive_doubling": slow})


def _netfit(tmp_path, sweeps):
    d = {"network": {"alpha": 3e-6, "beta": 1e-9, "gamma": 3e-11}}
    if sweeps is not None:
        d["algorithms"] = sweeps
    path = tmp_path / "netfit.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_netfit_thresholds_measured_for_this_p_and_chunk_else_the_model(tmp_path):
    sweep = {"ranks": 2, "chunk_bytes": 1 << 20, "sizes": [4 * KIB, 8 * KIB],
             "median_s": {"mpi": [1.0, 1.0], "recursive_doubling": [0.5, 2.0],
                          "ring": [2.0, 2.0]}}
    path = _netfit(tmp_path, [sweep])
    measured = cm.netfit_auto_thresholds(path, 2, 1 << 20)
    assert measured == cm.AutoThresholds(math.ceil(math.sqrt(4 * KIB * 8 * KIB)), math.inf)
    assert "measured at P=2, chunk 1 MiB" in str(measured)
    model = cm.auto_thresholds(cm.Network(alpha=3e-6, beta=1e-9, gamma=3e-11), 3)
    other_p = cm.netfit_auto_thresholds(path, 3, 1 << 20)
    assert other_p == model and "cost model" in str(other_p) and "not P=3" in str(other_p)
    other_chunk = cm.netfit_auto_thresholds(path, 2, 4 << 20)
    assert other_chunk == cm.auto_thresholds(cm.Network(alpha=3e-6, beta=1e-9, gamma=3e-11), 2)
    assert "chunk 1 MiB, not 4 MiB" in str(other_chunk)
    no_sweep = cm.netfit_auto_thresholds(_netfit(tmp_path, None), 2, 1 << 20)
    assert "no measured sweep" in str(no_sweep)
    assert cm.netfit_auto_thresholds(path, 1, 1 << 20) == cm.AutoThresholds()   # P = 1: none


@pytest.mark.parametrize("P", [2, 3, 8])
def test_simulation_runs_the_algorithm_the_engine_runs(P):
    layers = net_layers(grad=4096)              # 8 x 4 KiB: one 32 KiB allreduce when blocking
    net = cm.Network(alpha=5e-6, beta=1e-9, gamma=1e-10, poll_s=0.0)
    comm = {a: cm.blocking_comm_time(layers, net, P, cm.Engine(chunk_bytes=1 << 30, algorithm=a))
            for a in cm.ALLREDUCE_ALGORITHMS}
    for a in ("mpi", "recursive_doubling", "ring"):
        assert comm[a] == pytest.approx(net.round_s(P) + cm.algorithm_time(32768, P, net, a))
    assert comm["auto"] == pytest.approx(min(comm[a] for a in ("mpi", "recursive_doubling", "ring")))
    with pytest.raises(ValueError, match="unknown allreduce algorithm"):
        cm.Channel(net, P, cm.Engine(algorithm="butterfly"))


def test_engine_chunks_reduce_scatter_and_allgather_like_allreduce():
    """ext/_progress.pyx: chunk c is piece c of every rank's slice, chunk_bytes / 4 / P each."""
    channel = cm.Channel(GIGABIT, 4, cm.Engine(chunk_bytes=1 << 20))
    for kind in ("reduce_scatter", "allgather", "allreduce"):
        sizes = channel.chunk_sizes(kind, 10 << 20)
        assert len(sizes) == 10 and sum(sizes) == pytest.approx(10 << 20)
    odd = channel.chunk_sizes("allgather", 4 * 1001)       # slices of 251, 250, 250, 250
    assert len(odd) == 1 and odd[0] == pytest.approx(4 * 1001)
    small = cm.Channel(GIGABIT, 4, cm.Engine(chunk_bytes=64, min_piece_bytes=0))  # 4 elements
    assert len(small.chunk_sizes("reduce_scatter", 4 * 1001)) == 63   # ceil(251 / 4)


@pytest.mark.parametrize("P", [2, 3, 4, 8192])
def test_min_piece_bounds_the_chunks_of_reduce_scatter_allgather_alltoall(P):
    """ext/_progress.pyx: a piece is max(min_piece_bytes, chunk_bytes / P) per rank."""
    nbytes = 4 * 25_000_000                            # ~100 MB, VGG-16's largest tensor
    for kind in ("reduce_scatter", "allgather", "alltoall"):
        plain = cm.Channel(GIGABIT, P, cm.Engine(chunk_bytes=1 << 20, min_piece_bytes=0))
        floor = cm.Channel(GIGABIT, P, cm.Engine(chunk_bytes=1 << 20, min_piece_bytes=65536))
        slice_bytes = 4 * math.ceil(nbytes / 4 / P)
        piece = 4 * ((1 << 20) // 4 // P)
        assert len(plain.chunk_sizes(kind, nbytes)) == math.ceil(slice_bytes / piece)
        assert len(floor.chunk_sizes(kind, nbytes)) == math.ceil(slice_bytes / max(piece, 65536))
        assert sum(floor.chunk_sizes(kind, nbytes)) == pytest.approx(nbytes)
    # at 8192 ranks a 128 B piece becomes 64 KiB: 96 chunks of (P - 1) alpha become one
    if P == 8192:
        assert len(plain.chunk_sizes("reduce_scatter", nbytes)) == 96
        assert len(floor.chunk_sizes("reduce_scatter", nbytes)) == 1


@given(st.integers(1, 1 << 28), st.integers(2, 10000))
def test_collectives_monotonic_in_bytes_and_beta(n, P):
    slow = cm.Network(alpha=2e-6, beta=2e-9, gamma=1e-10)
    fast = cm.Network(alpha=2e-6, beta=1e-9, gamma=1e-10)
    for fn in (cm.allreduce_time, cm.reduce_scatter_time, cm.allgather_time):
        assert fn(n, P, fast) <= fn(n, P, slow)


# -- the event simulation: limits ----------------------------------------------------

@pytest.mark.parametrize("kinds", [None, MIXED])
@pytest.mark.parametrize("strategy", ALL)
def test_zero_communication_cost_is_compute(strategy, kinds):
    layers = net_layers(update=0.0, kinds=kinds)
    r = cm.simulate(layers, FREE, strategy, P=16)
    assert r.iter_s == pytest.approx(compute(layers))
    assert r.compute_thread_s == pytest.approx(compute(layers))   # the FC GEMM only moves
    assert r.exposed_comm_s == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kinds", [None, MIXED])
@pytest.mark.parametrize("strategy", ALL)
def test_one_rank_is_compute(strategy, kinds):
    layers = net_layers(kinds=kinds)
    r = cm.simulate(layers, GIGABIT, strategy, P=1)
    assert r.iter_s == pytest.approx(compute(layers))
    assert r.comm_s == 0.0
    assert r.sent_bytes == 0.0


def test_multistep_updates_one_pth_of_the_model():
    layers = net_layers(update=0.004)
    r = cm.simulate(layers, FREE, "multistep", P=4)
    assert r.iter_s == pytest.approx(sum(l.fwd_s + l.bwd_s + l.update_s / 4 for l in layers))


@pytest.mark.parametrize("kinds", [None, MIXED])
@pytest.mark.parametrize("strategy", ALL)
def test_infinite_bandwidth_leaves_only_latencies(strategy, kinds):
    layers = net_layers(kinds=kinds)
    latency_only = cm.Network(alpha=1e-6, beta=0.0, gamma=0.0, poll_s=1e-6)
    r = cm.simulate(layers, latency_only, strategy, P=64)
    floor = sum(l.fwd_s + l.bwd_s + (l.update_s / 64 if strategy.startswith("multistep")
                                     else l.update_s) for l in layers)
    assert floor - 1e-12 <= r.iter_s <= floor + 1e-3     # a few dozen latencies at most


def test_blocking_is_the_sum():
    """T_iter = T_fwd + T_bwd + T_allreduce(N) + T_update(N) (+ the stats allreduce)."""
    layers = net_layers(grad=4096)
    engine = cm.Engine(chunk_bytes=1 << 30)            # one chunk, nothing to pipeline
    net = cm.Network(alpha=5e-6, beta=1e-9, gamma=1e-10, poll_s=0.0)
    r = cm.simulate(layers, net, "blocking", P=8, engine=engine)
    stats = cm.allreduce_time(8 * (3 + len(layers)), 8, net)
    assert r.comm_s == pytest.approx(net.round_s(8) + cm.allreduce_time(4096 * 8, 8, net))
    assert r.iter_s == pytest.approx(compute(layers) + r.comm_s + stats)
    assert r.overlap_efficiency == pytest.approx(-stats / r.comm_s)


@settings(max_examples=40, deadline=None)
@given(layer_lists, st.sampled_from(ALL), st.integers(2, 512),
       st.floats(1e-7, 1e-4), st.floats(1e-11, 1e-7))
def test_never_beats_the_physical_limit(layers, strategy, P, alpha, beta):
    """T_iter >= max(compute-thread time, link time); overlap efficiency <= 1 (+ rounding)."""
    net = cm.Network(alpha=alpha, beta=beta, gamma=beta / 10, poll_s=1e-5)
    r = cm.simulate(layers, net, strategy, P)
    assert r.iter_s >= cm.lower_bound(r) * (1 - 1e-9)
    if not strategy.startswith("multistep"):        # multistep updates only 1/P
        assert r.iter_s >= r.compute_s * (1 - 1e-9)
        assert r.overlap_efficiency <= 1 + 1e-9


@pytest.mark.parametrize("strategy", ALL)
def test_monotonic_in_beta(strategy):
    layers = net_layers(n=10, grad=3 << 20)
    times = [cm.simulate(layers, cm.Network(alpha=10e-6, beta=b, gamma=1e-10), strategy, 8).iter_s
             for b in (0.0, 1e-10, 1e-9, 4e-9, 1.6e-8, 6.4e-8)]
    assert all(a <= b + 1e-12 for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("strategy", ["layerwise", "bucketed", "priority", "multistep"])
def test_overlap_beats_blocking_when_comm_matters(strategy):
    layers = net_layers(n=10, grad=4 << 20)
    b = cm.simulate(layers, GIGABIT, "blocking", 8)
    r = cm.simulate(layers, GIGABIT, strategy, 8)
    assert r.iter_s < b.iter_s
    assert 0 < r.overlap_efficiency <= 1


def test_priority_hides_more_than_fifo_on_a_slow_link():
    # the first layers finish backprop last; FIFO leaves them behind every other layer's chunks
    layers = net_layers(n=10, grad=8 << 20)     # comm per layer > backward per layer
    fifo = cm.simulate(layers, GIGABIT, "layerwise", 2)
    prio = cm.simulate(layers, GIGABIT, "priority", 2)
    assert prio.iter_s < fifo.iter_s


def test_comm_behind_long_compute_is_fully_hidden():
    # layer 0's exchange can never hide (the next forward starts with it): make it small,
    # as a first convolution is; then only the trainer's loss/flag allreduce stays exposed
    layers = net_layers(n=6, grad=4 << 20, fwd=0.5, bwd=1.0, update=0.0)
    layers[0] = cm.LayerCost("l0", 0, "conv", 1024, 4096, 0.5, 1.0, 0.0)
    r = cm.simulate(layers, GIGABIT, "priority", 4)
    assert r.overlap_efficiency == pytest.approx(1.0, abs=0.05)


def test_buckets_match_the_strategy():
    """Bucket boundaries equal engine/strategies/bucketed.py's on a real model."""
    from cnn import models
    from engine.strategies.bucketed import form_buckets

    model = models.build("resnet20", seed=0)
    layers = [cm.LayerCost("x", i, "conv", sum(p.data.size for p in l.params),
                           sum(p.grad.nbytes for p in l.params), 0, 0, 0)
              for i, l in enumerate(model.layers)]
    for size in (1, 4096, 1 << 16, 1 << 20, 1 << 30):
        real = [[i for i, _ in b.layers] for b in form_buckets(model.layers, size)]
        assert cm.form_buckets(layers, size) == real


# -- multistep's FC path (engine/strategies/multistep.py) ------------------------------

def fc(n_in, n_out, kind="linear"):
    return cm.LayerCost("fc", 0, kind, n_in * n_out, 4 * n_in * n_out, 0.0, 0.0, 0.0,
                        in_features=n_in, out_features=n_out)


def test_fc_path_auto_picks_the_smaller_exchange():
    # VGG-16 fc6: the all-to-all moves 256 (25088/P + 4096) values, the gradient 103 M
    assert cm.fc_path(fc(25088, 4096), 256, P=16) == "alltoall"
    assert cm.fc_path(fc(84, 10), 256, P=16) == "reduce_scatter"      # LeNet's classifier
    # B = 8192: 8192 (12544 + 4096) = 136 M > 103 M at P = 2; 8192 (3136 + 4096) = 59 M at P = 8
    assert cm.fc_path(fc(25088, 4096), 8192, P=2) == "reduce_scatter"
    assert cm.fc_path(fc(25088, 4096), 8192, P=8) == "alltoall"
    assert cm.fc_path(fc(84, 10), 256, "activations") == "activations"
    assert cm.fc_path(fc(84, 10), 256, "alltoall") == "alltoall"
    assert cm.fc_path(fc(25088, 4096), 256, "reduce_scatter") == "reduce_scatter"
    assert cm.fc_path(fc(512, 512, kind="conv"), 2, "activations") == "reduce_scatter"
    assert cm.fc_path(fc(0, 0), 2) == "reduce_scatter"                # shape unknown
    with pytest.raises(ValueError, match="fc_mode"):
        cm.fc_path(fc(8, 8), 2, "all-to-all")
    with pytest.raises(ValueError, match="fc_mode"):
        cm.simulate(net_layers(), FREE, "multistep", 2, fc_mode="nope")


@pytest.mark.parametrize("mode", cm.FC_MODES)
def test_fc_path_is_the_engines_choice(mode):
    """The path the engine's FC wrapper takes, on small real Linear layers."""
    from types import SimpleNamespace

    from cnn.layers import Linear
    from engine import partition
    from engine.strategies.multistep import ActivationExchange, AllToAllExchange

    for n_in, n_out in ((84, 10), (64, 64), (300, 20), (20, 300), (1024, 8)):
        for P, local in ((1, 4), (2, 3), (4, 8), (8, 16), (16, 1), (64, 2)):
            layer = Linear(n_in, n_out)
            exchanger = SimpleNamespace(size=P, rank=0, partition=lambda n, P=P: partition(n, P))
            strategy = SimpleNamespace(exchanger=exchanger, fc_mode=mode)
            if mode == "reduce_scatter":
                expected = "reduce_scatter"
            elif mode == "activations":
                engine = ActivationExchange(0, layer, strategy)
                expected = "activations" if engine.chooses_activations(local) else "?"
                engine.restore()
            else:
                engine = AllToAllExchange(0, layer, strategy)
                expected = "alltoall" if engine.chooses_activations(local) else "reduce_scatter"
                engine.restore()
            assert cm.fc_path(fc(n_in, n_out), P * local, mode, P) == expected


def test_multistep_activations_send_far_less_for_vgg16():
    layers, P, B = vgg16_layers(), 16, 256
    rs = cm.simulate(layers, GIGABIT, "multistep", P, global_batch=B, fc_mode="reduce_scatter")
    act = cm.simulate(layers, GIGABIT, "multistep-activations", P, global_batch=B)
    paper = cm.simulate(layers, GIGABIT, "multistep-alltoall", P, global_batch=B)
    auto = cm.simulate(layers, GIGABIT, "multistep", P, global_batch=B)
    assert auto.sent_bytes == paper.sent_bytes            # auto takes the all-to-all here
    frac = (P - 1) / P
    fcs = [l for l in layers if l.kind == "linear"]
    grads = sum(l.grad_bytes for l in fcs)
    activations = 4 * B * sum(l.in_features + l.out_features for l in fcs)
    # the reduce-scatter of the FC gradients is replaced by the two allgathers
    assert rs.sent_bytes - act.sent_bytes == pytest.approx(frac * (grads - activations))
    assert activations < grads / 10                       # 43 MB instead of 494 MB
    assert act.sent_bytes < 0.65 * rs.sent_bytes           # the weight allgathers remain
    # the paper's all-to-all sends (P-1)/P B N_in / P instead of (P-1)/P B N_in for X
    x = 4 * B * sum(l.in_features for l in fcs)
    assert act.sent_bytes - paper.sent_bytes == pytest.approx(frac * (x - x / P))
    assert paper.iter_s <= act.iter_s < rs.iter_s
    assert act.channel_busy_s < rs.channel_busy_s


def test_multistep_fc_hooks_follow_the_engine():
    """X is gathered after the FC forward, dY just before its backward, both waited for
    after backprop, where the slice GEMM (half the FC backward) runs."""
    layers = net_layers(n=4, kinds=["conv", "conv", "linear", "linear"], fwd=0.01, bwd=0.02)
    net = cm.Network(alpha=1e-6, beta=1e-12, gamma=0.0, poll_s=0.0)
    r = cm.simulate(layers, net, "multistep-activations", 2, global_batch=64, iterations=1,
                    trace=True)
    begin = {label: start for label, start, _ in r.waits}
    assert "reduce-scatter 1" in begin
    assert "reduce-scatter 2" not in begin and "reduce-scatter 3" not in begin
    fwd = [sum(l.fwd_s for l in layers[:i + 1]) for i in range(4)]
    assert begin["allgather inputs 2"] == pytest.approx(fwd[2], abs=1e-4)
    assert begin["allgather inputs 3"] == pytest.approx(fwd[3], abs=1e-4)
    # backward of layer 3 (first) then layer 2, each without its dW GEMM (half of 0.02 s)
    assert begin["allgather errors 3"] == pytest.approx(fwd[3], abs=1e-4)
    assert begin["allgather errors 2"] == pytest.approx(fwd[3] + 0.01, abs=1e-4)
    assert r.compute_thread_s == pytest.approx(sum(l.fwd_s + l.bwd_s + l.update_s / 2
                                                   for l in layers), rel=1e-3)
    # a slow link: layer 2's dY arrives long after backprop; its slice GEMM waits for it
    slow = cm.Network(alpha=1e-6, beta=1e-6, gamma=0.0, poll_s=0.0)
    s = cm.simulate(layers, slow, "multistep-activations", 2, global_batch=64, iterations=1,
                    trace=True)
    end = {label: e for label, _, e in s.waits}
    assert end["allgather errors 2"] > compute(layers)
    # then: slice GEMM + 1/P update of layer 2, the same for layer 3
    assert s.iter_s >= end["allgather errors 2"] + 2 * (0.01 + layers[2].update_s / 2)


def test_multistep_alltoall_is_posted_before_the_fc_forward():
    """The paper's path: the all-to-all of X goes out before the layer's forward."""
    layers = net_layers(n=4, kinds=["conv", "conv", "linear", "linear"], fwd=0.01, bwd=0.02)
    net = cm.Network(alpha=1e-6, beta=1e-12, gamma=0.0, poll_s=0.0)
    r = cm.simulate(layers, net, "multistep", 2, global_batch=64, fc_mode="alltoall",
                    iterations=1, trace=True)
    begin = {label: start for label, start, _ in r.waits}
    fwd = [sum(l.fwd_s for l in layers[:i + 1]) for i in range(4)]
    assert begin["alltoall inputs 2"] == pytest.approx(fwd[1], abs=1e-4)
    assert begin["alltoall inputs 3"] == pytest.approx(fwd[2], abs=1e-4)
    assert "allgather inputs 2" not in begin and "reduce-scatter 2" not in begin
    assert begin["allgather errors 3"] == pytest.approx(fwd[3], abs=1e-4)


def test_multistep_fc_variant_sends_less_for_big_fc_layers():
    kinds = ["conv"] * 4 + ["linear"] * 2
    layers = [cm.LayerCost(f"l{i}", i, k, 0, (64 << 20) if k == "linear" else (1 << 20),
                           0.01, 0.02, 0.0, in_features=4096, out_features=4096)
              for i, k in enumerate(kinds)]
    rs = cm.simulate(layers, GIGABIT, "multistep", 16, global_batch=256, fc_mode="reduce_scatter")
    a = cm.simulate(layers, GIGABIT, "multistep", 16, global_batch=256)
    a = cm.simulate(layers, GIGABIT, "multistep-activations", 16, global_batch=256)
    b = cm.simulate(layers, GIGABIT, "multistep-alltoall", 16, global_batch=256)
    assert b.sent_bytes < a.sent_bytes < rs.sent_bytes
    assert b.channel_busy_s < a.channel_busy_s < rs.channel_busy_s
    assert b.iter_s <= a.iter_s < rs.iter_s


def test_simulation_at_8192_ranks_finishes():
    """Every strategy at 8192 ranks (the simulator's largest case) runs and
    stays within the physical limit; how long it takes is bench/simulate.py's
    business, not a unit test's."""
    layers = net_layers(n=60, grad=8 << 20)
    for s in ALL:
        r = cm.simulate(layers, GIGABIT, s, 8192)
        assert r.iter_s >= cm.lower_bound(r) * (1 - 1e-9)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        cm.simulate(net_layers(), FREE, "nope", 2)
    assert math.isfinite(cm.simulate(net_layers(), FREE, "blocking", 2).iter_s)


# -- one collective per unit (cnn Model.param_groups) ----------------------------------

def conv_bn_layers(pairs=8):
    """ResNet-like: (conv, batch norm) pairs, tiny tensors, so latency dominates."""
    layers = []
    for k in range(2 * pairs):
        kind = "conv" if k % 2 == 0 else "batchnorm"
        grad = 4096 if kind == "conv" else 512
        tensors = (grad,) if kind == "conv" else (grad // 2, grad // 2)
        layers.append(cm.LayerCost(f"l{k}", k, kind, grad // 4, grad, 1e-4, 2e-4, 1e-6,
                                   param_bytes=tensors))
    return layers


def test_fuse_units_is_the_models_grouping():
    from cnn import models
    from cnn.models.model import natural_units

    layers = conv_bn_layers(3) + [fc(64, 10)]
    fused = cm.fuse_units(layers)
    assert [l.name for l in fused] == ["l0+l1", "l2+l3", "l4+l5", "fc"]
    assert [l.index for l in fused] == [0, 1, 2, 3]
    assert fused[0].grad_bytes == 4096 + 512 and fused[0].tensors == (4096, 256, 256)
    assert sum(l.bwd_s for l in fused) == pytest.approx(sum(l.bwd_s for l in layers))
    model = models.build("resnet20")
    kinds = ["conv" if type(l).__name__ == "Conv2D" else
             "batchnorm" if type(l).__name__ == "BatchNorm2d" else "linear" for l in model.layers]
    mirror = [cm.LayerCost(str(i), i, k, 1, 4, 0.0, 0.0, 0.0) for i, k in enumerate(kinds)]
    assert len(cm.fuse_units(mirror)) == len(natural_units(model.layers)) == 22


@pytest.mark.parametrize("strategy", ["layerwise", "priority", "multistep"])
def test_one_request_per_unit_pays_the_latency_once(strategy):
    layers, P = conv_bn_layers(), 64
    slow_latency = cm.Network(alpha=200e-6, beta=1e-12, gamma=0.0, poll_s=0.0)
    units = cm.simulate(layers, slow_latency, strategy, P)
    per_tensor = cm.simulate(layers, slow_latency, strategy, P,
                             engine=cm.Engine(fuse_units=False))
    assert units.iter_s < per_tensor.iter_s
    assert units.compute_s == pytest.approx(per_tensor.compute_s)     # same work, fewer requests
