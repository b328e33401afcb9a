"""`layerwise`: one non-blocking allreduce per layer, posted during backprop
(docs/algorithm.md §1.2, the HiPC'17 engine).

As soon as layer i's gradients are final (grad-ready hook), they are handed to
the progress thread, and backprop goes straight on with layer i-1. The update
of layer i is delayed until just before layer i's forward in the next
iteration (pre-forward hook, as PCNN's allreduce path does), so each wait
happens as late as possible and covers only what that layer needs.

Requests are posted in backprop order with one priority, so the progress
thread serves them first come, first served; `priority` changes only that.
One request per unit (a convolution and its batch norm, or a layer's weight
and bias: `Strategy.layer_units`), not per tensor: each request pays the
latency once.
"""

from __future__ import annotations

from .base import Hyper, Strategy


class Layerwise(Strategy):
    name = "layerwise"

    def __init__(self, model, exchanger, optimizer):
        super().__init__(model, exchanger, optimizer)
        self.check_whole_parameters()
        self.units = self.layer_units()          # first layer -> Unit
        self.handles: dict[int, object] = {}     # first layer -> handle of its unit
        self.hyper: Hyper | None = None
        self.apply = True

    def priority(self, i: int) -> int:
        """Posting priority of layer i's chunks (lower is posted first)."""
        return 0

    def grad_ready(self, i: int, layer) -> None:
        unit = self.units.get(i)
        if unit is not None:      # else a later layer of a unit, posted with its first layer
            self.handles[i] = self.exchanger.allreduce_async(unit.grad, op="mean",
                                                             priority=self.priority(i))

    def finish_step(self, apply: bool) -> None:
        self.hyper = Hyper.of(self.optimizer)    # used by the deferred updates below
        self.apply = apply

    def pre_forward(self, i: int, layer) -> None:
        handle = self.handles.pop(i, None)
        if handle is None:
            return
        unit = self.units[i]
        self.wait(handle, f"allreduce layer {i}")
        if self.apply:
            for p in unit.params:
                self.update_param(p, p.grad, self.hyper)
        unit.grad.fill(0)

    def synchronize(self) -> None:
        for i in sorted(self.handles):
            self.pre_forward(i, self.layers[i])
