"""The Python side and the extension agree: kinds, states, algorithm codes,
limits and defaults come from ext/_progress.pxd, never retyped.

Serial: the engine runs on MPI.COMM_SELF.
"""

import inspect

import numpy as np
import pytest
from mpi4py import MPI

from analysis import costmodel as cm
from analysis import predict
from bench import algorithms as bench_algorithms
from bench import overlap as bench_overlap
from bench import step as bench_step
from engine import train as engine_train
from engine.exchanger import ALGORITHMS, Exchanger
from engine.trainer import Trainer
from ext import _progress


def test_kinds_states_and_algorithms_are_the_c_enums():
    assert set(_progress.KINDS) == {"allreduce", "reduce_scatter", "allgather", "alltoall"}
    assert sorted(_progress.KINDS.values()) == list(range(4))     # distinct C enum values
    assert _progress.KIND_NAMES == {c: n for n, c in _progress.KINDS.items()}
    assert list(_progress.STATES) == ["queued", "agreed", "done", "failed"]
    # Request.finished() relies on done and failed being the two highest states
    assert sorted(_progress.STATES.values()) == list(_progress.STATES.values())
    assert ALGORITHMS == ("auto",) + tuple(_progress.ALGORITHM_CODES)
    assert set(_progress.ALGORITHM_CODES) == {"mpi", "recursive_doubling", "ring"}
    for name, code in _progress.ALGORITHM_CODES.items():
        if name == "mpi":       # MPI's own: the engine has no plan of its own to show
            with pytest.raises(ValueError, match="only ours"):
                _progress.algorithm_steps(code, 0, 2, 8)
        else:
            assert _progress.algorithm_steps(code, 0, 2, 8)
    assert _progress.NEGOTIATION_LEN == 2 + 2 * _progress.NEGOTIATION_WINDOW
    assert cm.ROUND_BYTES == 8 * _progress.NEGOTIATION_LEN


def _defaults(func, *names):
    params = inspect.signature(func).parameters
    return tuple(params[n].default for n in names)


def test_every_default_is_the_extensions():
    engine = (_progress.DEFAULT_CHUNK_BYTES, _progress.DEFAULT_MAX_INFLIGHT,
              _progress.DEFAULT_POLL_US)
    assert engine == (1 << 20, 4, 200)
    names = ("chunk_bytes", "max_inflight", "poll_us")
    assert _defaults(Exchanger.__init__, *names) == engine
    assert _defaults(Trainer.__init__, *names) == engine
    assert (cm.Engine().chunk_bytes, cm.Engine().max_inflight) == engine[:2]
    assert predict.STEP_ENGINE == cm.Engine()
    step = bench_step.parse_args([])
    assert (step.chunk_bytes, step.max_inflight, step.poll_us) == engine
    train = engine_train.parse_args([])
    assert (train.chunk_bytes, train.max_inflight) == engine[:2]
    # The two benchmarks that choose a larger chunk say so by name.
    assert bench_overlap.CHUNK_BYTES == 4 << 20
    # bench.algorithms checks auto at the chunk bench.netfit calibrates it at: the engine's
    assert bench_algorithms.CHUNK_BYTES == _progress.DEFAULT_CHUNK_BYTES
    assert _defaults(Exchanger.__init__, "min_piece_bytes") == (_progress.DEFAULT_MIN_PIECE_BYTES,)
    assert cm.Engine().min_piece_bytes == _progress.DEFAULT_MIN_PIECE_BYTES


def test_max_inflight_bound_is_max_slots():
    with Exchanger(MPI.COMM_SELF, max_inflight=_progress.MAX_SLOTS, stall_warn_s=None) as ex:
        assert ex.max_inflight == _progress.MAX_SLOTS
    with pytest.raises(ValueError, match=f"\\[1, {_progress.MAX_SLOTS}\\]"):
        Exchanger(MPI.COMM_SELF, max_inflight=_progress.MAX_SLOTS + 1, stall_warn_s=None)
    with pytest.raises(ValueError, match=f"\\[1, {_progress.MAX_SLOTS}\\]"):
        _progress.Engine(MPI.COMM_SELF, 1 << 20, _progress.MAX_SLOTS + 1, 200)


def test_trace_and_states_use_the_same_names():
    with Exchanger(MPI.COMM_SELF, trace=True, stall_warn_s=None) as ex:
        a = np.arange(8, dtype=np.float32)
        # every request its own arrays: one still in flight may not be posted again
        handles = [ex.allreduce_async(a.copy()), ex.reduce_scatter_async(a.copy(), np.empty_like(a)),
                   ex.allgather_async(a.copy(), np.empty_like(a)),
                   ex.alltoall_async(a.copy(), np.empty_like(a))]
        for h in handles:
            h.wait()
            assert h._request.state() == _progress.STATES["done"]
        kinds = {kind for _, _, kind, *_ in ex.drain_trace()}
    assert kinds == set(_progress.KINDS)
