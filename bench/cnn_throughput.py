r"""Training-step throughput of one CNN on the CPU: ours (numpy + numba) vs PyTorch.

    python -m bench.cnn_throughput --model vgg16-cifar --batch 64 --threads 2 \
        [--compare-torch] [--json] [--iters N] [--warmup N] [--rounds R]

Other flags: ``--json-out FILE`` also writes the JSON object to FILE,
``--profile`` prints where our step spends its time, per layer (and PyTorch's
top operators with ``--compare-torch``), ``--header`` prints the markdown
table header above the row.

What is timed: one full training step - ``zero_grad``, forward, softmax
cross-entropy forward and backward, model backward, SGD (momentum 0.9) update -
on a fixed random batch, after ``--warmup`` untimed steps. Each measurement is
the median over ``--iters`` steps, as images per second, in a fresh process;
``--rounds`` such processes per framework run alternately (ours, torch, ours,
...) and the median of their results is reported, so that a slow spell of a
shared machine does not land on one framework only (each round's figure is in
the JSON: ``ours_img_s_rounds``, ``torch_img_s_rounds``). PyTorch runs the same
architecture (the modules below, with the same state_dict names; parity is
checked by tests/test_torch_parity.py) with ``torch.set_num_threads(threads)``.

Core probe: with 2 or more threads, ``python -m bench.coreprobe`` runs in a
fresh process just before each round, and its figure - how much longer two
threads take on L2-resident SGEMMs at once than one thread alone, about 1.1
with two cores to themselves - is recorded beside the round
(``ours_probe_rounds``, ``torch_probe_rounds``). On the shared VM of
bench/results/ it switches between ~1.1 and ~3 every few seconds, and our
2-thread rounds follow it (see bench/coreprobe.py).

Peak memory: each framework is measured in its own fresh subprocess, and the
figure is that process's resident-set high-water mark,
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` - everything the process ever held
at once: interpreter, libraries (numba/LLVM or libtorch), weights, gradients,
momentum, activations and workspaces. The resident size after imports, before
the model is built (``*_base_mb``), is reported too, so the part that belongs to
the training step can be read off. tracemalloc would see numpy's arrays only,
not libtorch's allocator, so it cannot compare the two.

Thread settings: the child's OMP/MKL/OpenBLAS/numba thread variables are set to
``--threads`` before anything is imported, then ``cnn.set_num_threads`` (numba
and, through threadpoolctl, BLAS) or ``torch.set_num_threads``. Our process
calls ``cnn.runtime.configure(progress_thread=False)`` (the caller's own
setting wins): numba's OpenMP workers spin for a bounded ~1.4 ms after a
kernel, then sleep. Every SGEMM of our step runs single-threaded on those
workers (cnn/layers/blas.py), so OpenBLAS's own pool stays idle. PyTorch runs
everything on one OpenMP pool and keeps its defaults.

Output: without ``--json``, one markdown table row
``| model | batch | threads | ours img/s | torch img/s | ours/torch | ours peak MB | torch peak MB |``;
with ``--json``, one object with keys model, batch, threads, ours_img_s,
torch_img_s, ratio, ours_peak_mb, torch_peak_mb (the torch fields are null
without ``--compare-torch``), plus ours_base_mb, torch_base_mb, iters, warmup.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.torch_models import MODELS, build_torch_model

TABLE_HEADER = ("| model | batch | threads | ours img/s | torch img/s | ours/torch "
                "| ours peak MB | torch peak MB |\n|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------
# Measurement, one framework per fresh process
# ---------------------------------------------------------------------------


def _rss_mb():
    """Current resident set size (Linux /proc; the high-water mark elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _time_steps(step, warmup, iters):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(input_shape, num_classes, batch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    return x, rng.integers(0, num_classes, batch)


def measure_ours(args):
    from cnn.runtime import configure
    configure(progress_thread=False)      # before any kernel; this process is compute alone

    import cnn
    from cnn.losses import SoftmaxCrossEntropy
    from cnn.models import build
    from cnn.optim import SGD

    cnn.set_num_threads(args.threads)
    base = _rss_mb()
    model = build(args.model, seed=0)
    x, labels = _batch(model.input_shape, model.num_classes, args.batch)
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = SoftmaxCrossEntropy()

    def step():
        optimizer.zero_grad()
        loss.forward(model.forward(x), labels)
        model.backward(loss.backward())
        optimizer.step()

    seconds = _time_steps(step, args.warmup, args.iters)
    result = {"img_s": args.batch / seconds, "peak_mb": _peak_rss_mb(), "base_mb": base}
    if args.profile:
        result["profile"] = _profile_ours(model, step, args.iters)
    return result


def _profile_ours(model, step, iters):
    """Per-leaf forward/backward milliseconds per step, plus what is left (loss, SGD, adds)."""
    start = time.perf_counter()
    with model.profile() as timings:
        for _ in range(iters):
            step()
    total_ms = (time.perf_counter() - start) * 1e3 / iters
    kinds = dict(model.leaves())
    rows = [(name, repr(kinds[name]), fwd * 1e3 / iters, bwd * 1e3 / iters)
            for name, (fwd, bwd, _) in timings.items()]
    accounted = sum(fwd + bwd for _, _, fwd, bwd in rows)
    rows.append(("(rest: loss, SGD, residual adds, hooks)", "", total_ms - accounted, 0.0))
    return {"step_ms": total_ms, "rows": rows}


def measure_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    base = _rss_mb()
    model = build_torch_model(args.model)
    x, labels = _batch(*MODELS[args.model], args.batch)
    x, labels = torch.from_numpy(x), torch.from_numpy(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()

    seconds = _time_steps(step, args.warmup, args.iters)
    result = {"img_s": args.batch / seconds, "peak_mb": _peak_rss_mb(), "base_mb": base}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(max(1, min(args.iters, 3))):
                step()
        result["torch_profile"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                            row_limit=20)
    return result


def run_worker(framework, args, profile=False):
    """Re-run this module in a fresh process for one framework; returns its result dict."""
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               OPENBLAS_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
    command = [sys.executable, "-m", "bench.cnn_throughput", "--worker", framework,
               "--model", args.model, "--batch", str(args.batch), "--threads", threads,
               "--iters", str(args.iters), "--warmup", str(args.warmup)]
    if profile:
        command.append("--profile")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(command, check=False, env=env, cwd=root, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        sys.exit(f"cnn_throughput: the {framework} measurement failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def probe_cores(threads):
    """`bench.coreprobe` in a fresh process with `threads` numba threads: the
    2-thread slowdown figure, or None below 2 threads."""
    if threads < 2:
        return None
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run([sys.executable, "-m", "bench.coreprobe", "--value"], check=False,
                               env=env, cwd=root, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        sys.exit(f"cnn_throughput: the core probe failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_profile(model, result, out):
    profile = result["profile"]
    print(f"\n{model}: {profile['step_ms']:.1f} ms per profiled step (ours)", file=out)
    print("| layer | kind | forward ms | backward ms | % of step |\n|---|---|---|---|---|", file=out)
    for name, kind, fwd, bwd in profile["rows"]:
        share = 100 * (fwd + bwd) / profile["step_ms"]
        print(f"| {name} | {kind} | {fwd:.2f} | {bwd:.2f} | {share:.1f} |", file=out)


def table_row(record):
    """One markdown row; memory as "peak (base after imports)"."""
    def number(value, digits=1):
        return "-" if value is None else f"{value:,.{digits}f}"

    def memory(prefix):
        if record[f"{prefix}_peak_mb"] is None:
            return "-"
        return f"{record[f'{prefix}_peak_mb']:,.0f} ({record[f'{prefix}_base_mb']:,.0f} base)"

    return (f"| {record['model']} | {record['batch']} | {record['threads']} "
            f"| {number(record['ours_img_s'])} | {number(record['torch_img_s'])} "
            f"| {number(record['ratio'], 2)} | {memory('ours')} | {memory('torch')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vgg16-cifar", choices=MODELS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT, caches)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per framework, alternating (median of their medians)")
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON object to FILE")
    parser.add_argument("--profile", action="store_true", help="per-layer forward/backward times")
    parser.add_argument("--header", action="store_true", help="print the markdown table header")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.batch, args.threads, args.iters, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch, --threads, --iters and --rounds must be >= 1, --warmup >= 0")

    if args.worker:  # child process: measure and print one JSON line
        result = (measure_ours if args.worker == "ours" else measure_torch)(args)
        print(json.dumps(result))
        return

    if args.compare_torch and importlib.util.find_spec("torch") is None:
        sys.exit("cnn_throughput: --compare-torch needs PyTorch, which this interpreter "
                 f"({sys.executable}) cannot import. Run from an environment that has it, e.g. "
                 "python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy "
                 "numba threadpoolctl tqdm, then /tmp/torchvenv/bin/python -m bench.cnn_throughput ...")
    # Alternate the two frameworks, one fresh process each per round, so that
    # a slow spell of a shared machine hits both and not one of them only.
    ours_rounds, torch_rounds, ours_probes, torch_probes = [], [], [], []
    for round_index in range(args.rounds):
        profile = args.profile and round_index == 0  # the first round's profile is printed
        ours_probes.append(probe_cores(args.threads))
        ours_rounds.append(run_worker("ours", args, profile))
        if args.compare_torch:
            torch_probes.append(probe_cores(args.threads))
            torch_rounds.append(run_worker("torch", args, profile))
    ours, theirs = ours_rounds[0], (torch_rounds[0] if torch_rounds else None)
    ours_img_s = statistics.median(r["img_s"] for r in ours_rounds)
    torch_img_s = statistics.median(r["img_s"] for r in torch_rounds) if theirs else None
    record = {
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "ours_img_s": round(ours_img_s, 2),
        "torch_img_s": round(torch_img_s, 2) if theirs else None,
        "ratio": round(ours_img_s / torch_img_s, 3) if theirs else None,
        "ours_peak_mb": round(max(r["peak_mb"] for r in ours_rounds), 1),
        "torch_peak_mb": round(max(r["peak_mb"] for r in torch_rounds), 1) if theirs else None,
        "ours_base_mb": round(ours["base_mb"], 1),
        "torch_base_mb": round(theirs["base_mb"], 1) if theirs else None,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "ours_img_s_rounds": [round(r["img_s"], 2) for r in ours_rounds],
        "torch_img_s_rounds": [round(r["img_s"], 2) for r in torch_rounds] if theirs else None,
        "ours_probe_rounds": ours_probes if args.threads > 1 else None,
        "torch_probe_rounds": torch_probes if theirs and args.threads > 1 else None,
    }
    report = sys.stderr if args.json else sys.stdout
    if args.profile:
        print_profile(args.model, ours, report)
        if theirs:
            print(f"\n{args.model}: PyTorch operators, {min(args.iters, 3)} steps", file=report)
            print(theirs["torch_profile"], file=report)
    if args.json:
        print(json.dumps(record))
    else:
        if args.header:
            print(TABLE_HEADER)
        print(table_row(record))
    if args.json_out:
        directory = os.path.dirname(args.json_out)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(args.json_out, "w") as out:
            json.dump(record, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main()
