"""`multistep`: the MLHPC'18 algorithm (docs/algorithm.md §1.5): allreduce split into
reduce-scatter + allgather, each half hidden behind a different computation,
and each rank updating only its 1/P of the model.

Per parameter of n elements, rank r owns the slice ``partition(n, P)[r]``
(ranks 0..r-1 one element longer when P does not divide n).

Convolution layers (and every layer that is not a fully-connected one):

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

Per parameter of n values each rank sends and receives about 2 (P-1)/P n
values, the same volume as a ring allreduce, but the update costs n/P instead
of n and is overlapped with the allgathers in flight.

Fully-connected layers (`cnn.layers.Linear`, ``fc_mode="activations"``, or
``"auto"``, the default, for the layers where it moves less): the gradient
N_out x N_in is large, the activations B x N are small, so activations travel
instead of the gradient (`ActivationExchange`):

1. Forward, right after layer i's forward (training only): post an allgather
   of its input X (B/P x N_in on each rank -> B x N_in, ranks in batch order;
   ``partition(B N_in, P)`` gives every rank one block of B/P rows because P
   divides B). The layer is told not to form its weight gradient
   (``skip_weight_grad``): nobody needs the local one.
2. Backprop, just before layer i's backward: post an allgather of the output
   error dY it receives (B/P x N_out -> B x N_out). It overlaps this layer's
   dx product and the whole backprop below it (the convolutions).
3. After backprop (`finish_step`, input side first, after the conv layers):
   wait for both, then compute exactly this rank's slice [a, b) of the flat
   weight gradient. In torch layout (W is N_out x N_in, row-major) the slice
   lies in output rows r0 = a // N_in .. r1 = (b - 1) // N_in, so

       G[r0..r1, :] = dY[:, r0..r1].T @ X / P      (B x ... GEMM, global batch)

   and the rank keeps elements [a - r0 N_in, b - r0 N_in) of it (at most two
   partial rows are computed in excess). dY already carries the loss's 1/(B/P)
   factor, so (1/P) dY^T X is the mean over ranks of the per-rank gradients:
   the gradient of the mean loss over the global batch, with no reduction at
   all. The bias slice is ``dY[:, c:d].sum(0) / P`` from the same dY; the
   bias gradient the layer accumulated locally is discarded (zeroed), never
   added, so nothing is counted twice.
4. Partial SGD update and weight allgather, exactly as for conv layers.

Communication per FC layer and per rank (values received; sent is the same):

==========================  ===========================================
path                        values
==========================  ===========================================
reduce-scatter (conv path)  (P-1)/P N_in N_out           + allgather of W
activations (this file)     (P-1)/P B (N_in + N_out)     + allgather of W
paper's all-to-all          (P-1)/P B (N_in / P + N_out) + allgather of W
==========================  ===========================================

Why allgather and not the paper's all-to-all: the exchanger has no
all-to-all, and contiguous flat slices of a torch (out x in) weight are bands
of *output* rows, each needing every input neuron of every sample, so X has
to be gathered whole (the paper slices by input neuron, the transposed
layout). dY needs only the band's columns, but taking them by all-to-all
would save only the dY term, which is the smaller one whenever N_out <= N_in.
For VGG-16's fc6 (N_in 25,088, N_out 4,096, B = 256) that is 7.5 M values
instead of 102.8 M: 14x less. When B (N_in + N_out) >= N_in N_out (a small
layer such as the 84 x 10 classifier of LeNet, or a very large batch), the
gradient is the smaller message: ``fc_mode="auto"`` picks, per layer and step,
whichever of the two paths moves fewer values (B and the shapes are the same
on every rank, so every rank picks alike); ``fc_mode="reduce_scatter"`` sends
every layer down the conv path.

Numerics: the FC weight gradient is one GEMM over the global batch instead
of a sum over ranks of GEMMs over local batches, so with activations it
equals `blocking`'s to float32 rounding (not bitwise, even at P <= 2); every
rank still ends with bitwise identical weights (each slice is computed by
one rank and allgathered).

The wrapping: the strategy replaces ``layer.forward`` and ``layer.backward`` of
each `Linear` *instance* by thin wrappers (instance attributes; the class is
untouched) that post the two allgathers and call the original method;
`close` removes them. A forward with ``train=True`` of a model driven by this
strategy must therefore happen inside ``Trainer.step`` (evaluation uses
``train=False`` and posts nothing).

Priorities: each request carries its layer index, so the allgather of layer
0 overtakes the queued requests of later layers.
"""

from __future__ import annotations

import numpy as np

from cnn.layers import Linear
from cnn.layers.blas import matmul
from cnn.optim import SGD, sgd_update

from .base import Hyper, Strategy

FC_MODES = ("activations", "reduce_scatter", "auto")


class ActivationExchange:
    """The FC path of one `Linear` layer: gathers X and dY, computes a gradient slice.

    Parameters
    ----------
    i : int
        The layer's index in ``model.layers`` (the requests' priority).
    layer : cnn.layers.Linear
    strategy : Multistep
    """

    def __init__(self, i: int, layer: Linear, strategy: Multistep):
        self.i, self.layer, self.strategy = i, layer, strategy
        self.exchanger = strategy.exchanger
        self.inputs = self.errors = None      # X (B, N_in), dY (B, N_out): global batch
        self.input_handle = self.error_handle = None
        self.active = False                   # this step's weight gradient comes from here
        self._forward, self._backward = layer.forward, layer.backward
        layer.forward, layer.backward = self.forward, self.backward

    def restore(self) -> None:
        """Give the layer back its own methods and its weight gradient."""
        del self.layer.forward, self.layer.backward
        self.layer.skip_weight_grad = False

    def chooses_activations(self, local_batch: int) -> bool:
        if self.strategy.fc_mode == "activations":
            return True
        n_in, n_out = self.layer.in_features, self.layer.out_features
        return local_batch * self.exchanger.size * (n_in + n_out) < n_in * n_out

    def _gather(self, local: np.ndarray, full: np.ndarray | None):
        """Post an allgather of `local` (B/P x N) into `full` (B x N), in place."""
        rows = local.shape[0]
        shape = (rows * self.exchanger.size, local.shape[1])
        if full is None or full.shape != shape:
            full = np.empty(shape, np.float32)
        own = full[self.exchanger.rank * rows:(self.exchanger.rank + 1) * rows]
        own[...] = local
        return full, self.exchanger.allgather_async(own.reshape(-1), full, priority=self.i)

    def forward(self, x, train=True):
        y = self._forward(x, train=train)
        if train:
            self.active = self.chooses_activations(x.shape[0])
            self.layer.skip_weight_grad = self.active
            if self.active:
                self.inputs, self.input_handle = self._gather(self.layer.input, self.inputs)
        return y

    def backward(self, dy):
        if self.active:
            self.errors, self.error_handle = self._gather(
                np.ascontiguousarray(dy, np.float32), self.errors)
        return self._backward(dy)

    def wait(self) -> None:
        self.strategy.wait(self.input_handle, f"allgather inputs layer {self.i}")
        self.strategy.wait(self.error_handle, f"allgather errors layer {self.i}")
        self.input_handle = self.error_handle = None
        self.active = False

    def gradient_slices(self, out: dict) -> None:
        """This rank's slices of the mean weight and bias gradients, into `out[name]`."""
        size = np.float32(self.exchanger.size)
        weight, bias = self.layer.weight, self.layer.bias
        n_in = self.layer.in_features
        a, b = self.strategy.slices[weight.name]
        if b > a:
            r0, r1 = a // n_in, (b - 1) // n_in + 1
            rows = matmul(self.errors[:, r0:r1].T, self.inputs)    # (r1 - r0, N_in)
            np.divide(rows.reshape(-1)[a - r0 * n_in:b - r0 * n_in], size, out=out[weight.name])
        if bias is not None:
            c, d = self.strategy.slices[bias.name]
            if d > c:
                np.divide(self.errors[:, c:d].sum(axis=0), size, out=out[bias.name])


class Multistep(Strategy):
    """See the module docstring.

    Parameters
    ----------
    model, exchanger, optimizer
        As for every strategy.
    fc_mode : {"activations", "reduce_scatter", "auto"}
        How `Linear` layers get their gradient: gathered activations and
        errors (the paper's FC path), the reduce-scatter of the conv path, or
        (default) per layer whichever moves fewer values.
    """

    name = "multistep"

    def __init__(self, model, exchanger, optimizer, fc_mode: str = "auto"):
        super().__init__(model, exchanger, optimizer)
        self.check_whole_parameters()
        if fc_mode not in FC_MODES:
            raise ValueError(f"multistep: fc_mode must be one of {FC_MODES}, got {fc_mode!r}")
        self.fc_mode = fc_mode
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
        self.fc: dict[int, ActivationExchange] = {}
        if fc_mode != "reduce_scatter":
            self.fc = {i: ActivationExchange(i, layer, self)
                       for i, layer in enumerate(self.layers) if isinstance(layer, Linear)}

    def grad_ready(self, i: int, layer) -> None:
        fc = self.fc.get(i)
        if fc is not None and fc.active:
            return      # gradient computed after backprop from the gathered X and dY
        self.reduce_scatters[i] = [
            self.exchanger.reduce_scatter_async(p.grad, self.scattered[p.name], op="mean",
                                                priority=i)
            for p in layer.params]

    def finish_step(self, apply: bool) -> None:
        hyper = Hyper.of(self.optimizer)
        gathered = [i for i, fc in self.fc.items() if fc.active]
        for i in sorted(set(self.reduce_scatters) | set(gathered)):
            layer = self.layers[i]
            if i in self.reduce_scatters:
                for h in self.reduce_scatters.pop(i):
                    self.wait(h, f"reduce-scatter layer {i}")
            else:
                fc = self.fc[i]
                fc.wait()
                if apply:
                    fc.gradient_slices(self.scattered)
            self.zero_layer_grads(layer)     # for a gathered FC layer: the local bias gradient
            if not apply:
                continue
            gathers = []
            for p in layer.params:
                a, b = self.slices[p.name]
                own = p.data.reshape(-1)[a:b]
                if b > a:
                    self._update_slice(p.name, own, hyper)
                gathers.append(self.exchanger.allgather_async(own, p.data, priority=i))
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

    def close(self) -> None:
        """Unwrap the `Linear` layers (called by `Trainer.close`)."""
        for fc in self.fc.values():
            fc.restore()
        self.fc = {}

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
