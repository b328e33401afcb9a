"""`Trainer`: one synchronous data-parallel SGD iteration per `step`, over MPI.

Each rank calls ``trainer.step(x, y)`` with its own B/P samples of the global
batch; the gradient exchange is delegated to a strategy (engine/strategies/),
which the trainer drives through the model's hooks::

    with Trainer(model, SGD(model.parameters(), lr=0.1), strategy="priority") as t:
        for x, y in batches:
            loss = t.step(x, y)        # loss averaged over the global batch
        t.synchronize()                # weights final and identical on every rank

Per iteration, on every rank, in this order:

1. forward; before layer i runs, the strategy may wait for / apply layer i's
   pending update (pre-forward hook);
2. loss and backward; as soon as layer i's gradient is final, the trainer
   notes whether it is finite and the strategy may post its exchange
   (grad-ready hook);
3. the strategy posts what is left (`end_backward`), the BN running statistics
   are posted for averaging, and one small allreduce carries
   [loss, correct predictions, non-finite flags of the loss and of each layer]
   ahead of every queued gradient chunk (priority -1);
4. if any rank saw a non-finite value, every rank knows it from that
   allreduce: the update is skipped on every rank (``skip_nonfinite=True``)
   or `NonFiniteError` names the layer and iteration; otherwise the strategy
   updates (now or deferred, `finish_step`).

Every rank issues the same collectives in the same order; nothing depends on
local timing.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
from mpi4py import MPI

from cnn.losses import SoftmaxCrossEntropy
from engine.exchanger import Exchanger
from engine.strategies import make_strategy
from ext import _progress

__all__ = ["NonFiniteError", "ReplicaDivergenceError", "Trainer"]

_STATS_PRIORITY = -1   # the loss/flag allreduce overtakes queued gradient chunks


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite on at least one rank."""


class ReplicaDivergenceError(RuntimeError):
    """The ranks' weights are no longer bitwise identical."""


class Trainer:
    """Synchronous data-parallel SGD with a pluggable gradient-exchange strategy.

    Parameters
    ----------
    model : cnn.models.Model
        Identical on every rank (same build seed or same loaded state).
    optimizer : cnn.optim.SGD
        Over ``model.parameters()``, whole parameters. Set ``optimizer.lr``
        before a step to change the learning rate (schedules).
    strategy : str
        See `engine.strategies.make_strategy`.
    comm : mpi4py.MPI.Intracomm, optional
        Defaults to ``MPI.COMM_WORLD``.
    loss : object with forward(logits, y) -> float and backward() -> dlogits
        Averaging over the local batch; default `SoftmaxCrossEntropy`.
    chunk_bytes, max_inflight, poll_us : int
        Passed to the `Exchanger`; defaults the engine's (1 MiB, 4, 200 us).
    algorithm : str
        The Exchanger's allreduce algorithm ("mpi", "recursive_doubling",
        "ring", "auto"; docs/allreduce_algorithms.md).
    bn_stats : {"average", "local"}
        "average": BN running statistics are averaged over ranks after every
        step (replicas stay identical; the running mean then equals the one
        of the global batch); "local": each rank keeps its own (PCNN).
    skip_nonfinite : bool
        Skip the update of an iteration with a non-finite loss or gradient on
        every rank instead of raising `NonFiniteError`: weights, optimizer
        state and BN running statistics stay as they were before it.
    check_replicas : int
        Every this many steps, verify that all ranks hold bitwise identical
        weights (`check_replicas()`); 0 disables.
    trace : bool
        Record layer spans, waits and chunk events (`trace_events`).
    stall_warn_s, stall_timeout_s : float or None
        Passed to the `Exchanger`: a wait this long names the ranks holding
        it up; one that long raises `engine.StallError` (None: never).
    **strategy_options
        Passed to the strategy (e.g. ``bucket_bytes``).
    """

    def __init__(self, model, optimizer, strategy: str = "multistep", comm=None, *, loss=None,
                 chunk_bytes: int = _progress.DEFAULT_CHUNK_BYTES,
                 max_inflight: int = _progress.DEFAULT_MAX_INFLIGHT,
                 poll_us: int = _progress.DEFAULT_POLL_US,
                 bn_stats: str = "average", skip_nonfinite: bool = False,
                 check_replicas: int = 0, trace: bool = False, algorithm: str = "mpi",
                 stall_warn_s: float | None = 60.0, stall_timeout_s: float | None = None,
                 **strategy_options):
        if bn_stats not in ("average", "local"):
            raise ValueError(f"bn_stats must be 'average' or 'local', got {bn_stats!r}")
        if int(check_replicas) < 0:
            raise ValueError(f"check_replicas must be >= 0, got {check_replicas}")
        self.model = model
        self.optimizer = optimizer
        self.loss = SoftmaxCrossEntropy() if loss is None else loss
        self.bn_stats = bn_stats
        self.skip_nonfinite = bool(skip_nonfinite)
        self.check_every = int(check_replicas)
        self.tracing = bool(trace)
        base = MPI.COMM_WORLD if comm is None else comm
        self.exchanger = Exchanger(base, chunk_bytes=chunk_bytes, max_inflight=max_inflight,
                                   poll_us=poll_us, trace=self.tracing, algorithm=algorithm,
                                   stall_warn_s=stall_warn_s, stall_timeout_s=stall_timeout_s)
        self.comm = base.Dup()     # the trainer's own blocking collectives (replica check)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        try:
            self.strategy = make_strategy(strategy, model, self.exchanger,
                                          optimizer=optimizer, **strategy_options)
        except Exception:
            self.exchanger.close()
            self.comm.Free()
            raise
        self.strategy_name = strategy
        self.layers = list(model.layers)
        self.iteration = 0
        self.skipped = 0
        self.last = {"loss": float("nan"), "accuracy": float("nan"), "iter_ms": 0.0,
                     "exposed_comm_ms": 0.0, "compute_ms": 0.0, "skipped": False}
        self._stats = np.zeros(3 + len(self.layers), np.float64)
        self._nonfinite = np.zeros(len(self.layers), bool)
        self._buffers = [(name, a) for name, a in model.buffers()
                         if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim > 0]
        size = sum(a.size for _, a in self._buffers)
        self._bn_flat = np.zeros(size, np.float32) if bn_stats == "average" and size else None
        # A skipped step must leave no trace: the forward pass has already
        # moved the BN running statistics (possibly to NaN), so they are saved
        # before it and put back when the update is skipped.
        self._saved_buffers = ([(a, np.empty_like(a)) for _, a in model.buffers()]
                               if self.skip_nonfinite else [])
        self.events: list = []           # (name, category, t_start, t_end) on this thread
        self._chunk_events: list = []
        if self.tracing:
            self.strategy.wait_events = []
        self._in_step = False
        self._open_forward, self._mark = None, 0.0
        self._closed = False
        model.zero_grad()
        self._hooks = [model.register_pre_forward_hook(self._pre_forward),
                       model.register_grad_ready_hook(self._grad_ready)]

    # -- context manager ----------------------------------------------------------
    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.close(synchronize=exc_type is None)
        except Exception:
            if exc_type is None:
                raise
            # Leaving on an error (a StallError, say): that error is the news,
            # not the shutdown that could not finish what it left pending.

    # -- hooks ----------------------------------------------------------------------
    def _pre_forward(self, i, layer) -> None:
        if self._in_step and self.tracing:
            now = time.monotonic()
            if self._open_forward is not None:
                self._record_layer("forward", self._open_forward, self._mark, now)
        self.strategy.pre_forward(i, layer)
        if self._in_step and self.tracing:
            self._open_forward, self._mark = i, time.monotonic()

    def _grad_ready(self, i, layer) -> None:
        if self.tracing:
            self._record_layer("backward", i, self._mark, time.monotonic())
        # Read before the strategy posts the gradient (the exchange writes into it).
        # A float64 sum is NaN/inf exactly when some element is (no overflow possible).
        self._nonfinite[i] = any(not np.isfinite(p.grad.sum(dtype=np.float64))
                                 for p in layer.params)
        self.strategy.grad_ready(i, layer)
        if self.tracing:
            self._mark = time.monotonic()

    def _record_layer(self, phase, i, start, end) -> None:
        name = self.layers[i].params[0].name.rsplit(".", 1)[0]
        self.events.append((f"{phase} {i} {name}", phase, start, end))

    # -- the iteration ----------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One synchronous SGD iteration on this rank's samples.

        Parameters
        ----------
        x : ndarray of shape (B/P, C, H, W), float32
            This rank's part of the global batch (the same size on every rank).
        y : ndarray of shape (B/P,), int

        Returns
        -------
        float
            The loss averaged over the global batch (identical on every rank).

        Raises
        ------
        NonFiniteError
            On every rank, naming the layer and iteration, when a loss or
            gradient was non-finite somewhere and ``skip_nonfinite`` is False.
        """
        if self._closed:
            raise RuntimeError("the trainer is closed")
        strategy = self.strategy
        start = time.monotonic()
        strategy.wait_seconds = 0.0
        self._in_step, self._open_forward, self._mark = True, None, start
        try:
            for live, saved in self._saved_buffers:
                np.copyto(saved, live)
            logits = self.model.forward(x, train=True)
            if self.tracing and self._open_forward is not None:
                self._record_layer("forward", self._open_forward, self._mark, time.monotonic())
            loss = self.loss.forward(logits, y)
            correct = int((logits.argmax(axis=1) == np.asarray(y)).sum())
            self._nonfinite[:] = False
            self._mark = time.monotonic()
            self.model.backward(self.loss.backward())
            strategy.end_backward()
            bn_handle = None
            if self._bn_flat is not None:
                self._pack_buffers()
                bn_handle = self.exchanger.allreduce_async(self._bn_flat, op="mean")
            stats = self._stats
            stats[0], stats[1], stats[2] = loss, correct, not np.isfinite(loss)
            stats[3:] = self._nonfinite
            strategy.wait(self.exchanger.allreduce_async(stats, op="sum",
                                                         priority=_STATS_PRIORITY),
                          "loss and flags")
            flagged = np.flatnonzero(stats[2:] > 0)
            apply = flagged.size == 0
            strategy.finish_step(apply)
            if bn_handle is not None:
                strategy.wait(bn_handle, "BN statistics")
                if apply:
                    self._unpack_buffers()
            if not apply:
                for live, saved in self._saved_buffers:
                    np.copyto(live, saved)
        finally:
            self._in_step = False
        iteration = self.iteration
        self.iteration += 1
        end = time.monotonic()
        global_loss = float(stats[0] / self.size)
        exposed = strategy.wait_seconds
        self.last = {"loss": global_loss, "accuracy": float(stats[1]) / (len(y) * self.size),
                     "iter_ms": 1e3 * (end - start), "exposed_comm_ms": 1e3 * exposed,
                     "compute_ms": 1e3 * (end - start - exposed), "skipped": not apply}
        if not apply:
            self.skipped += 1
            message = self._nonfinite_message(iteration, flagged)
            if not self.skip_nonfinite:
                raise NonFiniteError(message + "; pass skip_nonfinite=True (--skip-nonfinite) "
                                     "to skip such updates on every rank")
        if self.check_every and self.iteration % self.check_every == 0:
            self.check_replicas()
        return global_loss

    def _nonfinite_message(self, iteration: int, flagged: np.ndarray) -> str:
        if 0 in flagged:
            return f"iteration {iteration}: non-finite loss on at least one rank"
        # The highest flagged layer is the first one backprop produced.
        layers = sorted((int(k) - 1 for k in flagged), reverse=True)
        names = [f"layer {i} ({self.layers[i].params[0].name.rsplit('.', 1)[0]})"
                 for i in layers]
        return (f"iteration {iteration}: non-finite gradient in {names[0]} on at least one "
                f"rank (all affected: {', '.join(names)})")

    def _pack_buffers(self) -> None:
        offset = 0
        for _, a in self._buffers:
            self._bn_flat[offset:offset + a.size] = a.reshape(-1)
            offset += a.size

    def _unpack_buffers(self) -> None:
        offset = 0
        for _, a in self._buffers:
            a.reshape(-1)[:] = self._bn_flat[offset:offset + a.size]
            offset += a.size

    # -- completion, checks, state --------------------------------------------------------
    def synchronize(self) -> None:
        """Complete everything pending: weights final (identical on every rank), grads zero."""
        self.strategy.synchronize()

    def check_replicas(self) -> None:
        """Verify that every rank holds bitwise identical weights (every rank must call it).

        Raises
        ------
        ReplicaDivergenceError
            On every rank, naming the first parameter (in forward order) whose
            bytes differ between ranks.
        """
        self.synchronize()
        named = [(p.name, p.data) for p in self.model.parameters()]
        if self.bn_stats == "average":
            named += self._buffers
        digests = [zlib.crc32(np.ascontiguousarray(a).view(np.uint8)) for _, a in named]
        everyone = self.comm.allgather(digests)
        for k, (name, _) in enumerate(named):
            values = [d[k] for d in everyone]
            if len(set(values)) > 1:
                groups = {}
                for rank, v in enumerate(values):
                    groups.setdefault(v, []).append(rank)
                raise ReplicaDivergenceError(
                    f"after iteration {self.iteration - 1}: replicas diverge first at {name!r}; "
                    f"ranks grouped by identical contents: {sorted(groups.values())}")

    def optimizer_state_dict(self) -> dict:
        """Optimizer state over whole parameters, for a checkpoint (every rank must call it)."""
        self.synchronize()
        return self.strategy.optimizer_state_dict()

    def trace_events(self) -> dict:
        """Events since the last call, times on `time.monotonic()`'s clock.

        Returns
        -------
        dict with "compute": [(name, category, t_start, t_end)] (layer spans on
        the compute thread), "waits": [(label, t_start, t_end)] and "chunks":
        [(seq, chunk, kind, bytes, t_post, t_done)] (the progress thread).
        """
        events = {"compute": self.events, "waits": self.strategy.wait_events or [],
                  "chunks": self.exchanger.drain_trace()}
        self.events = []
        if self.tracing:
            self.strategy.wait_events = []
        return events

    def close(self, synchronize: bool = True) -> None:
        """Complete pending work (unless `synchronize` is False), stop the progress thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if synchronize:
                self.strategy.synchronize()
        finally:
            for h in self._hooks:
                h.remove()
            self.strategy.close()
            try:
                self.exchanger.close()
            finally:
                self.comm.Free()
