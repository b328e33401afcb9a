"""Run `engine.train` under mpiexec and restart it from its last checkpoint when it fails.

    python -m engine.supervise -n 4 [--shrink] [--max-restarts 3] -- \\
        --model lenet --dataset mnist --data-dir DATA --batch-size 240 --epochs 5 \\
        --checkpoint-dir ckpt --checkpoint-every 100

A failed job (a rank killed or stalled past `--timeout`, a node lost) is
restarted with ``--resume`` from CHECKPOINT_DIR/checkpoint.npz, on the same
number of ranks or, with ``--shrink``, on the next smaller count that divides
the global batch (the data order and the global batch do not depend on the
rank count, so the run continues the same SGD trajectory). A configuration
error (exit status 2) is not restarted: it would fail again alike. Every
attempt is logged to stderr and, with ``--log``, as a JSON line.

This is the MPI user's alternative to Horovod Elastic: no rendezvous server,
the checkpoint is the only state carried across a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    import mpi4py
    # A launcher, not an MPI process: engine.train imports mpi4py.MPI, which
    # would otherwise call MPI_Init here (a singleton job of its own).
    mpi4py.rc.initialize = mpi4py.rc.finalize = False

from cnn.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from engine.train import CHECKPOINT_NAME  # noqa: E402
from engine.train import parse_args as parse_train_args  # noqa: E402

CONFIG_ERROR = 2      # engine.train's exit status for a bad configuration


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("engine.supervise: error: separate the training arguments with "
                         "'--', e.g. python -m engine.supervise -n 4 -- --checkpoint-dir ckpt")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m engine.supervise",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, required=True, help="ranks of the first attempt")
    p.add_argument("--shrink", action="store_true",
                   help="restart on fewer ranks (the next count that divides the batch)")
    p.add_argument("--min-ranks", type=int, default=1, help="never shrink below this")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--mpiexec", default=None,
                   help="launcher (default: mpiexec next to this Python, else on PATH)")
    p.add_argument("--log", default=None, help="append one JSON line per attempt")
    args = p.parse_args(argv[:cut])
    args.train_args = argv[cut + 1:]
    return args


def next_ranks(ranks: int, batch: int, minimum: int) -> int | None:
    """The largest count below `ranks` (and >= `minimum`) that divides `batch`, or None."""
    for r in range(ranks - 1, max(minimum, 1) - 1, -1):
        if batch % r == 0:
            return r
    return None


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration a checkpoint resumes at; None if there is none or it is unreadable."""
    try:
        return load_checkpoint(path).iteration
    except (FileNotFoundError, CheckpointError):
        return None


def default_mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def supervise(args) -> int:
    """Run attempts until one succeeds or the restarts are used up; the last exit status."""
    train = parse_train_args(args.train_args)
    if not train.checkpoint_dir:
        raise SystemExit("engine.supervise: error: the training arguments need "
                         "--checkpoint-dir (a restart resumes from it)")
    if args.ranks < 1 or args.max_restarts < 0 or args.min_ranks < 1:
        raise SystemExit("engine.supervise: error: -n and --min-ranks must be >= 1, "
                         "--max-restarts >= 0")
    ckpt = Path(train.checkpoint_dir) / CHECKPOINT_NAME
    mpiexec = args.mpiexec or default_mpiexec()
    ranks, attempt, status = args.ranks, 0, 1
    base = [a for a in args.train_args if a != "--resume"]
    while True:
        resume_at = checkpoint_iteration(ckpt)
        command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "engine.train", *base]
        if resume_at is not None:
            command.append("--resume")
        start = time.monotonic()
        status = subprocess.call(command, env=os.environ.copy())
        seconds = time.monotonic() - start
        record = {"attempt": attempt, "ranks": ranks, "resumed_at": resume_at,
                  "exit_status": status, "seconds": round(seconds, 2),
                  "checkpoint_after": checkpoint_iteration(ckpt)}
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")
        if status == 0:
            print(f"engine.supervise: attempt {attempt} on {ranks} ranks finished "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
            return 0
        if status == CONFIG_ERROR:
            print(f"engine.supervise: attempt {attempt} failed with a configuration error "
                  "(exit status 2); not restarting", file=sys.stderr, flush=True)
            return status
        if attempt >= args.max_restarts:
            print(f"engine.supervise: attempt {attempt} failed (exit status {status}); "
                  f"{args.max_restarts} restarts used, giving up", file=sys.stderr, flush=True)
            return status
        if args.shrink:
            smaller = next_ranks(ranks, train.batch_size, args.min_ranks)
            if smaller is None:
                print(f"engine.supervise: no rank count below {ranks} (>= {args.min_ranks}) "
                      f"divides the batch {train.batch_size}; giving up", file=sys.stderr,
                      flush=True)
                return status
            ranks = smaller
        attempt += 1
        at = checkpoint_iteration(ckpt)
        print(f"engine.supervise: attempt {attempt - 1} failed (exit status {status}) after "
              f"{seconds:.1f} s; restart {attempt}/{args.max_restarts} on {ranks} ranks from "
              + (f"{ckpt} (iteration {at})" if at is not None else "scratch (no checkpoint)"),
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    return supervise(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
