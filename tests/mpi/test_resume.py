"""engine.train faults: a checkpoint that cannot be written, one that is corrupt
at resume, and resuming on fewer ranks (same global batch, same data order,
the weights of an uninterrupted run)."""

import errno

import numpy as np
import pytest
from mpi4py import MPI

import cnn.checkpoint
from cnn.checkpoint import CheckpointError, load_checkpoint
from engine import train

COMM = MPI.COMM_WORLD
P, RANK = COMM.size, COMM.rank
BATCH = 12          # divisible by 1, 2, 3 and 4 ranks


def args_for(directory, *extra):
    return train.parse_args(["--iters", "8", "--batch-size", str(BATCH), "--checkpoint-dir",
                             str(directory), "--checkpoint-every", "4", "--no-progress",
                             "--threads", "1", "--schedule", "cosine", "--lr", "0.1",
                             "--stall-warn", "60", "--timeout", "120", *extra])


class Crash(Exception):
    """Stands in for a lost rank: the run stops on every rank after iteration `at`."""


def crash_after(monkeypatch, at):
    step = train.Trainer.step

    def stepping(self, x, y):
        if self.iteration == at:
            raise Crash(f"stopped after iteration {at}")
        return step(self, x, y)

    monkeypatch.setattr(train.Trainer, "step", stepping)


@pytest.mark.parametrize("fmt", ["single", "sharded"])
def test_a_failed_checkpoint_write_stops_every_rank_and_keeps_the_previous(
        shared_dir, monkeypatch, fmt):
    real = cnn.checkpoint._write_arrays
    calls = []
    full = 0 if fmt == "single" else P - 1      # the rank whose disk fills (sharded: one)

    def full_disk(f, arrays):
        calls.append(1)
        if RANK == full and len(calls) == 2:    # its second checkpoint (iteration 8)
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, arrays)

    monkeypatch.setattr(cnn.checkpoint, "_write_arrays", full_disk)
    with pytest.raises(train.CheckpointWriteError) as info:
        train.run(args_for(shared_dir, "--checkpoint-format", fmt), COMM)
    message = str(info.value)
    assert "at iteration 8" in message
    assert "the previous checkpoint (iteration 4) is intact" in message
    assert "No space left on device" in message        # on every rank, with who failed
    assert P == 1 or f"(rank {full})" in message
    COMM.Barrier()
    names = sorted(p.name for p in shared_dir.iterdir())
    assert train.CHECKPOINT_NAME in names
    assert not [name for name in names if name.startswith(".")], names  # no partial file
    assert load_checkpoint(shared_dir / train.CHECKPOINT_NAME).iteration == 4


def test_an_unwritable_checkpoint_directory_is_refused_before_training(shared_dir, capsys):
    if RANK == 0:
        (shared_dir / "blocked").write_text("a file where the directory should be")
    COMM.Barrier()
    target = shared_dir / "blocked" / "sub"
    code = train.main(["--iters", "2", "--batch-size", str(BATCH), "--no-progress",
                       "--threads", "1", "--checkpoint-dir", str(target)])
    assert code == 2
    if RANK == 0:
        err = capsys.readouterr().err
        assert f"--checkpoint-dir {target}: cannot write there" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing entry"])
def test_a_corrupt_checkpoint_at_resume_names_the_file(shared_dir, damage, capsys):
    train.run(args_for(shared_dir, "--iters", "4"), COMM)
    path = shared_dir / train.CHECKPOINT_NAME
    COMM.Barrier()
    if RANK == 0:
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            path.write_bytes(data[:100] + bytes(200) + data[300:])
        else:
            import zipfile
            with zipfile.ZipFile(path) as z:
                kept = {n: z.read(n) for n in z.namelist()
                        if not n.startswith(("params/fc", "shard/0."))}   # single, sharded
            with zipfile.ZipFile(path, "w") as z:
                for n, b in kept.items():
                    z.writestr(n, b)
    COMM.Barrier()
    with pytest.raises(CheckpointError) as info:
        train.run(args_for(shared_dir, "--resume"), COMM)
    assert str(path) in str(info.value)
    assert "Traceback" not in str(info.value)
    code = train.main(["--iters", "8", "--batch-size", str(BATCH), "--no-progress",
                       "--threads", "1", "--checkpoint-dir", str(shared_dir), "--resume"])
    assert code == 2
    if RANK == 0:
        assert str(path) in capsys.readouterr().err


@pytest.mark.skipif(P < 2, reason="resuming on fewer ranks needs at least 2")
def test_resume_on_one_rank_fewer_matches_the_uninterrupted_run(shared_dir, monkeypatch):
    whole, broken = shared_dir / "whole", shared_dir / "broken"
    train.run(args_for(whole), COMM)                  # 8 iterations on P ranks
    with monkeypatch.context() as m:
        crash_after(m, 6)                             # checkpoint at 4, lost at 6
        with pytest.raises(Crash):
            train.run(args_for(broken), COMM)
    mid = load_checkpoint(broken / train.CHECKPOINT_NAME)
    assert mid.iteration == 4
    COMM.Barrier()
    fewer = COMM.Split(0 if RANK < P - 1 else MPI.UNDEFINED, RANK)
    if fewer != MPI.COMM_NULL:
        metrics = train.run(args_for(broken, "--resume"), fewer)    # 4 more on P-1 ranks
        fewer.Free()
        assert metrics["iteration"] == 8
    COMM.Barrier()
    a = load_checkpoint(whole / train.CHECKPOINT_NAME)
    b = load_checkpoint(broken / train.CHECKPOINT_NAME)
    assert a.iteration == b.iteration == 8
    assert b.metadata["ranks"] == P - 1 and a.metadata["ranks"] == P
    for name in a.params:
        # Only the summation order differs (P vs P-1 partial sums).
        np.testing.assert_allclose(b.params[name], a.params[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(b.optimizer["momentum_buffers"][name],
                                   a.optimizer["momentum_buffers"][name], rtol=1e-4, atol=1e-6)
    # The resumed iterations did move the weights, far beyond the tolerance.
    assert max(float(np.abs(b.params[n] - mid.params[n]).max()) for n in b.params) > 1e-3
