"""The homegrown MPI trainer: one blocking mpi4py Allreduce of the flattened
gradients after backprop, on this project's own CNN (no progress thread).

    mpiexec -n 2 python -m bench.peers.mpi4py_allreduce --model vgg16-cifar --batch-size-per-rank 32

Same fields as bench/step.py (strategy "mpi4py"): iter_ms, compute_ms (the
same step without communication), comm_ms (one blocking Allreduce of all
gradients), exposed_comm_ms and overlap_efficiency. Nothing overlaps here, so
the efficiency is about 0 by construction: it is the baseline the strategies
are measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

import cnn
from bench.step import batches, compute_only
from cnn import models
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import SGD


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.peers.mpi4py_allreduce",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=list(models.MODELS))
    p.add_argument("--batch-size-per-rank", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", metavar="FILE")
    p.add_argument("--link", default=os.environ.get("NETLINK_RATE", "loopback"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    cnn.set_num_threads(args.threads)
    count = args.warmup + args.iters
    model = models.build(args.model, seed=0)
    data = batches(model, args.batch_size_per_rank, count, comm.rank)
    comm.Barrier()
    compute_times = compute_only(model, data, args.warmup)

    params = model.parameters()
    flat = np.zeros(sum(p.grad.size for p in params), np.float32)
    comm_times = []
    for _ in range(count):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, flat)
        comm_times.append(time.perf_counter() - start)
    comm_ms = 1e3 * statistics.median(comm_times[args.warmup:])

    model = models.build(args.model, seed=0)
    params = model.parameters()
    optimizer = SGD(params, lr=0.01, momentum=0.9)
    loss = SoftmaxCrossEntropy()
    times = []
    comm.Barrier()
    for k, (x, y) in enumerate(data):
        start = time.perf_counter()
        model.zero_grad()
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        offset = 0
        for p in params:                       # flatten, average, scatter back
            flat[offset:offset + p.grad.size] = p.grad.reshape(-1)
            offset += p.grad.size
        comm.Allreduce(MPI.IN_PLACE, flat)
        flat /= comm.size
        offset = 0
        for p in params:
            p.grad.reshape(-1)[...] = flat[offset:offset + p.grad.size]
            offset += p.grad.size
        optimizer.step()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
    comm.Barrier()
    compute_times += compute_only(models.build(args.model, seed=0), data, args.warmup)
    compute_ms = 1e3 * statistics.median(compute_times)
    iter_ms = 1e3 * statistics.median(times)
    iter_ms, compute_ms, comm_ms = (comm.allreduce(v, op=MPI.MAX) for v in (iter_ms, compute_ms, comm_ms))
    result = {
        "model": args.model, "strategy": "mpi4py", "ranks": comm.size, "link": args.link,
        "batch_per_rank": args.batch_size_per_rank,
        "iter_ms": round(iter_ms, 3), "compute_ms": round(compute_ms, 3),
        "exposed_comm_ms": round(iter_ms - compute_ms, 3), "comm_ms": round(comm_ms, 3),
        "overlap_efficiency": round((compute_ms + comm_ms - iter_ms) / min(compute_ms, comm_ms), 3),
        "bytes_per_iter": int(flat.nbytes), "progress_cpu_s": None,
    }
    if comm.rank == 0:
        if args.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result) if args.json else
              "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
