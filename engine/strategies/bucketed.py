"""`bucketed`: consecutive layers fused into buckets, one allreduce per bucket
(docs/algorithm.md §1.3; Horovod tensor fusion, PyTorch DDP buckets).

Every collective costs a latency alpha whatever its size, and a network has
many small tensors (biases, small convolutions). Layers are grouped, in
backprop order (last layer first), into buckets of at least `bucket_bytes`
of gradient; a bucket is posted as soon as its last layer in backprop order
(the one nearest the input) is ready: its gradients are copied into the
bucket's flat buffer and zeroed. The boundaries depend only on layer order and
sizes, so every rank forms the same buckets. As in `layerwise`, layer i is
updated from its bucket just before its next forward.
"""

from __future__ import annotations

import numpy as np

from .base import Hyper, Strategy


class Bucket:
    """Layers ``first..last`` (inclusive, last > first) packed in one flat buffer."""

    def __init__(self, layers: list[tuple[int, object]]):
        self.layers = sorted(layers, key=lambda item: item[0])
        self.views = {}      # parameter name -> flat view into the buffer
        size = sum(p.grad.size for _, layer in self.layers for p in layer.params)
        self.buffer = np.zeros(size, np.float32)
        offset = 0
        for _, layer in self.layers:
            for p in layer.params:
                self.views[p.name] = self.buffer[offset:offset + p.grad.size]
                offset += p.grad.size
        self.first = self.layers[0][0]       # posted when this layer is ready
        self.handle = None
        self.waited = False


def bucket_indices(grad_bytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Layer indices per bucket: walk the layers in backprop order and close a
    bucket once it holds >= bucket_bytes (the last may be smaller). A function
    of sizes alone, so every rank (and the cost model) forms the same buckets.

    Parameters
    ----------
    grad_bytes : list of int, one per layer in forward order
    """
    buckets, current, nbytes = [], [], 0
    for i in reversed(range(len(grad_bytes))):
        current.append(i)
        nbytes += grad_bytes[i]
        if nbytes >= bucket_bytes:
            buckets.append(sorted(current))
            current, nbytes = [], 0
    if current:
        buckets.append(sorted(current))
    return buckets


def form_buckets(layers, bucket_bytes: int) -> list[Bucket]:
    """The `Bucket`s of `bucket_indices` over the model's layers, in posting order."""
    sizes = [sum(p.grad.nbytes for p in layer.params) for layer in layers]
    return [Bucket([(i, layers[i]) for i in sorted(indices, reverse=True)])
            for indices in bucket_indices(sizes, bucket_bytes)]


class Bucketed(Strategy):
    name = "bucketed"

    def __init__(self, model, exchanger, optimizer, bucket_bytes: int = 1 << 20):
        super().__init__(model, exchanger, optimizer)
        self.check_whole_parameters()
        if int(bucket_bytes) < 1:
            raise ValueError(f"bucketed: bucket_bytes must be >= 1, got {bucket_bytes}")
        self.buckets = form_buckets(self.layers, int(bucket_bytes))
        self.bucket_of = {i: b for b in self.buckets for i, _ in b.layers}
        self.pending: set[int] = set()      # layers whose update is still to apply
        self.hyper: Hyper | None = None
        self.apply = True

    def grad_ready(self, i: int, layer) -> None:
        bucket = self.bucket_of[i]
        if i != bucket.first:
            return
        for _, member in bucket.layers:
            for p in member.params:
                bucket.views[p.name][:] = p.grad.reshape(-1)
                p.grad.fill(0)
        bucket.handle = self.exchanger.allreduce_async(bucket.buffer, op="mean")
        bucket.waited = False
        self.pending.update(j for j, _ in bucket.layers)

    def finish_step(self, apply: bool) -> None:
        self.hyper = Hyper.of(self.optimizer)
        self.apply = apply

    def pre_forward(self, i: int, layer) -> None:
        if i not in self.pending:
            return
        bucket = self.bucket_of[i]
        if not bucket.waited:
            self.wait(bucket.handle, f"allreduce bucket of layers {bucket.first}.."
                                     f"{bucket.layers[-1][0]}")
            bucket.waited = True
        if self.apply:
            for p in layer.params:
                self.update_param(p, bucket.views[p.name], self.hyper)
        self.pending.discard(i)

    def synchronize(self) -> None:
        for i in sorted(self.pending):
            self.pre_forward(i, self.layers[i])
