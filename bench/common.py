"""What the benchmarks share. bench/step.py and the peers (bench/peers/): the
same options, the same overlap formula (docs/algorithm.md §4) and the same
JSON record, so that their rows in the README table mean the same thing; the
message-size benchmarks: how sizes are read and printed."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def parse_size(text: str) -> int:
    """'64KiB', '1MiB', '4m', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def size_label(nbytes: int) -> str:
    """4096 -> '4 KiB', 1048576 -> '1 MiB'."""
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def write_results(rows: list, json_out: str, markdown: str, plot=None) -> None:
    """`rows` as JSON to `json_out`, the markdown table beside it (.md) and, when
    given, ``plot(rows, path)`` to a .png beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as f:
        json.dump(rows, f, indent=1)
    base = os.path.splitext(json_out)[0]
    with open(base + ".md", "w") as f:
        f.write(markdown + "\n")
    if plot is not None:
        plot(rows, base + ".png")


def step_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every step benchmark takes (model, batch, iterations, output)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size-per-rank", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object (rank 0)")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--link", default=os.environ.get("NETLINK_RATE", "loopback"),
                   help="label of the link, recorded in the JSON (bench/netlink sets it)")
    return p


def step_record(args, strategy: str, ranks: int, iter_ms: float, compute_ms: float,
                comm_ms: float, bytes_per_iter: int, progress_cpu_s: float | None, **extra) -> dict:
    """The JSON record of one step benchmark; overlap efficiency as in docs/algorithm.md §4:
    (compute + comm - iter) / min(compute, comm), 0 = no overlap, 1 = the physical limit."""
    return {
        "model": args.model, "strategy": strategy, "ranks": ranks, "link": args.link,
        "batch_per_rank": args.batch_size_per_rank, **extra,
        "iter_ms": round(iter_ms, 3), "compute_ms": round(compute_ms, 3),
        "exposed_comm_ms": round(iter_ms - compute_ms, 3), "comm_ms": round(comm_ms, 3),
        "overlap_efficiency": round((compute_ms + comm_ms - iter_ms) / min(compute_ms, comm_ms), 3),
        "bytes_per_iter": int(bytes_per_iter),
        "progress_cpu_s": None if progress_cpu_s is None else round(progress_cpu_s, 6),
    }


def report(result: dict, args) -> None:
    """Write `--json-out`, then print JSON (`--json`) or aligned key: value lines."""
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(f"{key:>20}: {value}" for key, value in result.items()))


def shuffled(algorithms, rep: int) -> list:
    """This repetition's order, the same on every rank (seeded by `rep`).

    A rotation (mpi, rd, ring, auto; rd, ring, auto, mpi; ...) puts "auto"
    right after "ring" in three repetitions of four, and behind the emulated
    links' token bucket a transfer is slower right after a large one: on the
    10 Gbit/s link auto's ring took 1.67 ms where the ring alone took 1.38 ms
    in the same run. A random order gives every algorithm every predecessor alike.
    """
    order = list(algorithms)
    np.random.default_rng(rep).shuffle(order)
    return order
