"""The fault report (bench/faults.py) run for real under mpiexec: a stopped rank,
a killed rank, a corrupt checkpoint, a full disk, and engine.supervise
restarting on fewer ranks; plus the supervisor's rank arithmetic."""

import json
import os
import subprocess
import sys

import pytest

from bench import faults
from engine import supervise


def test_next_ranks_divides_the_batch():
    assert supervise.next_ranks(4, 12, 1) == 3
    assert supervise.next_ranks(4, 8, 1) == 2
    assert supervise.next_ranks(3, 12, 1) == 2
    assert supervise.next_ranks(2, 12, 2) is None
    assert supervise.next_ranks(1, 12, 1) is None


def test_supervise_refuses_a_run_without_checkpoints():
    with pytest.raises(SystemExit, match="--checkpoint-dir"):
        supervise.main(["-n", "2", "--", "--iters", "4"])
    with pytest.raises(SystemExit, match="'--'"):
        supervise.main(["-n", "2", "--iters", "4"])


def test_every_fault_scenario_is_detected_and_resumes_correctly(tmp_path):
    out = tmp_path / "faults.json"
    assert faults.main(["--quick", "--json-out", str(out),
                        "--only", "sigstop,kill9,corrupt,full_disk,supervise"]) == 0
    report = {r["scenario"]: r for r in json.loads(out.read_text())["scenarios"]}
    assert set(report) == {"sigstop", "kill9", "corrupt", "full_disk", "supervise"}, report

    stop = report["sigstop"]
    assert stop["detected"] and stop["exit_status"] == 3 and stop["ranks_exited"] == 2, stop
    assert "rank 1 did not answer" in stop["message"], stop
    assert stop["checkpoint_loads"] and stop["resume_correct"], stop
    assert stop["resume_compared"] == "bitwise", stop

    kill = report["kill9"]
    assert kill["detected"] and kill["exit_status"] != 0 and kill["ranks_exited"] == 2, kill
    assert kill["checkpoint_loads"] and kill["resumed_on"] == 1 and kill["resume_correct"], kill

    corrupt = report["corrupt"]
    assert corrupt["detected"] and corrupt["exit_status"] == 2, corrupt
    assert "checkpoint.npz" in corrupt["message"], corrupt

    disk = report["full_disk"]
    if os.geteuid() == 0:
        assert disk["detected"] and disk["checkpoint_loads"], disk
        assert "No space left on device" in disk["message"], disk
        assert f"(iteration {disk['checkpoint_iteration']}) is intact" in disk["message"], disk

    sup = report["supervise"]
    assert sup["exit_status"] == 0 and sup["resume_correct"], sup
    assert [a["ranks"] for a in sup["attempts"]] == [2, 1], sup
    assert sup["attempts"][1]["resumed_at"] == sup["attempts"][0]["checkpoint_after"], sup


def test_the_supervisor_process_does_not_initialise_mpi():
    """`python -m engine.supervise` launches MPI jobs; it must not be one itself."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['engine.supervise', '--help']\n"
             "try:\n"
             "    runpy.run_module('engine.supervise', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "from mpi4py import MPI\n"
             "print(MPI.Is_initialized())\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
