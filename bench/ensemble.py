"""Ensemble training: one shared data pipeline vs one pipeline per member.

    python -m bench.ensemble --json-out bench/results/ensemble_lenet-cifar.json    # ~2 min, 2 cores
    python -m bench.ensemble --model resnet20 \\
        --json-out bench/results/ensemble_resnet20.json                           # ~2.5 min, 2 cores
    python -m bench.ensemble --quick                                              # smoke test

For K = 1, 2, 4 members (one rank per member by default, `--ranks-per-member`),
each with `--pipeline shared` (rank 0 makes every batch), `--pipeline
distributed` (every rank makes B/P samples of it) and `--pipeline separate`
(`--pipelines` picks), `engine.ensemble` trains on CIFAR-shaped images
stored one zlib stream per image (decode), randomly cropped and flipped,
and normalised (the CIFAR recipe), in a fresh `mpiexec` job. The default
member is LeNet-5 on 3 x 32 x 32 (`lenet-cifar`), whose training costs ~4
times the pipeline's CPU per image (p/t ~0.24 on the 2-core VM); resnet20's
costs ~90 times, so its pipeline is ~1 % of the CPU.

How it is measured: one untimed job first (it fills the numba cache), then
`--rounds` rounds, each running every configuration once, the pipelines
in an order that rotates every round; every number reported
is the median over the rounds. Inside a job the first iteration (kernel
loading) is left out (`engine.ensemble --timing-warmup`). One record per K
and pipeline:

- cpu_s: CPU seconds of all ranks (user + system, all threads);
- pipeline_cpu_s: the part spent reading, decoding and augmenting, and
  pipeline_samples: the images it made meanwhile;
- wait_s: seconds the ranks waited for their batch (summed);
- wall_s: wall time (the slowest rank), img_s_per_member: images per second
  each member trained;
- cpu_factor: separate cpu_s / this pipeline's cpu_s at this K, next to its
  bound K (p + t) / (p + K t), with p and t the pipeline's and the
  training's CPU per image measured in the separate runs (p_over_t);
- speed_vs_separate: img_s_per_member / separate's (the target: >= 1).

`--pipeline-rank` gives the shared runs one more process that runs only
the pipeline (K + 1 ranks against K), so no member's step waits behind
rank 0's data work and scatters; its CPU counts in cpu_s.

Writes JSON (`--json-out`), a markdown table next to it (.md) and a plot (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.common import write_results

#: Iterations per job: a few seconds of training per member on one core.
DEFAULT_ITERS = {"lenet-cifar": 200, "resnet20": 30}
PIPELINES = ("shared", "distributed", "separate")
MEDIAN_KEYS = ("cpu_s", "pipeline_cpu_s", "pipeline_samples", "wait_s", "wall_s",
               "img_s_per_member")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ensemble", description=__doc__.split("\n")[0])
    p.add_argument("--members", default="1,2,4", help="comma-separated K values")
    p.add_argument("--ranks-per-member", type=int, default=1)
    p.add_argument("--model", default="lenet-cifar", help="lenet-cifar or resnet20 (any CIFAR "
                                                          "model of cnn.models)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch of every member")
    p.add_argument("--iters", type=int, default=None,
                   help=f"iterations per job (default {DEFAULT_ITERS}, else 30)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every configuration")
    p.add_argument("--crop-pad", type=int, default=4)
    p.add_argument("--strategy", default="blocking",
                   help="gradient exchange inside a member (with one rank per member there is "
                        "none, and blocking adds the least engine work to the training)")
    p.add_argument("--prefetch", type=int, default=2, help="engine.ensemble --prefetch")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help="comma-separated, from " + ", ".join(PIPELINES))
    p.add_argument("--pipeline-rank", action="store_true",
                   help="shared runs get one more rank that only runs the pipeline "
                        "(engine.ensemble --pipeline-rank)")
    p.add_argument("--pipeline-depth", type=int, default=3,
                   help="engine.ensemble --pipeline-depth")
    p.add_argument("--quick", action="store_true", help="K = 1, 2; 6 iterations; one round")
    p.add_argument("--json", action="store_true", help="print the JSON list")
    p.add_argument("--json-out", metavar="FILE", help="write the JSON list here (+ .md, .png)")
    p.add_argument("--mpiexec", default=os.path.join(os.path.dirname(sys.executable), "mpiexec"))
    args = p.parse_args(argv)
    if args.quick:
        args.members, args.iters, args.rounds = "1,2", 6, 1
    if args.iters is None:
        args.iters = DEFAULT_ITERS.get(args.model, 30)
    try:
        args.ks = [int(v) for v in args.members.split(",")]
    except ValueError:
        p.error(f"--members {args.members!r}: expected comma-separated integers")
    if min(args.ks) < 1 or args.rounds < 1 or args.iters < 2 or args.ranks_per_member < 1:
        p.error("--members, --rounds and --ranks-per-member must be >= 1, --iters >= 2")
    args.pipelines = args.pipelines.split(",")
    if "separate" not in args.pipelines or not set(args.pipelines) <= set(PIPELINES):
        p.error(f"--pipelines {','.join(args.pipelines)!r}: choose from {', '.join(PIPELINES)}, "
                "separate included (the baseline)")
    return args


def run_one(args, k: int, pipeline: str, iters: int | None = None) -> dict:
    """One `engine.ensemble` job; its final JSON line."""
    iters = iters or args.iters
    extra = ["--pipeline-rank"] if pipeline == "shared" and args.pipeline_rank else []
    command = [args.mpiexec, "-n", str(ranks(args, k, pipeline)), sys.executable, "-m",
               "engine.ensemble", "--members", str(k), "--pipeline", pipeline, *extra,
               "--model", args.model, "--dataset", "synthetic-cifar",
               "--crop-pad", str(args.crop_pad), "--synthetic-size", str(args.batch_size * iters),
               "--epochs", "1", "--batch-size", str(args.batch_size),
               "--strategy", args.strategy, "--prefetch", str(args.prefetch),
               "--pipeline-depth", str(args.pipeline_depth), "--timing-warmup", "1",
               "--threads", "1", "--no-eval", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"bench.ensemble: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ranks(args, k: int, pipeline: str) -> int:
    """Processes of one job: the members' ranks, plus the pipeline rank if asked for."""
    return k * args.ranks_per_member + (pipeline == "shared" and args.pipeline_rank)


def summarise(args, k: int, pipeline: str, runs: list) -> dict:
    """The record of one configuration: medians over its rounds, rounds kept."""
    record = {"members": k, "pipeline": pipeline, "ranks": ranks(args, k, pipeline),
              "pipeline_rank_run": args.pipeline_rank,
              "model": args.model, "batch_size": args.batch_size, "iters": args.iters,
              "timed_iters": runs[0]["timed_iters"], "rounds": len(runs),
              "prefetch": args.prefetch, "pipeline_depth": args.pipeline_depth}
    for key in MEDIAN_KEYS:
        record[key] = round(statistics.median(r[key] for r in runs), 4)
    record["runs"] = [{key: round(r[key], 4) for key in MEDIAN_KEYS} for r in runs]
    return record


def add_factors(records: list) -> None:
    """cpu_factor, its bound, p_over_t and speed_vs_separate on every record of every K."""
    for k in sorted({r["members"] for r in records}):
        separate = next(r for r in records if r["members"] == k and r["pipeline"] == "separate")
        # CPU per image, from the separate run (K pipelines, K trainings); the
        # pipeline runs a few batches ahead, so its images are counted.
        images = k * separate["timed_iters"] * separate["batch_size"]
        p = separate["pipeline_cpu_s"] / max(separate["pipeline_samples"], 1)
        t = (separate["cpu_s"] - separate["pipeline_cpu_s"]) / images
        ratio = p / t if t > 0 else float("nan")
        for r in records:
            if r["members"] != k:
                continue
            r["p_over_t"] = round(ratio, 4)
            r["cpu_factor"] = round(separate["cpu_s"] / r["cpu_s"] if r["cpu_s"] > 0
                                    else float("nan"), 3)
            r["cpu_factor_bound"] = round(k * (1 + ratio) / (ratio + k), 3)
            r["speed_vs_separate"] = round(r["img_s_per_member"] / separate["img_s_per_member"]
                                           if separate["img_s_per_member"] > 0
                                           else float("nan"), 3)


def table(rows) -> str:
    lines = ["| model | K | pipeline | CPU s (all ranks) | pipeline CPU s | wait s | wall s "
             "| img/s per member | vs separate | p/t | CPU factor (bound) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        factor = (f"{r['cpu_factor']:.2f} ({r['cpu_factor_bound']:.2f})"
                  if r["pipeline"] != "separate" else "")
        lines.append(f"| {r['model']} | {r['members']} | {r['pipeline']} | {r['cpu_s']:.2f} | "
                     f"{r['pipeline_cpu_s']:.3f} | {r['wait_s']:.2f} | {r['wall_s']:.2f} | "
                     f"{r['img_s_per_member']:.1f} | {r['speed_vs_separate']:.2f} | "
                     f"{r['p_over_t']:.3f} | {factor} |")
    r0 = rows[0]
    lines += ["", f"{r0['model']}, batch {r0['batch_size']}, {r0['timed_iters']} timed of "
                  f"{r0['iters']} iterations, median of {r0['rounds']} rotating rounds; "
                  "CPU factor = separate CPU / this pipeline's, bound K(p+t)/(p+Kt); "
                  "vs separate = img/s per member / separate's."]
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["members"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    shown = [p for p in PIPELINES if any(r["pipeline"] == p for r in rows)]
    width = 0.8 / len(shown)
    for ax, key, label in zip(axes[:2], ("cpu_s", "img_s_per_member"),
                              ("CPU seconds, all ranks", "images/s per member"), strict=True):
        for j, pipeline in enumerate(shown):
            values = [next((r[key] for r in rows if r["members"] == k
                            and r["pipeline"] == pipeline), 0) for k in ks]
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(ks))], values,
                   width, label=pipeline)
        ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
        ax.set_title(label)
    axes[0].legend()
    for pipeline in shown:
        if pipeline != "separate":
            mine = [next(r for r in rows if r["members"] == k and r["pipeline"] == pipeline)
                    for k in ks]
            axes[2].plot(ks, [r["cpu_factor"] for r in mine], "o-", label=pipeline)
    bound = [next(r["cpu_factor_bound"] for r in rows if r["members"] == k) for k in ks]
    axes[2].plot(ks, bound, "k--", label="K(p+t)/(p+Kt)")
    axes[2].set_xticks(ks)
    axes[2].set_xlabel("members K")
    axes[2].set_title(f"CPU factor separate / one pipeline ({rows[0]['model']})")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    # Untimed: compiles (or loads) every numba kernel of this model into the cache.
    run_one(args, 1, "shared", iters=2)
    runs = {(k, p): [] for k in args.ks for p in args.pipelines}
    for i in range(args.rounds):
        shift = i % len(args.pipelines)
        order = args.pipelines[shift:] + args.pipelines[:shift]
        for k in args.ks:
            for pipeline in order:
                result = run_one(args, k, pipeline)
                runs[k, pipeline].append(result)
                print(f"bench.ensemble: round {i + 1}/{args.rounds} K={k} {pipeline}: "
                      f"cpu {result['cpu_s']:.2f} s, wall {result['wall_s']:.2f} s, "
                      f"{result['img_s_per_member']:.1f} img/s per member", file=sys.stderr)
    rows = [summarise(args, k, p, runs[k, p]) for k in args.ks for p in args.pipelines]
    add_factors(rows)
    if args.json_out:
        write_results(rows, args.json_out, table(rows), plot)
    print(json.dumps(rows) if args.json else table(rows))
    return rows


if __name__ == "__main__":
    main()
