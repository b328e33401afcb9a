"""Chrome-trace JSON (open in https://ui.perfetto.dev or chrome://tracing).

One process per rank (pid = rank), three threads each:

    tid 0  compute    each layer's forward and backward span (from the model's
                      hooks: a span runs from one parameter layer's hook to the
                      next, so it includes the ReLU / pooling layers in between)
    tid 1  waits      every wait of the compute thread for communication
    tid 2  progress   each chunk from its post to its completion, on the
                      progress thread (``Exchanger(trace=True).drain_trace()``)

All times are on `time.monotonic()`'s clock, shifted so that 0 is the moment
every rank left a barrier at `TraceRecorder` creation (the ranks' clocks agree
to within that barrier's latency on one node).
"""

from __future__ import annotations

import json
import time

from mpi4py import MPI

from ext import _progress

__all__ = ["TraceRecorder", "chrome_events"]

_THREADS = ((0, "compute"), (1, "waits"), (2, "progress thread"))


def chrome_events(rank: int, events: dict, origin: float) -> list[dict]:
    """Complete ("X") events of one rank from `Trainer.trace_events()` output."""
    out = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
    out += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
            for tid, name in _THREADS]

    def span(name, cat, tid, t0, t1, args=None):
        out.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": tid,
                    "ts": (t0 - origin) * 1e6, "dur": max(t1 - t0, 0.0) * 1e6,
                    "args": args or {}})

    for name, cat, t0, t1 in events["compute"]:
        span(name, cat, 0, t0, t1)
    for label, t0, t1 in events["waits"]:
        span(f"wait {label}", "wait", 1, t0, t1)
    for seq, chunk, kind, nbytes, t0, t1 in events["chunks"]:
        kind_name = _progress.KIND_NAMES.get(kind, str(kind))
        span(f"{kind_name} #{seq}.{chunk}", kind_name, 2, t0, t1,
             {"seq": seq, "chunk": chunk, "bytes": nbytes})
    return out


class TraceRecorder:
    """Collects a trainer's events after each step and writes one file for all ranks."""

    def __init__(self, trainer):
        self.trainer = trainer
        trainer.comm.Barrier()
        self.origin = time.monotonic()
        self.events = {"compute": [], "waits": [], "chunks": []}

    def collect(self) -> None:
        for key, values in self.trainer.trace_events().items():
            self.events[key].extend(values)

    def write(self, path, comm=None) -> None:
        """Gather every rank's events to rank 0, which writes `path` (collective)."""
        self.collect()
        comm = comm or MPI.COMM_WORLD
        mine = chrome_events(comm.Get_rank(), self.events, self.origin)
        everyone = comm.gather(mine, root=0)
        if comm.Get_rank() == 0:
            events = [e for rank_events in everyone for e in rank_events]
            with open(path, "w") as f:
                json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
