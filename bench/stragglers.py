"""Stragglers: what one slow rank does to each strategy's iteration time.

    mpiexec -n 2 python -m bench.stragglers --json-out bench/results/stragglers.json   # ~4 min
    mpiexec -n 2 python -m bench.stragglers --full --json-out bench/results/stragglers.json
    bench/netlink --rate 1gbit -- mpiexec -n 4 python -m bench.stragglers --models vgg16-cifar \\
        --json-out bench/results/stragglers_1gbit_4.json
    mpiexec -n 2 python -m bench.stragglers --quick                                    # ~40 s

For every model, strategy and factor, the last rank is slowed by FACTOR
(`bench.step --straggler P-1:FACTOR`: each of its layers' forward and backward
takes FACTOR times as long, engine/straggler.py; for ddp, PyTorch
DistributedDataParallel slowed by torch hooks, `bench.peers.ddp.slow_down`,
skipped without torch). From the step benchmark:

- iter_ms: the iteration (slowest rank);
- straggler_delay_ms: the delay the straggler added per iteration (measured
  by its `Straggler`, so exact however noisy the machine); compute_ms and
  compute_ms_fastest: the straggler's and the other ranks' compute;
- hidden_fraction = 1 - (iter_ms(FACTOR) - iter_ms(1.0)) / straggler_delay_ms:
  the part of the straggler's delay the strategy hides; 0 = the whole delay
  shows in the iteration, 1 = none of it does.

Synchronous SGD cannot hide a straggler's delay outright (every update needs
every rank's gradient); what a pipelining strategy can hide is the part its
own exposed communication used to cover, which is why the fraction is read
against the factor-1.0 exposed time. Then the worst case (largest factor,
first model) is traced with blocking and multistep (`engine.train --trace`)
and drawn with analysis.plot_trace. Writes JSON, a markdown table (.md), a plot
(.png) and the two timelines next to `--json-out`. Rank 0 reports.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

from mpi4py import MPI

from bench import step
from bench.common import write_results
from bench.peers import ddp
from cnn.runtime import configure
from engine import train
from engine.strategies import STRATEGIES

COMM = MPI.COMM_WORLD


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.stragglers",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,vgg16-cifar")
    p.add_argument("--strategies", default="blocking,layerwise,priority,multistep,ddp",
                   help="engine strategies and ddp (PyTorch DDP, needs `make torch`)")
    p.add_argument("--factors", default="1.0,1.5,2.0")
    p.add_argument("--batch-size-per-rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mode", default="sleep", choices=("sleep", "spin"))
    p.add_argument("--full", action="store_true",
                   help="every strategy and factors 1.0,1.1,1.25,1.5,2.0 (~20 min on 2 cores)")
    p.add_argument("--quick", action="store_true", help="resnet20, 2 strategies, 2 factors")
    p.add_argument("--no-timelines", action="store_true")
    p.add_argument("--json", action="store_true", help="print the JSON list (rank 0)")
    p.add_argument("--json-out", metavar="FILE")
    p.add_argument("--link", default=os.environ.get("NETLINK_RATE", "loopback"))
    args = p.parse_args(argv)
    if args.full:
        args.strategies, args.factors = ",".join([*STRATEGIES, "ddp"]), "1.0,1.1,1.25,1.5,2.0"
    if args.quick:
        args.models, args.strategies, args.factors = "resnet20", "blocking,multistep", "1.0,2.0"
        args.batch_size_per_rank, args.iters = 8, 2
    args.factors = [float(f) for f in args.factors.split(",")]
    if args.factors[0] != 1.0:
        p.error("--factors must start with 1.0 (the baseline of hidden_fraction)")
    for s in args.strategies.split(","):
        if s not in STRATEGIES and s != "ddp":
            p.error(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    return args


def measure(args, model, strategy, factor) -> dict | None:
    """bench.step's record (bench.peers.ddp's for "ddp"; None without torch)."""
    argv = ["--model", model, "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--batch-size-per-rank", str(args.batch_size_per_rank), "--link", args.link,
            "--straggler", f"{COMM.size - 1}:{factor}", "--straggler-mode", args.mode]
    with contextlib.redirect_stdout(io.StringIO()):      # both print on rank 0
        if strategy != "ddp":
            return step.main([*argv, "--strategy", strategy])
        # A fresh rendezvous file per gloo process group.
        measure.groups = getattr(measure, "groups", 0) + 1
        path = COMM.bcast(f"/tmp/ddp-stragglers-{os.getpid()}-{measure.groups}", root=0)
        return ddp.run([*argv, "--rendezvous", path])


def table(rows) -> str:
    lines = ["| model | strategy | factor | iter ms | compute ms (straggler / others) | "
             "straggler delay ms | hidden fraction |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        hidden = "" if r["hidden_fraction"] is None else f"{r['hidden_fraction']:.2f}"
        lines.append(f"| {r['model']} | {r['strategy']} | {r['straggler_factor']:g} | "
                     f"{r['iter_ms']:.1f} | {r['compute_ms']:.1f} / {r['compute_ms_fastest']:.1f} "
                     f"| {r['straggler_delay_ms']:.1f} | {hidden} |")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(model_names), figsize=(6 * len(model_names), 3.8),
                             squeeze=False)
    for ax, model in zip(axes[0], model_names, strict=True):
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["strategy"] == strategy]
            ax.plot([r["straggler_factor"] for r in mine], [r["iter_ms"] for r in mine],
                    marker="o", label=strategy)
        ax.set_title(f"{model}, {rows[0]['ranks']} ranks, {rows[0]['link']}")
        ax.set_xlabel("straggler factor")
        ax.set_ylabel("iteration ms")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timelines(args, base: str) -> list[str]:
    """Trace the worst case with blocking and multistep; draw both timelines (rank 0)."""
    from analysis.plot_trace import load_spans
    from analysis.plot_trace import plot as plot_timeline

    model, factor = args.models.split(",")[0], args.factors[-1]
    written = []
    for strategy in ("blocking", "multistep"):
        # Named trace_* so that bench/report.py's stragglers*.json holds only results.
        trace = os.path.join(os.path.dirname(base), f"trace_{os.path.basename(base)}_{strategy}.json")
        argv = ["--model", model, "--dataset", "synthetic", "--synthetic-size", "512",
                "--batch-size", str(args.batch_size_per_rank * COMM.size), "--iters", "3",
                "--strategy", strategy, "--threads", "1", "--no-progress", "--trace", trace,
                "--straggler", f"{COMM.size - 1}:{factor}", "--straggler-mode", args.mode]
        with contextlib.redirect_stdout(io.StringIO()):
            status = train.main(argv)
        if COMM.allreduce(status, op=MPI.MAX) != 0:     # leave together, whoever failed
            raise SystemExit(f"bench.stragglers: engine.train {' '.join(argv)} failed")
        if COMM.rank == 0:
            spans = load_spans(trace)
            last = max(e["ts"] + e["dur"] for e in spans) / 1e3
            first = min(e["ts"] for e in spans) / 1e3
            # The last of the three iterations: warm, and whole.
            output = f"{base}_timeline_{strategy}.png"
            plot_timeline(spans, output, first + (last - first) * 2 / 3, last,
                          f"{model} {strategy}, rank {COMM.size - 1} slowed x{factor:g}")
            written.append(output)
    return written


def main(argv=None):
    configure(progress_thread=True)
    args = parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for strategy in args.strategies.split(","):
            baseline = None
            for factor in args.factors:
                r = measure(args, model, strategy, factor)
                if r is None:       # ddp without torch: bench.peers.ddp said so
                    break
                delay = r["straggler_delay_ms"]
                baseline = baseline or r["iter_ms"]
                hidden = (1 - (r["iter_ms"] - baseline) / delay
                          if factor > 1.0 and delay > 0 else None)
                rows.append({**r, "hidden_fraction": None if hidden is None else round(hidden, 3)})
                if COMM.rank == 0:
                    print(f"bench.stragglers: {model} {strategy} x{factor:g}: iter "
                          f"{r['iter_ms']:.1f} ms, delay {delay:.1f} ms", file=sys.stderr)
    base = os.path.splitext(args.json_out)[0] if args.json_out else None
    if base and COMM.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    COMM.Barrier()
    if base and not args.no_timelines:
        timelines(args, base)
    if COMM.rank == 0:
        if args.json_out:
            write_results(rows, args.json_out, table(rows), plot)
        print(json.dumps(rows) if args.json else table(rows))
    return rows


if __name__ == "__main__":
    main()
