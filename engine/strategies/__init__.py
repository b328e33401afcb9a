"""Gradient-exchange strategies: one file each, one contract (`base.Strategy`).

``make_strategy(name, model, exchanger, optimizer=sgd, **options)`` builds one.

==========  =====================================  ==========================================
name        what is communicated, and when         use it when
==========  =====================================  ==========================================
blocking    one allreduce of all gradients after   the baseline; debugging; compute is tiny
            backprop, then the update              next to communication anyway
layerwise   one allreduce per layer, posted in     few, large layers; a fast link; the
            backprop; layer i updated just before  simplest overlap
            its next forward
bucketed    allreduce of buckets of consecutive    many small tensors (biases, BN, small
            layers (``bucket_bytes``)              convs) where per-message latency counts
priority    layerwise, chunks of input-side        large models on a slow link: the next
            layers posted first (``chunk_bytes``,  forward starts as soon as layer 0 is ready
            ``max_inflight`` of the exchanger)
multistep   reduce-scatter in backprop, update of  memory for optimizer state matters (1/P
            this rank's 1/P slice, allgather       per rank) or the update is costly; hides
            overlapped with the next forward; FC   both halves of the allreduce; large FC
            layers all-to-all their inputs and     layers (VGG): B (N_in/P + N_out) values
            allgather errors (``fc_mode``)         instead of N_in N_out
lazy        layerwise, but the first               the input-side exchange (never hidden)
            ``lazy_layers`` layers accumulate      dominates and a small change to the
            locally and are averaged every         optimisation is acceptable: NOT equal to
            ``interval`` steps (adaptive)          blocking once the interval exceeds 1
==========  =====================================  ==========================================

Batch norm: no strategy touches BN running statistics; the `Trainer` averages
them over ranks after every step unless ``bn_stats="local"`` (PCNN's choice:
per rank). Batch statistics in the forward are always per rank (local batch).
"""

from __future__ import annotations

from .base import Hyper, Strategy
from .blocking import Blocking
from .bucketed import Bucketed
from .layerwise import Layerwise
from .lazy import Lazy
from .multistep import Multistep
from .priority import Priority

__all__ = ["STRATEGIES", "Blocking", "Bucketed", "Hyper", "Layerwise", "Lazy", "Multistep",
           "Priority", "Strategy", "make_strategy"]

STRATEGIES = {cls.name: cls for cls in (Blocking, Layerwise, Bucketed, Priority, Multistep,
                                         Lazy)}


def make_strategy(name: str, model, exchanger, *, optimizer, **options) -> Strategy:
    """Build the strategy called `name` (see the table above).

    Parameters
    ----------
    name : str
        A key of `STRATEGIES`.
    model : cnn.models.Model
    exchanger : engine.Exchanger
    optimizer : cnn.optim.SGD
        Over ``model.parameters()``, whole parameters.
    **options
        Strategy-specific, e.g. ``bucket_bytes`` for ``bucketed``, ``fc_mode`` for
        ``multistep``, ``lazy_layers``, ``interval``, ``adaptive`` for ``lazy``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    try:
        return STRATEGIES[name](model, exchanger, optimizer, **options)
    except TypeError as e:
        raise ValueError(f"strategy {name!r}: bad options {sorted(options)} ({e})") from e
