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

import statistics
import time

import numpy as np
from mpi4py import MPI

from bench.common import report, step_arguments, step_record
from bench.step import compute_only, setup
from cnn import models
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import SGD
from cnn.runtime import configure


def parse_args(argv=None):
    p = step_arguments("python -m bench.peers.mpi4py_allreduce", __doc__.split("\n")[0])
    return p.parse_args(argv)


def main(argv=None):
    configure(progress_thread=False)
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    model, data = setup(args, comm)
    count = len(data)
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
    result = step_record(args, "mpi4py", comm.size, iter_ms, compute_ms, comm_ms, flat.nbytes, None)
    if comm.rank == 0:
        report(result, args)
    return result


if __name__ == "__main__":
    main()
