"""Gradient exchange for data-parallel CNN training over MPI.

- `Exchanger`: the progress engine (non-blocking collectives driven by a C thread).
- `make_strategy`: blocking, layerwise, bucketed, priority, multistep, lazy.
- `Trainer`: one synchronous SGD step per call, on top of a strategy.

The names are imported on first use (PEP 562), not with the package:
importing mpi4py.MPI initialises MPI, which `python -m engine.supervise`
(a launcher, not an MPI process) must not do.
"""

import importlib

_EXPORTS = {
    "Exchanger": "engine.exchanger", "ExchangeError": "engine.exchanger",
    "Handle": "engine.exchanger", "StallError": "engine.exchanger",
    "partition": "engine.exchanger", "make_strategy": "engine.strategies",
    "Trainer": "engine.trainer", "NonFiniteError": "engine.trainer",
    "ReplicaDivergenceError": "engine.trainer",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
