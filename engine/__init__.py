"""Gradient exchange for data-parallel CNN training over MPI.

- `Exchanger`: the progress engine (non-blocking collectives driven by a C thread).
- `make_strategy`: blocking, layerwise, bucketed, priority, multistep, lazy.
- `Trainer`: one synchronous SGD step per call, on top of a strategy.
"""

from engine.exchanger import ExchangeError, Exchanger, Handle, StallError, partition
from engine.strategies import make_strategy
from engine.trainer import NonFiniteError, ReplicaDivergenceError, Trainer

__all__ = ["Exchanger", "ExchangeError", "Handle", "partition", "make_strategy", "Trainer",
           "NonFiniteError", "ReplicaDivergenceError", "StallError"]
