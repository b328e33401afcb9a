"""The background checkpoint writer (engine/async_checkpoint.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cnn.checkpoint import load_checkpoint
from engine.async_checkpoint import AsyncCheckpointWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writes_the_snapshot_taken_at_submit(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    momentum = {"momentum_buffers": {"w": np.ones(5, np.float32)}, "lr": 0.1}
    with AsyncCheckpointWriter() as writer:
        writer.submit(tmp_path / "c.npz", {"w": w}, optimizer=momentum, iteration=7,
                      metadata={"run": "a"})
        w += 100                                   # training goes on and updates in place
        momentum["momentum_buffers"]["w"][:] = -1
    assert writer.written == 1 and not writer.busy
    ckpt = load_checkpoint(tmp_path / "c.npz")
    np.testing.assert_array_equal(ckpt.params["w"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(ckpt.optimizer["momentum_buffers"]["w"], np.ones(5))
    assert ckpt.iteration == 7 and ckpt.metadata == {"run": "a"}


def test_checkpoints_land_in_order(tmp_path):
    writer = AsyncCheckpointWriter()
    for it in range(4):
        writer.submit(tmp_path / "c.npz", {"w": np.full(1000, it, np.float32)}, iteration=it)
    writer.close()
    assert writer.written == 4 and load_checkpoint(tmp_path / "c.npz").iteration == 3


def test_a_failed_write_is_raised_on_the_next_call(tmp_path):
    writer = AsyncCheckpointWriter()
    writer.submit(tmp_path / "missing-dir" / "c.npz", {"w": np.zeros(3)})
    with pytest.raises(FileNotFoundError):
        writer.wait()
    writer.submit(tmp_path / "c.npz", {"w": np.zeros(3)})     # usable again afterwards
    writer.close()
    assert writer.written == 1


def test_snapshots_reuse_the_previous_arrays_once_written(tmp_path):
    writer = AsyncCheckpointWriter()
    w = np.zeros(1000, np.float32)
    writer.submit(tmp_path / "a.npz", {"w": w}, optimizer={"m": [np.ones(3)]})
    first = writer._last
    w += 1
    writer.submit(tmp_path / "b.npz", {"w": w}, optimizer={"m": [np.ones(3)]})
    second = writer._last
    assert second[0]["w"] is first[0]["w"]                # no new 100 MB allocation
    assert second[1]["optimizer"]["m"][0] is first[1]["optimizer"]["m"][0]
    writer.submit(tmp_path / "c.npz", {"w": np.zeros(7, np.float32)})     # shape changed
    assert writer._last[0]["w"] is not first[0]["w"]
    writer.close()
    # the reuse came after each write had landed: every file holds its own state
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "a.npz").params["w"], 0)
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "b.npz").params["w"], 1)
    assert load_checkpoint(tmp_path / "c.npz").params["w"].shape == (7,)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux scheduling policies")
def test_the_writer_runs_at_idle_priority_and_the_caller_does_not(tmp_path):
    before = os.sched_getscheduler(0)
    with AsyncCheckpointWriter() as writer:
        writer.submit(tmp_path / "c.npz", {"w": np.zeros(3)})
    assert writer.priority in ("SCHED_IDLE", "nice 19")
    assert os.sched_getscheduler(0) == before            # only the writer thread changed
    with AsyncCheckpointWriter(background_priority=False) as writer:
        writer.submit(tmp_path / "c.npz", {"w": np.zeros(3)})
    assert writer.priority == ""


CHILD = textwrap.dedent("""
    import io, sys, time
    import numpy as np
    import cnn.checkpoint as checkpoint
    from engine.async_checkpoint import AsyncCheckpointWriter

    path, marks = sys.argv[1], sys.argv[2]
    checkpoint.save_checkpoint(path, {"w": np.full(4096, 1.0, np.float32)}, iteration=1)

    def half_then_hang(f, arrays):
        # Half of a real archive reaches the temporary file, then the process dies.
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        open(marks + ".writing", "w").close()
        time.sleep(120)

    checkpoint._write_arrays = half_then_hang
    writer = AsyncCheckpointWriter()
    writer.submit(path, {"w": np.full(4096, 2.0, np.float32)}, iteration=2)
    open(marks + ".training", "w").close()     # submit returned: training continues
    time.sleep(120)
""")


def test_killed_mid_write_the_previous_checkpoint_is_intact(tmp_path):
    path, marks = tmp_path / "checkpoint.npz", str(tmp_path / "mark")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), marks], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(marks + ".writing") and os.path.exists(marks + ".training")):
            assert child.poll() is None, "the child died before the write started"
            assert time.monotonic() < deadline, "the background write never started"
            time.sleep(0.05)
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert leftovers and leftovers[0].stat().st_size > 0      # really mid-write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ckpt = load_checkpoint(path)
    assert ckpt.iteration == 1
    np.testing.assert_array_equal(ckpt.params["w"], np.full(4096, 1.0, np.float32))


@pytest.fixture
def restore_threads():
    """engine.train sets the process-wide compute thread count; later tests expect it back."""
    import numba

    import cnn
    threads = numba.get_num_threads()
    yield
    cnn.set_num_threads(threads)


def test_sync_and_async_checkpoints_of_engine_train_are_identical(tmp_path, restore_threads):
    from mpi4py import MPI

    from engine import train
    common = ["--no-progress", "--iters", "4", "--checkpoint-every", "2", "--threads", "1",
              "--batch-size", "16"]
    train.run(train.parse_args([*common, "--checkpoint-dir", str(tmp_path / "sync")]),
              MPI.COMM_SELF)
    train.run(train.parse_args([*common, "--checkpoint-dir", str(tmp_path / "async"),
                                "--checkpoint-async"]), MPI.COMM_SELF)
    a = load_checkpoint(tmp_path / "sync" / "checkpoint.npz")
    b = load_checkpoint(tmp_path / "async" / "checkpoint.npz")
    assert a.iteration == b.iteration == 4
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
        np.testing.assert_array_equal(a.optimizer["momentum_buffers"][name],
                                      b.optimizer["momentum_buffers"][name])
