"""The contract every gradient-exchange strategy fulfils, and its shared helpers.

A strategy decides *when* each layer's gradient is communicated and *when*
each layer's weights are updated. The `Trainer` drives it through five calls
per iteration, in this order on every rank::

    pre_forward(i)       model hook, just before layer i's forward (increasing i)
    grad_ready(i)        model hook, right after layer i's backward (decreasing i)
    end_backward()       after the whole backward: post what is still unposted
    finish_step(apply)   after the loss/flag exchange: update what must be
                         updated now (apply=False: skip this iteration's update
                         on every rank, e.g. a non-finite gradient)
    synchronize()        complete everything left pending (deferred updates,
                         allgathers), so that the weights are final and every
                         gradient is zero

Rules every strategy keeps:

1. Collectives are posted in an order that depends only on layer order, sizes
   and configuration, never on timing, so all ranks post the same sequence.
2. A gradient buffer is never zeroed (or written by the next backward) while
   a collective still reads it; each strategy zeroes a layer's gradients
   once their exchange is complete, before that layer's next backward.
3. The update of iteration k uses the hyperparameters (lr, momentum, weight
   decay) the optimizer had at the end of iteration k, even when the strategy
   defers it to iteration k+1's forward.
4. Every wait goes through `Strategy.wait`, which times it: the sum is the
   exposed (not hidden) communication time of the iteration.

One collective per unit, not per tensor: the model stores the parameters of
each natural unit (a convolution and the batch norm after it, or a layer's
weight and bias) in one flat buffer (cnn ``Model.param_groups``), and the
per-layer strategies exchange a `Unit` with one request, posted in the
grad-ready hook of its first layer (the last of the unit backprop reaches)
and waited for in the pre-forward hook of that same layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cnn.optim import sgd_update

__all__ = ["Hyper", "Strategy", "Unit"]


@dataclass(frozen=True)
class Hyper:
    """The optimizer's hyperparameters, frozen at the end of an iteration."""

    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool

    @classmethod
    def of(cls, optimizer) -> Hyper:
        return cls(optimizer.lr, optimizer.momentum, optimizer.weight_decay, optimizer.nesterov)


@dataclass(frozen=True)
class Unit:
    """Consecutive layers exchanged as one flat buffer (a run of a cnn ParamGroup).

    ``data`` and ``grad`` are flat views of the group's storage; every
    parameter's own ``data``/``grad`` is a view into them, so posting ``grad``
    exchanges all of them and no copy is made.
    """

    layers: tuple
    params: tuple
    data: np.ndarray
    grad: np.ndarray

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def key(self) -> str:
        """A name for the unit: its first parameter's, or ``first+...+last``."""
        names = [p.name for p in self.params]
        return names[0] if len(names) == 1 else f"{names[0]}+...+{names[-1]}"


class Strategy:
    """Base class: hooks that do nothing, timed waits, per-layer SGD updates.

    Parameters
    ----------
    model : cnn.models.Model
        Only ``model.layers`` and each layer's ``params`` are used.
    exchanger : engine.Exchanger
    optimizer : cnn.optim.SGD
        Over ``model.parameters()``, whole parameters (no ``slices``); its
        momentum buffers are the ones updated (except by `multistep`, which
        keeps its own per-rank slices).
    """

    name = "base"

    def __init__(self, model, exchanger, optimizer):
        self.model = model
        self.exchanger = exchanger
        self.optimizer = optimizer
        self.layers = list(model.layers)
        self.wait_seconds = 0.0          # exposed communication, reset by the trainer
        self.wait_events: list | None = None   # (label, t_start, t_end) when tracing
        known = {p.name for p in model.parameters()}
        if {p.name for p in optimizer.params} != known:
            raise ValueError(f"{self.name}: the optimizer must hold exactly model.parameters()")

    # -- the contract (overridden by the strategies) ---------------------------
    def pre_forward(self, i: int, layer) -> None:
        pass

    def grad_ready(self, i: int, layer) -> None:
        pass

    def end_backward(self) -> None:
        pass

    def finish_step(self, apply: bool) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        """Undo what the strategy did to the model (multistep unwraps its FC layers)."""

    def optimizer_state_dict(self) -> dict:
        """The optimizer state over whole parameters (what a checkpoint stores)."""
        return self.optimizer.state_dict()

    # -- helpers ------------------------------------------------------------------
    def layer_units(self, start: int = 0, stop: int | None = None) -> dict[int, Unit]:
        """The units of layers [start, stop), keyed by first layer (groups cut at the bounds)."""
        stop = len(self.layers) if stop is None else stop
        units = {}
        for group in self.model.param_groups:
            layers = tuple(i for i in group.layers if start <= i < stop)
            if layers:
                data, grad = group.span(layers)
                params = tuple(p for i in layers for p in self.layers[i].params)
                units[layers[0]] = Unit(layers, params, data, grad)
        return units

    def wait(self, handle, label: str) -> None:
        """`handle.wait()`, with its duration added to the exposed communication time."""
        if handle.done:            # nothing exposed; still raises a stored error
            handle.wait()
            return
        start = time.monotonic()
        handle.wait(label=label)
        end = time.monotonic()
        self.wait_seconds += end - start
        if self.wait_events is not None:
            self.wait_events.append((label, start, end))

    def update_param(self, param, grad: np.ndarray, hyper: Hyper) -> None:
        """One SGD step on a whole parameter from its averaged gradient (flat view)."""
        sgd_update(param.data.reshape(-1), grad.reshape(-1),
                   self.optimizer.momentum_buffers[param.name],
                   hyper.lr, hyper.momentum, hyper.weight_decay, hyper.nesterov)

    @staticmethod
    def zero_layer_grads(layer) -> None:
        for p in layer.params:
            p.grad.fill(0)

    def check_whole_parameters(self) -> None:
        for p in self.optimizer.params:
            if self.optimizer.slices[p.name] != (0, p.data.size):
                raise ValueError(f"{self.name}: the optimizer must update whole parameters "
                                 f"({p.name} has slice {self.optimizer.slices[p.name]})")
