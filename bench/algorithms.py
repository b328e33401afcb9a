"""Allreduce algorithms side by side: MPI's own, the progress thread's recursive
doubling and ring, and "auto", on one link, 4 KiB .. 64 MiB.

    mpiexec -n 2 python -m bench.algorithms                    # markdown table
    mpiexec -n 2 python -m bench.algorithms --quick            # smoke test (~20 s)
    mpiexec -n 2 python -m bench.algorithms --json-out bench/results/algorithms_loopback.json \\
        --plot bench/results/algorithms_loopback.png --md-out bench/results/algorithms_loopback.md
    bench/netlink --rate 1gbit -- mpiexec -n 2 python -m bench.algorithms --link 1gbit \\
        --json-out bench/results/algorithms_1gbit.json --plot bench/results/algorithms_1gbit.png \\
        --md-out bench/results/algorithms_1gbit.md

One Exchanger (engine/exchanger.py) runs every allreduce (float32, op mean,
post + wait, nothing else in flight), with the algorithm given per call:
"mpi" (MPI_Iallreduce), "recursive_doubling", "ring" (ext/_algorithms.pxi)
and "auto", whose thresholds come from the link's netfit file (--netfit,
default bench/results/netfit_<link>.json) as the Exchanger takes them: its
timed sweep of the algorithms for this P and chunk (bench/netfit.py, sweep
6), else the cost model on its fitted alpha-beta-gamma; --thresholds fixes
them. They are printed first, with where they came from. Each repetition runs the four algorithms
once, in an order shuffled per repetition (the same on every rank), so
that drift of a shared machine, and the state a previous transfer leaves
the link in, hit them alike; t_ms is the median over repetitions of the slowest rank's time.

The JSON (--json on stdout, --json-out to a file) is a list of
{link, algorithm, bytes, ranks, t_ms} (auto's rows add "chose", and the
"thresholds" and their "source"); the
markdown table adds auto / best and auto / mpi, the ratios of the target
(auto within 5 % of the best fixed algorithm, never more than 5 % slower
than mpi), and the thresholds the measurements themselves suggest (the
model's rule applied to the measured times; pass them back with
--thresholds to check them). At 2 ranks the default run takes about half a
minute on loopback and about 1.5 minutes on the emulated 1 Gbit/s link
(64 MiB: 4 x 8 allreduces of about 1 s); --quick takes seconds.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from analysis import costmodel as cm
from bench.common import parse_size, shuffled, size_label
from engine import Exchanger
from ext import _progress

COMM = MPI.COMM_WORLD
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("mpi", "recursive_doubling", "ring", "auto")
FIXED = ALGORITHMS[:3]
DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 256 << 10, 4 << 20]
#: The engine's default chunk (1 MiB), the one training runs with and bench.netfit
#: calibrates auto at: auto's thresholds are measured per chunk size, so a run at
#: another chunk would check thresholds taken elsewhere (auto then falls back to
#: the cost model and says so). Results recorded before this change used 4 MiB.
CHUNK_BYTES = _progress.DEFAULT_CHUNK_BYTES


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.algorithms", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated sizes, e.g. 4KiB,1MiB")
    p.add_argument("--quick", action="store_true", help="3 sizes, 3 repetitions: a smoke test")
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="seconds of repetitions per size (all four algorithms together)")
    p.add_argument("--min-reps", type=int, default=7)
    p.add_argument("--max-reps", type=int, default=300)
    p.add_argument("--chunk-bytes", type=parse_size, default=CHUNK_BYTES)
    p.add_argument("--max-inflight", type=int, default=_progress.DEFAULT_MAX_INFLIGHT)
    p.add_argument("--poll-us", type=int, default=_progress.DEFAULT_POLL_US)
    p.add_argument("--link", default=os.environ.get("NETLINK_RATE", "loopback"),
                   help="label of the link, recorded in the JSON; also picks the netfit file")
    p.add_argument("--netfit", default=None,
                   help="the link's bench/netfit.py JSON (default bench/results/netfit_<link>.json)")
    p.add_argument("--thresholds", default=None,
                   help='fix auto\'s thresholds: "recursive_doubling_below=BYTES,ring_from=BYTES"')
    p.add_argument("--json", action="store_true", help="print the JSON list instead of a table")
    p.add_argument("--json-out", help="also write the JSON list to this file")
    p.add_argument("--md-out", help="also write the markdown table to this file")
    p.add_argument("--plot", help="write a plot (PNG) of time and time / best against size")
    return p.parse_args(argv)


def time_once(ex, buf, algorithm):
    """Seconds of one allreduce (post + wait) on the slowest rank."""
    COMM.Barrier()
    t0 = time.perf_counter()
    ex.allreduce_async(buf, algorithm=algorithm).wait()
    return COMM.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def measure(ex, nbytes, args):
    """{algorithm: median seconds} for one size; repetitions from a first timed round."""
    buf = np.ones(nbytes // 4, np.float32)
    first = sum(time_once(ex, buf, a) for a in ALGORITHMS)     # also warms every path up
    reps = 3 if args.quick else int(min(args.max_reps, max(args.min_reps, args.budget_s / first)))
    samples = {a: [] for a in ALGORITHMS}
    for rep in range(reps):
        for a in shuffled(ALGORITHMS, rep):
            samples[a].append(time_once(ex, buf, a))
    return {a: statistics.median(s) for a, s in samples.items()}


def table(rows, link, ranks, auto):
    by = {(r["bytes"], r["algorithm"]): r for r in rows}
    sizes = sorted({r["bytes"] for r in rows})
    lines = [f"Allreduce (float32, mean), {ranks} ranks, link {link}; t in ms; {auto}", "",
             "| size | mpi | recursive_doubling | ring | auto (chose) | auto / best | auto / mpi |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        t = {a: by[n, a]["t_ms"] for a in ALGORITHMS}
        best = min(t[a] for a in FIXED)
        lines.append(f"| {size_label(n)} | " + " | ".join(f"{t[a]:.3f}" for a in FIXED)
                     + f" | {t['auto']:.3f} ({by[n, 'auto']['chose']}) | {t['auto'] / best:.3f}"
                     + f" | {t['auto'] / t['mpi']:.3f} |")
    return "\n".join(lines)


def measured_thresholds(rows):
    """auto's thresholds as this run measured them, for --thresholds / $EXCHANGER_AUTO_THRESHOLDS:
    the rule bench.netfit's calibration applies (costmodel.measured_auto_thresholds)."""
    t = {(r["bytes"], r["algorithm"]): r["t_ms"] for r in rows}
    sizes = sorted({r["bytes"] for r in rows})
    return cm.measured_auto_thresholds(sizes, {a: [t[n, a] for n in sizes] for a in FIXED}).spec()


def plot(rows, path, link, ranks):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({r["bytes"] for r in rows})
    t = {(r["bytes"], r["algorithm"]): r["t_ms"] for r in rows}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for a, style in zip(ALGORITHMS, ("o-", "s--", "^--", "k.-")):
        top.plot(sizes, [t[n, a] for n in sizes], style, label=a)
        bottom.plot(sizes, [t[n, a] / min(t[n, f] for f in FIXED) for n in sizes], style, label=a)
    top.set(xscale="log", yscale="log", ylabel="time per allreduce (ms)",
            title=f"Allreduce algorithms, {ranks} ranks, {link}")
    bottom.axhline(1.05, color="grey", lw=0.8, ls=":")
    bottom.set(xscale="log", xlabel="bytes", ylabel="time / best fixed algorithm")
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    bottom.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    sizes = ([parse_size(s) for s in args.sizes.split(",")] if args.sizes
             else QUICK_SIZES if args.quick else DEFAULT_SIZES)
    netfit = args.netfit or os.path.join(ROOT, "bench", "results", f"netfit_{args.link}.json")
    if args.thresholds is None and not os.path.exists(netfit):
        netfit = os.path.join(ROOT, "bench", "results", "netfit_loopback.json")
    rows = []
    with Exchanger(chunk_bytes=args.chunk_bytes, max_inflight=args.max_inflight,
                   poll_us=args.poll_us, algorithm="auto", network=netfit,
                   auto_thresholds=args.thresholds) as ex:
        auto = str(ex.auto)           # says where the thresholds came from
        if COMM.rank == 0 and not args.json:
            print(auto, flush=True)
        for nbytes in sizes:
            times = measure(ex, nbytes, args)
            chose = ex.algorithm_for(nbytes, "auto")
            for a in ALGORITHMS:
                row = {"link": args.link, "algorithm": a, "bytes": nbytes, "ranks": COMM.size,
                       "t_ms": round(1e3 * times[a], 4)}
                if a == "auto":
                    row.update(chose=chose, thresholds=ex.auto.spec(), source=ex.auto.source)
                rows.append(row)
    if COMM.rank != 0:
        return 0
    text = table(rows, args.link, COMM.size, auto)
    text += ("\n\nThresholds this run measured (rerun with --thresholds, or set "
             f"EXCHANGER_AUTO_THRESHOLDS): {measured_thresholds(rows)}")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md_out:
        with open(args.md_out, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(rows, args.plot, args.link, COMM.size)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
