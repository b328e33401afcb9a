"""`engine.train --straggler`: a slow rank changes the time, never the weights."""

import tempfile

import numpy as np
from mpi4py import MPI

from cnn.checkpoint import load_checkpoint
from engine import train

WORLD = MPI.COMM_WORLD
COMMON = ["--no-progress", "--batch-size", str(8 * WORLD.size), "--threads", "1",
          "--schedule", "constant", "--iters", "3"]


def test_straggler_run_ends_with_the_weights_of_a_normal_run():
    root = WORLD.bcast(tempfile.mkdtemp(prefix="straggler-test-") if WORLD.rank == 0 else None)
    slow = str(WORLD.size - 1)
    assert train.main([*COMMON, "--checkpoint-dir", f"{root}/normal"]) == 0
    assert train.main([*COMMON, "--checkpoint-dir", f"{root}/slow",
                       "--straggler", f"{slow}:1.5"]) == 0
    assert train.main([*COMMON, "--checkpoint-dir", f"{root}/spin",
                       "--straggler", f"{slow}:1.25", "--straggler-mode", "spin"]) == 0
    if WORLD.rank == 0:
        normal = load_checkpoint(f"{root}/normal/checkpoint.npz")
        for name in ("slow", "spin"):
            other = load_checkpoint(f"{root}/{name}/checkpoint.npz")
            for key in normal.params:
                np.testing.assert_array_equal(normal.params[key], other.params[key])
    WORLD.Barrier()


def test_bad_straggler_fails_on_every_rank(capsys):
    assert train.main([*COMMON, "--straggler", f"{WORLD.size}:2"]) == 2
    assert train.main([*COMMON, "--straggler", "0:0.9"]) == 2
    err = capsys.readouterr().err
    if WORLD.rank == 0:
        assert f"rank {WORLD.size} is not in [0, {WORLD.size})" in err
        assert "factor must be a finite number >= 1" in err
