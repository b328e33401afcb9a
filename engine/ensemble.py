"""Ensemble training: K models at once, fed by one shared data pipeline.

    mpiexec -n 4 python -m engine.ensemble --members 2 --seeds 0,1 --epochs 5
    mpiexec -n 4 python -m engine.ensemble --members-file members.json --model resnet20 \\
        --dataset synthetic-cifar --crop-pad 4 --pipeline shared --checkpoint-dir ckpt

The P ranks are split into K member groups of G = P/K ranks (``comm.Split``);
member k is an ordinary data-parallel `Trainer` over its group with seed and
learning rate of its own. With K > P (K a multiple of P) each rank trains
K/P members, one after the other in each step. All members see the same data
in the same order (``--data-seed``); only initialisation and learning rate
differ.

``--pipeline shared`` (default): rank 0 reads, decodes and augments each
global batch once and scatters every rank its shard, posted
``--pipeline-depth - 1`` steps ahead so the delivery overlaps compute and
members may run ahead of rank 0 (engine/pipeline.py); with
``--pipeline-rank`` rank 0 runs only the pipeline and the members train on
ranks 1..P-1, so no member's step waits for another's data work.
``--pipeline distributed``: the same single pipeline with its work spread
over all ranks; the ranks that need the same shard (one per member) each
make a piece and allgather it, so no rank makes more than B/P samples a
step. ``--pipeline separate``: every member runs its own pipeline for its
shards, as K independent jobs would. All three give bitwise the same
batches and the same weights; all make their batches ``--prefetch`` steps
ahead on a background thread. The reported ``cpu_s`` (all ranks, all threads), ``pipeline_cpu_s``
and ``wall_s`` leave out the first ``--timing-warmup`` iterations.

After every epoch each member's held-out accuracy and the ensemble's (class
probabilities averaged over members) are printed; each member writes its own
checkpoint (CHECKPOINT_DIR/member<k>/checkpoint.npz, written as
engine.train writes it: sharded over the member's ranks under multistep),
and ``--resume`` continues all of them.

A members file is a JSON list with one object per member::

    [{"seed": 0, "lr": 0.05}, {"seed": 1, "lr": 0.1}]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import cnn
from cnn import models
from cnn.checkpoint import CheckpointError, load_checkpoint
from cnn.data import (
    DatasetError,
    SyntheticDataset,
    normalize_cifar10,
)
from cnn.optim import SGD
from cnn.runtime import configure
from engine.checkpointing import Checkpointer, CheckpointWriteError
from engine.pipeline import (
    CompressedImages,
    DistributedDelivery,
    Pipeline,
    SeparateDelivery,
    SharedDelivery,
)
from engine.strategies import STRATEGIES
from engine.train import (
    CHECKPOINT_NAME,
    SCHEDULES,
    ConfigError,
    abort_the_job,
    default_threads,
    load_arrays,
    make_schedule,
    strategy_options,
)
from engine.trainer import NonFiniteError, ReplicaDivergenceError, Trainer

DATASETS = ("digits", "synthetic", "synthetic-cifar", "mnist", "cifar10")
PIPELINES = ("shared", "distributed", "separate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.ensemble",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--members", type=int, default=None,
                   help="K, members of the ensemble (default: as many as --seeds or the file)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated initialisation seed per member (default 0..K-1)")
    p.add_argument("--lrs", default=None,
                   help="comma-separated learning rate per member, or one for all (--lr)")
    p.add_argument("--members-file", default=None,
                   help='JSON list [{"seed": S, "lr": LR}, ...], one object per member')
    p.add_argument("--pipeline", default="shared", help=f"one of {', '.join(PIPELINES)}")
    p.add_argument("--pipeline-rank", action="store_true",
                   help="shared: rank 0 runs only the pipeline, the members train on ranks "
                        "1..P-1 (else rank 0 also trains a member)")
    p.add_argument("--pipeline-depth", type=int, default=3,
                   help="shared: receive buffers per rank; scatters are posted this many steps "
                        "minus one ahead, so members run that far ahead of rank 0 (>= 2)")
    p.add_argument("--prefetch", type=int, default=2,
                   help="batches the pipeline makes ahead on a background thread (either "
                        "pipeline; 0: on the training thread)")
    p.add_argument("--model", default="digits", help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="directory of MNIST / CIFAR-10 files")
    p.add_argument("--synthetic-size", type=int, default=4096,
                   help="training samples of the synthetic datasets")
    p.add_argument("--data-seed", type=int, default=0,
                   help="data order and augmentation, shared by all members")
    p.add_argument("--crop-pad", type=int, default=0,
                   help="augmentation: random crop after padding by this many pixels, and "
                        "a horizontal flip (CIFAR recipes: 4); 0: none")
    p.add_argument("--strategy", default="multistep", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--batch-size", type=int, default=64, help="global batch of every member")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="epochs to train (default 20)")
    length.add_argument("--iters", type=int, default=None, help="iterations to train")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", default="cosine", help=f"one of {', '.join(SCHEDULES)}")
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="iterations between checkpoints (0: at the end of every epoch)")
    p.add_argument("--resume", action="store_true",
                   help="continue every member from CHECKPOINT_DIR/member<k>/checkpoint.npz")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads per rank (default: cores per node / ranks per node)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--max-inflight", type=int, default=4)
    p.add_argument("--bucket-bytes", type=int, default=1 << 20, help="bucketed strategy only")
    p.add_argument("--fc-mode", default="auto",
                   choices=("activations", "reduce_scatter", "auto"))
    p.add_argument("--lazy-layers", type=int, default=1)
    p.add_argument("--lazy-interval", type=int, default=1)
    p.add_argument("--lazy-fixed-interval", action="store_true")
    p.add_argument("--bn-stats", default="average", choices=("average", "local"))
    p.add_argument("--timing-warmup", type=int, default=1,
                   help="iterations left out of the reported CPU and wall times (kernel "
                        "loading); never the last one")
    p.add_argument("--no-eval", action="store_true", help="skip held-out evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def member_specs(args) -> list[dict]:
    """[{"seed", "lr"}] per member from --members-file or --members/--seeds/--lrs."""
    if args.members_file:
        if args.seeds or args.lrs:
            raise ConfigError("--members-file excludes --seeds and --lrs")
        try:
            with open(args.members_file) as f:
                specs = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--members-file {args.members_file}: {e}") from e
        if not isinstance(specs, list) or not specs or not all(
                isinstance(s, dict) and set(s) <= {"seed", "lr"} for s in specs):
            raise ConfigError(f"--members-file {args.members_file}: expected a non-empty JSON "
                              'list of objects with keys "seed" and/or "lr"')
        specs = [{"seed": s.get("seed", k), "lr": s.get("lr", args.lr)}
                 for k, s in enumerate(specs)]
    else:
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
            lrs = [float(s) for s in args.lrs.split(",")] if args.lrs else None
        except ValueError as e:
            raise ConfigError(f"--seeds / --lrs: {e}") from e
        k = args.members or (len(seeds) if seeds else len(lrs) if lrs and len(lrs) > 1 else 2)
        seeds = seeds or list(range(k))
        lrs = lrs or [args.lr]
        if len(lrs) == 1:
            lrs = lrs * k
        if len(seeds) != k or len(lrs) != k:
            raise ConfigError(f"{k} members but {len(seeds)} seeds and {len(lrs)} learning "
                              "rates; give one per member (or one learning rate for all)")
        specs = [{"seed": s, "lr": lr} for s, lr in zip(seeds, lrs, strict=True)]
    if args.members is not None and args.members != len(specs):
        raise ConfigError(f"--members {args.members} but {len(specs)} members specified")
    for s in specs:
        if not isinstance(s["seed"], int) or not isinstance(s["lr"], (int, float)) or s["lr"] < 0:
            raise ConfigError(f"member {s}: seed must be an int and lr a number >= 0")
    return specs


def layout(size: int, rank: int, k: int) -> tuple[int, int, int, list[int]]:
    """How members share the ranks: (color, local_rank, group_size, local_members).

    K <= P: member m runs on ranks m*G .. m*G + G - 1 with G = P/K. K > P:
    every member on one rank (G = 1), member m on rank m mod P.
    """
    if k <= size:
        if size % k:
            raise ConfigError(f"{k} members do not divide the {size} ranks; use a number of "
                              f"ranks that is a multiple of the members (or vice versa)")
        g = size // k
        return rank // g, rank % g, g, [rank // g]
    if k % size:
        raise ConfigError(f"{k} members are not a multiple of the {size} ranks")
    return rank, 0, 1, list(range(rank, k, size))


def member_layout(args, size: int, rank: int, k: int) -> tuple[int, int, int, list[int]]:
    """`layout`, leaving rank 0 out with ``--pipeline-rank``.

    The pipeline rank trains nothing (no color: it joins no member group); it
    takes local rank 0 of the members' group size, so its scatter shapes are
    theirs (it receives shard 0 and ignores it).
    """
    if not args.pipeline_rank:
        return layout(size, rank, k)
    if rank == 0:
        return MPI.UNDEFINED, 0, layout(size - 1, 0, k)[2], []
    return layout(size - 1, rank - 1, k)


def check_config(args, size: int, specs) -> None:
    """Raise ConfigError for anything that would fail later (same on every rank)."""
    if args.pipeline_rank and (args.pipeline != "shared" or size < 2):
        raise ConfigError("--pipeline-rank needs --pipeline shared and at least 2 ranks "
                          f"(got --pipeline {args.pipeline} on {size} ranks)")
    for name, known in (("model", models.MODELS), ("strategy", STRATEGIES),
                        ("dataset", DATASETS), ("schedule", SCHEDULES), ("pipeline", PIPELINES)):
        if getattr(args, name) not in known:
            raise ConfigError(f"unknown {name} {getattr(args, name)!r}; known: "
                              f"{', '.join(known)}")
    try:
        _, _, g, _ = member_layout(args, size, 1 if args.pipeline_rank else 0, len(specs))
    except ConfigError as e:
        if not args.pipeline_rank:
            raise
        raise ConfigError(f"{e} (with --pipeline-rank the members get {size - 1} of the "
                          f"{size} ranks)") from None
    if args.batch_size < 1 or args.batch_size % g:
        raise ConfigError(f"global batch {args.batch_size} is not divisible by the {g} ranks "
                          f"of a member; use a multiple of {g}")
    if args.dataset in ("mnist", "cifar10") and not args.data_dir:
        raise ConfigError(f"--dataset {args.dataset} needs --data-dir")
    for name in ("epochs", "iters", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if args.crop_pad < 0 or args.checkpoint_every < 0 or args.warmup_iters < 0 \
            or args.prefetch < 0:
        raise ConfigError("--crop-pad, --checkpoint-every, --warmup-iters and --prefetch "
                          "must be >= 0")
    if args.timing_warmup < 0:
        raise ConfigError(f"--timing-warmup must be >= 0, got {args.timing_warmup}")
    if args.pipeline_depth < 2:
        raise ConfigError(f"--pipeline-depth must be >= 2 (double buffering), got "
                          f"{args.pipeline_depth}")
    if args.momentum < 0 or args.weight_decay < 0:
        raise ConfigError("--momentum and --weight-decay must be >= 0")
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir")
    for k in range(len(specs) if args.resume else 0):
        if not member_checkpoint(args, k).is_file():
            raise ConfigError(f"--resume: no checkpoint at {member_checkpoint(args, k)}")


def member_checkpoint(args, k: int) -> Path:
    return Path(args.checkpoint_dir) / f"member{k}" / CHECKPOINT_NAME


def load_pipeline_data(args, input_shape, num_classes):
    """(read, n_train, test_x float32, test_y, normalize): raw training reads, prepared test set."""
    if args.dataset == "synthetic":
        train = SyntheticDataset(args.synthetic_size, input_shape, num_classes, seed=args.data_seed)
        test = SyntheticDataset(max(args.synthetic_size // 8, 1), input_shape, num_classes,
                                seed=args.data_seed + 1)
        xte, yte = test[np.arange(len(test))]
        return train.__getitem__, len(train), xte, yte, None
    if args.dataset == "synthetic-cifar":
        if tuple(input_shape) != (3, 32, 32):
            raise ConfigError(f"synthetic-cifar has inputs (3, 32, 32); model {args.model!r} "
                              f"takes {tuple(input_shape)}")
        train = CompressedImages(args.synthetic_size, num_classes=num_classes,
                                 seed=args.data_seed)
        test = CompressedImages(max(args.synthetic_size // 8, 1), num_classes=num_classes,
                                seed=args.data_seed + 1)
        xte, yte = test.read(np.arange(len(test)))
        return train.read, len(train), normalize_cifar10(xte), yte, normalize_cifar10
    xtr, ytr, xte, yte, normalize = load_arrays(args, input_shape)
    xte = normalize(xte) if normalize is not None else xte
    return (lambda idx: (xtr[idx], ytr[idx])), len(xtr), np.asarray(xte, np.float32), yte, \
        normalize


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities, float64, of logits of shape (N, classes)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def evaluate(members, xte, yte, comm, local_rank: int, group_size: int, k: int,
             num_classes: int, batch: int = 256) -> tuple[list[float], float]:
    """Held-out accuracy of every member and of the ensemble (mean of their probabilities).

    Every rank scores its shard (by rank inside its member) with each member it
    trains; one allreduce over all ranks sums the probabilities and correct counts.
    """
    n = len(yte)
    lo, hi = (n * local_rank) // group_size, (n * (local_rank + 1)) // group_size
    probabilities = np.zeros((n, num_classes), np.float64)
    correct = np.zeros(k, np.float64)
    for m in members:
        for start in range(lo, hi, batch):
            end = min(start + batch, hi)
            p = softmax(m["model"].forward(xte[start:end], train=False))
            probabilities[start:end] += p
            correct[m["index"]] += (p.argmax(axis=1) == yte[start:end]).sum()
    comm.Allreduce(MPI.IN_PLACE, probabilities, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, correct, op=MPI.SUM)
    return list(correct / n), float((probabilities.argmax(axis=1) == yte).mean())


def run(args, comm) -> dict:
    """Train the ensemble as configured; returns the final metrics (same on every rank)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    specs = member_specs(args)
    check_config(args, size, specs)
    k = len(specs)
    color, local_rank, group_size, local = member_layout(args, size, rank, k)
    spec = models.MODELS[args.model]
    read, n_train, xte, yte, normalize = load_pipeline_data(args, spec.input_shape,
                                                            spec.num_classes)
    if n_train < args.batch_size:
        raise ConfigError(f"dataset {args.dataset!r} has {n_train} training samples, fewer than "
                          f"the global batch {args.batch_size}")
    cnn.set_num_threads(args.threads or default_threads(comm))
    pipeline = Pipeline(read, n_train, args.batch_size, args.data_seed, args.crop_pad, normalize)
    steps = pipeline.steps_per_epoch
    total = args.iters if args.iters is not None else (args.epochs or 20) * steps

    built, error, start = [], None, 0
    for m in local:
        member_args = copy.copy(args)
        member_args.lr = specs[m]["lr"]
        model = models.build(args.model, seed=specs[m]["seed"])
        schedule = make_schedule(member_args, total)
        optimizer = SGD(model.parameters(), lr=schedule(0), momentum=args.momentum,
                        weight_decay=args.weight_decay)
        if args.resume and error is None:
            try:
                start = resume_member(args, m, specs[m], model, optimizer)
            except (ConfigError, CheckpointError) as e:
                error = str(e)
        built.append((m, model, optimizer, schedule))
    # A member's checkpoint is read on its ranks only: agree on errors and on
    # where to start before anyone enters a collective of its own.
    outcomes = comm.allgather((error, start if local else None))
    errors = [e for e, _ in outcomes if e is not None]
    if errors:
        raise ConfigError(errors[0])
    starts = {s for _, s in outcomes if s is not None}
    if args.resume and len(starts) > 1:
        raise ConfigError(f"--resume: the members' checkpoints are at different iterations "
                          f"{sorted(starts)}; resume needs them all at one")
    start = starts.pop() if starts else 0       # the pipeline rank resumes where they do

    group = comm.Split(color, rank)
    members = []
    try:
        for m, model, optimizer, schedule in built:
            try:     # a bad strategy option raises alike on every rank, before any work
                trainer = Trainer(model, optimizer, args.strategy, group,
                                  chunk_bytes=args.chunk_bytes, max_inflight=args.max_inflight,
                                  bn_stats=args.bn_stats, **strategy_options(args))
            except ValueError as e:
                raise ConfigError(str(e)) from e
            trainer.iteration = start
            members.append({"index": m, "model": model, "optimizer": optimizer,
                            "schedule": schedule, "trainer": trainer, "loss": float("nan")})
        return train(args, comm, specs, members, pipeline, start, total, steps, xte, yte,
                     local_rank, group_size, spec.num_classes)
    finally:
        for m in members:
            m["trainer"].close(synchronize=False)
        if group != MPI.COMM_NULL:
            group.Free()


def resume_member(args, m: int, spec: dict, model, optimizer) -> int:
    ckpt = load_checkpoint(member_checkpoint(args, m))
    meta = ckpt.metadata
    expected = {"model": args.model, "batch_size": args.batch_size, "seed": spec["seed"],
                "lr": spec["lr"], "data_seed": args.data_seed, "member": m}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ConfigError(f"--resume: member {m}'s checkpoint was written with {key}="
                              f"{meta.get(key)!r}, this run has {value!r}")
    model.load_state_dict({**ckpt.params, **ckpt.buffers})
    optimizer.load_state_dict(ckpt.optimizer)
    return ckpt.iteration


def train(args, comm, specs, members, pipeline, start, total, steps, xte, yte, local_rank,
          group_size, num_classes) -> dict:
    rank, k = comm.Get_rank(), len(specs)
    if args.pipeline in ("shared", "distributed"):
        posted = SharedDelivery if args.pipeline == "shared" else DistributedDelivery
        delivery = posted(pipeline, comm, local_rank, group_size,
                          models.MODELS[args.model].input_shape,
                          depth=args.pipeline_depth, prefetch=args.prefetch)
        # Between layers MPI gets a chance to move the collectives in flight.
        hooks = [m["model"].register_pre_forward_hook(lambda i, layer: delivery.progress())
                 for m in members]
    else:
        delivery = SeparateDelivery(pipeline, local_rank, group_size, copies=len(members),
                                    prefetch=args.prefetch)
        hooks = []
    positions = [divmod(it, steps) for it in range(start, total)]
    if args.checkpoint_dir and local_rank == 0:
        for m in members:
            member_checkpoint(args, m["index"]).parent.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    bar = None
    if rank == 0 and not args.no_progress and start < total:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, file=sys.stderr)

    # Each member's checkpoints as engine.train writes them (sharded under
    # multistep), collective over the member's own ranks.
    savers = [Checkpointer(m["trainer"], m["trainer"].comm, member_checkpoint(args, m["index"]),
                           last=start if args.resume else None)
              for m in members] if args.checkpoint_dir else []

    def checkpoint(iteration: int) -> None:
        for m, saver in zip(members, savers, strict=True):
            spec = specs[m["index"]]
            saver.save(iteration, epoch=iteration // steps,
                       metadata={"model": args.model, "dataset": args.dataset,
                                 "strategy": args.strategy, "member": m["index"],
                                 "members": k, "seed": spec["seed"], "lr": spec["lr"],
                                 "data_seed": args.data_seed, "batch_size": args.batch_size})
        comm.Barrier()     # nobody reads a checkpoint before it is complete

    metrics = {"iteration": start, "members": specs}
    # The first steps load the numba kernels from their cache (~0.15 s for
    # LeNet, as long as 20 of its steps): the clocks start after them.
    untimed = min(args.timing_warmup, max(len(positions) - 1, 0))
    clock = Clock(pipeline)
    try:
        delivery.start(positions)
        for it, (epoch, step) in enumerate(positions, start):
            if it - start == untimed:
                clock.start()
            waited = time.monotonic()
            batch = delivery.next()
            clock.wait_s += time.monotonic() - waited
            for m in members:
                m["optimizer"].lr = m["schedule"](it)
                m["loss"] = m["trainer"].step(*batch())
            if not args.no_progress:
                # Every rank takes part (the same collectives everywhere); rank 0 shows them.
                losses = comm.gather([(m["index"], m["loss"]) for m in members
                                      if local_rank == 0], root=0)
                if bar is not None:
                    flat = dict(x for part in losses for x in part)
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {epoch} loss " + " ".join(
                        f"m{j}={flat[j]:.4f}" for j in range(k)), refresh=False)
            end_of_epoch = step == steps - 1
            if (end_of_epoch or it + 1 == total) and not args.no_eval:
                for m in members:
                    m["trainer"].synchronize()
                accuracies, ensemble = evaluate(members, xte, yte, comm, local_rank,
                                                group_size, k, num_classes)
                metrics = {"iteration": it + 1, "epoch": epoch,
                           "members": [{**s, "test_accuracy": a}
                                       for s, a in zip(specs, accuracies, strict=True)],
                           "ensemble_accuracy": ensemble,
                           "best_member_accuracy": max(accuracies)}
                if rank == 0:
                    table = " ".join(f"m{j} {100 * a:.2f}" for j, a in enumerate(accuracies))
                    line = (f"epoch {epoch} iteration {it + 1}: held-out accuracy % {table} | "
                            f"ensemble {100 * ensemble:.2f}")
                    (bar.write if bar is not None else print)(line, file=sys.stderr)
            if args.checkpoint_dir and (
                    (args.checkpoint_every and (it + 1) % args.checkpoint_every == 0)
                    or (not args.checkpoint_every and end_of_epoch) or it + 1 == total):
                checkpoint(it + 1)
        for m in members:
            m["trainer"].synchronize()
        cpu, pipeline_cpu, pipeline_samples, wall, wait = clock.stop()
        timed = len(positions) - untimed
        wall = comm.allreduce(wall, op=MPI.MAX)
        metrics.update({
            "iteration": total, "pipeline": args.pipeline, "ranks": comm.size,
            "timed_iters": timed,
            "cpu_s": comm.allreduce(cpu, op=MPI.SUM),
            "pipeline_cpu_s": comm.allreduce(pipeline_cpu, op=MPI.SUM),
            "pipeline_samples": comm.allreduce(pipeline_samples, op=MPI.SUM),
            "wait_s": comm.allreduce(wait, op=MPI.SUM),
            "wall_s": wall,
            "img_s_per_member": args.batch_size * timed / wall if timed and wall else 0.0})
    finally:
        if bar is not None:
            bar.close()
        for h in hooks:
            h.remove()
        delivery.close()
    return metrics


class Clock:
    """This process's CPU (all threads), its pipeline's CPU and samples made,
    wall time, and the wall time spent waiting for batches, from `start` to `stop`.

    The pipeline runs a few batches ahead of training (prefetch, scatters in
    flight), so the samples it made in the window are counted, not assumed.

    Parameters
    ----------
    pipeline : Pipeline
    """

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.wait_s = 0.0
        self.start()

    @staticmethod
    def process_cpu_s() -> float:
        """User + system CPU seconds of all this process's threads (getrusage: finer
        than the clock ticks of os.times)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self._cpu, self._wall = self.process_cpu_s(), time.monotonic()
        self._pipeline = (self.pipeline.cpu_s, self.pipeline.samples)
        self.wait_s = 0.0

    def stop(self) -> tuple[float, float, int, float, float]:
        """(cpu_s, pipeline_cpu_s, pipeline_samples, wall_s, wait_s) since `start`."""
        cpu = self.process_cpu_s() - self._cpu
        return (cpu, self.pipeline.cpu_s - self._pipeline[0],
                self.pipeline.samples - self._pipeline[1], time.monotonic() - self._wall,
                self.wait_s)


def main(argv=None) -> int:
    configure(progress_thread=True)
    comm = MPI.COMM_WORLD
    args = parse_args(argv)
    try:
        metrics = run(args, comm)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        # Raised alike on every rank (each reads the same files), before any work.
        if comm.Get_rank() == 0:
            print(f"engine.ensemble: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, ReplicaDivergenceError, CheckpointWriteError) as e:
        # raised alike on a member's ranks
        print(f"engine.ensemble: rank {comm.Get_rank()} stopped: {e}", file=sys.stderr,
              flush=True)
        if comm.Get_size() > 1:
            comm.Abort(1)
        return 1
    except Exception:
        abort_the_job(comm, "engine.ensemble")
        raise
    if comm.Get_rank() == 0:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
