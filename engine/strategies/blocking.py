"""`blocking`: the traditional baseline (docs/algorithm.md §1.1).

forward -> backward (all layers) -> one allreduce of all gradients -> update.
Nothing overlaps: T_iter = T_fwd + T_bwd + T_allreduce(N) + T_update(N).
The gradients are packed into one flat buffer so that the exchange is a
single collective (chunked by the exchanger like any other).
"""

from __future__ import annotations

import numpy as np

from .base import Hyper, Strategy


class Blocking(Strategy):
    name = "blocking"

    def __init__(self, model, exchanger, optimizer):
        super().__init__(model, exchanger, optimizer)
        self.check_whole_parameters()
        self.params = model.parameters()
        sizes = [p.grad.size for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.flat = np.zeros(int(self.offsets[-1]), np.float32)
        self.handle = None

    def end_backward(self) -> None:
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            self.flat[a:b] = p.grad.reshape(-1)
            p.grad.fill(0)
        self.handle = self.exchanger.allreduce_async(self.flat, op="mean")

    def finish_step(self, apply: bool) -> None:
        self.wait(self.handle, "allreduce all gradients")
        self.handle = None
        if apply:
            hyper = Hyper.of(self.optimizer)
            for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
                self.update_param(p, self.flat[a:b], hyper)
