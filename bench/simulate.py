"""Strong scaling beyond this machine: every strategy, 1 to 8192 cores, from
the cost model (analysis/costmodel.py), next to the published figures.

    python -m bench.simulate                     # the published comparison: PNG + table + JSON
    python -m bench.simulate --model resnet50 --machine bench/machines/cori.json \\
        --batch 8192 --procs 1,2,4,8,16,32,64,128,256   # which strategy, how many nodes?

Inputs
------
- Per-layer forward / backward / update times of the model from
  analysis/profile.py on THIS machine (bench/results/profile_<model>_b<b>.json,
  single thread, small batch b at 224 x 224).
- A machine file (bench/machines/*.json): cores per node, the target core's
  peak FLOP/s, the thread-scaling model, the interconnect's alpha / beta /
  gamma (with sources).

Compute scaling, documented choices
-----------------------------------
1. Batch: times per sample = profiled time / b; a process with batch B/P
   computes (B/P) x that (linear in the batch: small batches use a core less
   well, so per-sample costs at b = 2..8 overestimate large-batch ones a
   little; a caveat, not a correction).
2. Core: x ``sgemm_here / (core_peak_gflops x sgemm_efficiency)``, the ratio of
   this machine's measured single-thread SGEMM rate (numpy's BLAS, recorded in
   the profile) to the target core's achievable SGEMM rate. Haswell E5-2698 v3:
   2.3 GHz x 2 AVX2 FMA units x 8 float lanes x 2 = 73.6 GFLOP/s per core;
   ``sgemm_efficiency`` is the fraction a tuned SGEMM reaches (machine file).
   This assumes our kernels are as far from SGEMM here as PCNN's are there.
3. Threads: Amdahl, t(T) = t(1) (s + (1 - s) / T), with the serial fraction s
   of the machine file (one number for the whole network: im2col, BN, ReLU,
   pooling and the Python between kernels scale worse than GEMM).
4. The SGD update scales with the core factor and the threads like compute;
   multistep updates 1/P of it.
5. multistep's FC layers (engine/strategies/multistep.py, ``--fc-mode``,
   default auto): per layer, the path that moves the fewest values per rank:
   the paper's all-to-all of the inputs (B (N_in/P + N_out)), the allgather
   of the inputs (B (N_in + N_out), never fewer) or the reduce-scatter of the
   conv path (N_in N_out); off the conv path, the local GEMM over the global
   batch after backprop is charged half the layer's backward (the dW GEMM it
   replaces, see costmodel.FC_WEIGHT_GRAD_SHARE). ``multistep-alltoall``,
   ``multistep-activations`` and ``multistep-reduce_scatter`` are multistep
   with that fc_mode fixed (dashed in the plots), to compare the paths.

Layouts
-------
- ``node`` (default, PCNN's): one process per node, ``cores_per_node`` threads;
  below one node, one process with as many threads as cores.
- ``core``: one process per core; the node's NIC is shared by its processes,
  modelled pessimistically as beta x processes-per-node (each step of a
  collective has all of them sending at once); within one node, the
  machine's ``intra_node`` link.

Speedup is over one core running the whole global batch (MLHPC'18 reports
speedups of this kind: 2516x on 8192 cores cannot be over one 32-core node);
HiPC'17's VGG-A speedups on 128 nodes are taken over one node.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from dataclasses import replace

from analysis import costmodel as cm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
MACHINES = os.path.join(ROOT, "bench", "machines")
# the default sweep: every strategy, and multistep with the paper's FC path and the conv
# path fixed (the activations path never moves fewer values than the all-to-all)
SIM_STRATEGIES = cm.STRATEGIES + ("multistep-alltoall", "multistep-reduce_scatter")

#: docs/algorithm.md §3. cores or nodes, speedup, baseline, global batch (None: not stated there).
PUBLISHED = {
    "vgg16": [{"source": "MLHPC'18", "cores": 8192, "speedup": 2516.36, "baseline": "core",
               "batch": None}],
    "resnet50": [{"source": "MLHPC'18", "cores": 8192, "speedup": 2734.25, "baseline": "core",
                  "batch": None}],
    "vgga": [{"source": "HiPC'17", "nodes": 128, "speedup": 62.97, "baseline": "node",
              "batch": 256},
             {"source": "HiPC'17", "nodes": 128, "speedup": 77.97, "baseline": "node",
              "batch": 512}],
}
#: Assumed global batch for the MLHPC'18 comparison: the paper does not state it.
#: 8192 keeps >= 1 sample per core at 8192 cores (needed in the 1-process-per-core
#: layout) and is the issue's own example; 512 is shown as a sensitivity check.
MLHPC_BATCH = 8192
MLHPC_BATCH_ALT = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="vgg16, resnet50, vgga, ... (default: the "
                   "published comparison for all three)")
    p.add_argument("--profile", default=None, help="profile JSON (default: newest "
                   "bench/results/profile_<model>_b*.json)")
    p.add_argument("--machine", default=os.path.join(MACHINES, "cori.json"))
    p.add_argument("--batch", type=int, default=MLHPC_BATCH, help="global batch")
    p.add_argument("--procs", default=None,
                   help="comma-separated process counts (nodes in the node layout)")
    p.add_argument("--layout", choices=("node", "core"), default="node")
    p.add_argument("--strategies", default=",".join(SIM_STRATEGIES),
                   help=f"comma-separated, from {', '.join(cm.STRATEGIES + cm.FC_VARIANTS)}")
    p.add_argument("--fc-mode", choices=cm.FC_MODES, default="auto",
                   help="multistep's fc_mode (engine/strategies/multistep.py); default auto")
    p.add_argument("--per-tensor", action="store_true",
                   help="one collective per parameter tensor, as the engine did before "
                        "units (cnn Model.param_groups): to compare")
    p.add_argument("--serial-fraction", type=float, default=None,
                   help="override the machine file's Amdahl serial fraction (thread scaling)")
    p.add_argument("-o", "--output", default=None, help="output prefix (JSON/MD/PNG)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def load_machine(path: str, serial_fraction: float | None = None) -> dict:
    if not os.path.exists(path) and os.path.exists(os.path.join(MACHINES, path)):
        path = os.path.join(MACHINES, path)
    with open(path) as f:
        machine = json.load(f)
    if serial_fraction is not None:
        machine["threads"] = dict(machine["threads"], serial_fraction=serial_fraction)
        machine["name"] = f"{machine['name']}, serial fraction {serial_fraction}"
    return machine


def find_profile(model: str) -> str:
    paths = sorted(glob.glob(os.path.join(RESULTS, f"profile_{model}_b*.json")),
                   key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no profile for {model}: run python -m analysis.profile --model {model} "
                         f"--batch-size-per-rank 2 -o bench/results/profile_{model}_b2.json")
    return paths[-1]


class Target:
    """The profiled model moved onto one machine: per-process costs for any layout."""

    def __init__(self, profile: cm.Profile, machine: dict, fc_mode: str = "auto",
                 fuse_units: bool = True):
        self.profile, self.machine, self.fc_mode = profile, machine, fc_mode
        self.fuse_units = fuse_units
        here = profile.meta.get("machine", {}).get("sgemm_gflops_1thread")
        self.sgemm_here = here
        if not here:
            raise SystemExit("the profile has no machine.sgemm_gflops_1thread")
        core = machine["core"]
        self.core_factor = here / (core["peak_gflops"] * core["sgemm_efficiency"])
        self.serial = machine["threads"]["serial_fraction"]
        self.cpn = machine["cores_per_node"]
        b = profile.batch_per_rank
        self.per_sample = [replace(l, fwd_s=l.fwd_s / b, bwd_s=l.bwd_s / b) for l in profile.layers]

    def amdahl(self, threads: int) -> float:
        return self.serial + (1 - self.serial) / threads

    def layers(self, batch_per_process: float, threads: int) -> list:
        f = self.core_factor * self.amdahl(threads)
        return cm.scale_layers(self.per_sample, compute=f, batch=batch_per_process, update=f)

    def network(self, procs: int, procs_per_node: int) -> cm.Network:
        m = self.machine
        if procs <= procs_per_node and "intra_node" in m:
            d = dict(m["network"], **m["intra_node"])
        else:
            d = dict(m["network"])
            d["beta"] = d["beta"] * procs_per_node   # the NIC is shared by the node's processes
        return cm.Network.from_dict(d)

    def engine(self) -> cm.Engine:
        return cm.Engine(**dict(self.machine.get("engine", {}), fuse_units=self.fuse_units))


def configuration(cores: int, layout: str, cpn: int) -> tuple[int, int, int]:
    """(processes, threads per process, processes per node) for `cores` cores."""
    if layout == "core":
        return cores, 1, min(cores, cpn)
    if cores < cpn:
        return 1, cores, 1
    return cores // cpn, cpn, 1


def run(target: Target, strategy: str, cores: int, batch: int, layout: str) -> dict:
    P, threads, ppn = configuration(cores, layout, target.cpn)
    if batch / P < 1:
        return {"strategy": strategy, "cores": cores, "procs": P, "feasible": False}
    layers = target.layers(batch / P, threads)
    prof = cm.Profile(layers, batch / P, target.profile.bn_bytes,
                      target.profile.copy_s_per_byte * target.core_factor, 0.0)
    r = cm.simulate(layers, target.network(P, ppn), strategy, P, engine=target.engine(),
                    profile=prof, global_batch=batch, iterations=3, fc_mode=target.fc_mode)
    return {"strategy": strategy, "cores": cores, "procs": P, "threads": threads,
            "nodes": max(1, math.ceil(cores / target.cpn)), "feasible": True,
            "batch_per_proc": batch / P, **r.as_dict()}


def baseline(target: Target, batch: int, cores: int = 1, layout: str = "node") -> float:
    """Iteration time on `cores` cores with blocking (one node or less: no network)."""
    return run(target, "blocking", cores, batch, layout)["iter_ms"]


def sweep(target: Target, strategies, cores_list, batch: int, layout: str, base_cores: int = 1):
    base = baseline(target, batch, base_cores, layout)
    rows = []
    for cores in cores_list:
        for s in strategies:
            row = run(target, s, cores, batch, layout)
            if row["feasible"]:
                row["speedup"] = base / row["iter_ms"]
                row["efficiency"] = row["speedup"] * base_cores / cores
                row["images_per_s"] = batch / row["iter_ms"] * 1e3
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------

def label(strategy: str) -> str:
    """The strategy's name in tables and plots (multistep with --fc-mode=X: multistep-X)."""
    return strategy


def markdown(rows, strategies, title: str, unit: str = "cores") -> str:
    cores = sorted({r["cores"] for r in rows})
    head = f"| {unit} | procs x threads | " + " | ".join(map(label, strategies)) + " |"
    lines = [f"**{title}** (speedup / efficiency)", "", head,
             "|" + "---|" * (2 + len(strategies))]
    for c in cores:
        cells, cfg = [], ""
        for s in strategies:
            r = next(r for r in rows if r["cores"] == c and r["strategy"] == s)
            if not r["feasible"]:
                cells.append("batch < 1/proc")
                continue
            cfg = f"{r['procs']} x {r['threads']}"
            cells.append(f"{r['speedup']:.1f}x / {100 * r['efficiency']:.0f}%")
        n = c // (1 if unit == "cores" else 1)
        lines.append(f"| {n} | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recommend(rows, unit: str, min_efficiency: float = 0.7) -> str:
    """Fastest configuration, and the largest count that still pays for its nodes.

    "Pays" = parallel efficiency of the best strategy, relative to the smallest
    count in the list, stays >= `min_efficiency`.
    """
    ok = [r for r in rows if r["feasible"]]
    counts = sorted({r["procs"] for r in ok})
    best = {c: min((r for r in ok if r["procs"] == c), key=lambda r: r["iter_ms"]) for c in counts}
    fastest = min(best.values(), key=lambda r: r["iter_ms"])
    first = best[counts[0]]
    worth = first
    for c in counts:
        relative = first["iter_ms"] / best[c]["iter_ms"] * first["cores"] / best[c]["cores"]
        if relative >= min_efficiency:
            worth = best[c]
    name = "nodes" if unit == "nodes" else "processes"
    return (f"Recommendation: {worth['strategy']} on {worth['procs']} {name} "
            f"({worth['iter_ms']:.1f} ms/iteration, {worth['images_per_s']:.0f} images/s), the "
            f"largest count keeping >= {100 * min_efficiency:.0f} % efficiency relative to "
            f"{counts[0]} {name}; fastest overall: {fastest['strategy']} on {fastest['procs']} "
            f"{name} ({fastest['iter_ms']:.1f} ms, {fastest['speedup']:.0f}x over one core).")


def plot(panels, path: str, rows: int = 1) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = math.ceil(len(panels) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.6 * rows), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        for s in panel["strategies"]:
            pts = [(r["cores"], r["speedup"]) for r in panel["rows"]
                   if r["strategy"] == s and r["feasible"]]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label(s),
                        linestyle="--" if s in cm.FC_VARIANTS else "-")
        xs = sorted({r["cores"] for r in panel["rows"]})
        ax.plot(xs, [x / panel.get("base_cores", 1) for x in xs], color="grey", lw=0.8,
                linestyle=":", label="ideal")
        for p in panel.get("published", []):
            ax.scatter([p["x"]], [p["speedup"]], marker="*", s=180, color="black", zorder=5)
            ax.annotate(f"{p['label']}\n{p['speedup']:.0f}x", (p["x"], p["speedup"]),
                        textcoords="offset points", xytext=(-60, 10), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(panel.get("xlabel", "cores"))
        ax.set_ylabel(panel.get("ylabel", "speedup over 1 core"))
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def published_comparison(args) -> None:
    machine = load_machine(args.machine, args.serial_fraction)
    strategies = args.strategies.split(",")
    cores_list = [2 ** k for k in range(0, 14)]
    out_json, md, panels = {"machine": machine.get("name"), "runs": []}, [], []
    md.append(f"# Simulated strong scaling on {machine.get('name')}\n")
    md.append("Generated by `python -m bench.simulate`; the model and its assumptions are in "
              "bench/simulate.py and bench/results/simulate_notes.md. multistep: the engine's "
              f"strategy, FC layers with fc_mode={args.fc_mode}; multistep-X: multistep with "
              "fc_mode=X (alltoall: the paper's FC path).\n")
    for model in ("vgg16", "resnet50"):
        path = find_profile(model)
        target = Target(cm.load_profile(path), machine, args.fc_mode, not args.per_tensor)
        pub = PUBLISHED[model][0]
        for layout in ("node", "core"):
            for batch in (MLHPC_BATCH, MLHPC_BATCH_ALT):
                rows = sweep(target, strategies, cores_list, batch, layout)
                out_json["runs"].append({"model": model, "profile": os.path.relpath(path, ROOT),
                                         "core_factor": target.core_factor, "batch": batch,
                                         "layout": layout, "rows": rows})
                at = {r["strategy"]: r for r in rows if r["cores"] == pub["cores"]}
                md.append(markdown(rows, strategies,
                                   f"{model}, global batch {batch}, one process per {layout}"))
                md.append("")
                md.append(f"At {pub['cores']} cores: " + ", ".join(
                    f"{label(s)} {at[s]['speedup']:.0f}x" for s in strategies
                    if at[s]["feasible"])
                    + f"; published ({pub['source']}, multistep): {pub['speedup']}x.\n")
                if layout == "node":
                    panels.append({"title": f"{model}, B={batch}, 1 process per {layout} "
                                            f"({machine.get('name')})",
                                   "rows": rows, "strategies": strategies,
                                   "published": [{"x": pub["cores"], "speedup": pub["speedup"],
                                                  "label": pub["source"]}]})
    # HiPC'17: VGG-A, 1..128 nodes, speedup over one node
    path = find_profile("vgga")
    target = Target(cm.load_profile(path), machine, args.fc_mode, not args.per_tensor)
    cpn = target.cpn
    for pub in PUBLISHED["vgga"]:
        rows = sweep(target, strategies, [cpn * 2 ** k for k in range(0, 8)], pub["batch"], "node",
                     base_cores=cpn)
        for r in rows:
            r["nodes"] = r["cores"] // cpn
        out_json["runs"].append({"model": "vgga", "profile": os.path.relpath(path, ROOT),
                                 "core_factor": target.core_factor, "batch": pub["batch"],
                                 "layout": "node", "baseline": "1 node",
                                 "rows": rows})
        md.append(markdown([dict(r, cores=r["nodes"]) for r in rows], strategies,
                           f"vgga (VGG-A), global batch {pub['batch']}, speedup over one node",
                           unit="nodes"))
        at = {r["strategy"]: r for r in rows if r["nodes"] == pub["nodes"]}
        md.append("")
        md.append("At 128 nodes: " + ", ".join(f"{label(s)} {at[s]['speedup']:.1f}x"
                                                 for s in strategies if at[s]["feasible"])
                  + f"; published ({pub['source']}, layerwise with a communication thread): "
                    f"{pub['speedup']}x.\n")
        panels.append({"title": f"vgga, B={pub['batch']}, speedup over 1 node",
                       "rows": [dict(r, cores=r["nodes"]) for r in rows],
                       "strategies": strategies, "xlabel": "nodes",
                       "ylabel": "speedup over 1 node",
                       "published": [{"x": 128, "speedup": pub["speedup"],
                                      "label": pub["source"]}]})
    prefix = args.output or os.path.join(RESULTS, "simulate_" +
                                         os.path.splitext(os.path.basename(args.machine))[0])
    with open(prefix + ".json", "w") as f:
        json.dump(out_json, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    # panels: vgg16 B=8192, B=512, resnet50 B=8192, B=512, vgga B=256, B=512
    plot([panels[0], panels[2], panels[4], panels[1], panels[3], panels[5]], prefix + ".png",
         rows=2)
    print("\n".join(md))
    print(f"-> {prefix}.json, {prefix}.md, {prefix}.png")


def question(args) -> None:
    """The user's question: this model, batch and machine: which strategy, how many nodes?"""
    machine = load_machine(args.machine, args.serial_fraction)
    target = Target(cm.load_profile(args.profile or find_profile(args.model)), machine,
                    args.fc_mode, not args.per_tensor)
    strategies = args.strategies.split(",")
    procs = [int(p) for p in (args.procs or "1,2,4,8,16,32,64,128,256").split(",")]
    per = 1 if args.layout == "core" else target.cpn
    rows = sweep(target, strategies, [p * per for p in procs], args.batch, args.layout)
    unit = "nodes" if args.layout == "node" else "cores"
    print(f"{args.model}, global batch {args.batch}, {machine.get('name')}, one process per "
          f"{args.layout}; iteration time in ms (speedup over one core)")
    print(f"multistep: fc_mode={args.fc_mode}" + "".join(
        f"; {s}: multistep with fc_mode={s[len('multistep-'):]}"
        for s in strategies if s in cm.FC_VARIANTS))
    print(f"{unit:>6} " + " ".join(f"{s:>18}" for s in strategies))
    for p in procs:
        cells = []
        for s in strategies:
            r = next(r for r in rows if r["procs"] == p and r["strategy"] == s)
            cells.append(f"{r['iter_ms']:>9.1f} ({r['speedup']:>5.0f}x)" if r["feasible"]
                         else f"{'batch < 1':>18}")
        print(f"{p:>6} " + " ".join(cells))
    best = {}
    for p in procs:
        ok = [r for r in rows if r["procs"] == p and r["feasible"]]
        if ok:
            best[p] = min(ok, key=lambda r: r["iter_ms"])["strategy"]
    print("fastest per count: " + ", ".join(f"{p}: {s}" for p, s in best.items()))
    print(recommend(rows, unit))
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "machine": machine.get("name"),
                       "layout": args.layout, "fc_mode": args.fc_mode,
                       "per_tensor": args.per_tensor, "rows": rows}, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    if args.model is None:
        published_comparison(args)
    else:
        question(args)


if __name__ == "__main__":
    main()
