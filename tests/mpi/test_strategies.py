"""Every strategy computes synchronous SGD with the global batch.

Run under ``mpiexec -n P python -m pytest tests/mpi`` for P = 1..4; the
expectations are derived from ``comm.size``, so every P gives the same answer:

- P ranks with global batch B hold, after k steps, the weights of plain SGD
  on one process with batch B, within float32 tolerance (summation order
  differs: rtol 1e-4, atol 1e-6 after 4 steps of momentum SGD);
- all ranks hold bitwise identical weights (hash allgather);
- every strategy gives the weights `blocking` gives: bitwise at P <= 2 (a sum
  of two float32 values does not depend on order), within 1e-6 otherwise
  (MPI may associate the sums of 3-4 ranks differently for different
  message sizes and collectives).
"""

import zlib

import numpy as np
import pytest
from mpi4py import MPI

from cnn import models
from cnn.data import ShardedSampler, load_digits
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import SGD
from engine.strategies import STRATEGIES, make_strategy
from engine.trainer import Trainer

WORLD = MPI.COMM_WORLD
GLOBAL_BATCH = 24            # divisible by 1, 2, 3 and 4
STEPS = 4
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
OPTIONS = {"blocking": {}, "layerwise": {}, "priority": {}, "multistep": {},
           "bucketed": {"bucket_bytes": 4096}}   # several buckets on the digits model


@pytest.fixture(scope="module")
def data():
    return load_digits("train")


def flat_weights(model):
    return np.concatenate([p.data.reshape(-1) for p in model.parameters()])


def train_distributed(strategy, data, steps=STEPS, model_name="digits", **options):
    x, y = data
    model = models.build(model_name, seed=3)
    optimizer = SGD(model.parameters(), **HYPER)
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size, seed=5)
    losses = []
    with Trainer(model, optimizer, strategy, chunk_bytes=2048, max_inflight=2,
                 **{**OPTIONS.get(strategy, {}), **options}) as trainer:
        for step in range(steps):
            idx = sampler.indices(0, step)
            losses.append(trainer.step(x[idx], y[idx]))
        trainer.synchronize()
        trainer.check_replicas()
    return model, losses


def train_single_process(data, steps=STEPS):
    """The oracle: plain SGD with the whole global batch, no MPI."""
    x, y = data
    model = models.build("digits", seed=3)
    optimizer = SGD(model.parameters(), **HYPER)
    loss_fn = SoftmaxCrossEntropy()
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, 0, 1, seed=5)
    losses = []
    for step in range(steps):
        idx = sampler.global_indices(0, step)
        model.zero_grad()
        losses.append(loss_fn.forward(model.forward(x[idx]), y[idx]))
        model.backward(loss_fn.backward())
        optimizer.step()
    return model, losses


def assert_identical_on_all_ranks(model):
    digest = zlib.crc32(flat_weights(model).view(np.uint8))
    assert len(set(WORLD.allgather(digest))) == 1


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_matches_one_process_with_the_global_batch(strategy, data):
    model, losses = train_distributed(strategy, data)
    reference, reference_losses = train_single_process(data)
    assert_identical_on_all_ranks(model)
    np.testing.assert_allclose(flat_weights(model), flat_weights(reference),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"blocking"}))
def test_matches_blocking(strategy, data):
    model, losses = train_distributed(strategy, data)
    baseline, baseline_losses = train_distributed("blocking", data)
    if WORLD.size <= 2:
        np.testing.assert_array_equal(flat_weights(model), flat_weights(baseline))
        assert losses == baseline_losses
    else:
        np.testing.assert_allclose(flat_weights(model), flat_weights(baseline),
                                   rtol=1e-6, atol=1e-7)


def test_multistep_keeps_momentum_for_its_slice_only(data):
    model = models.build("digits", seed=3)
    optimizer = SGD(model.parameters(), **HYPER)
    with Trainer(model, optimizer, "multistep") as trainer:
        local = trainer.strategy.local
        for p in model.parameters():
            a, b = trainer.strategy.slices[p.name]
            assert local.momentum_buffers[p.name].size == b - a
        owned = WORLD.allreduce(sum(v.size for v in local.momentum_buffers.values()))
        assert owned == model.num_parameters()
        x, y = data
        idx = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size).indices(0, 0)
        trainer.step(x[idx], y[idx])
        # Gathered back to whole parameters for a checkpoint, the same on every rank.
        state = trainer.optimizer_state_dict()
    full = np.concatenate([state["momentum_buffers"][p.name] for p in model.parameters()])
    assert full.size == model.num_parameters()
    assert len(set(WORLD.allgather(zlib.crc32(full.view(np.uint8))))) == 1


def test_bucketed_buckets_are_deterministic_and_cover_every_layer():
    from engine.strategies.bucketed import form_buckets
    model = models.build("lenet")
    for bucket_bytes in (1, 4096, 1 << 30):
        buckets = form_buckets(model.layers, bucket_bytes)
        covered = sorted(i for b in buckets for i, _ in b.layers)
        assert covered == list(range(len(model.layers)))
        firsts = [b.first for b in buckets]
        assert firsts == sorted(firsts, reverse=True)   # posted in backprop order
    assert len(form_buckets(model.layers, 1)) == len(model.layers)
    assert len(form_buckets(model.layers, 1 << 30)) == 1


def test_unknown_strategy_and_bad_options_are_clear_errors():
    model = models.build("digits")
    optimizer = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_strategy("nope", model, None, optimizer=optimizer)
    with pytest.raises(ValueError, match="unknown strategy"):
        Trainer(model, optimizer, "nope")
    with pytest.raises(ValueError, match="bad options"):
        Trainer(model, optimizer, "layerwise", bucket_bytes=10)
