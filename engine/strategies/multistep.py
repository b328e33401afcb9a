"""`multistep`: the MLHPC'18 algorithm (ALGORITHM.md §1.5): allreduce split into
reduce-scatter + allgather, each half hidden behind a different computation,
and each rank updating only its 1/P of the model.

Per parameter of n elements, rank r owns the slice ``partition(n, P)[r]``
(ranks 0..r-1 one element longer when P does not divide n).

1. Backprop (grad-ready hook of layer i): post a reduce-scatter of layer i's
   gradient; rank r receives the average over ranks of its slice. Backprop
   goes on with layer i-1 meanwhile.
2. After backprop (`finish_step`), for each layer from the input side up: wait
   for its reduce-scatter, apply SGD to this rank's slice only (momentum exists
   only for that slice: `SGD(slices=...)`, a P-fold memory saving), and post
   at once an allgather of the updated slice into the full weight array
   (in place). The gradient buffers are zeroed once their reduce-scatter is
   complete.
3. Next forward (pre-forward hook of layer i): wait for layer i's allgather.
   The allgathers of later layers overlap the forward of earlier ones.

Every layer, fully-connected ones included, takes this path. Per parameter
of n values each rank sends and receives about 2 (P-1)/P n values, the same
volume as a ring allreduce, but the update costs n/P instead of n and is
overlapped with the allgathers in flight. The FC activation all-to-all
variant of the paper (exchanging B (N_in + N_out)/P activations instead of
the N_in N_out gradient) is not implemented: the exchanger offers no
all-to-all, and for the CIFAR-sized models here (FC 512 x 512, B <= 256)
the gradient is not larger than the activations by enough to matter.

Priorities: each request carries its layer index, so the allgather of layer
0 overtakes the queued requests of later layers.
"""

from __future__ import annotations

import numpy as np

from cnn.optim import SGD, sgd_update

from .base import Hyper, Strategy


class Multistep(Strategy):
    name = "multistep"

    def __init__(self, model, exchanger, optimizer):
        super().__init__(model, exchanger, optimizer)
        self.check_whole_parameters()
        params = model.parameters()
        self.slices = {}
        for p in params:
            offset, count = exchanger.partition(p.data.size)[exchanger.rank]
            self.slices[p.name] = (offset, offset + count)
        # The rank-local optimizer: momentum only for the owned slices, started
        # from the given optimizer's momentum (non-zero after a resume).
        self.local = SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                         weight_decay=optimizer.weight_decay, nesterov=optimizer.nesterov,
                         slices=self.slices)
        for name, (a, b) in self.slices.items():
            self.local.momentum_buffers[name][:] = optimizer.momentum_buffers[name][a:b]
        self.scattered = {p.name: np.zeros(b - a, np.float32)
                          for p in params for a, b in [self.slices[p.name]]}
        self.reduce_scatters: dict[int, list] = {}
        self.allgathers: dict[int, list] = {}

    def grad_ready(self, i: int, layer) -> None:
        self.reduce_scatters[i] = [
            self.exchanger.reduce_scatter_async(p.grad, self.scattered[p.name], op="mean",
                                                priority=i)
            for p in layer.params]

    def finish_step(self, apply: bool) -> None:
        hyper = Hyper.of(self.optimizer)
        for i in sorted(self.reduce_scatters):
            layer = self.layers[i]
            handles = self.reduce_scatters.pop(i)
            gathers = []
            for p, h in zip(layer.params, handles):
                self.wait(h, f"reduce-scatter layer {i}")
                p.grad.fill(0)
                if not apply:
                    continue
                a, b = self.slices[p.name]
                own = p.data.reshape(-1)[a:b]
                if b > a:
                    self._update_slice(p.name, own, hyper)
                gathers.append(self.exchanger.allgather_async(own, p.data, priority=i))
            if gathers:
                self.allgathers[i] = gathers

    def _update_slice(self, name: str, own: np.ndarray, hyper: Hyper) -> None:
        sgd_update(own, self.scattered[name], self.local.momentum_buffers[name],
                   hyper.lr, hyper.momentum, hyper.weight_decay, hyper.nesterov)

    def pre_forward(self, i: int, layer) -> None:
        for h in self.allgathers.pop(i, ()):
            self.wait(h, f"allgather layer {i}")

    def synchronize(self) -> None:
        for i in sorted(self.allgathers):
            self.pre_forward(i, self.layers[i])

    def optimizer_state_dict(self) -> dict:
        """Full momentum buffers, gathered from the slices (every rank must call it)."""
        self.synchronize()
        state = self.optimizer.state_dict()
        handles, full = [], {}
        for p in self.local.params:
            full[p.name] = np.zeros(p.data.size, np.float32)
            handles.append(self.exchanger.allgather_async(
                self.local.momentum_buffers[p.name], full[p.name]))
        for h in handles:
            h.wait()
        state["momentum_buffers"] = full
        state["lr"] = self.optimizer.lr
        return state
