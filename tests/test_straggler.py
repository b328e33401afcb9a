"""Straggler injection (engine/straggler.py): slower, never different."""

import time

import numpy as np
import pytest

from cnn import models
from cnn.losses import SoftmaxCrossEntropy
from engine.straggler import MIN_DELAY_S, Straggler, parse_straggler


def forward_backward(model, x, y):
    loss = SoftmaxCrossEntropy()
    model.zero_grad()
    loss.forward(model.forward(x), y)
    model.backward(loss.backward())
    return [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["sleep", "spin"])
def test_slowed_layers_take_factor_times_as_long_and_compute_the_same(mode):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 16)
    reference = forward_backward(models.build("digits", seed=1), x, y)
    model = models.build("digits", seed=1)
    straggler = Straggler(model, 3.0, mode)
    start = time.perf_counter()
    grads = forward_backward(model, x, y)
    elapsed = time.perf_counter() - start
    for a, b in zip(grads, reference, strict=True):
        np.testing.assert_array_equal(a, b)
    assert straggler.compute_s > 0
    # What is still owed is under MIN_DELAY_S; an overshoot only adds.
    assert straggler.delay_s >= 2 * straggler.compute_s - MIN_DELAY_S
    assert elapsed >= 3 * straggler.compute_s - MIN_DELAY_S
    straggler.remove()
    assert not any(name in vars(leaf) for _, leaf in model.leaves()
                   for name in ("forward", "backward"))
    before = straggler.compute_s
    forward_backward(model, x, y)
    assert straggler.compute_s == before


@pytest.mark.parametrize("text, message", [
    ("1", "expected RANK:FACTOR"), ("a:2", "expected RANK:FACTOR"),
    ("2:1.5", "rank 2 is not in [0, 2)"), ("-1:1.5", "rank -1 is not in"),
    ("0:0.5", "factor must be a finite number >= 1"), ("0:nan", "factor must be"),
    ("0:inf", "factor must be")])
def test_bad_straggler_option_is_named(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_straggler(text, 2)


def test_parse_straggler():
    assert parse_straggler("1:1.25", 2) == (1, 1.25)
    with pytest.raises(ValueError, match="mode"):
        Straggler(models.build("digits"), 2.0, "nap")


def test_ddp_peer_slow_down_delays_torch_modules_and_computes_the_same():
    torch = pytest.importorskip("torch")
    from bench.peers.ddp import slow_down

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(inplace=True),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))

    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    reference = build()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    model = build()
    straggler = slow_down(model, 3.0, "spin")
    start = time.perf_counter()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    elapsed = time.perf_counter() - start
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert straggler.compute_s > 0
    assert straggler.delay_s >= 2 * straggler.compute_s - MIN_DELAY_S
    assert elapsed >= 3 * straggler.compute_s - MIN_DELAY_S
