"""Collectives per training step, by strategy, counted from the engine's own statistics.

    python -m bench.collectives                        # resnet50 and vgg16, ~3 min on 2 cores
    python -m bench.collectives --quick                # resnet50 only, ~1 min
    mpiexec -n 2 python -m bench.collectives --json bench/results/collectives.json

Each strategy drives the same model through one real `Trainer.step` (batch 1
per rank, 224 x 224 inputs); the count is the exchanger's
``requests_enqueued`` during that step. The trainer posts requests of its own
every step (the loss/flag allreduce, the BN-statistics allreduce): they are
the count of `blocking` minus its one gradient allreduce, and are reported
apart, so ``exchange`` is what the strategy posts for the gradients and
weights. Counts, not timings: they do not depend on the machine, only on
the model, the strategy and (for multistep's FC path choice) P and the batch.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

from cnn import models
from cnn.optim import SGD
from cnn.runtime import configure
from engine.trainer import Trainer

STRATEGY_OPTIONS = {
    "blocking": {},
    "layerwise": {},
    "priority": {},
    "lazy": {"lazy_layers": 2, "interval": 1, "adaptive": False},   # the stem conv + BN
    "multistep": {},
    "multistep-reduce_scatter": {"fc_mode": "reduce_scatter"},
}


def count(model, strategy: str, comm, x, y) -> int:
    """Requests the exchanger enqueued during one Trainer.step (after a first one)."""
    name = strategy.split("-")[0]
    options = STRATEGY_OPTIONS[strategy]
    with Trainer(model, SGD(model.parameters(), lr=0.0, momentum=0.0), name, comm,
                 **options) as trainer:
        trainer.step(x, y)            # the first step: lazy strategies post their updates late
        before = trainer.exchanger.stats()["requests_enqueued"]
        trainer.step(x, y)
        requests = trainer.exchanger.stats()["requests_enqueued"] - before
    return requests


def main(argv=None) -> None:
    configure(progress_thread=True)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,vgg16")
    p.add_argument("--strategies", default=",".join(STRATEGY_OPTIONS))
    p.add_argument("--quick", action="store_true", help="resnet50 only")
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    names = ["resnet50"] if args.quick else args.models.split(",")
    strategies = args.strategies.split(",")
    if "blocking" not in strategies:
        strategies.insert(0, "blocking")      # gives the trainer's own requests
    rows = []
    for name in names:
        start = time.time()
        model = models.build(name, seed=0)
        shape = (1,) + model.input_shape
        rng = np.random.default_rng(comm.rank)
        x = rng.standard_normal(shape).astype(np.float32)
        y = np.zeros(1, np.int64)
        counts = {s: count(model, s, comm, x, y) for s in strategies}
        own = counts["blocking"] - 1
        for s in strategies:
            rows.append({"model": name, "strategy": s, "ranks": comm.size,
                         "global_batch": comm.size, "tensors": len(model.parameters()),
                         "layers": len(model.layers), "units": len(model.param_groups),
                         "requests": counts[s], "trainer_requests": own,
                         "exchange": counts[s] - own})
        if comm.rank == 0:
            print(f"{name}: {len(model.parameters())} tensors, {len(model.layers)} layers, "
                  f"{len(model.param_groups)} units; the trainer's own requests: {own} "
                  f"({time.time() - start:.0f} s)")
            for s in strategies:
                print(f"  {s:<26} {counts[s] - own:>4} exchange requests per step")
    if comm.rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
