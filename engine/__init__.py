"""Gradient exchange for data-parallel CNN training over MPI.

- `Exchanger`: the progress engine (non-blocking collectives driven by a C thread).
- `make_strategy`: blocking, layerwise, bucketed, priority, multistep, lazy.
- `Trainer`: one synchronous SGD step per call, on top of a strategy.
"""

import os

# The progress thread (ext/) shares the cores with numba's OpenMP workers, so
# they sleep as soon as a parallel region ends instead of spinning for a while
# (cnn's default outside the engine, see cnn/__init__.py). Set before cnn is
# imported, and before numba starts OpenMP; an explicit setting by the user wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "0"

from engine.exchanger import ExchangeError, Exchanger, Handle, StallError, partition
from engine.strategies import make_strategy
from engine.trainer import NonFiniteError, ReplicaDivergenceError, Trainer

__all__ = ["Exchanger", "ExchangeError", "Handle", "partition", "make_strategy", "Trainer",
           "NonFiniteError", "ReplicaDivergenceError", "StallError"]
