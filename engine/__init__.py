"""Gradient exchange for data-parallel CNN training over MPI.

The progress engine (`Exchanger`) lives here; the strategies, the trainer,
tracing and the cost model build on it.
"""

from engine.exchanger import ExchangeError, Exchanger, Handle, partition

__all__ = ["Exchanger", "ExchangeError", "Handle", "partition"]
