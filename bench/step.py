"""One training step under real communication: iteration vs compute-only vs
one blocking allreduce, and the overlap efficiency (docs/algorithm.md §4).

    mpirun -n 2 python -m bench.step --model vgg16-cifar --strategy multistep \\
        --batch-size-per-rank 32 --iters 10 --json

Measured on every rank, reported by rank 0 as medians over `--iters` timed
iterations after `--warmup` untimed ones:

- iter_ms: `Trainer.step` with the strategy;
- compute_ms: the same step with communication skipped (forward, backward,
  local SGD update, same per-rank batch);
- exposed_comm_ms = iter_ms - compute_ms;
- comm_ms: one blocking allreduce of all gradients (one flat buffer, the
  exchanger's chunking) on the same link;
- overlap_efficiency = (compute_ms + comm_ms - iter_ms) / min(compute_ms, comm_ms):
  0 is no overlap, 1 the physical limit iter = max(compute, comm);
- bytes_per_iter: bytes this rank posted to collectives per iteration;
- progress_cpu_s: CPU seconds of the progress thread per iteration.

With ``--straggler RANK:FACTOR`` that rank's layers run FACTOR times slower
(engine/straggler.py) in every measurement; compute_ms is then the
straggler's (the slowest rank's) and compute_ms_fastest the others', and
straggler_delay_ms the delay the straggler added per timed iteration.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

import cnn
from bench.common import report, step_arguments, step_record
from cnn import models
from cnn.data import SyntheticDataset
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import SGD
from cnn.runtime import configure
from engine.exchanger import ALGORITHMS, Exchanger
from engine.straggler import Straggler, parse_straggler
from engine.strategies import STRATEGIES
from engine.trainer import Trainer
from ext import _progress


def parse_args(argv=None):
    p = step_arguments("python -m bench.step", __doc__.split("\n")[0])
    p.add_argument("--strategy", default="multistep", choices=list(STRATEGIES))
    p.add_argument("--chunk-bytes", type=int, default=_progress.DEFAULT_CHUNK_BYTES)
    p.add_argument("--max-inflight", type=int, default=_progress.DEFAULT_MAX_INFLIGHT)
    p.add_argument("--bucket-bytes", type=int, default=1 << 20)
    p.add_argument("--poll-us", type=int, default=_progress.DEFAULT_POLL_US)
    p.add_argument("--fc-mode", default="auto",
                   choices=("auto", "alltoall", "activations", "reduce_scatter"))
    p.add_argument("--algorithm", default="mpi", choices=ALGORITHMS,
                   help="the exchanger's allreduce algorithm (auto: $EXCHANGER_NETFIT's link)")
    p.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                   help="slow RANK's layers down by FACTOR (engine/straggler.py)")
    p.add_argument("--straggler-mode", default="sleep", choices=("sleep", "spin"))
    args = p.parse_args(argv)
    if args.straggler is not None:
        try:
            args.straggler_rank, args.straggler_factor = parse_straggler(
                args.straggler, MPI.COMM_WORLD.size)
        except ValueError as e:
            p.error(str(e))
    if args.model not in models.MODELS:
        p.error(f"unknown --model {args.model!r}; choose from {', '.join(models.MODELS)}")
    return args


def batches(model, batch, count, rank):
    data = SyntheticDataset(batch * count * 64, model.input_shape, model.num_classes, seed=1)
    return [data[np.arange((rank * count + k) * batch, (rank * count + k + 1) * batch)]
            for k in range(count)]


def setup(args, comm):
    """Threads, a fresh model and this rank's synthetic batches for warmup + iters steps."""
    cnn.set_num_threads(args.threads)
    model = models.build(args.model, seed=0)
    return model, batches(model, args.batch_size_per_rank, args.warmup + args.iters, comm.rank)


def slowed(model, args, comm):
    """The model, slowed down on the straggler rank (`--straggler`); the
    `Straggler` is kept as ``model.straggler`` (None elsewhere)."""
    model.straggler = None
    if args.straggler is not None and comm.rank == args.straggler_rank:
        model.straggler = Straggler(model, args.straggler_factor, args.straggler_mode)
    return model


def compute_only(model, data, warmup):
    """Times (s) of forward + backward + local update, no communication."""
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = SoftmaxCrossEntropy()
    times = []
    for k, (x, y) in enumerate(data):
        start = time.monotonic()
        model.zero_grad()
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        optimizer.step()
        if k >= warmup:
            times.append(time.monotonic() - start)
    return times


def blocking_allreduce(n, comm, chunk_bytes, max_inflight, reps=5, algorithm="mpi"):
    """Median ms of one allreduce of n float32 values through the exchanger."""
    buffer = np.ones(n, np.float32)
    times = []
    with Exchanger(comm, chunk_bytes=chunk_bytes, max_inflight=max_inflight,
                   algorithm=algorithm) as ex:
        for _ in range(reps + 1):
            comm.Barrier()
            start = time.monotonic()
            ex.allreduce_async(buffer, op="mean").wait()
            times.append(time.monotonic() - start)
    return 1e3 * float(np.median(times[1:]))


def main(argv=None):
    configure(progress_thread=True)
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    model, data = setup(args, comm)
    comm.Barrier()
    # Compute-only steps are timed before and after the strategy's steps: on a
    # shared machine the speed drifts, and one side alone would bias the difference.
    compute_times = compute_only(slowed(model, args, comm), data, args.warmup)
    comm_ms = blocking_allreduce(model.num_parameters(), comm, args.chunk_bytes,
                                 args.max_inflight, algorithm=args.algorithm)

    model = slowed(models.build(args.model, seed=0), args, comm)
    options = {"bucket_bytes": args.bucket_bytes} if args.strategy == "bucketed" else {}
    if args.strategy == "multistep":
        options["fc_mode"] = args.fc_mode
    iter_times, stats0 = [], None
    with Trainer(model, SGD(model.parameters(), lr=0.01, momentum=0.9), args.strategy, comm,
                 chunk_bytes=args.chunk_bytes, max_inflight=args.max_inflight,
                 poll_us=args.poll_us, algorithm=args.algorithm, **options) as trainer:
        comm.Barrier()
        for k, (x, y) in enumerate(data):
            if k == args.warmup:
                stats0 = trainer.exchanger.stats()
                delay0 = model.straggler.delay_s if model.straggler is not None else 0.0
            start = time.monotonic()
            trainer.step(x, y)
            if k >= args.warmup:
                iter_times.append(time.monotonic() - start)
        trainer.synchronize()
        stats1 = trainer.exchanger.stats()
        delay_ms = (1e3 * (model.straggler.delay_s - delay0) / args.iters
                    if model.straggler is not None else 0.0)
    comm.Barrier()
    compute_times += compute_only(slowed(models.build(args.model, seed=0), args, comm), data,
                                  args.warmup)
    compute_ms = 1e3 * float(np.median(compute_times))
    extra = {}
    if args.straggler is not None:   # the straggler's compute is the max; the others', the min
        extra = {"straggler_rank": args.straggler_rank,
                 "straggler_factor": args.straggler_factor,
                 "straggler_mode": args.straggler_mode,
                 "compute_ms_fastest": round(comm.allreduce(compute_ms, op=MPI.MIN), 3),
                 # Injected per timed iteration, as measured by the straggler itself.
                 "straggler_delay_ms": round(comm.allreduce(delay_ms, op=MPI.MAX), 3)}
    iter_ms = 1e3 * float(np.median(iter_times))
    # Medians over ranks too: rank 0 reports the slowest rank's figure.
    iter_ms, compute_ms, comm_ms = (comm.allreduce(v, op=MPI.MAX)
                                    for v in (iter_ms, compute_ms, comm_ms))
    result = step_record(
        args, args.strategy, comm.size, iter_ms, compute_ms, comm_ms,
        (stats1["bytes_posted"] - stats0["bytes_posted"]) / args.iters,
        (stats1["progress_thread_cpu_s"] - stats0["progress_thread_cpu_s"]) / args.iters,
        **extra)
    if comm.rank == 0:
        report(result, args)
    return result


if __name__ == "__main__":
    main()
