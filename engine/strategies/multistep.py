"""`multistep`: the MLHPC'18 algorithm (docs/algorithm.md §1.5): allreduce split into
reduce-scatter + allgather, each half hidden behind a different computation,
and each rank updating only its 1/P of the model.

The unit of exchange is the model's unit (`Strategy.layer_units`): a conv
and the batch norm after it, or a layer's weight and bias, one flat buffer
of n elements; rank r owns its slice ``partition(n, P)[r]`` (ranks 0..r-1
one element longer when P does not divide n).

Convolution layers (and every layer that is not a fully-connected one):

1. Backprop (grad-ready hook of the unit's first layer i): post one
   reduce-scatter of the unit's gradient; rank r receives the average over
   ranks of its slice. Backprop goes on with layer i-1 meanwhile.
2. After backprop (`finish_step`), for each unit from the input side up: wait
   for its reduce-scatter, apply SGD to this rank's slice only (momentum exists
   only for that slice, a P-fold memory saving), and post
   at once an allgather of the updated slice into the full weight array
   (in place). The gradient buffers are zeroed once their reduce-scatter is
   complete.
3. Next forward (pre-forward hook of layer i): wait for layer i's allgather.
   The allgathers of later layers overlap the forward of earlier ones.

Per unit of n values each rank sends and receives about 2 (P-1)/P n
values, the same volume as a ring allreduce, but the update costs n/P instead
of n and is overlapped with the allgathers in flight.

Fully-connected layers (`cnn.layers.Linear`): the gradient N_out x N_in is
large, the activations B x N are small, so activations can travel instead of
the gradient. ``fc_mode`` picks the path:

``"alltoall"`` -- the paper's FC path, as the MLHPC'18 algorithm does it
(`AllToAllExchange`). Rank r owns the input neurons (weight *columns*)
``partition(N_in, P)[r] = [c0, c1)``: the rows [c0, c1) of the transposed
weight W^T (N_in x N_out), a contiguous slice of it.

1. Forward, just *before* layer i's forward (training only): post an
   all-to-all of its input X (B/P x N_in on each rank, sent as X^T, N_in x
   B/P, so that block q is the rows of q's neurons). Rank r receives from
   every rank its neurons [c0, c1) for that rank's samples: X[:, c0:c1] for
   the *global* batch, N_in/P x B. It overlaps the layer's forward and
   everything after it. The layer forms no weight gradient
   (``skip_weight_grad``).
2. Backprop, just before layer i's backward: post an allgather of the output
   error dY (B/P x N_out -> B x N_out): every rank needs every output neuron
   of its columns.
3. After backprop (`finish_step`, input side first, after the conv layers):
   wait for both, then compute the exact rows of this rank's neurons of the
   gradient over the global batch, with no reduction at all::

       G^T[c0:c1, :] = X[:, c0:c1]^T @ dY / P            (N_in/P x B) (B x N_out)

   (dY carries the loss's 1/(B/P), so 1/P makes it the gradient of the mean
   loss over the global batch). The bias slice is ``dY[:, c:d].sum(0) / P``
   as below; the locally accumulated bias gradient is discarded.
4. Update W^T[c0:c1] with this rank's momentum (kept in the same transposed
   layout), allgather the rows of W^T (``rows=True``), and, in the next
   forward's pre-forward hook, copy W = (W^T)^T before the layer runs: the
   weight allgather overlaps the forward of the layers below, as for convs.

``"activations"`` (`ActivationExchange`): allgather X whole instead, so the
flat slices of the weight (bands of output rows) can stay the owned slices
of the conv path:

1. Forward, right after layer i's forward: post an allgather of its input X
   (B/P x N_in -> B x N_in, ranks in batch order).
2. Backprop: the same allgather of dY as above.
3. After backprop: this rank's slice [a, b) of the flat (N_out x N_in) weight
   gradient lies in output rows r0 = a // N_in .. r1 = (b - 1) // N_in, so
   ``G[r0..r1, :] = dY[:, r0..r1].T @ X / P``; the rank keeps elements
   [a - r0 N_in, b - r0 N_in) of it (at most two partial rows in excess).
4. Partial SGD update and weight allgather, exactly as for conv layers.

``"reduce_scatter"``: every layer takes the conv path.

``"auto"`` (default): per layer and step, the path that moves the fewest
values (`choose_fc_mode`; B and the shapes are the same on every rank, so
every rank picks alike). Its layers own weight columns as in ``"alltoall"``
(a layer's ownership must not change from step to step: the momentum lives
there), and its reduce-scatter path reduce-scatters the rows of G^T.

Values each rank receives per FC layer and step (sent is the same; B the
global batch; the weight allgather, (P-1)/P N_in N_out, comes on top of
every path):

================  ================================
path              values received per rank
================  ================================
reduce_scatter    (P-1)/P N_in N_out
activations       (P-1)/P B (N_in + N_out)
alltoall          (P-1)/P B (ceil(N_in/P) + N_out)
================  ================================

The all-to-all never moves more than the activations path (equal at P = 1),
so ``"auto"`` in effect chooses between it and the reduce-scatter; the
activations path stays as the step between the two (a reader diffs it with
the all-to-all). VGG-16's fc6 (N_in 25,088, N_out 4,096), MB per rank and
step in float32 (x the gradient exchange only; "-": P > B, no sample per rank):

======  =====  ==============  ===========  ========  ==============
B       P      reduce_scatter  activations  alltoall  auto picks
======  =====  ==============  ===========  ========  ==============
256     2      205.5           14.9         8.5       alltoall
256     8      359.7           26.1         6.5       alltoall
256     32     398.2           29.0         4.8       alltoall
256     256    409.4           29.8         4.3       alltoall
256     8192   -               -            -         -
8192    2      205.5           478.2        272.6     reduce_scatter
8192    8      359.7           836.8        207.4     alltoall
8192    32     398.2           926.4        154.9     alltoall
8192    128    407.8           948.8        139.5     alltoall
8192    512    410.2           954.4        135.6     alltoall
8192    2048   410.8           955.8        134.6     alltoall
8192    8192   411.0           956.2        134.3     alltoall
======  =====  ==============  ===========  ========  ==============

At B = 8192 the activations path moves more than the gradient itself, and
the all-to-all 3x less than it from P = 512 on (the all-to-all's X term
shrinks as 1/P, the allgathered dY stays B N_out).

Numerics: on the ``activations`` and ``alltoall`` paths the FC weight
gradient is one GEMM over the global batch instead of a sum over ranks of
GEMMs over local batches, so it equals `blocking`'s to float32 rounding (not
bitwise, even at P <= 2); every rank still ends with bitwise identical
weights (each slice is computed by one rank and allgathered).

The wrapping: the strategy replaces ``layer.forward`` and ``layer.backward`` of
each `Linear` *instance* by thin wrappers (instance attributes; the class is
untouched) that post the exchanges and call the original method; `close`
removes them. A forward with ``train=True`` of a model driven by this
strategy must therefore happen inside ``Trainer.step`` (evaluation uses
``train=False`` and posts nothing).

Priorities: each request carries its layer index, so the allgather of layer
0 overtakes the queued requests of later layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnn.layers import Linear
from cnn.layers.blas import matmul
from cnn.optim import sgd_update

from .base import Hyper, Strategy

FC_MODES = ("alltoall", "activations", "reduce_scatter", "auto")
# Tie order of "auto": the conv path first (no wrapper work), then the paper's.
_AUTO_ORDER = ("reduce_scatter", "alltoall", "activations")


def fc_values(mode: str, global_batch: int, n_in: int, n_out: int, size: int) -> int:
    """Values one rank receives for an FC layer's gradient on `mode`'s path, / ((P-1)/P).

    The table in the module docstring; the all-to-all block is that of rank
    0, the largest (so every rank computes the same number).
    """
    if mode == "reduce_scatter":
        return n_in * n_out
    if mode == "activations":
        return global_batch * (n_in + n_out)
    if mode == "alltoall":
        return global_batch * (-(-n_in // size) + n_out)
    raise ValueError(f"fc_values: unknown mode {mode!r}")


def choose_fc_mode(global_batch: int, n_in: int, n_out: int, size: int) -> str:
    """``fc_mode="auto"``: the path that moves the fewest values (ties: `_AUTO_ORDER`)."""
    return min(_AUTO_ORDER, key=lambda m: (fc_values(m, global_batch, n_in, n_out, size),
                                            _AUTO_ORDER.index(m)))


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
        return True       # fc_mode="activations": every step

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

    input_exchange = "allgather"

    def wait(self) -> None:
        self.strategy.wait(self.input_handle, f"{self.input_exchange} inputs layer {self.i}")
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


class AllToAllExchange(ActivationExchange):
    """The paper's FC path of one `Linear` layer: all-to-all of X, allgather of dY.

    This rank owns the input neurons [c0, c1) = ``partition(N_in, P)[rank]``:
    rows [c0, c1) of the transposed weight, updated here and allgathered by
    rows into `weight_t`, copied into ``layer.weight`` before the next forward.
    Under ``fc_mode="auto"`` a step may take the reduce-scatter path instead
    (`reduce_scatter`), with the same ownership.

    Parameters
    ----------
    i, layer, strategy
        As for `ActivationExchange`.
    """

    input_exchange = "alltoall"

    def __init__(self, i: int, layer: Linear, strategy: Multistep):
        super().__init__(i, layer, strategy)
        self.c0, count = self.exchanger.partition(layer.in_features)[self.exchanger.rank]
        self.c1 = self.c0 + count
        self.weight_t = np.ascontiguousarray(layer.weight.data.T)     # (N_in, N_out)
        self.received = None              # (P, c1 - c0, B/P): X[:, c0:c1] of every rank
        self.inputs_t = None              # X^T (N_in, B/P): the send buffer
        self.gradient_t = None            # G^T (N_in, N_out): reduce-scatter path's send buffer
        self.gathered = False             # weight_t holds new weights for layer.weight

    def owned_slice(self) -> tuple[int, int]:
        """The flat range of the owned rows in W^T (N_in x N_out, row-major)."""
        n_out = self.layer.out_features
        return self.c0 * n_out, self.c1 * n_out

    def chooses_activations(self, local_batch: int) -> bool:
        """True: the all-to-all path this step; False: the reduce-scatter path."""
        if self.strategy.fc_mode == "alltoall":
            return True
        return choose_fc_mode(local_batch * self.exchanger.size, self.layer.in_features,
                              self.layer.out_features, self.exchanger.size) == "alltoall"

    def forward(self, x, train=True):
        if train:
            self.active = self.chooses_activations(x.shape[0])
            self.layer.skip_weight_grad = self.active
            if self.active:
                self._post_alltoall(x)
        return self._forward(x, train=train)

    def _post_alltoall(self, x: np.ndarray) -> None:
        """X (B/P, N_in) -> this rank's neurons of every rank's samples, (P, c1 - c0, B/P)."""
        local = x.shape[0]
        self.inputs_t = np.ascontiguousarray(np.asarray(x, np.float32).T)
        shape = (self.exchanger.size, self.c1 - self.c0, local)
        if self.received is None or self.received.shape != shape:
            self.received = np.empty(shape, np.float32)
        self.input_handle = self.exchanger.alltoall_async(self.inputs_t, self.received,
                                                          priority=self.i)

    def reduce_scatter(self, out: np.ndarray):
        """The reduce-scatter path: the rows [c0, c1) of the mean G^T, into `out`."""
        grad = self.layer.weight.grad
        if self.gradient_t is None:
            self.gradient_t = np.empty(grad.shape[::-1], np.float32)
        self.gradient_t[...] = grad.T
        return self.exchanger.reduce_scatter_async(self.gradient_t, out, op="mean",
                                                   priority=self.i, rows=True)

    def gradient_slices(self, out: dict) -> None:
        """G^T[c0:c1] = X[:, c0:c1]^T dY / P over the global batch, and the bias slice."""
        size = np.float32(self.exchanger.size)
        weight, bias = self.layer.weight, self.layer.bias
        if self.c1 > self.c0:
            # (P, n, B/P) -> (n, B): samples in rank order, the order of the gathered dY
            inputs = np.ascontiguousarray(self.received.transpose(1, 0, 2))
            rows = matmul(inputs.reshape(self.c1 - self.c0, -1), self.errors)  # (n, N_out)
            np.divide(rows.reshape(-1), size, out=out[weight.name])
        if bias is not None:
            c, d = self.strategy.slices[bias.name]
            if d > c:
                np.divide(self.errors[:, c:d].sum(axis=0), size, out=out[bias.name])

    def own_weights(self) -> np.ndarray:
        """W^T[c0:c1] (flat), refreshed from the layer's weight (a checkpoint may have loaded it)."""
        own = self.weight_t[self.c0:self.c1]
        own[...] = self.layer.weight.data[:, self.c0:self.c1].T
        return own.reshape(-1)

    def post_weight_allgather(self):
        self.gathered = True
        return self.exchanger.allgather_async(self.weight_t[self.c0:self.c1], self.weight_t,
                                              priority=self.i, rows=True)

    def install_weights(self) -> None:
        """After the weight allgather: the layer's (N_out, N_in) weight from W^T."""
        if self.gathered:
            self.layer.weight.data[...] = self.weight_t.T
            self.gathered = False


@dataclass(frozen=True)
class Piece:
    """What one reduce-scatter and one allgather exchange: a unit's flat buffer or one tensor."""

    key: str
    params: tuple
    data: np.ndarray     # flat view of the parameters' storage
    grad: np.ndarray


class Multistep(Strategy):
    """See the module docstring.

    Parameters
    ----------
    model, exchanger, optimizer
        As for every strategy.
    fc_mode : {"auto", "alltoall", "activations", "reduce_scatter"}
        How `Linear` layers get their gradient: the paper's all-to-all of the
        inputs and allgather of the errors, gathered inputs and errors, the
        reduce-scatter of the conv path, or (default) per layer and step the
        path that moves the fewest values.

    Attributes
    ----------
    pieces : dict of int to list of Piece
        By first layer: what its collectives exchange, one flat buffer per
        unit (`Strategy.layer_units`), or each tensor of a `Linear` layer
        off the conv path.
    slices : dict of str to (int, int)
        The flat range of each piece this rank owns and updates; for the
        weight of a `Linear` layer under ``"alltoall"`` / ``"auto"``, a range
        of its transpose (N_in x N_out): the rows of this rank's input neurons.
    momentum : dict of str to ndarray
        SGD momentum of the owned slices only (a P-fold memory saving).
    """

    name = "multistep"

    def __init__(self, model, exchanger, optimizer, fc_mode: str = "auto"):
        super().__init__(model, exchanger, optimizer)
        self.check_whole_parameters()
        if fc_mode not in FC_MODES:
            raise ValueError(f"multistep: fc_mode must be one of {FC_MODES}, got {fc_mode!r}")
        self.fc_mode = fc_mode
        self.fc: dict[int, ActivationExchange] = {}
        if fc_mode != "reduce_scatter":
            path = ActivationExchange if fc_mode == "activations" else AllToAllExchange
            self.fc = {i: path(i, layer, self)
                       for i, layer in enumerate(self.layers) if isinstance(layer, Linear)}
        # weight name -> its all-to-all path: the rank owns rows of the transpose
        self.transposed = {fc.layer.weight.name: fc for fc in self.fc.values()
                           if isinstance(fc, AllToAllExchange)}
        # What one reduce-scatter / allgather exchanges: a whole unit (one flat
        # buffer), or, for a Linear layer off the conv path, each tensor (its
        # weight gradient is formed from X and dY, by rows or by columns).
        self.pieces: dict[int, list[Piece]] = {}
        for first, unit in self.layer_units().items():
            if first in self.fc:
                self.pieces[first] = [Piece(p.name, (p,), p.data.reshape(-1), p.grad)
                                      for p in unit.params]
            else:
                self.pieces[first] = [Piece(unit.key, unit.params, unit.data, unit.grad)]
        self.slices = {}
        for piece in self.all_pieces():
            fc = self.transposed.get(piece.key)
            if fc is not None:
                self.slices[piece.key] = fc.owned_slice()
            else:
                offset, count = exchanger.partition(piece.data.size)[exchanger.rank]
                self.slices[piece.key] = (offset, offset + count)
        # Momentum only for the owned slices, started from the given
        # optimizer's momentum (non-zero after a resume).
        self.momentum = {piece.key: self._layout(piece, optimizer.momentum_buffers)[a:b].copy()
                         for piece in self.all_pieces() for a, b in [self.slices[piece.key]]}
        self.scattered = {key: np.zeros(b - a, np.float32) for key, (a, b) in self.slices.items()}
        self.reduce_scatters: dict[int, list] = {}
        self.allgathers: dict[int, list] = {}

    def all_pieces(self) -> list[Piece]:
        return [piece for first in sorted(self.pieces) for piece in self.pieces[first]]

    def _layout(self, piece: Piece, full: dict) -> np.ndarray:
        """The whole-parameter buffers `full[name]` of a piece, flat, in its slice's layout."""
        fc = self.transposed.get(piece.key)
        if fc is not None:
            return full[piece.key].reshape(fc.layer.weight.data.shape).T.reshape(-1)
        return np.concatenate([full[p.name].reshape(-1) for p in piece.params])

    def grad_ready(self, i: int, layer) -> None:
        fc = self.fc.get(i)
        if fc is not None and fc.active:
            return      # gradient computed after backprop from the exchanged X and dY
        if i not in self.pieces:
            return      # a later layer of a unit: posted with the unit's first layer
        self.reduce_scatters[i] = [
            self.transposed[piece.key].reduce_scatter(self.scattered[piece.key])
            if piece.key in self.transposed else
            self.exchanger.reduce_scatter_async(piece.grad, self.scattered[piece.key],
                                                op="mean", priority=i)
            for piece in self.pieces[i]]

    def finish_step(self, apply: bool) -> None:
        hyper = Hyper.of(self.optimizer)
        gathered = [i for i, fc in self.fc.items() if fc.active]
        for i in sorted(set(self.reduce_scatters) | set(gathered)):
            if i in self.reduce_scatters:
                for h in self.reduce_scatters.pop(i):
                    self.wait(h, f"reduce-scatter layer {i}")
            else:
                fc = self.fc[i]
                fc.wait()
                if apply:
                    fc.gradient_slices(self.scattered)
            for piece in self.pieces[i]:
                piece.grad.fill(0)       # for a gathered FC layer: the local bias gradient
            if not apply:
                continue
            gathers = []
            for piece in self.pieces[i]:
                fc = self.transposed.get(piece.key)
                a, b = self.slices[piece.key]
                own = piece.data[a:b] if fc is None else fc.own_weights()
                if b > a:
                    self._update_slice(piece.key, own, hyper)
                gathers.append(self.exchanger.allgather_async(own, piece.data, priority=i)
                               if fc is None else fc.post_weight_allgather())
            self.allgathers[i] = gathers

    def _update_slice(self, key: str, own: np.ndarray, hyper: Hyper) -> None:
        sgd_update(own, self.scattered[key], self.momentum[key],
                   hyper.lr, hyper.momentum, hyper.weight_decay, hyper.nesterov)

    def pre_forward(self, i: int, layer) -> None:
        for h in self.allgathers.pop(i, ()):
            self.wait(h, f"allgather layer {i}")
        fc = self.fc.get(i)
        if isinstance(fc, AllToAllExchange):
            fc.install_weights()

    def synchronize(self) -> None:
        for i in sorted(self.allgathers):
            self.pre_forward(i, self.layers[i])

    def close(self) -> None:
        """Unwrap the `Linear` layers (called by `Trainer.close`)."""
        for fc in self.fc.values():
            fc.restore()
        self.fc = {}

    def shard_pieces(self) -> list[dict]:
        """What this rank owns, weights and momentum by parameter, for a sharded checkpoint.

        No communication and no copy (the pieces are views): each rank writes
        the slices it updates, instead of one rank writing everything after
        gathering the momentum (`optimizer_state_dict`). Valid as soon as a
        step returns: the weight allgathers still in flight only read these
        slices (in place, the rank's own block is the send buffer), so a
        checkpoint need not wait for them. Layouts: `cnn.checkpoint`.
        """
        pieces = []
        for piece in self.all_pieces():
            a, b = self.slices[piece.key]
            momentum = self.momentum[piece.key]
            fc = self.transposed.get(piece.key)
            if fc is not None:      # rows of W^T: the columns of the input neurons owned
                if fc.c1 > fc.c0:
                    weight = fc.layer.weight
                    for kind, data in (("params", fc.weight_t[fc.c0:fc.c1]),
                                       ("momentum", momentum)):
                        pieces.append({"name": weight.name, "kind": kind, "layout": "columns",
                                       "start": fc.c0, "stop": fc.c1,
                                       "shape": weight.data.shape, "data": data})
                continue
            offset = 0
            for p in piece.params:      # a unit's slice may span several of its tensors
                lo, hi = max(a, offset), min(b, offset + p.data.size)
                if hi > lo:
                    for kind, data in (("params", piece.data[lo:hi]),
                                       ("momentum", momentum[lo - a:hi - a])):
                        pieces.append({"name": p.name, "kind": kind, "layout": "flat",
                                       "start": lo - offset, "stop": hi - offset,
                                       "shape": p.data.shape, "data": data})
                offset += p.data.size
        return pieces

    def optimizer_state_dict(self, momentum: bool = True) -> dict:
        """Full momentum buffers, gathered from the slices (every rank must call it).

        With ``momentum=False``, the rest of the state only (no communication),
        for a sharded checkpoint that stores `shard_pieces` instead.
        """
        if not momentum:
            return self.optimizer.state_dict(momentum_buffers=False)
        self.synchronize()
        state = self.optimizer.state_dict(momentum_buffers=False)    # its buffers are stale
        handles, gathered = [], {}
        for piece in self.all_pieces():
            fc = self.transposed.get(piece.key)
            if fc is None:
                gathered[piece.key] = np.empty(piece.data.size, np.float32)
                handles.append(self.exchanger.allgather_async(self.momentum[piece.key],
                                                              gathered[piece.key]))
            else:       # rows of the transpose, back to torch's (N_out, N_in) afterwards
                gathered[piece.key] = np.empty(fc.layer.weight.data.shape[::-1], np.float32)
                handles.append(self.exchanger.allgather_async(
                    self.momentum[piece.key], gathered[piece.key], rows=True))
        for h in handles:
            h.wait()
        full = {}
        for piece in self.all_pieces():
            if piece.key in self.transposed:
                full[piece.key] = np.ascontiguousarray(gathered[piece.key].T).reshape(-1)
                continue
            offset = 0
            for p in piece.params:      # a unit's flat momentum, split by parameter (views)
                full[p.name] = gathered[piece.key][offset:offset + p.data.size]
                offset += p.data.size
        state["momentum_buffers"] = full
        state["lr"] = self.optimizer.lr
        return state
