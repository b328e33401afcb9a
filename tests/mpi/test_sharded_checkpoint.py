"""Sharded checkpoints (engine/checkpointing.py) at 1-4 ranks.

Each rank writes its own momentum slices; loading rank 0's file must give
back exactly the state a gathered (single-file) checkpoint holds, for every
way multistep slices a tensor (a unit's flat buffer spanning several
tensors, an FC weight by rows or by columns of its transpose), written now
or in the background; only the committed generation's files stay.
"""

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from cnn import models
from cnn.checkpoint import CheckpointError, load_checkpoint
from cnn.data import ShardedSampler
from cnn.optim import SGD
from engine.checkpointing import Checkpointer, shard_name
from engine.trainer import Trainer

COMM = MPI.COMM_WORLD
P, RANK = COMM.size, COMM.rank
BATCH = 24


def trained(images28, fc_mode, steps=2):
    x, y = images28
    model = models.build("lenet", seed=3)
    trainer = Trainer(model, SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                      "multistep", fc_mode=fc_mode, chunk_bytes=2048)
    sampler = ShardedSampler(len(x), BATCH, RANK, P, seed=5)
    for step in range(steps):
        idx = sampler.indices(0, step)
        trainer.step(x[idx], y[idx])
    return trainer


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("fc_mode", ["alltoall", "activations", "reduce_scatter"])
def test_the_shards_load_as_the_gathered_state(shared_dir, images28, fc_mode, background):
    target = shared_dir / "checkpoint.npz"
    with trained(images28, fc_mode) as trainer:
        saver = Checkpointer(trainer, COMM, target, fmt="sharded", background=background)
        assert saver.sharded
        saver.save(2, metadata={"note": "x"})
        saver.close()
        gathered = trainer.optimizer_state_dict()
        params = {p.name: p.data.copy() for p in trainer.model.parameters()}
    ckpt = load_checkpoint(target)
    assert ckpt.iteration == 2 and ckpt.metadata == {"note": "x"}
    assert set(ckpt.optimizer["momentum_buffers"]) == set(gathered["momentum_buffers"])
    for name, value in gathered["momentum_buffers"].items():
        np.testing.assert_array_equal(ckpt.optimizer["momentum_buffers"][name], value,
                                      err_msg=name)
    for name, value in params.items():
        np.testing.assert_array_equal(ckpt.params[name], value, err_msg=name)
    assert {k: v for k, v in ckpt.optimizer.items() if k != "momentum_buffers"} == \
        {k: v for k, v in gathered.items() if k != "momentum_buffers"}


@pytest.mark.parametrize("background", [False, True])
def test_only_the_committed_generation_stays(shared_dir, images28, background):
    target = shared_dir / "checkpoint.npz"
    with trained(images28, "auto", steps=1) as trainer:
        saver = Checkpointer(trainer, COMM, target, fmt="auto", background=background)
        for iteration in (1, 2, 3):
            saver.save(iteration)
            COMM.Barrier()
            if RANK == 0:       # in the background, a save commits the one before it
                committed = iteration - 1 if background else iteration
                assert (load_checkpoint(target).iteration == committed if committed
                        else not target.exists())
        saver.close()
    COMM.Barrier()
    names = sorted(p.name for p in shared_dir.iterdir())
    assert names == sorted([target.name] + [shard_name(target, 3, r, P).name for r in range(P)])
    assert load_checkpoint(target).iteration == 3
    assert target.samefile(shard_name(target, 3, 0, P))      # rank 0's file, linked


def test_a_missing_shard_is_named(shared_dir, images28):
    target = shared_dir / "checkpoint.npz"
    with trained(images28, "alltoall", steps=1) as trainer:
        saver = Checkpointer(trainer, COMM, target, fmt="sharded")
        saver.save(1)
        saver.save(2)
        saver.close()
    COMM.Barrier()
    if RANK == 0 and P > 1:
        last = shard_name(target, 2, P - 1, P)
        with pytest.raises(CheckpointError, match=f"shard {P - 1} of {P} of a sharded"):
            load_checkpoint(last)           # a shard alone is not a checkpoint
        last.unlink()
        with pytest.raises(CheckpointError, match=f"shard file .*{last.name} is missing"):
            load_checkpoint(target)
    COMM.Barrier()


def test_a_strategy_with_whole_momentum_cannot_shard(images28):
    model = models.build("lenet", seed=3)
    with Trainer(model, SGD(model.parameters(), lr=0.1, momentum=0.9), "priority") as trainer:
        with pytest.raises(ValueError, match="sharded checkpoints need a strategy"):
            Checkpointer(trainer, COMM, Path("unused.npz"), fmt="sharded")
        assert not Checkpointer(trainer, COMM, Path("unused.npz"), fmt="auto").sharded


def test_engine_train_refuses_sharded_for_whole_momentum(shared_dir, capsys):
    from engine import train
    code = train.main(["--iters", "2", "--batch-size", str(BATCH), "--no-progress",
                       "--threads", "1", "--strategy", "priority", "--checkpoint-format",
                       "sharded", "--checkpoint-dir", str(shared_dir)])
    assert code == 2
    if RANK == 0:
        assert "--checkpoint-format: sharded checkpoints need a strategy whose momentum is " \
               "sharded (multistep); priority keeps it whole" in capsys.readouterr().err
