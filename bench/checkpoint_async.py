"""Checkpointing every N steps: what it adds to the step, synchronous vs asynchronous.

    mpiexec -n 2 python -m bench.checkpoint_async --json-out bench/results/checkpoint_async.json
    mpiexec -n 2 python -m bench.checkpoint_async --quick                   # ~1 min
    mpiexec -n 2 python -m bench.checkpoint_async --format single ...       # one file, gathered

Three runs of the same training (model, strategy, synthetic batches as in
bench/step.py): no checkpoints, then a checkpoint every `--every` steps
written synchronously and asynchronously (a copy written by a background
thread at idle priority while the next steps run), both by
`engine.checkpointing.Checkpointer` as `engine.train` writes them, in the
`--format` given (auto: sharded for multistep, one file per rank and nothing
gathered; single: the momentum gathered and one file written by rank 0).
Per run, over the timed steps (the checkpoint's cost included in the step
that triggers it):

- step_ms: mean wall time per step (slowest rank);
- overhead: step_ms / step_ms(none) - 1; the target is < 5 % for async;
- checkpoint_mb: size of one checkpoint, all ranks' files together.

Runs alternate in `--rounds` rounds (none, sync, async, none, ...) and each
mode reports its median round, so a drift in machine speed does not land on
one mode. The warm-up steps end with an untimed checkpoint, so the first
one's one-time costs (first allocations, the first gather of the sharded
momentum: 0.35 s against 0.04-0.07 s later for vgg16-cifar) are not charged
to the steady state (in the background too: it is waited for before the
timing starts); each timed checkpoint is the first step of its run of
`--every` steps, so every background write overlaps timed steps.
`--every 4,16` measures several intervals in one run. Files go to a
temporary directory (`--dir` to choose, e.g. the disk checkpoints would
really go to). Rank 0 reports; `--json-out` also writes a markdown table
next to the JSON. `--link` only labels the rows (run it under bench/netlink
to measure on an emulated link, where the exchange leaves the cores gaps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from bench.common import write_results
from bench.step import batches
from cnn import models, set_num_threads
from cnn.optim import SGD
from cnn.runtime import configure
from engine.checkpointing import FORMATS, Checkpointer, resolve_format, shard_name
from engine.strategies import STRATEGIES
from engine.trainer import Trainer

COMM = MPI.COMM_WORLD
MODES = ("none", "sync", "async")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint_async",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16-cifar")
    p.add_argument("--strategy", default="multistep")
    p.add_argument("--batch-size-per-rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=16,
                   help="timed steps per run, a multiple of every --every")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps, the last one followed by an untimed checkpoint")
    p.add_argument("--every", default="4", help="steps between checkpoints (comma list)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="checkpoint format (engine/checkpointing.py)")
    p.add_argument("--link", default="loopback", help="label of the link, for the results")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the checkpoints are written")
    p.add_argument("--quick", action="store_true", help="resnet20, 6 steps, 1 round")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.iters, args.every, args.rounds = "resnet20", 6, "2", 1
    if args.strategy not in STRATEGIES:
        p.error(f"--strategy: one of {', '.join(STRATEGIES)}, got {args.strategy!r}")
    try:        # "auto" becomes what it means for the strategy, as the rows record it
        args.format = resolve_format(args.format, STRATEGIES[args.strategy])
    except ValueError as e:
        p.error(f"--format: {e}")
    try:
        args.every = [int(v) for v in str(args.every).split(",")]
    except ValueError:
        p.error(f"--every: expected comma-separated integers, got {args.every!r}")
    if min(args.every) < 1 or args.iters < 1 or args.rounds < 1 or args.warmup < 1:
        p.error("--every, --iters, --rounds and --warmup must be >= 1")
    if any(args.iters % every for every in args.every):
        p.error(f"--iters {args.iters} must be a multiple of every --every {args.every}, "
                "so that each run writes iters / every checkpoints")
    return args


def run(args, mode: str, every: int, data, directory: str) -> tuple[float, int]:
    """Mean step ms (slowest rank) and the checkpoint's size in bytes."""
    model = models.build(args.model, seed=0)
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = Path(directory) / f"{mode}.npz"
    times = []
    with Trainer(model, optimizer, args.strategy, COMM) as trainer:
        saver = Checkpointer(trainer, COMM, target, fmt=args.format, background=mode == "async")
        COMM.Barrier()
        for k, (x, y) in enumerate(data):
            start = time.monotonic()
            trainer.step(x, y)
            timed = k - args.warmup + 1         # timed steps done (<= 0: warm-up)
            # First in each run of `every` steps, so that every background write
            # overlaps timed steps (one at the end would hide its cost).
            if mode != "none" and (timed == 0 or (timed > 0 and (timed - 1) % every == 0)):
                saver.save(k + 1)
                last = k + 1
                if timed == 0:
                    saver.flush()       # the warm-up write lands before the timing starts
            if timed > 0:
                times.append(time.monotonic() - start)
        trainer.synchronize()
        saver.close()
    step_ms = COMM.allreduce(1e3 * statistics.fmean(times), op=MPI.MAX)
    size = 0
    if mode != "none" and saver.writes:
        size = os.path.getsize(shard_name(target, last, COMM.rank, COMM.size)
                               if saver.sharded else target)
    return step_ms, COMM.allreduce(size)


def main(argv=None):
    configure(progress_thread=True)
    args = parse_args(argv)
    set_num_threads(args.threads)
    model = models.build(args.model, seed=0)
    data = batches(model, args.batch_size_per_rank, args.warmup + args.iters, COMM.rank)
    directory = COMM.bcast(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
                           if COMM.rank == 0 else None, root=0)
    runs = [("none", 0)] + [(mode, every) for every in args.every for mode in MODES[1:]]
    results = {run_key: [] for run_key in runs}
    size = 0
    try:
        for _ in range(args.rounds):
            for mode, every in runs:
                step_ms, mode_size = run(args, mode, every, data, directory)
                results[mode, every].append(step_ms)
                size = max(size, mode_size)
    finally:
        COMM.Barrier()
        if COMM.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
    base = statistics.median(results["none", 0])
    rows = [{"model": args.model, "strategy": args.strategy, "ranks": COMM.size,
             "format": args.format,
             "link": args.link, "batch_per_rank": args.batch_size_per_rank,
             "every": every or None, "mode": mode,
             "step_ms": round(statistics.median(results[mode, every]), 3),
             "overhead": round(statistics.median(results[mode, every]) / base - 1, 4),
             "checkpoint_mb": round(size / 2**20, 2), "rounds": results[mode, every]}
            for mode, every in runs]
    if COMM.rank == 0:
        lines = ["| mode | every | step ms | overhead | checkpoint MB |", "|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['every'] or '-'} | {r['step_ms']:.1f} | "
                  f"{100 * r['overhead']:+.1f} % | {r['checkpoint_mb']:.1f} |" for r in rows]
        if args.json_out:
            write_results(rows, args.json_out, "\n".join(lines))
        print(json.dumps(rows) if args.json else "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
