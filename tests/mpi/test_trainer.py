"""The trainer around the strategies: non-finite values, replica checks, BN
statistics, checkpoint/resume and tracing through the CLI, configuration errors.

Every test issues the same collectives on every rank; expectations follow
from ``comm.size`` so the file passes under ``mpiexec -n 1`` to ``-n 4``.
"""

import json
import os
import tempfile
import time

import numpy as np
import pytest
from mpi4py import MPI

from cnn import models
from cnn.checkpoint import load_checkpoint
from cnn.data import ShardedSampler, load_digits
from cnn.layers import BatchNorm2d, Conv2D, Flatten, Linear, ReLU
from cnn.losses import SoftmaxCrossEntropy
from cnn.models import Model
from cnn.optim import SGD
from engine import train
from engine.trainer import NonFiniteError, ReplicaDivergenceError, Trainer

WORLD = MPI.COMM_WORLD
GLOBAL_BATCH = 24


@pytest.fixture(scope="module")
def data():
    return load_digits("train")


def local_batch(data, step, seed=5):
    x, y = data
    idx = ShardedSampler(len(x), GLOBAL_BATCH, WORLD.rank, WORLD.size, seed=seed).indices(0, step)
    return x[idx].copy(), y[idx].copy()


def shared_tmpdir():
    path = tempfile.mkdtemp(prefix="engine-test-") if WORLD.rank == 0 else None
    return WORLD.bcast(path, root=0)


def weights(model):
    return np.concatenate([p.data.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("strategy", ["blocking", "priority", "multistep"])
def test_nonfinite_loss_skipped_on_every_rank(strategy, data):
    model = models.build("digits", seed=1)
    with Trainer(model, SGD(model.parameters(), lr=0.1), strategy, skip_nonfinite=True) as t:
        t.step(*local_batch(data, 0))
        t.synchronize()
        before = weights(model).copy()
        x, y = local_batch(data, 1)
        if WORLD.rank == WORLD.size - 1:
            x[0, 0, 0, 0] = np.nan
        t.step(x, y)
        assert t.last["skipped"] and t.skipped == 1
        t.synchronize()
        np.testing.assert_array_equal(weights(model), before)
        t.step(*local_batch(data, 2))          # training goes on
        t.check_replicas()
        assert not t.last["skipped"]


@pytest.mark.parametrize("bn_stats", ["average", "local"])
def test_skipped_step_leaves_bn_statistics_alone(bn_stats):
    """The forward pass of a skipped step has moved the running statistics
    (to NaN on the poisoned rank); they are put back on every rank."""
    model = models.build("resnet20", seed=1)
    rng = np.random.default_rng(WORLD.rank)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 2)
    with Trainer(model, SGD(model.parameters(), lr=0.1), "blocking", bn_stats=bn_stats,
                 skip_nonfinite=True) as t:
        t.step(x, y)
        before = [a.copy() for _, a in model.buffers()]
        poisoned = x.copy()
        if WORLD.rank == 0:
            poisoned[0, 0, 0, 0] = np.nan
        t.step(poisoned, y)
        assert t.last["skipped"]
        for (name, after), was in zip(model.buffers(), before):
            np.testing.assert_array_equal(after, was, err_msg=name)
        t.step(x, y)
        assert not t.last["skipped"]
        assert all(np.isfinite(a).all() for _, a in model.buffers())


def test_nonfinite_gradient_names_layer_and_iteration(data):
    model = models.build("digits", seed=1)

    def poison(i, layer):   # registered before the trainer's hook: runs first
        if i == 1 and WORLD.rank == 0 and poison.armed:
            layer.params[0].grad[...] = np.inf

    poison.armed = False
    model.register_grad_ready_hook(poison)
    with Trainer(model, SGD(model.parameters(), lr=0.1), "layerwise") as t:
        t.step(*local_batch(data, 0))
        poison.armed = True
        with pytest.raises(NonFiniteError, match=r"iteration 1: non-finite gradient in layer 1 "
                                                 r"\(conv2\)"):
            t.step(*local_batch(data, 1))


def test_replica_divergence_names_the_first_divergent_parameter(data):
    model = models.build("digits", seed=1)
    with Trainer(model, SGD(model.parameters(), lr=0.1), "bucketed") as t:
        t.step(*local_batch(data, 0))
        t.check_replicas()
        t.synchronize()
        if WORLD.rank == 0:
            model.layers[2].params[1].data[0] += 1.0     # fc.bias
            model.layers[1].params[0].data[0, 0, 0, 0] += 1.0   # conv2.weight
        if WORLD.size > 1:
            with pytest.raises(ReplicaDivergenceError, match="'conv2.weight'"):
                t.check_replicas()
        else:
            t.check_replicas()


def tiny_bn_model(seed=0):
    rng = np.random.default_rng(seed)
    return Model("tinybn", (1, 8, 8), 10,
                 ("conv", Conv2D(1, 4, 3, padding=1, rng=rng)), ("bn", BatchNorm2d(4)),
                 ("relu", ReLU()), ("flatten", Flatten()), ("fc", Linear(256, 10, rng=rng)))


@pytest.mark.parametrize("bn_stats", ["average", "local"])
def test_batchnorm_running_statistics(bn_stats, data):
    """average: identical on every rank, the running mean that of the global
    batch; local: per rank (PCNN). Weights are identical either way."""
    model = tiny_bn_model()
    with Trainer(model, SGD(model.parameters(), lr=0.1), "multistep", bn_stats=bn_stats) as t:
        t.step(*local_batch(data, 0))
        t.synchronize()
        t.check_replicas()
        running = dict(model.buffers())
    gathered = WORLD.allgather(running["bn.running_mean"].copy())
    if bn_stats == "average":
        assert all(np.array_equal(g, gathered[0]) for g in gathered)
        reference = tiny_bn_model()
        x, y = data
        idx = ShardedSampler(len(x), GLOBAL_BATCH, 0, 1, seed=5).global_indices(0, 0)
        loss = SoftmaxCrossEntropy()
        loss.forward(reference.forward(x[idx]), y[idx])
        np.testing.assert_allclose(running["bn.running_mean"],
                                   dict(reference.buffers())["bn.running_mean"],
                                   rtol=1e-5, atol=1e-7)
    elif WORLD.size > 1:
        assert not all(np.array_equal(g, gathered[0]) for g in gathered)


def run_cli(*argv):
    return train.main(["--no-progress", "--batch-size", str(GLOBAL_BATCH), *argv])


@pytest.mark.parametrize("strategy", ["layerwise", "multistep"])
def test_resume_continues_exactly(strategy):
    root = shared_tmpdir()
    common = ["--strategy", strategy, "--schedule", "constant", "--lr", "0.1"]
    assert run_cli(*common, "--iters", "6", "--checkpoint-dir", f"{root}/a") == 0
    assert run_cli(*common, "--iters", "3", "--checkpoint-dir", f"{root}/b") == 0
    assert run_cli(*common, "--iters", "6", "--checkpoint-dir", f"{root}/b", "--resume") == 0
    a = load_checkpoint(f"{root}/a/checkpoint.npz")
    b = load_checkpoint(f"{root}/b/checkpoint.npz")
    assert a.iteration == b.iteration == 6
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
        np.testing.assert_array_equal(a.optimizer["momentum_buffers"][name],
                                      b.optimizer["momentum_buffers"][name])
    WORLD.Barrier()


def wait_for_everyone(comm=WORLD):
    """A barrier that sleeps instead of spinning (idle ranks leave the cores to rank 0)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


@pytest.mark.parametrize("strategy", ["multistep", "layerwise"])
def test_resume_at_a_different_rank_count(strategy):
    """Checkpoint at P ranks and resume on rank 0 alone, and the reverse: both
    match the uninterrupted P-rank run to float32 rounding (the global batch
    sequence does not depend on P; the checkpoint holds whole parameters and
    whole momentum, gathered from multistep's slices)."""
    root = shared_tmpdir()
    common = ["--no-progress", "--batch-size", str(GLOBAL_BATCH), "--strategy", strategy,
              "--schedule", "constant", "--lr", "0.1", "--threads", "1"]

    def run(comm, iters, name, *extra):
        args = train.parse_args([*common, "--iters", str(iters),
                                 "--checkpoint-dir", f"{root}/{name}", *extra])
        return train.run(args, comm)

    alone = WORLD.Split(0 if WORLD.rank == 0 else MPI.UNDEFINED, WORLD.rank)
    run(WORLD, 6, "uninterrupted")
    run(WORLD, 3, "shrink")                                  # P ranks ...
    if WORLD.rank == 0:
        run(alone, 6, "shrink", "--resume")                  # ... then 1
        run(alone, 3, "grow")                                # 1 ...
    wait_for_everyone()
    run(WORLD, 6, "grow", "--resume")                        # ... then P
    if WORLD.rank == 0:
        alone.Free()
        reference = load_checkpoint(f"{root}/uninterrupted/checkpoint.npz")
        for name, ranks in (("shrink", 1), ("grow", WORLD.size)):
            resumed = load_checkpoint(f"{root}/{name}/checkpoint.npz")
            assert resumed.iteration == 6 and resumed.metadata["ranks"] == ranks
            for key in reference.params:
                np.testing.assert_allclose(resumed.params[key], reference.params[key],
                                           rtol=1e-4, atol=1e-6, err_msg=f"{name}: {key}")
                np.testing.assert_allclose(resumed.optimizer["momentum_buffers"][key],
                                           reference.optimizer["momentum_buffers"][key],
                                           rtol=1e-4, atol=1e-6, err_msg=f"{name}: {key}")
    WORLD.Barrier()


def test_cli_options_of_multistep_and_lazy():
    assert run_cli("--strategy", "multistep", "--fc-mode", "auto", "--iters", "2") == 0
    assert run_cli("--strategy", "lazy", "--lazy-layers", "2", "--iters", "3") == 0
    assert run_cli("--strategy", "lazy", "--lazy-layers", "9", "--iters", "1") == 2


def test_default_cli_learns_digits_and_writes_trace_and_log():
    root = shared_tmpdir()
    trace, log = f"{root}/trace.json", f"{root}/log.jsonl"
    assert run_cli("--epochs", "12", "--lr", "0.1", "--trace", trace, "--log", log,
                   "--check-replicas", "50") == 0
    if WORLD.rank == 0:
        evals = [r for r in map(json.loads, open(log)) if r["kind"] == "eval"]
        assert evals[-1]["test_accuracy"] >= 0.95, evals[-1]
        events = json.load(open(trace))["traceEvents"]
        spans = [e for e in events if e["ph"] == "X"]
        assert {e["pid"] for e in spans} == set(range(WORLD.size))
        categories = {e["cat"] for e in spans}
        assert {"forward", "backward", "wait", "reduce_scatter", "allgather"} <= categories
        from analysis.plot_trace import load_spans, plot
        plot(load_spans(trace), os.path.join(root, "timeline.png"), 0, 50)
        assert os.path.getsize(os.path.join(root, "timeline.png")) > 1000
    WORLD.Barrier()


def test_bad_configuration_fails_before_any_work(capsys):
    assert run_cli("--model", "nope") == 2
    assert run_cli("--strategy", "nope") == 2
    assert train.main(["--batch-size", "4200"]) == 2          # more than the 1442 samples
    if WORLD.size > 1:
        assert train.main(["--batch-size", str(4 * WORLD.size + 1)]) == 2
    err = capsys.readouterr().err
    if WORLD.rank == 0:
        assert "unknown model 'nope'" in err and "unknown strategy 'nope'" in err
        assert "fewer than the global batch 4200" in err
