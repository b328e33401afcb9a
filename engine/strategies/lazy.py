"""`lazy`: the input-side layers averaged only every `interval` iterations, the
interval adapting to how consistent their gradients are (docs/algorithm.md §1.6,
the JPDC 2022 follow-up of the multi-step algorithm).

The first `lazy_layers` layers (input side) are the last whose gradients are
final in backprop and the first the next forward needs, so their exchange is
the one that can never be hidden. This strategy exchanges them only every
`interval` iterations; every other layer behaves exactly as in `layerwise`.

For a lazy layer, per iteration (``count`` steps already accumulated in
``a_prev``, g this iteration's local gradient, a = a_prev + g):

- not an averaging step (``count + 1 < interval``): nothing is posted and the
  layer's weights are **not updated**; after the step, g is added to a_prev
  (``count += 1``) and the gradient buffer zeroed;
- averaging step (``count + 1 == interval``): at the grad-ready hook, post an
  allreduce (mean over ranks) of a = a_prev + g. Just before the layer's
  next forward, **one** SGD step is applied with that average of the
  accumulated sum (momentum and weight decay applied once), and a_prev,
  count are reset.

So a lazy layer's weights stay frozen during an interval and then move by the
rank-averaged sum of the interval's gradients, each computed at those frozen
weights: local gradient accumulation. This changes the optimisation: with an
interval > 1 the result is *not* the one `blocking` computes (stale weights
for the lazy layers, one momentum / weight-decay step per interval instead of
one per iteration). With ``interval=1, adaptive=False`` every step is an
averaging step of a = g and the strategy is `layerwise` exactly.

The interval (one for all lazy layers) adapts at each averaging step from
three statistics over the concatenated gradients of the lazy layers: with
k = count + 1 the steps in a,

    angle test       ||g - a||^2 + ||g||^2 <= ||a||^2     (i.e. ||g||^2 <= g.a)
    magnitude test   k ||g||^2 <= ||a||^2

where ||g - a||^2 = ||a_prev||^2. Both pass: interval + 1 (at most
`max_interval`); both fail: interval - 1 (at least 1); otherwise unchanged.
Each rank's three local squared norms are summed over ranks (one allreduce
of three float64 values posted with the averaged gradient) and the tests are
applied to the sums, so every rank takes the same decision from the same
numbers; no decision ever depends on a local-only value. A skipped iteration
(non-finite gradient) adds nothing to the accumulation, leaves the interval
unchanged and, if it was the averaging step, makes the next one the averaging
step instead.

The accumulation in progress and the current interval are not part of a
checkpoint: a resumed run restarts with an empty accumulation and the
configured `interval`.
"""

from __future__ import annotations

import numpy as np

from .layerwise import Layerwise

_STATS_PRIORITY = -1     # the three statistics overtake queued gradient chunks


def next_interval(interval: int, steps: int, g2: float, a2: float, d2: float,
                  max_interval: int) -> int:
    """The interval after an averaging step (docs/algorithm.md §1.6).

    Parameters
    ----------
    interval : int
        The current interval.
    steps : int
        k, the iterations accumulated in a (this one included).
    g2, a2, d2 : float
        ||g||^2, ||a||^2 and ||g - a||^2, each summed over ranks.
    max_interval : int
    """
    angle = d2 + g2 <= a2
    magnitude = steps * g2 <= a2
    if angle and magnitude:
        return min(interval + 1, max_interval)
    if not angle and not magnitude:
        return max(interval - 1, 1)
    return interval


class Lazy(Layerwise):
    """See the module docstring.

    Parameters
    ----------
    model, exchanger, optimizer
        As for every strategy.
    lazy_layers : int
        How many layers, from the input side, are averaged lazily (0: `layerwise`).
    interval : int
        The initial averaging interval, in iterations.
    adaptive : bool
        Adapt the interval (False: keep `interval` fixed).
    max_interval : int
        Upper bound of the adaptive interval.

    Attributes
    ----------
    interval : int
        The current interval.
    history : list of int
        The interval after each averaging step (identical on every rank).
    """

    name = "lazy"

    def __init__(self, model, exchanger, optimizer, lazy_layers: int = 1, interval: int = 1,
                 adaptive: bool = True, max_interval: int = 16):
        super().__init__(model, exchanger, optimizer)
        if not 0 <= int(lazy_layers) <= len(self.layers):
            raise ValueError(f"lazy: lazy_layers must be in [0, {len(self.layers)}], "
                             f"got {lazy_layers}")
        if not 1 <= int(interval) <= int(max_interval):
            raise ValueError(f"lazy: need 1 <= interval <= max_interval, got interval "
                             f"{interval}, max_interval {max_interval}")
        self.lazy_layers = int(lazy_layers)
        self.interval = int(interval)
        self.adaptive = bool(adaptive)
        self.max_interval = int(max_interval)
        params = [p for layer in self.layers[:self.lazy_layers] for p in layer.params]
        total = sum(p.grad.size for p in params)
        self.accumulated = np.zeros(total, np.float32)   # a_prev, flat over the lazy layers
        self.averaged = np.zeros(total, np.float32)      # a, then its mean over ranks
        self.previous_view, self.average_view, offset = {}, {}, 0
        for p in params:
            self.previous_view[p.name] = self.accumulated[offset:offset + p.grad.size]
            self.average_view[p.name] = self.averaged[offset:offset + p.grad.size]
            offset += p.grad.size
        # one request per unit on both sides of the boundary (a unit is cut there)
        self.units = self.layer_units(start=self.lazy_layers)
        self.lazy_units = self.layer_units(stop=self.lazy_layers)
        self.unit_span, offset = {}, 0        # first lazy layer of a unit -> its range in a
        for first, unit in sorted(self.lazy_units.items()):
            n = sum(p.grad.size for p in unit.params)
            self.unit_span[first] = (offset, offset + n)
            offset += n
        self.statistics = np.zeros(3, np.float64)   # ||g||^2, ||a||^2, ||g - a||^2
        self.count = 0
        self.averaging = False           # this iteration posts the average
        self.lazy_handles: dict[int, object] = {}     # first layer of a unit -> handle
        self.statistics_handle = None
        self.update_pending = False      # the posted average is to be applied
        self.history: list[int] = []

    def is_lazy(self, i: int) -> bool:
        return i < self.lazy_layers

    def grad_ready(self, i: int, layer) -> None:
        if not self.is_lazy(i):
            super().grad_ready(i, layer)
            return
        if i == self.lazy_layers - 1:       # the first lazy layer backprop reaches
            self.averaging = self.count + 1 >= self.interval
            self.statistics[:] = 0
        if not self.averaging:
            return
        for p in layer.params:
            g, previous = p.grad.reshape(-1), self.previous_view[p.name]
            a = self.average_view[p.name]
            np.add(previous, g, out=a)
            self.statistics += (np.dot(g, g), np.dot(a, a), np.dot(previous, previous))
        if i in self.lazy_units:          # the unit's last layer backprop reaches: post it
            start, stop = self.unit_span[i]
            self.lazy_handles[i] = self.exchanger.allreduce_async(
                self.averaged[start:stop], op="mean", priority=self.priority(i))
        if i == 0:
            self.statistics_handle = self.exchanger.allreduce_async(
                self.statistics, op="sum", priority=_STATS_PRIORITY)

    def finish_step(self, apply: bool) -> None:
        super().finish_step(apply)           # hyperparameters and `apply` for the updates
        if self.averaging:
            self.update_pending = apply
        elif apply:
            for layer in self.layers[:self.lazy_layers]:
                for p in layer.params:
                    self.previous_view[p.name] += p.grad.reshape(-1)
            self.count += 1
        for layer in self.layers[:self.lazy_layers]:
            self.zero_layer_grads(layer)
        self.averaging = False

    def pre_forward(self, i: int, layer) -> None:
        if not self.is_lazy(i):
            super().pre_forward(i, layer)
            return
        if i == 0 and self.statistics_handle is not None:
            self._close_interval()
        handle = self.lazy_handles.pop(i, None)
        if handle is not None:
            self.wait(handle, f"allreduce lazy layer {i}")
            if self.update_pending:
                for p in self.lazy_units[i].params:
                    self.update_param(p, self.average_view[p.name], self.hyper)
        if i == self.lazy_layers - 1:
            self.update_pending = False

    def _close_interval(self) -> None:
        """After an averaging step: adapt the interval, restart the accumulation."""
        self.wait(self.statistics_handle, "allreduce lazy statistics")
        self.statistics_handle = None
        if not self.update_pending:          # skipped iteration: accumulation kept
            return
        if self.adaptive:
            g2, a2, d2 = self.statistics
            self.interval = next_interval(self.interval, self.count + 1, g2, a2, d2,
                                          self.max_interval)
        self.history.append(self.interval)
        self.accumulated.fill(0)
        self.count = 0

    def synchronize(self) -> None:
        for i in range(self.lazy_layers):
            self.pre_forward(i, self.layers[i])
        super().synchronize()
