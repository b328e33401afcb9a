"""The benchmark helpers that are not benchmarks themselves: the core probe and
the README table of the throughput comparison."""

import json

import numba
import pytest

import cnn
from bench import report
from bench.coreprobe import kernel_slowdowns, two_thread_slowdown


@pytest.fixture
def set_threads():
    """cnn.set_num_threads, with numba's full thread count restored afterwards."""
    yield cnn.set_num_threads
    cnn.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_core_probe_needs_two_threads_and_gives_a_ratio(set_threads):
    set_threads(1)
    assert two_thread_slowdown() is None
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    set_threads(2)
    ratio = two_thread_slowdown(repeats=1)
    assert 0.2 < ratio < 50  # a time ratio, not a placeholder


def test_kernel_slowdowns_cover_the_four_kernels(set_threads):
    set_threads(1)
    assert kernel_slowdowns() is None
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    set_threads(2)
    ratios = kernel_slowdowns(repeats=1)
    assert list(ratios) == ["sgemm", "axpy_l1", "dot_l1", "axpy_l2"]
    # a ratio of two timings: positive and finite, however loaded the machine
    assert all(0 < ratio < 1e3 for ratio in ratios.values())


def test_throughput_table_shows_rounds_and_probes():
    row = {"model": "resnet20", "batch": 64, "threads": 2, "ours_img_s": 900.0, "torch_img_s": 800.0,
           "ratio": 1.125, "ours_peak_mb": 300.0, "torch_peak_mb": 500.0,
           "ours_img_s_rounds": [900.0, 650.0, 910.0], "torch_img_s_rounds": [800.0, 810.0, 700.0],
           "ours_probe_rounds": [1.1, 2.6, 1.12], "torch_probe_rounds": [1.09, 1.1, 2.7]}
    lines = report.throughput_section([row, dict(row, threads=1, ours_probe_rounds=None,
                                                 torch_probe_rounds=None)])
    two = next(line for line in lines if line.startswith("| resnet20 | 64 | 2 |"))
    assert two.endswith("| 900, 650, 910 / 800, 810, 700 | 1.10, 2.60, 1.12 / 1.09, 1.10, 2.70 |")
    one = next(line for line in lines if line.startswith("| resnet20 | 64 | 1 |"))
    assert one.endswith("| n/a / n/a |")
    header = next(line for line in lines if line.startswith("| model |"))
    assert header.count("|") == two.count("|")


def test_write_results_puts_json_table_and_plot_side_by_side(tmp_path):
    from bench.common import write_results

    drawn = []
    rows = [{"k": 1, "t_ms": 2.5}]
    write_results(rows, str(tmp_path / "sub" / "r.json"), "| k |\n|---|",
                  plot=lambda r, path: drawn.append((r, path)))
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == rows
    assert (tmp_path / "sub" / "r.md").read_text() == "| k |\n|---|\n"
    assert drawn == [(rows, str(tmp_path / "sub" / "r.png"))]


def test_ensemble_factor_and_its_bound_come_from_the_measured_cpu():
    from bench.ensemble import add_factors, table

    def record(k, pipeline, cpu, pipeline_cpu, samples):
        return {"members": k, "pipeline": pipeline, "model": "lenet-cifar", "batch_size": 10,
                "timed_iters": 10, "iters": 11, "rounds": 3, "cpu_s": cpu,
                "pipeline_cpu_s": pipeline_cpu, "pipeline_samples": samples, "wait_s": 0.0,
                "wall_s": 1.0, "img_s_per_member": 50.0}

    # K = 2, separate: 100 images per member, p = 0.2 s / 200 images, t = 0.8 s / 200.
    rows = [record(2, "shared", 0.9, 0.1, 100), record(2, "separate", 1.0, 0.2, 200)]
    add_factors(rows)
    for r in rows:
        assert r["p_over_t"] == pytest.approx(0.25)
        assert r["cpu_factor"] == pytest.approx(1.0 / r["cpu_s"], abs=1e-3)   # 1 for separate
        assert r["cpu_factor_bound"] == pytest.approx(2 * 1.25 / 2.25, abs=1e-3)
        assert r["speed_vs_separate"] == 1.0
    text = table(rows)
    assert "| lenet-cifar | 2 | shared | 0.90 |" in text and "1.11 (1.11)" in text
    # A distributed run at the same K gets its own factor and speed, against separate.
    rows.append(dict(record(2, "distributed", 0.8, 0.1, 100), img_s_per_member=60.0))
    add_factors(rows)
    assert rows[-1]["cpu_factor"] == 1.25 and rows[-1]["speed_vs_separate"] == 1.2
    section = report.ensemble_factor_section(rows)
    assert ("| lenet-cifar | 2 | no | 0.250 | 0.90 | 0.80 | 1.00 | 1.11 (1.11) | 1.25 | "
            "50.0 | 60.0 | 50.0 |") in section
    rows.pop()
    section = report.ensemble_section(rows + [{"img_s_per_member": 1.0, "members": 1}])
    line = next(s for s in section if s.startswith("| lenet-cifar | 2 |"))
    assert line == "| lenet-cifar | 2 | no | 0.250 | 0.90 | 1.00 | 1.11 (1.11) | 50.0 | 50.0 |"
    # A --pipeline-rank run at the same K is a pair of its own, not mixed with the first.
    rank_rows = [dict(r, pipeline_rank_run=True, cpu_s=0.8 if r["pipeline"] == "shared" else 1.2)
                 for r in rows]
    section = report.ensemble_section(rows + rank_rows)
    assert sum(s.startswith("| lenet-cifar | 2 |") for s in section) == 2
    line = next(s for s in section if s.startswith("| lenet-cifar | 2 | yes |"))
    assert "| 0.80 | 1.20 |" in line


def test_checkpoint_section_sorts_links_formats_and_intervals():
    runs = [("1gbit", None, None, "none"), ("1gbit", None, 4, "async"),
            ("loopback", "sharded", 16, "sync"), ("loopback", "sharded", 4, "sync"),
            ("loopback", None, None, "none"), ("loopback", "single", 4, "async")]
    rows = [{"model": "vgg16-cifar", "ranks": 2, "checkpoint_mb": 114.3, "link": link,
             "every": every, "mode": mode, "step_ms": 100.0 + i, "overhead": 0.01 * i,
             **({"format": fmt} if fmt else {})}        # files before formats: single
            for i, (link, fmt, every, mode) in enumerate(runs)]
    lines = report.checkpoint_section(rows)
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[:5] for line in table] == [
        ["| loopback", "", "sharded", "4", "sync"], ["| loopback", "", "sharded", "16", "sync"],
        ["| loopback", "", "single", "-", "none"], ["| loopback", "", "single", "4", "async"],
        ["| 1gbit", "", "single", "-", "none"], ["| 1gbit", "", "single", "4", "async"]]


def test_netfit_merges_one_algorithm_sweep_per_ranks_and_chunk():
    from analysis import costmodel as cm
    from bench import netfit

    def sweep(ranks, chunk, rd):
        return {"ranks": ranks, "chunk_bytes": chunk, "sizes": [4096, 8192],
                "median_s": {"mpi": [1.0, 1.0], "recursive_doubling": [rd, rd],
                             "ring": [2.0, 2.0]}}

    fit = {"network": {"alpha": 1e-6, "beta": 1e-9}}
    merged = netfit.merge_sweep(fit, sweep(4, 1 << 20, 0.5))
    merged = netfit.merge_sweep(merged, sweep(2, 1 << 20, 0.5))
    merged = netfit.merge_sweep(merged, sweep(2, 1 << 20, 2.0))     # replaces the first P = 2
    assert merged["network"] == fit["network"] and "algorithms" not in fit
    assert [(s["ranks"], s["chunk_bytes"]) for s in merged["algorithms"]] == [(2, 1 << 20),
                                                                           (4, 1 << 20)]
    found, _ = cm.measured_sweep(merged, 2, 1 << 20)
    assert found["median_s"]["recursive_doubling"] == [2.0, 2.0]
    assert cm.measured_sweep(merged, 3, 1 << 20) == (None, "it has measured sweeps for P=[2, 4], "
                                                           "not P=3")
