"""Learning-rate schedules as pure functions of the iteration number.

A schedule is any callable ``schedule(iteration) -> lr``. Holding no state is
the point: a run resumed at iteration k computes exactly the lr the
uninterrupted run used, with nothing to save in the checkpoint. The
large-batch recipe of Goyal et al. (2017, "Accurate, Large Minibatch SGD")
is composed from the pieces::

    lr = scaled_lr(0.1, global_batch)                      # linear scaling rule
    schedule = LinearWarmup(StepDecay(lr, [30 * E, 60 * E, 80 * E]), 5 * E)
    for it in range(start, total):
        optimizer.lr = schedule(it)

where ``E`` is the number of iterations per epoch. Iterations count from 0.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Constant", "Cosine", "LinearWarmup", "StepDecay", "scaled_lr"]

Schedule = Callable[[int], float]


def _check_iteration(iteration: int):
    if iteration < 0:
        raise ValueError(f"schedule: iteration must be >= 0, got {iteration}")


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: lr grows with the global batch, ``base_lr * B / 256``.

    Why: with k times more samples per step, k times fewer steps are taken;
    scaling the lr by k keeps the distance travelled per epoch roughly equal
    (Goyal et al., section 2.1).
    """
    return base_lr * global_batch / reference_batch


@dataclass(frozen=True)
class Constant:
    """The same lr at every iteration."""

    lr: float

    def __call__(self, iteration: int) -> float:
        _check_iteration(iteration)
        return float(self.lr)


@dataclass(frozen=True)
class StepDecay:
    """Multiply the lr by `gamma` at each milestone: ``lr * gamma ** (# milestones <= it)``.

    Parameters
    ----------
    lr : float
        The lr before the first milestone.
    milestones : sequence of int
        Iterations (sorted, increasing) from which the next factor applies.
    gamma : float, default 0.1
    """

    lr: float
    milestones: Sequence[int]
    gamma: float = 0.1

    def __post_init__(self):
        milestones = tuple(int(m) for m in self.milestones)
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ValueError(f"StepDecay: milestones must increase, got {milestones}")
        object.__setattr__(self, "milestones", milestones)

    def __call__(self, iteration: int) -> float:
        _check_iteration(iteration)
        return float(self.lr * self.gamma ** bisect.bisect_right(self.milestones, iteration))


@dataclass(frozen=True)
class Cosine:
    """Half-cosine decay from `lr` to `min_lr` over `total_iters`, then `min_lr`.

    ``min_lr + (lr - min_lr) * (1 + cos(pi * min(it, T) / T)) / 2``
    """

    lr: float
    total_iters: int
    min_lr: float = 0.0

    def __post_init__(self):
        if self.total_iters <= 0:
            raise ValueError(f"Cosine: total_iters must be > 0, got {self.total_iters}")

    def __call__(self, iteration: int) -> float:
        _check_iteration(iteration)
        t = min(iteration, self.total_iters) / self.total_iters
        return float(self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2)


@dataclass(frozen=True)
class LinearWarmup:
    """Ramp linearly into another schedule over the first `warmup_iters` iterations.

    ``base(it) * (f + (1 - f) * it / w)`` for ``it < w``, then ``base(it)``.
    The factor multiplies the base schedule rather than replacing it, so the
    lr is continuous at ``it = w`` whatever the base does meanwhile, and the
    base keeps counting from iteration 0 (as in Goyal et al.).

    Parameters
    ----------
    base : callable (int) -> float
    warmup_iters : int
        ``w``; 0 disables warm-up.
    start_factor : float, default 0.0
        ``f``: start at ``f * base(0)``; Goyal et al. use ``1 / k`` for a
        batch k times the reference one, i.e. start from the small-batch lr.
    """

    base: Schedule
    warmup_iters: int
    start_factor: float = 0.0

    def __post_init__(self):
        if self.warmup_iters < 0 or not 0.0 <= self.start_factor <= 1.0:
            raise ValueError(f"LinearWarmup: need warmup_iters >= 0 and 0 <= start_factor <= 1, "
                             f"got {self.warmup_iters}, {self.start_factor}")

    def __call__(self, iteration: int) -> float:
        _check_iteration(iteration)
        lr = self.base(iteration)
        if iteration >= self.warmup_iters:
            return float(lr)
        f = self.start_factor
        return float(lr * (f + (1.0 - f) * iteration / self.warmup_iters))
