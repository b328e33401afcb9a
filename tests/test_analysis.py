"""analysis/: the idealised schematic timelines and the per-strategy predictions."""

import json

import pytest

from analysis import costmodel as cm
from analysis import predict, schematic

NET = cm.Network(alpha=5e-6, beta=1e-8, gamma=1e-10)


def layers(n=5):
    return [cm.LayerCost(name=f"l{i}", index=i, kind="conv", params=1000 * (i + 1),
                         grad_bytes=4000 * (i + 1), fwd_s=1e-3 * (i + 1), bwd_s=2e-3 * (i + 1),
                         update_s=1e-4) for i in range(n)]


def lanes_do_not_overlap(spans):
    for lane in ("compute", "link"):
        ordered = sorted((s.start, s.end) for s in spans if s.lane == lane)
        for (_, end), (start, _) in zip(ordered, ordered[1:]):
            assert start >= end - 1e-12, (lane, end, start)


def test_blocking_is_compute_plus_one_allreduce():
    ls = layers()
    spans, iteration = schematic.schedule("blocking", ls, NET, P=4)
    compute = sum(l.fwd_s + l.bwd_s + l.update_s for l in ls)
    comm = cm.allreduce_time(sum(l.grad_bytes for l in ls), 4, NET)
    assert iteration == pytest.approx(compute + comm, rel=1e-12)
    lanes_do_not_overlap(spans)
    assert {s.kind for s in spans} == {"forward", "backward", "update", "wait", "allreduce"}


@pytest.mark.parametrize("strategy", ["layerwise", "multistep"])
def test_overlapping_strategies_respect_the_physical_limit(strategy):
    ls = layers()
    spans, iteration = schematic.schedule(strategy, ls, NET, P=4)
    lanes_do_not_overlap(spans)
    compute = sum(l.fwd_s + l.bwd_s for l in ls)
    blocking = schematic.schedule("blocking", ls, NET, P=4)[1]
    assert compute <= iteration < blocking
    kinds = {s.kind for s in spans if s.lane == "link"}
    assert kinds == ({"allreduce"} if strategy == "layerwise" else {"reduce_scatter", "allgather"})
    # a layer's first collective starts only after its first backward ends
    first_bwd, first_comm = {}, {}
    for s in spans:
        if s.kind == "backward":
            first_bwd.setdefault(s.label, s.end)
        elif s.lane == "link":
            first_comm.setdefault(s.label, s.start)
    assert first_comm.keys() == first_bwd.keys()
    for label, start in first_comm.items():
        assert start >= first_bwd[label] - 1e-12, label


def test_one_rank_never_waits():
    spans, iteration = schematic.schedule("multistep", layers(), NET, P=1)
    assert not [s for s in spans if s.kind == "wait"]
    assert iteration == pytest.approx(sum(l.fwd_s + l.bwd_s + l.update_s for l in layers()))


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        schematic.schedule("bucketed", layers(), NET, P=2)
    with pytest.raises(ValueError, match="P >= 1"):
        schematic.schedule("blocking", layers(), NET, P=0)


def test_schematic_cli_draws_a_picture(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert schematic.main(["--profile", "bench/results/profile_resnet20_b32.json",
                           "--network", "bench/results/netfit_1gbit.json", "--ranks", "2",
                           "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert "multistep" in capsys.readouterr().out


def test_predict_scales_compute_with_the_batch():
    profile = cm.Profile(layers(), batch_per_rank=8)
    at8 = predict.predict(profile, NET, 2)
    at16 = predict.predict(profile, NET, 2, batch_per_rank=16)
    assert [r.strategy for r in at8] == list(cm.STRATEGIES)
    fwd_bwd = sum(l.fwd_s + l.bwd_s for l in layers())
    for a, b in zip(at8, at16):
        assert b.compute_s - a.compute_s == pytest.approx(fwd_bwd)
        assert b.comm_s == pytest.approx(a.comm_s)


def test_predict_cli_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "net.json"
    bad.write_text(json.dumps({"alpha": 1e-6}))       # beta and gamma missing
    code = predict.main(["--profile", "bench/results/profile_resnet20_b32.json",
                         "--network", str(bad)])
    assert code == 2
    assert "analysis.predict" in capsys.readouterr().err
    assert predict.main(["--profile", str(tmp_path / "missing.json"), "--network", str(bad)]) == 2
