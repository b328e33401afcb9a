"""Data-parallel CNN training from the command line.

    mpirun -n 2 python -m engine.train                      # digits, >= 95 % in seconds
    mpirun -n 4 python -m engine.train --model lenet --dataset mnist --data-dir DATA \\
        --strategy priority --batch-size 256 --epochs 5 --lr 0.05 --schedule cosine \\
        --checkpoint-dir ckpt [--resume] [--trace trace.json] [--log run.jsonl]

Every rank trains on its B/P samples of each global batch (`ShardedSampler`),
the chosen strategy exchanges gradients, rank 0 shows progress, checkpoints
and logs. Held-out accuracy is evaluated after every epoch with each rank
scoring a shard of the split and the correct counts summed over ranks.
The configuration is checked on every rank before any work, so a bad option
fails fast with one clear message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from mpi4py import MPI

import cnn
from cnn import models
from cnn.checkpoint import CheckpointError, load_checkpoint
from cnn.data import (
    DatasetError,
    ShardedSampler,
    SyntheticDataset,
    load_cifar10,
    load_digits,
    load_mnist,
    normalize_cifar10,
)
from cnn.models import StateDictError
from cnn.optim import SGD
from cnn.runtime import configure
from cnn.schedules import Constant, Cosine, LinearWarmup, StepDecay
from engine.checkpointing import FORMATS, Checkpointer, CheckpointWriteError, resolve_format
from engine.stall import StallError
from engine.straggler import Straggler, parse_straggler
from engine.strategies import STRATEGIES
from engine.trainer import NonFiniteError, ReplicaDivergenceError, Trainer
from ext import _progress

DATASETS = ("digits", "synthetic", "mnist", "cifar10")
SCHEDULES = ("constant", "step", "cosine")
CHECKPOINT_NAME = "checkpoint.npz"


class ConfigError(ValueError):
    """A bad command-line configuration, found before any work."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits", help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="directory of MNIST / CIFAR-10 files")
    p.add_argument("--synthetic-size", type=int, default=4096,
                   help="samples of the synthetic dataset")
    p.add_argument("--strategy", default="multistep", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="epochs to train (default 20)")
    length.add_argument("--iters", type=int, default=None, help="iterations to train")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", default="cosine", help=f"one of {', '.join(SCHEDULES)}")
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--data-seed", type=int, default=None,
                   help="data order only (default: --seed); as engine.ensemble's --data-seed")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="iterations between checkpoints (0: at the end of every epoch)")
    p.add_argument("--checkpoint-async", action="store_true",
                   help="write checkpoints on a background thread while training continues "
                        "(engine/async_checkpoint.py)")
    p.add_argument("--checkpoint-format", choices=FORMATS, default="auto",
                   help="sharded: each rank writes the weight and momentum slices it "
                        "updates, nothing gathered (multistep); single: one file from rank 0; "
                        "auto: sharded where the strategy shards them (engine/checkpointing.py)")
    p.add_argument("--resume", action="store_true",
                   help="continue from CHECKPOINT_DIR/checkpoint.npz")
    p.add_argument("--trace", default=None, help="write a Chrome-trace JSON here")
    p.add_argument("--log", default=None, help="append JSON lines (per iteration and epoch)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads per rank (default: cores per node / ranks per node)")
    p.add_argument("--check-replicas", type=int, default=0, metavar="N",
                   help="verify bitwise identical replicas every N iterations")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip updates with a non-finite loss or gradient on every rank")
    p.add_argument("--chunk-bytes", type=int, default=_progress.DEFAULT_CHUNK_BYTES)
    p.add_argument("--max-inflight", type=int, default=_progress.DEFAULT_MAX_INFLIGHT)
    p.add_argument("--bucket-bytes", type=int, default=1 << 20, help="bucketed strategy only")
    p.add_argument("--fc-mode", default="auto",
                   choices=("auto", "alltoall", "activations", "reduce_scatter"),
                   help="multistep only: how fully-connected layers get their gradient")
    p.add_argument("--lazy-layers", type=int, default=1,
                   help="lazy only: input-side layers averaged every INTERVAL iterations")
    p.add_argument("--lazy-interval", type=int, default=1,
                   help="lazy only: the initial averaging interval")
    p.add_argument("--lazy-fixed-interval", action="store_true",
                   help="lazy only: keep the interval fixed instead of adapting it")
    p.add_argument("--bn-stats", default="average", choices=("average", "local"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stall-warn", type=float, default=60.0, metavar="S",
                   help="a wait this long prints which ranks hold it up (0: off)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="a wait this long ends the job on every rank, naming the "
                        "ranks that hold it up (0: wait forever)")
    p.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                   help="slow RANK's layers down by FACTOR (engine/straggler.py)")
    p.add_argument("--straggler-mode", default="sleep", choices=("sleep", "spin"),
                   help="how the straggler's extra time is spent")
    return p.parse_args(argv)


def check_config(args, size: int) -> None:
    """Raise ConfigError for anything that would fail later (run on every rank)."""
    if args.model not in models.MODELS:
        raise ConfigError(f"unknown model {args.model!r}; known: {', '.join(models.MODELS)}")
    if args.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {args.strategy!r}; known: {', '.join(STRATEGIES)}")
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; known: {', '.join(DATASETS)}")
    if args.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {args.schedule!r}; known: {', '.join(SCHEDULES)}")
    if args.batch_size < 1 or args.batch_size % size:
        raise ConfigError(f"global batch {args.batch_size} is not divisible by the {size} ranks; "
                          f"use a multiple of {size}")
    if args.dataset in ("mnist", "cifar10") and not args.data_dir:
        raise ConfigError(f"--dataset {args.dataset} needs --data-dir")
    for name in ("epochs", "iters", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if args.lr < 0 or args.momentum < 0 or args.weight_decay < 0:
        raise ConfigError("--lr, --momentum and --weight-decay must be >= 0")
    if args.checkpoint_every < 0 or args.check_replicas < 0 or args.warmup_iters < 0:
        raise ConfigError("--checkpoint-every, --check-replicas, --warmup-iters must be >= 0")
    if args.stall_warn < 0 or args.timeout < 0:
        raise ConfigError("--stall-warn and --timeout must be >= 0 (0 disables them)")
    if args.straggler is not None:
        try:
            parse_straggler(args.straggler, size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir")
    try:
        resolve_format(args.checkpoint_format, STRATEGIES[args.strategy])
    except ValueError as e:
        raise ConfigError(f"--checkpoint-format: {e}") from None
    if args.resume and not (Path(args.checkpoint_dir) / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"--resume: no checkpoint at {Path(args.checkpoint_dir) / CHECKPOINT_NAME}")


def check_checkpoint_dir(directory: Path, comm) -> None:
    """Create the checkpoint directory and prove it writable (rank 0), before any
    training; ConfigError on every rank otherwise."""
    failure = ""
    if comm.Get_rank() == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            failure = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    failure = comm.bcast(failure, root=0)
    if failure:
        raise ConfigError(f"--checkpoint-dir {directory}: cannot write there: {failure}")


def load_arrays(args, input_shape):
    """(x_train, y_train, x_test, y_test, prepare) of a dataset stored on disk or
    embedded (digits, mnist, cifar10); `prepare` (or None) normalises a batch."""
    if args.dataset == "digits":
        (xtr, ytr), (xte, yte) = load_digits("train"), load_digits("test")
        prepare = None
    elif args.dataset == "mnist":
        (xtr, ytr), (xte, yte) = load_mnist(args.data_dir, "train"), load_mnist(args.data_dir,
                                                                              "test")
        prepare = None
    else:
        (xtr, ytr), (xte, yte) = (load_cifar10(args.data_dir, "train"),
                                  load_cifar10(args.data_dir, "test"))
        prepare = normalize_cifar10
    if tuple(xtr.shape[1:]) != tuple(input_shape):
        raise ConfigError(f"model {args.model!r} takes inputs {tuple(input_shape)} but dataset "
                          f"{args.dataset!r} has {tuple(xtr.shape[1:])}")
    return xtr, ytr, xte, yte, prepare


def load_data(args, input_shape, num_classes):
    """(train_get, n_train, test_get, n_test): getters from indices to (x float32, y)."""
    if args.dataset == "synthetic":
        train = SyntheticDataset(args.synthetic_size, input_shape, num_classes, seed=args.seed)
        test = SyntheticDataset(max(args.synthetic_size // 8, 1), input_shape, num_classes,
                                seed=args.seed + 1)
        return train.__getitem__, len(train), test.__getitem__, len(test)
    xtr, ytr, xte, yte, prepare = load_arrays(args, input_shape)

    def getter(x, y):
        def get(idx):
            xb = x[idx]
            xb = prepare(xb) if prepare is not None else xb
            return np.ascontiguousarray(xb, np.float32), y[idx]
        return get

    return getter(xtr, ytr), len(xtr), getter(xte, yte), len(xte)


def make_schedule(args, total_iters: int):
    if args.schedule == "constant":
        base = Constant(args.lr)
    elif args.schedule == "step":
        base = StepDecay(args.lr, [int(total_iters * 0.5), int(total_iters * 0.75)])
    else:
        base = Cosine(args.lr, max(total_iters, 1))
    return LinearWarmup(base, args.warmup_iters) if args.warmup_iters else base


def strategy_options(args) -> dict:
    """The options of the chosen strategy (see `engine.strategies.make_strategy`)."""
    if args.strategy == "bucketed":
        return {"bucket_bytes": args.bucket_bytes}
    if args.strategy == "multistep":
        return {"fc_mode": args.fc_mode}
    if args.strategy == "lazy":
        return {"lazy_layers": args.lazy_layers, "interval": args.lazy_interval,
                "adaptive": not args.lazy_fixed_interval,
                "max_interval": max(16, args.lazy_interval)}
    return {}


def default_threads(comm) -> int:
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    per_node = node.Get_size()
    node.Free()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // per_node)


def evaluate(model, get, n: int, comm, batch: int = 256, wait=None) -> tuple[int, int]:
    """Correct predictions summed over ranks; rank r scores the r-th contiguous shard.

    `wait(request, what)`, if given, waits for the summing collective (the
    exchanger's stall watch, so a stopped rank is named instead of hung on).
    """
    lo, hi = (n * comm.rank) // comm.size, (n * (comm.rank + 1)) // comm.size
    correct = 0
    for start in range(lo, hi, batch):
        x, y = get(np.arange(start, min(start + batch, hi)))
        correct += int((model.forward(x, train=False).argmax(axis=1) == y).sum())
    # Both buffers are named locals: mpi4py does not keep a collective's buffers alive.
    mine, total = np.array([correct], np.int64), np.zeros(1, np.int64)
    request = comm.Iallreduce(mine, total, op=MPI.SUM)
    if wait is None:
        request.Wait()
    else:
        wait(request, "the held-out accuracy sum")
    return int(total[0]), n


def run(args, comm) -> dict:
    """Train as configured; returns the final metrics (same on every rank)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    check_config(args, size)
    spec = models.MODELS[args.model]
    train_get, n_train, test_get, n_test = load_data(args, spec.input_shape, spec.num_classes)
    if n_train < args.batch_size:
        raise ConfigError(f"dataset {args.dataset!r} has {n_train} training samples, fewer than "
                          f"the global batch {args.batch_size}")
    cnn.set_num_threads(args.threads or default_threads(comm))
    data_seed = args.seed if args.data_seed is None else args.data_seed
    sampler = ShardedSampler(n_train, args.batch_size, rank, size, seed=data_seed)
    steps = sampler.steps_per_epoch
    total = args.iters if args.iters is not None else (args.epochs or 20) * steps
    schedule = make_schedule(args, total)

    model = models.build(args.model, seed=args.seed)
    if args.straggler is not None:
        straggler_rank, factor = parse_straggler(args.straggler, size)
        if rank == straggler_rank:
            Straggler(model, factor, args.straggler_mode)
    optimizer = SGD(model.parameters(), lr=schedule(0), momentum=args.momentum,
                    weight_decay=args.weight_decay)
    start = 0
    ckpt_path = Path(args.checkpoint_dir) / CHECKPOINT_NAME if args.checkpoint_dir else None
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)     # CheckpointError names the file and the fault
        meta = ckpt.metadata
        for key in ("model", "batch_size", "seed"):
            if meta.get(key) != getattr(args, key):
                raise ConfigError(f"--resume: the checkpoint was written with {key}="
                                  f"{meta.get(key)!r}, this run has {getattr(args, key)!r}")
        try:
            model.load_state_dict({**ckpt.params, **ckpt.buffers})
            optimizer.load_state_dict(ckpt.optimizer)
        except (StateDictError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt_path}: does not fit model {args.model!r} "
                                  f"({type(e).__name__}: {e})") from e
        start = ckpt.iteration
    if ckpt_path is not None:
        check_checkpoint_dir(ckpt_path.parent, comm)

    try:        # a bad strategy option raises alike on every rank, before any work
        trainer = Trainer(model, optimizer, args.strategy, comm, chunk_bytes=args.chunk_bytes,
                          max_inflight=args.max_inflight, bn_stats=args.bn_stats,
                          skip_nonfinite=args.skip_nonfinite,
                          check_replicas=args.check_replicas, trace=bool(args.trace),
                          stall_warn_s=args.stall_warn or None,
                          stall_timeout_s=args.timeout or None,
                          **strategy_options(args))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    trainer.iteration = start
    recorder = None
    if args.trace:
        from engine.trace import TraceRecorder
        recorder = TraceRecorder(trainer)
    # Line-buffered: after a crash the log shows the last iteration reached.
    log = open(args.log, "a", buffering=1) if (args.log and rank == 0) else None
    bar = None
    if rank == 0 and not args.no_progress and start < total:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, file=sys.stderr)

    saver = None if ckpt_path is None else Checkpointer(
        trainer, comm, ckpt_path, fmt=args.checkpoint_format, background=args.checkpoint_async,
        last=start if args.resume else None)
    metadata = {"model": args.model, "dataset": args.dataset, "strategy": args.strategy,
                "batch_size": args.batch_size, "seed": args.seed, "ranks": size}

    metrics = {"iteration": start}
    stalled = False
    try:
        epoch0, step0 = divmod(start, steps)
        it = start
        for epoch, step, idx in (sampler.iterate(epoch0, step0) if start < total else ()):
            optimizer.lr = schedule(it)
            t0 = time.monotonic()
            loss = trainer.step(*train_get(idx))
            seconds = time.monotonic() - t0
            it += 1
            last = trainer.last
            if recorder is not None:
                recorder.collect()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", acc=f"{last['accuracy']:.3f}",
                                img_s=f"{args.batch_size / seconds:.0f}",
                                compute_ms=f"{last['compute_ms']:.1f}",
                                comm_ms=f"{last['exposed_comm_ms']:.1f}", refresh=False)
            if log is not None:
                log.write(json.dumps({"kind": "iteration", "iteration": it - 1, "epoch": epoch,
                                      "lr": optimizer.lr, **last}) + "\n")
            end_of_epoch = step == steps - 1
            if end_of_epoch or it == total:
                trainer.synchronize()
                correct, n = evaluate(model, test_get, n_test, comm,
                                      wait=trainer.exchanger.wait_mpi)
                metrics = {"iteration": it, "epoch": epoch, "loss": loss,
                           "test_accuracy": correct / n}
                if log is not None:
                    log.write(json.dumps({"kind": "eval", **metrics}) + "\n")
                    log.flush()
                if bar is not None:   # tqdm.write clears the bar, prints, redraws it
                    bar.write(f"epoch {epoch} iteration {it}: held-out accuracy "
                              f"{correct}/{n} = {100 * correct / n:.2f} %", file=sys.stderr)
            if ckpt_path is not None and (
                    (args.checkpoint_every and it % args.checkpoint_every == 0)
                    or (not args.checkpoint_every and end_of_epoch) or it == total):
                saver.save(it, epoch=it // steps, metadata=metadata)
            if it >= total:
                break
        trainer.synchronize()
        if recorder is not None:
            recorder.write(args.trace, comm)
        if saver is not None:
            saver.close()       # the last checkpoint is on disk before run() returns
    except StallError:
        stalled = True
        raise
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if not stalled:     # a stalled request never completes: closing would wait on it
            trainer.close(synchronize=False)
    return metrics


def abort_the_job(comm, prog: str) -> None:
    """An exception raised on this rank only: the others would wait forever in a
    collective, so print it and end the whole job (nothing to do on one rank)."""
    if comm.Get_size() > 1:
        traceback.print_exc()
        print(f"{prog}: rank {comm.Get_rank()} failed; aborting the job", file=sys.stderr,
              flush=True)
        comm.Abort(1)


def main(argv=None) -> int:
    configure(progress_thread=True)
    comm = MPI.COMM_WORLD
    args = parse_args(argv)
    try:
        metrics = run(args, comm)
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointError) as e:
        # Raised alike on every rank (each reads the same files), before any work.
        if comm.Get_rank() == 0:
            print(f"engine.train: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, ReplicaDivergenceError, CheckpointWriteError) as e:
        # Raised alike on every rank.
        if comm.Get_rank() == 0:
            print(f"engine.train: stopped: {e}", file=sys.stderr)
        return 1
    except StallError as e:
        # Every rank that waited says what it saw; the stalled ranks cannot
        # take part in a clean exit, so the launcher ends the job.
        print(f"engine.train: {e}; ending the job (resume from the last checkpoint with "
              "--resume, on fewer ranks if a node is lost)", file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            time.sleep(1.0)    # let the other waiting ranks print their line too
            comm.Abort(3)
        return 3
    except Exception:
        abort_the_job(comm, "engine.train")
        raise
    if comm.Get_rank() == 0:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
