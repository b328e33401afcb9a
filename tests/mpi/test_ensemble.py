"""Ensemble training (engine.ensemble) and its data delivery (engine/pipeline.py).

The member counts K are those that fit the job: K divides P (G = P/K ranks per
member) or P divides K (K/P members per rank), so each P runs its own set.
"""

import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from cnn.checkpoint import load_checkpoint
from cnn.data import load_digits
from engine import ensemble, train
from engine.pipeline import DistributedDelivery, Pipeline, SeparateDelivery, SharedDelivery

WORLD = MPI.COMM_WORLD
BATCH = 24          # divisible by every group size 1..4
MEMBER_COUNTS = [k for k in (1, 2, 3, 4) if WORLD.size % k == 0 or k % WORLD.size == 0]
COMMON = ["--no-progress", "--batch-size", str(BATCH), "--threads", "1",
          "--schedule", "constant", "--data-seed", "7"]


def shared_tmpdir():
    path = tempfile.mkdtemp(prefix="ensemble-test-") if WORLD.rank == 0 else None
    return WORLD.bcast(path, root=0)


def digits_pipeline(crop_pad, batch=BATCH):
    x, y = load_digits("train")
    return Pipeline(lambda idx: (x[idx], y[idx]), len(x), batch, seed=3, crop_pad=crop_pad)


def assert_same_checkpoint(a, b, what):
    assert a.iteration == b.iteration, what
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=f"{what}: {name}")
        np.testing.assert_array_equal(a.optimizer["momentum_buffers"][name],
                                      b.optimizer["momentum_buffers"][name],
                                      err_msg=f"{what}: momentum {name}")
    for name in a.buffers:
        np.testing.assert_array_equal(a.buffers[name], b.buffers[name], err_msg=f"{what}: {name}")


def check_delivery(delivery_class, k, crop_pad, depth, prefetch, shard=None):
    """Every rank's shard, step by step, is its slice of the pipeline's batch."""
    color, local_rank, group_size, _ = ensemble.layout(WORLD.size, WORLD.rank, k)
    batch = BATCH if shard is None else shard * group_size
    pipeline = digits_pipeline(crop_pad, batch)
    positions = [(0, 0), (0, 1), (1, 0), (3, 5)]
    delivery = delivery_class(pipeline, WORLD, local_rank, group_size, (1, 8, 8), depth=depth,
                              prefetch=prefetch)
    separate = SeparateDelivery(digits_pipeline(crop_pad, batch), local_rank, group_size)
    delivery.start(positions)
    separate.start(positions)
    group = WORLD.Split(color, WORLD.rank)
    try:
        for epoch, step in positions:
            x, y = delivery.next()()
            assert x.dtype == np.float32 and x.shape == (batch // group_size, 1, 8, 8)
            # The shards of a member's ranks put together are exactly the pipeline's batch ...
            full_x, full_y = pipeline.batch(epoch, step)
            np.testing.assert_array_equal(np.concatenate(group.allgather(x)), full_x)
            np.testing.assert_array_equal(np.concatenate(group.allgather(y)), full_y)
            # ... and what a rank's own pipeline would have made of its slice.
            own_x, own_y = separate.next()()
            np.testing.assert_array_equal(x, own_x)
            np.testing.assert_array_equal(y, own_y)
        with pytest.raises(RuntimeError, match="no step left"):
            delivery.next()
        if crop_pad:    # the augmentation did something
            plain = Pipeline(pipeline.read, pipeline.sampler.dataset_size, batch, seed=3)
            assert not np.array_equal(plain.batch(0, 0)[0], pipeline.batch(0, 0)[0])
    finally:
        delivery.close()
        separate.close()
        group.Free()


@pytest.mark.parametrize("delivery_class", [SharedDelivery, DistributedDelivery])
@pytest.mark.parametrize("k", MEMBER_COUNTS)
@pytest.mark.parametrize("crop_pad", [0, 1])
# Double buffering made on the training thread; more steps in flight than there are.
@pytest.mark.parametrize("depth, prefetch", [(2, 0), (5, 2)])
def test_delivery_gives_every_rank_its_shard_of_the_pipeline_batch(delivery_class, k, crop_pad,
                                                                   depth, prefetch):
    check_delivery(delivery_class, k, crop_pad, depth, prefetch)


@pytest.mark.parametrize("k", MEMBER_COUNTS)
# 5 samples split unevenly over 2-4 ranks; 1 sample: some ranks make nothing.
@pytest.mark.parametrize("shard", [5, 1])
def test_distributed_delivery_splits_shards_of_any_size(k, shard):
    check_delivery(DistributedDelivery, k, 1, 3, 1, shard)
    # Each sample was made on exactly one rank of the ranks that share it.
    _, local_rank, group_size, _ = ensemble.layout(WORLD.size, WORLD.rank, k)
    delivery = DistributedDelivery(digits_pipeline(0, shard * group_size), WORLD, local_rank,
                                   group_size, (1, 8, 8))
    pieces = delivery.comm.allgather((delivery.lo, delivery.hi))
    delivery.close()
    assert pieces[0][0] == local_rank * shard and pieces[-1][1] == (local_rank + 1) * shard
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert max(hi - lo for lo, hi in pieces) == -(-shard // len(pieces))


@pytest.mark.parametrize("delivery_class", [SharedDelivery, DistributedDelivery])
def test_delivery_rejects_a_depth_or_prefetch_out_of_range(delivery_class):
    for depth, prefetch, message in ((1, 2, "depth must be >= 2"), (3, -1, "prefetch must be >= 0")):
        with pytest.raises(ValueError, match=f"{delivery_class.__name__}: {message}"):
            delivery_class(digits_pipeline(0), WORLD, 0, 1, (1, 8, 8), depth, prefetch)


@pytest.mark.parametrize("depth", [2, 4])
def test_members_run_depth_minus_one_steps_ahead_of_rank_0(depth):
    """Rank 0 posts depth - 1 steps in start(); the others take them all before
    rank 0 takes any (rank 0 sits in a barrier meanwhile), with the right data."""
    k = WORLD.size      # one rank per member
    _, local_rank, group_size, _ = ensemble.layout(WORLD.size, WORLD.rank, k)
    pipeline = digits_pipeline(1)
    positions = [(0, s) for s in range(depth + 1)]
    shared = SharedDelivery(pipeline, WORLD, local_rank, group_size, (1, 8, 8), depth=depth)
    shared.start(positions)
    try:
        if WORLD.rank != 0:
            for epoch, step in positions[:depth - 1]:
                x, y = shared.next()()
                np.testing.assert_array_equal(x, pipeline.batch(epoch, step)[0])
        WORLD.Barrier()
        for epoch, step in positions[depth - 1 if WORLD.rank else 0:]:
            x, y = shared.next()()
            np.testing.assert_array_equal(y, pipeline.batch(epoch, step)[1])
    finally:
        shared.close()


@pytest.mark.parametrize("k", MEMBER_COUNTS)
def test_every_member_equals_its_standalone_run(k):
    """Member m of a shared-pipeline ensemble ends with bitwise the weights,
    momentum and BN statistics of `engine.train` run alone on G ranks with
    member m's seed and learning rate on the same data."""
    root = shared_tmpdir()
    seeds = [11 * m + 1 for m in range(k)]
    lrs = [0.05 + 0.02 * m for m in range(k)]
    metrics = ensemble.run(ensemble.parse_args(
        [*COMMON, "--iters", "5", "--seeds", ",".join(map(str, seeds)),
         "--lrs", ",".join(map(str, lrs)), "--checkpoint-dir", f"{root}/ensemble"]), WORLD)
    assert len(metrics["members"]) == k and 0 <= metrics["ensemble_accuracy"] <= 1
    color, local_rank, _, local = ensemble.layout(WORLD.size, WORLD.rank, k)
    group = WORLD.Split(color, WORLD.rank)
    for m in local:
        train.run(train.parse_args(
            [*COMMON, "--iters", "5", "--seed", str(seeds[m]), "--lr", str(lrs[m]),
             "--checkpoint-dir", f"{root}/alone{m}"]), group)
        if local_rank == 0:
            assert_same_checkpoint(load_checkpoint(f"{root}/ensemble/member{m}/checkpoint.npz"),
                                   load_checkpoint(f"{root}/alone{m}/checkpoint.npz"),
                                   f"member {m} of {k}")
    group.Free()
    WORLD.Barrier()


def test_shared_distributed_and_separate_pipelines_train_the_same_ensemble():
    root = shared_tmpdir()
    k = max(MEMBER_COUNTS)
    runs = {}
    # Batches made on the training thread, one step ahead: the counts below are exact.
    for pipeline in ("shared", "distributed", "separate"):
        runs[pipeline] = ensemble.run(ensemble.parse_args(
            [*COMMON, "--iters", "4", "--members", str(k), "--crop-pad", "1",
             "--pipeline", pipeline, "--prefetch", "0", "--pipeline-depth", "2",
             "--checkpoint-dir", f"{root}/{pipeline}_pipeline"]), WORLD)
    _, local_rank, _, local = ensemble.layout(WORLD.size, WORLD.rank, k)
    for one in ("shared", "distributed"):
        assert runs[one]["members"] == runs["separate"]["members"]
        assert runs[one]["ensemble_accuracy"] == runs["separate"]["ensemble_accuracy"]
        for m in local if local_rank == 0 else ():
            assert_same_checkpoint(
                load_checkpoint(f"{root}/{one}_pipeline/member{m}/checkpoint.npz"),
                load_checkpoint(f"{root}/separate_pipeline/member{m}/checkpoint.npz"),
                f"member {m}, {one} pipeline")
    # One pipeline instead of k: rank 0 alone (shared) or all ranks together
    # (distributed) made each batch once. In the timed iterations (all but the
    # first) that was the batches of steps 2 and 3 (step 1 was made in the
    # first); every member made its own 1-3.
    assert runs["shared"]["pipeline_cpu_s"] < runs["separate"]["pipeline_cpu_s"] or k == 1
    for run in runs.values():
        assert run["timed_iters"] == 3 and run["wall_s"] > 0 and run["wait_s"] >= 0
    assert runs["shared"]["pipeline_samples"] == runs["distributed"]["pipeline_samples"] \
        == 2 * BATCH
    assert runs["separate"]["pipeline_samples"] == 3 * k * BATCH
    WORLD.Barrier()


@pytest.mark.skipif(WORLD.size < 2, reason="a pipeline rank needs a second rank to feed")
def test_a_dedicated_pipeline_rank_trains_the_same_members_and_resumes():
    """K = P - 1 members on ranks 1..P-1, fed by rank 0, equal the same ensemble
    run without a pipeline rank on those ranks alone; a resumed run equals both."""
    root = shared_tmpdir()
    k = WORLD.size - 1
    args = [*COMMON, "--members", str(k), "--crop-pad", "1"]
    assert ensemble.main([*args, "--iters", "4", "--pipeline-rank",
                          "--checkpoint-dir", f"{root}/rank"]) == 0
    assert ensemble.main([*args, "--iters", "2", "--pipeline-rank",
                          "--checkpoint-dir", f"{root}/resumed"]) == 0
    assert ensemble.main([*args, "--iters", "4", "--pipeline-rank", "--resume",
                          "--checkpoint-dir", f"{root}/resumed"]) == 0
    members = WORLD.Split(0 if WORLD.rank > 0 else MPI.UNDEFINED, WORLD.rank)
    if WORLD.rank > 0:
        ensemble.run(ensemble.parse_args([*args, "--iters", "4",
                                          "--checkpoint-dir", f"{root}/plain"]), members)
        members.Free()
        m = WORLD.rank - 1
        for other in ("plain", "resumed"):
            assert_same_checkpoint(load_checkpoint(f"{root}/rank/member{m}/checkpoint.npz"),
                                   load_checkpoint(f"{root}/{other}/member{m}/checkpoint.npz"),
                                   f"member {m} vs {other}")
    WORLD.Barrier()


def test_resume_continues_every_member_exactly():
    root = shared_tmpdir()
    k = max(MEMBER_COUNTS)

    def run(iters, name, *extra):
        return ensemble.main([*COMMON, "--members", str(k), "--iters", str(iters),
                              "--checkpoint-dir", f"{root}/{name}", *extra])

    assert run(6, "a") == 0
    assert run(3, "b") == 0
    assert run(6, "b", "--resume") == 0
    assert run(6, "b", "--resume", "--seeds", ",".join(["9"] * k)) == 2   # not these members
    _, local_rank, _, local = ensemble.layout(WORLD.size, WORLD.rank, k)
    for m in local if local_rank == 0 else ():
        assert_same_checkpoint(load_checkpoint(f"{root}/a/member{m}/checkpoint.npz"),
                               load_checkpoint(f"{root}/b/member{m}/checkpoint.npz"),
                               f"member {m}")
    WORLD.Barrier()


def test_bad_configuration_fails_on_every_rank(capsys):
    assert ensemble.main([*COMMON, "--members", str(WORLD.size + 1), "--iters", "1"]) == (
        2 if WORLD.size > 1 else 0)
    assert ensemble.main([*COMMON, "--seeds", "1,2", "--lrs", "0.1,0.2,0.3"]) == 2
    assert ensemble.main([*COMMON, "--pipeline", "nope"]) == 2
    assert ensemble.main([*COMMON, "--members", "1", "--pipeline-depth", "1"]) == 2
    assert ensemble.main([*COMMON, "--members", "1", "--prefetch", "-1"]) == 2
    assert ensemble.main([*COMMON, "--members", "1", "--timing-warmup", "-2"]) == 2
    assert ensemble.main([*COMMON, "--members", "1", "--pipeline-rank",
                          "--pipeline", "separate"]) == 2
    assert ensemble.main([*COMMON, "--members", "1", "--pipeline-rank",
                          "--pipeline", "distributed"]) == 2
    err = capsys.readouterr().err
    if WORLD.rank == 0:
        assert "2 seeds and 3 learning rates" in err and "unknown pipeline 'nope'" in err
        assert "--pipeline-depth must be >= 2" in err and "--prefetch must be >= 0" in err
        assert "--timing-warmup must be >= 0" in err
        assert "--pipeline-rank needs --pipeline shared" in err
        if WORLD.size > 1:
            assert f"{WORLD.size + 1} members" in err
