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
  message sizes and collectives). Except `multistep` with the FC all-to-all or
  activation path: its FC weight gradient is one GEMM over the global batch instead of a
  sum of per-rank GEMMs, so it matches to float32 rounding only, at every P.
- `lazy` with a fixed interval of 1 is `layerwise`; with an adaptive interval
  it is a different optimisation: only replica identity and the determinism
  of the interval are tested.
"""

import zlib

import numpy as np
import pytest
from mpi4py import MPI

from cnn import models
from cnn.data import ShardedSampler, load_digits
from cnn.layers import Linear
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import SGD
from engine.strategies import STRATEGIES, make_strategy
from engine.strategies.lazy import next_interval
from engine.trainer import Trainer

WORLD = MPI.COMM_WORLD
GLOBAL_BATCH = 24            # divisible by 1, 2, 3 and 4
STEPS = 4
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
# Configurations tested against the oracle: name -> (strategy, options).
CONFIGS = {
    "blocking": ("blocking", {}),
    "layerwise": ("layerwise", {}),
    "priority": ("priority", {}),
    "bucketed": ("bucketed", {"bucket_bytes": 4096}),   # several buckets on the digits model
    "multistep": ("multistep", {}),                      # FC: auto (the default)
    "multistep-alltoall": ("multistep", {"fc_mode": "alltoall"}),
    "multistep-activations": ("multistep", {"fc_mode": "activations"}),
    "multistep-reduce_scatter": ("multistep", {"fc_mode": "reduce_scatter"}),
    "lazy": ("lazy", {"lazy_layers": 2, "interval": 1, "adaptive": False}),
}
# FC gradient from one global-batch GEMM: equal to blocking to rounding only.
NOT_BITWISE = {"multistep", "multistep-alltoall", "multistep-activations"}


@pytest.fixture(scope="module")
def data():
    return load_digits("train")


def flat_weights(model):
    return np.concatenate([p.data.reshape(-1) for p in model.parameters()])


def train_distributed(config, data, steps=STEPS, model_name="digits", **options):
    strategy, defaults = CONFIGS.get(config, (config, {}))
    x, y = data
    model = models.build(model_name, seed=3)
    optimizer = SGD(model.parameters(), **HYPER)
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size, seed=5)
    losses = []
    with Trainer(model, optimizer, strategy, chunk_bytes=2048, max_inflight=2,
                 **{**defaults, **options}) as trainer:
        for step in range(steps):
            idx = sampler.indices(0, step)
            losses.append(trainer.step(x[idx], y[idx]))
        trainer.synchronize()
        trainer.check_replicas()
    return model, losses


def train_single_process(data, steps=STEPS, model_name="digits"):
    """The oracle: plain SGD with the whole global batch, no MPI."""
    x, y = data
    model = models.build(model_name, seed=3)
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


def test_every_strategy_is_tested():
    assert {strategy for strategy, _ in CONFIGS.values()} == set(STRATEGIES)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_one_process_with_the_global_batch(config, data):
    model, losses = train_distributed(config, data)
    reference, reference_losses = train_single_process(data)
    assert_identical_on_all_ranks(model)
    np.testing.assert_allclose(flat_weights(model), flat_weights(reference),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


@pytest.mark.parametrize("config", sorted(set(CONFIGS) - {"blocking"}))
def test_matches_blocking(config, data):
    model, losses = train_distributed(config, data)
    baseline, baseline_losses = train_distributed("blocking", data)
    if config in NOT_BITWISE:
        np.testing.assert_allclose(flat_weights(model), flat_weights(baseline),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(losses, baseline_losses, rtol=1e-6)
    elif WORLD.size <= 2:
        np.testing.assert_array_equal(flat_weights(model), flat_weights(baseline))
        assert losses == baseline_losses
    else:
        np.testing.assert_allclose(flat_weights(model), flat_weights(baseline),
                                   rtol=1e-6, atol=1e-7)


def test_multistep_keeps_momentum_for_its_slice_only(data):
    model = models.build("digits", seed=3)
    optimizer = SGD(model.parameters(), **HYPER)
    with Trainer(model, optimizer, "multistep") as trainer:
        strategy = trainer.strategy
        for key, (a, b) in strategy.slices.items():
            assert strategy.momentum[key].size == b - a
        owned = WORLD.allreduce(sum(v.size for v in strategy.momentum.values()))
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


# -- multistep: the fully-connected paths ----------------------------------------------

@pytest.mark.parametrize("fc_mode", ["alltoall", "activations", "reduce_scatter", "auto"])
def test_multistep_fc_paths_on_lenet(fc_mode, images28):
    """Three FC layers (400x120, 120x84, 84x10): partial rows / uneven neuron blocks at every P."""
    model, losses = train_distributed("multistep", images28, steps=2, model_name="lenet",
                                      fc_mode=fc_mode)
    reference, reference_losses = train_single_process(images28, steps=2, model_name="lenet")
    assert_identical_on_all_ranks(model)
    np.testing.assert_allclose(flat_weights(model), flat_weights(reference),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def expected_auto_paths(global_batch, shapes, size):
    """Values received per rank (/ (P-1)/P) on each path, the smallest wins (ties: conv path)."""
    paths = []
    for n_in, n_out in shapes:
        values = {"reduce_scatter": n_in * n_out,
                  "alltoall": global_batch * (-(-n_in // size) + n_out),
                  "activations": global_batch * (n_in + n_out)}
        best = min(values.values())
        paths.append("reduce_scatter" if values["reduce_scatter"] == best else "alltoall")
    return paths


def test_multistep_auto_picks_the_smaller_message_and_close_unwraps(images28):
    x, y = images28
    model = models.build("lenet", seed=3)
    fcs = [layer for layer in model.layers if isinstance(layer, Linear)]
    idx = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size).indices(0, 0)
    shapes = [(fc.in_features, fc.out_features) for fc in fcs]
    # B = 24: fc1 (400x120) and fc2 (120x84) always all-to-all; fc3 (84x10, 840 values)
    # all-to-all only from P = 4 (24 (21 + 10) = 744), reduce-scatter below (P = 3: 912).
    paths = expected_auto_paths(GLOBAL_BATCH, shapes, WORLD.size)
    assert paths[:2] == ["alltoall", "alltoall"]
    assert paths[2] == ("alltoall" if WORLD.size >= 4 else "reduce_scatter")
    with Trainer(model, SGD(model.parameters(), **HYPER), "multistep", fc_mode="auto") as t:
        t.step(x[idx], y[idx])
        assert [fc.skip_weight_grad for fc in fcs] == [p == "alltoall" for p in paths]
        assert all(not p.grad.any() for p in model.parameters())
        t.synchronize()
        t.check_replicas()
    assert all("forward" not in vars(fc) and "backward" not in vars(fc)
               and not fc.skip_weight_grad for fc in fcs)
    model.forward(x[:2])         # plain model again: no collective, no closed exchanger


def test_multistep_alltoall_resumes_momentum_in_torch_layout(images28):
    """A non-zero momentum handed in (a resume) is sliced by columns and gathered back unchanged."""
    model = models.build("lenet", seed=3)
    optimizer = SGD(model.parameters(), **HYPER)
    rng = np.random.default_rng(2)
    for p in model.parameters():
        optimizer.momentum_buffers[p.name][:] = rng.standard_normal(p.data.size)
    before = {k: v.copy() for k, v in optimizer.momentum_buffers.items()}
    with Trainer(model, optimizer, "multistep", fc_mode="alltoall") as t:
        state = t.optimizer_state_dict()
    for name, value in before.items():
        np.testing.assert_array_equal(state["momentum_buffers"][name], value)


def test_multistep_alltoall_momentum_matches_one_process(images28):
    """The momentum kept by rows of W^T, gathered back, is the oracle's (N_out, N_in) momentum."""
    x, y = images28
    model = models.build("lenet", seed=3)
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size, seed=5)
    with Trainer(model, SGD(model.parameters(), **HYPER), "multistep", fc_mode="alltoall",
                 chunk_bytes=2048) as t:
        for step in range(2):
            idx = sampler.indices(0, step)
            t.step(x[idx], y[idx])
        state = t.optimizer_state_dict()
    reference = models.build("lenet", seed=3)
    optimizer = SGD(reference.parameters(), **HYPER)
    loss_fn = SoftmaxCrossEntropy()
    for step in range(2):
        idx = ShardedSampler(len(x), GLOBAL_BATCH, 0, 1, seed=5).global_indices(0, step)
        reference.zero_grad()
        loss_fn.forward(reference.forward(x[idx]), y[idx])
        reference.backward(loss_fn.backward())
        optimizer.step()
    for name, value in optimizer.momentum_buffers.items():
        np.testing.assert_allclose(state["momentum_buffers"][name], value, rtol=1e-4, atol=1e-6)


def test_multistep_rejects_unknown_fc_mode():
    model = models.build("digits")
    with pytest.raises(ValueError, match="fc_mode"):
        Trainer(model, SGD(model.parameters(), lr=0.1), "multistep", fc_mode="all-to-all")
    assert "forward" not in vars(model.layers[-1])


# -- one collective per unit (a conv and its batch norm, a layer's weight and bias) --------

@pytest.fixture(scope="module")
def images32():
    rng = np.random.default_rng(12)
    return (rng.standard_normal((48, 3, 32, 32)).astype(np.float32),
            rng.integers(0, 10, 48).astype(np.int64))


def train_counting(config, data, steps=2):
    """ResNet-20 (conv + BN units) for `steps` steps; also the requests of the last step."""
    strategy, options = CONFIGS[config]
    if strategy == "lazy":
        options = dict(options, lazy_layers=3)    # cuts the unit (conv, BN) of layers 2, 3
    x, y = data
    model = models.build("resnet20", seed=3)
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size, seed=5)
    with Trainer(model, SGD(model.parameters(), **HYPER), strategy, chunk_bytes=1 << 16,
                 **options) as trainer:
        for step in range(steps):
            before = trainer.exchanger.stats()["requests_enqueued"]
            idx = sampler.indices(0, step)
            trainer.step(x[idx], y[idx])
            requests = trainer.exchanger.stats()["requests_enqueued"] - before
        trainer.synchronize()
        trainer.check_replicas()
    return model, requests


@pytest.mark.parametrize("config", ["layerwise", "priority", "multistep-reduce_scatter",
                                    "multistep", "lazy"])
def test_units_with_batch_norm_match_blocking_with_one_request_per_unit(config, images32):
    model, requests = train_counting(config, images32)
    baseline, baseline_requests = train_counting("blocking", images32)
    # ResNet-20: 43 parameter layers, 65 tensors, 22 units (21 conv + BN, the classifier)
    units = len(model.param_groups)
    assert (len(model.layers), len(model.parameters()), units) == (43, 65, 22)
    around = baseline_requests - 1          # the trainer's own: loss/flags, BN statistics
    if config == "multistep":                # the classifier (64 x 10) on the all-to-all path?
        fc = model.layers[-1]
        path = expected_auto_paths(GLOBAL_BATCH, [(fc.in_features, fc.out_features)],
                                   WORLD.size)[0]
        # reduce-scatter path: weight (by W^T rows) and bias apart; all-to-all path:
        # all-to-all of X, allgather of dY: still two requests in backprop
        assert requests == 2 * (units - 1) + 2 * 2 + around, path
    elif config == "multistep-reduce_scatter":
        assert requests == 2 * units + around          # reduce-scatter + allgather per unit
    elif config == "lazy":
        assert requests == units + 1 + 1 + around      # the cut unit, the lazy statistics
    else:
        assert requests == units + around
    if WORLD.size <= 2 and config not in ("multistep",):
        np.testing.assert_array_equal(flat_weights(model), flat_weights(baseline))
    else:
        np.testing.assert_allclose(flat_weights(model), flat_weights(baseline),
                                   rtol=1e-5, atol=1e-6)


# -- lazy ---------------------------------------------------------------------------------

def test_next_interval_rule():
    # both tests pass (aligned, growing accumulation): +1, capped
    assert next_interval(3, 3, g2=1.0, a2=9.0, d2=4.0, max_interval=8) == 4
    assert next_interval(8, 3, g2=1.0, a2=9.0, d2=4.0, max_interval=8) == 8
    # both fail (g opposes the accumulation): -1, at least 1
    assert next_interval(3, 2, g2=1.0, a2=0.5, d2=1.0, max_interval=8) == 2
    assert next_interval(1, 2, g2=1.0, a2=0.5, d2=1.0, max_interval=8) == 1
    # one passes, one fails: unchanged (angle ok: 1 + 1 <= 2.5; magnitude: 3 > 2.5)
    assert next_interval(3, 3, g2=1.0, a2=2.5, d2=1.0, max_interval=8) == 3
    # first step of an interval: a = g, both pass
    assert next_interval(1, 1, g2=2.0, a2=2.0, d2=0.0, max_interval=8) == 2


def run_lazy(data, steps, **options):
    x, y = data
    model = models.build("digits", seed=3)
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size, seed=5)
    snapshots = []
    with Trainer(model, SGD(model.parameters(), **HYPER), "lazy", **options) as trainer:
        for step in range(steps):
            idx = sampler.indices(0, step)
            trainer.step(x[idx], y[idx])
            trainer.synchronize()
            snapshots.append([p.data.copy() for p in model.parameters()])
            trainer.check_replicas()
        history = list(trainer.strategy.history)
    return model, snapshots, history


def test_lazy_fixed_interval_applies_the_accumulated_average(data):
    """interval 3, lazy_layers 1: conv1 frozen for two steps, then one SGD step
    with the average of the summed gradients; the oracle replays this on one
    process with the global batch."""
    model, snapshots, history = run_lazy(data, 6, lazy_layers=1, interval=3, adaptive=False)
    lazy_params = len(model.layers[0].params)
    for step, weights in enumerate(snapshots):
        before = snapshots[step - 1] if step else None
        if before is None:
            continue
        moved = [not np.array_equal(w, b) for w, b in zip(weights, before)]
        assert moved[lazy_params:] == [True] * (len(moved) - lazy_params)
        assert moved[:lazy_params] == [step % 3 == 2] * lazy_params, step
    assert history == [3, 3]

    x, y = data
    oracle = models.build("digits", seed=3)
    lazy = [p for p in oracle.layers[0].params]
    rest = [p for layer in oracle.layers[1:] for p in layer.params]
    lazy_opt, rest_opt = SGD(lazy, **HYPER), SGD(rest, **HYPER)
    accumulated = [np.zeros_like(p.grad) for p in lazy]
    loss_fn = SoftmaxCrossEntropy()
    sampler = ShardedSampler(len(x), GLOBAL_BATCH, 0, 1, seed=5)
    for step in range(6):
        idx = sampler.global_indices(0, step)
        oracle.zero_grad()
        loss_fn.forward(oracle.forward(x[idx]), y[idx])
        oracle.backward(loss_fn.backward())
        rest_opt.step()
        for a, p in zip(accumulated, lazy):
            a += p.grad
        if step % 3 == 2:
            lazy_opt.step({p.name: a.reshape(-1) for a, p in zip(accumulated, lazy)})
            for a in accumulated:
                a.fill(0)
    np.testing.assert_allclose(flat_weights(model), flat_weights(oracle), rtol=1e-4, atol=1e-6)


def test_lazy_adaptive_interval_is_deterministic_and_identical_on_every_rank(data):
    model, _, history = run_lazy(data, 10, lazy_layers=2, max_interval=4)
    again, _, history_again = run_lazy(data, 10, lazy_layers=2, max_interval=4)
    assert history == history_again and history[0] == 2     # a = g at interval 1: both pass
    assert all(1 <= k <= 4 for k in history)
    assert len(set(map(tuple, WORLD.allgather(history)))) == 1
    np.testing.assert_array_equal(flat_weights(model), flat_weights(again))
    assert_identical_on_all_ranks(model)


def test_lazy_rejects_bad_options():
    model = models.build("digits")
    optimizer = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lazy_layers"):
        Trainer(model, optimizer, "lazy", lazy_layers=4)
    with pytest.raises(ValueError, match="interval"):
        Trainer(model, optimizer, "lazy", interval=0)
