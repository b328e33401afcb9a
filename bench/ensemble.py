"""Ensemble training: one shared data pipeline vs one pipeline per member.

    python -m bench.ensemble --json-out bench/results/ensemble.json     # ~3 min on 2 cores
    python -m bench.ensemble --quick                                    # smoke test, ~30 s

For K = 1, 2, 4 members (one rank per member by default, `--ranks-per-member`),
each with `--pipeline shared` and `--pipeline separate`, one epoch of
`engine.ensemble` on CIFAR-shaped images stored one zlib stream per image
(decode), randomly cropped and flipped, and normalised (the CIFAR recipe),
in a fresh `mpiexec` job. One record per run:

- cpu_s: CPU seconds of all ranks (user + system, all threads) during training;
- pipeline_cpu_s: the part spent reading, decoding and augmenting;
- wall_s: wall time of the epoch (the slowest rank);
- img_s_per_member: images per second each member trained.

The shared pipeline does the data work once instead of K times, so its
pipeline CPU falls by K; the total falls by as much as the data work weighs
against the members' compute. Writes JSON (`--json-out`), a markdown table
next to it (.md) and a plot (.png). Nothing else is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import write_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ensemble", description=__doc__.split("\n")[0])
    p.add_argument("--members", default="1,2,4", help="comma-separated K values")
    p.add_argument("--ranks-per-member", type=int, default=1)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=32, help="global batch of every member")
    p.add_argument("--iters", type=int, default=30, help="iterations (one epoch)")
    p.add_argument("--crop-pad", type=int, default=4)
    p.add_argument("--strategy", default="multistep")
    p.add_argument("--quick", action="store_true", help="K = 1, 2 and 4 iterations")
    p.add_argument("--json", action="store_true", help="print the JSON list")
    p.add_argument("--json-out", metavar="FILE", help="write the JSON list here (+ .md, .png)")
    p.add_argument("--mpiexec", default=os.path.join(os.path.dirname(sys.executable), "mpiexec"))
    args = p.parse_args(argv)
    if args.quick:
        args.members, args.iters = "1,2", 4
    return args


def run_one(args, k: int, pipeline: str) -> dict:
    ranks = k * args.ranks_per_member
    command = [args.mpiexec, "-n", str(ranks), sys.executable, "-m", "engine.ensemble",
               "--members", str(k), "--pipeline", pipeline, "--model", args.model,
               "--dataset", "synthetic-cifar", "--crop-pad", str(args.crop_pad),
               "--synthetic-size", str(args.batch_size * args.iters), "--epochs", "1",
               "--batch-size", str(args.batch_size), "--strategy", args.strategy,
               "--threads", "1", "--no-eval", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"bench.ensemble: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"members": k, "pipeline": pipeline, "ranks": ranks, "model": args.model,
            "batch_size": args.batch_size, "iters": args.iters,
            "cpu_s": round(result["cpu_s"], 3), "pipeline_cpu_s": round(result["pipeline_cpu_s"], 4),
            "wall_s": round(result["wall_s"], 3),
            "img_s_per_member": round(result["img_s_per_member"], 2)}


def table(rows) -> str:
    lines = ["| members | pipeline | ranks | CPU s (all ranks) | pipeline CPU s | wall s / epoch "
             "| img/s per member |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['members']} | {r['pipeline']} | {r['ranks']} | {r['cpu_s']:.2f} | "
              f"{r['pipeline_cpu_s']:.3f} | {r['wall_s']:.2f} | {r['img_s_per_member']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["members"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("cpu_s", "pipeline_cpu_s", "img_s_per_member"),
                              ("CPU seconds, all ranks", "pipeline CPU seconds",
                               "images/s per member"), strict=True):
        for offset, pipeline in ((-0.2, "shared"), (0.2, "separate")):
            values = [next((r[key] for r in rows if r["members"] == k
                            and r["pipeline"] == pipeline), 0) for k in ks]
            ax.bar([i + offset for i in range(len(ks))], values, 0.4, label=pipeline)
        ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for k in (int(v) for v in args.members.split(",")):
        for pipeline in ("shared", "separate"):
            rows.append(run_one(args, k, pipeline))
            print(f"bench.ensemble: K={k} {pipeline}: {rows[-1]}", file=sys.stderr)
    if args.json_out:
        write_results(rows, args.json_out, table(rows), plot)
    print(json.dumps(rows) if args.json else table(rows))
    return rows


if __name__ == "__main__":
    main()
