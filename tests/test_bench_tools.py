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
