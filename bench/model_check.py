"""Predicted vs measured iteration time, per strategy and link: the cost model's check.

    python -m bench.model_check                        # resnet20, loopback + 1 and 10 Gbit/s
    python -m bench.model_check --links loopback --json
    python -m bench.model_check --model vgg16-cifar --iters 10 -o bench/results/model_check_vgg16-cifar.json

On each link the parent launches ``mpiexec -n 2 python -m bench.model_check
--worker`` (inside ``bench/netlink --rate R`` for an emulated link; that needs
root, as bench/netlink says). Each worker:

1. profiles the model on every rank at once (analysis/profile.py's attribution),
   so that the per-layer times are taken under the same sharing of the cores
   as the real run;
2. for each strategy, runs bench/step.py's measurement for real (median
   iteration time of `Trainer.step`, compute-only time, one blocking
   allreduce), keeping the fastest of ``--repeats`` runs (load from other
   jobs only ever slows a run down);
3. predicts the iteration with analysis/costmodel.py from that profile and the
   link's fitted network (bench/results/netfit_<link>.json, from bench/netfit.py).

The profile's total is rescaled to the compute-only time that bench/step.py
measures in the same runs (the fastest over all strategies and repeats: it is
the same work for each; ``compute_scale`` in the output), so the check
isolates the communication model; ``predicted_unscaled_ms`` is the prediction
from the raw profile. Target: |rel_error| <= 15 %.

Output: a table (predicted, measured, error) and, with ``--json``, a list of
{"model", "strategy", "link", "predicted_ms", "measured_ms", "rel_error", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from cnn.runtime import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGY_NAMES = ("blocking", "layerwise", "bucketed", "priority", "multistep")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.model_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size-per-rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    p.add_argument("--links", default="loopback,1gbit,10gbit",
                   help="comma-separated: loopback or a bench/netlink rate such as 1gbit")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--algorithm", default="mpi",
                   help="the exchanger's allreduce algorithm (mpi, recursive_doubling, ring, "
                        "auto: thresholds from the link's netfit file, as the model's)")
    p.add_argument("--repeats", type=int, default=5,
                   help="bench/step.py runs per strategy; the fastest is kept")
    p.add_argument("--netfit-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--mpiexec", default=os.path.join(os.path.dirname(sys.executable), "mpiexec"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per link")
    p.add_argument("--json", action="store_true", help="print the JSON list only")
    p.add_argument("-o", "--output", default=None, help="also write the JSON list here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--link", default="loopback", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# worker: runs under mpiexec, on one link
# ---------------------------------------------------------------------------

def _abort_on_error(kind, value, tb):
    """One failing rank must not leave the other waiting in a collective."""
    import traceback

    from mpi4py import MPI
    rank = MPI.COMM_WORLD.rank
    sys.stderr.write(f"model_check worker rank {rank} failed:\n"
                     + "".join(traceback.format_exception(kind, value, tb)))
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(1)


def worker(args) -> None:
    import numpy as np
    from mpi4py import MPI

    sys.excepthook = _abort_on_error
    from analysis import costmodel as cm
    from analysis.profile import profile_model
    from bench import step
    from cnn import models

    comm = MPI.COMM_WORLD
    model = models.build(args.model, seed=0)
    comm.Barrier()
    prof = profile_model(model, args.batch_size_per_rank, args.iters, args.warmup)["layers"]
    # slowest rank per layer: every collective waits for it
    def slowest(key):
        mine = np.array([l[key] for l in prof], np.float64)
        out = np.empty_like(mine)
        comm.Allreduce(mine, out, op=MPI.MAX)
        return out

    fwd, bwd, upd = slowest("fwd_ms"), slowest("bwd_ms"), slowest("update_ms")
    layers = [cm.LayerCost(l["name"], l["index"], l["kind"], l["params"], l["grad_bytes"],
                           f * 1e-3, b * 1e-3, u * 1e-3, param_bytes=tuple(l["param_bytes"]))
              for l, f, b, u in zip(prof, fwd, bwd, upd)]
    bn_bytes = sum(a.nbytes for _, a in model.buffers()
                   if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim > 0)
    grads = np.ones(sum(l.grad_bytes for l in layers) // 4, np.float32)
    flat = np.empty_like(grads)
    start = time.perf_counter()
    for _ in range(3):
        flat[:] = grads
    copy_s = (time.perf_counter() - start) / 3 / grads.nbytes
    start = time.perf_counter()
    for _ in range(3):
        np.isfinite(grads.sum(dtype=np.float64))
    check_s = (time.perf_counter() - start) / 3 / grads.nbytes
    profile = cm.Profile(layers, args.batch_size_per_rank, bn_bytes, copy_s, check_s)
    # "auto" in the engine reads the same fit the model uses
    os.environ["EXCHANGER_NETFIT"] = os.path.join(args.netfit_dir, f"netfit_{args.link}.json")
    with open(os.path.join(args.netfit_dir, f"netfit_{args.link}.json")) as f:
        net = cm.Network.from_dict(json.load(f)["network"])
    engine = cm.Engine(algorithm=args.algorithm)     # bench/step.py runs the same defaults
    profile_compute = sum(l.fwd_s + l.bwd_s + l.update_s for l in layers)
    names = args.strategies.split(",")
    _run_step(step, args, names[0])      # untimed: first-run effects (threads, page faults)
    runs, loads = {}, {}
    for name in names:
        loads[name] = os.getloadavg()[0]
        # the least disturbed of `repeats` runs: on a shared machine load only slows a run down
        runs[name] = [_run_step(step, args, name) for _ in range(args.repeats)]
    # The compute-only step is the same work for every strategy: its fastest measurement
    # over all of them is the least disturbed estimate of the compute the model starts from.
    compute_ms = min(m["compute_ms"] for ms in runs.values() for m in ms)
    comm_ms = min(m["comm_ms"] for ms in runs.values() for m in ms)
    scale = compute_ms * 1e-3 / profile_compute
    scaled = cm.scale_layers(layers, compute=scale, update=scale)
    scaled_profile = cm.Profile(scaled, profile.batch_per_rank, bn_bytes, copy_s, check_s)
    for name in names:
        measured = min(runs[name], key=lambda m: m["iter_ms"])
        load = loads[name]
        pred = cm.simulate(scaled, net, name, comm.size, engine=engine, profile=scaled_profile)
        raw = cm.simulate(layers, net, name, comm.size, engine=engine, profile=profile)
        row = {"model": args.model, "strategy": name, "algorithm": args.algorithm,
               "link": args.link, "ranks": comm.size,
               "batch_per_rank": args.batch_size_per_rank,
               "predicted_ms": round(pred.iter_s * 1e3, 3),
               "measured_ms": measured["iter_ms"],
               "rel_error": round(pred.iter_s * 1e3 / measured["iter_ms"] - 1, 4),
               "predicted_unscaled_ms": round(raw.iter_s * 1e3, 3),
               "compute_scale": round(scale, 4),
               "predicted_compute_ms": round(pred.compute_s * 1e3, 3),
               "measured_compute_ms": compute_ms,
               "predicted_comm_ms": round(pred.comm_s * 1e3, 3),
               "measured_comm_ms": comm_ms,
               "predicted_exposed_comm_ms": round(pred.exposed_comm_s * 1e3, 3),
               "measured_exposed_comm_ms": round(measured["iter_ms"] - compute_ms, 3),
               "predicted_overlap_efficiency": round(pred.overlap_efficiency, 3),
               "measured_overlap_efficiency": round(
                   (compute_ms + comm_ms - measured["iter_ms"]) / min(compute_ms, comm_ms), 3),
               "loadavg_1min": round(load, 2)}
        if comm.rank == 0:
            print("MODEL_CHECK " + json.dumps(row), flush=True)


def _run_step(step, args, name) -> dict:
    """bench/step.py's measurement, quietly (its own printing is on rank 0)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return step.main(["--model", args.model, "--strategy", name,
                          "--batch-size-per-rank", str(args.batch_size_per_rank),
                          "--iters", str(args.iters), "--warmup", str(args.warmup),
                          "--algorithm", args.algorithm, "--json"])


# ---------------------------------------------------------------------------
# parent: one worker per link, then the table
# ---------------------------------------------------------------------------

def run_link(args, link: str) -> list[dict]:
    cmd = [args.mpiexec, "-n", str(args.ranks), sys.executable, "-m", "bench.model_check",
           "--worker", "--link", link, "--model", args.model,
           "--batch-size-per-rank", str(args.batch_size_per_rank), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--strategies", args.strategies,
           "--repeats", str(args.repeats), "--algorithm", args.algorithm,
           "--netfit-dir", args.netfit_dir]
    if link != "loopback":
        cmd = [os.path.join(ROOT, "bench", "netlink"), "--rate", link, "--"] + cmd
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        sys.stderr.write(f"model_check: link {link} timed out after {args.timeout} s\n")
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                if line.startswith("MODEL_CHECK ")]
    rows = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
            if line.startswith("MODEL_CHECK ")]
    if proc.returncode != 0 or not rows:
        sys.stderr.write(f"model_check: link {link} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}\n")
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} {'link':<9} {'strategy':<10} {'predicted':>10} {'measured':>10} "
             f"{'error':>7}  {'exposed pred/meas (ms)':>24}  {'overlap eff pred/meas':>22}"]
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['link']:<9} {r['strategy']:<10} {r['predicted_ms']:>10.1f} "
            f"{r['measured_ms']:>10.1f} {100 * r['rel_error']:>6.1f}%  "
            f"{r['predicted_exposed_comm_ms']:>11.1f} /{r['measured_exposed_comm_ms']:>10.1f}  "
            f"{r['predicted_overlap_efficiency']:>10.2f} /{r['measured_overlap_efficiency']:>9.2f}")
    errors = [abs(r["rel_error"]) for r in rows]
    if errors:
        within = sum(e <= 0.15 for e in errors)
        lines.append(f"{within}/{len(errors)} within 15 %; max |error| {100 * max(errors):.1f} %; "
                     f"load {os.getloadavg()[0]:.2f}")
    return "\n".join(lines)


def main(argv=None):
    configure(progress_thread=False)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    rows = []
    for link in args.links.split(","):
        rows += run_link(args, link)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows))
    return rows


if __name__ == "__main__":
    main()
