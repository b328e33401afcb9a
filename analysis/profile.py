"""Per-layer profile of one training iteration: the cost model's compute input.

    python -m analysis.profile --model resnet20 --batch-size-per-rank 32 --iters 5 \\
        -o bench/results/profile_resnet20_b32.json

For each parameter layer i of ``model.layers`` (forward order) it writes the
forward, backward and SGD-update time (ms, medians over ``--iters`` iterations
after ``--warmup``), the gradient bytes (per tensor too) and the analytic
forward FLOPs of the batch.

Attribution. Times come from the model's own hooks, the ones the engine uses:
``pre_forward(i)`` fires just before layer i's forward and ``grad_ready(i)``
right after layer i's backward. The time between two consecutive hook calls
goes to one parameter layer, so the parameter-free layers (ReLU, pooling,
flatten, dropout, residual additions) are attributed to a neighbour:

- forward of layer i = pre_forward(i+1) - pre_forward(i): layer i and the
  parameter-free layers that follow it (conv -> ReLU -> pool is one unit);
  the last layer's forward ends when ``model.forward`` returns;
- backward of layer i = grad_ready(i) - grad_ready(i+1): layer i's backward
  and the backward of the parameter-free layers that follow it in forward
  order (they run just before it in backprop); the last layer's backward also
  holds the loss's forward and backward.

This is exactly what the strategies see: a gradient is ready when its hook
fires, and the next forward of layer i waits in layer i's pre-forward hook.

The update time is measured separately (cnn.optim.sgd_update on each of the
layer's parameters, momentum 0.9). The file also records the per-byte cost of
packing gradients into a flat buffer (blocking, bucketed), of the trainer's
finiteness check in the grad-ready hook, the bytes of BN running statistics
(averaged after every step), the machine and its load, and this machine's
SGEMM rate (numpy, 512^3, timed between the profiled iterations, in the
profiled thread count; the reference bench/simulate.py scales to other CPUs by.
Interleaving it makes the ratio of layer times to SGEMM time robust to the
load of a shared machine; run with --threads 1 for simulate's input).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import cnn
from cnn import models
from cnn.data import SyntheticDataset
from cnn.layers import BatchNorm2d, Conv2D, Linear
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import sgd_update
from cnn.runtime import configure

__all__ = ["forward_flops", "machine_info", "profile_model", "sgemm_gflops"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m analysis.profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=list(models.MODELS))
    p.add_argument("--batch-size-per-rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("-o", "--output", default=None, help="JSON file (default: print)")
    p.add_argument("--sgemm-only", action="store_true",
                   help="only measure this machine's single-thread SGEMM rate (best of 30 "
                        "runs, the unloaded capability) and write it to -o, e.g. "
                        "bench/machines/this_machine.json (a record; bench/simulate.py scales "
                        "by the SGEMM rate timed inside each profile)")
    return p.parse_args(argv)


def forward_flops(layer, batch: int) -> float:
    """Analytic forward FLOPs of `layer` for a batch (multiply-add = 2 FLOPs).

    Conv2D: 2 N C_out H_out W_out C_in kh kw (+ N C_out H_out W_out for a bias);
    Linear: 2 N in out (+ N out); BatchNorm2d: 4 per element (normalise, scale, shift).
    Needs the layer to have run forward once (output shape).
    """
    if isinstance(layer, Conv2D):
        n, c_out, h, w = layer._y_shape
        kh, kw = layer.kernel_size
        flops = 2.0 * n * c_out * h * w * layer.in_channels * kh * kw
        return flops + (n * c_out * h * w if layer.bias is not None else 0)
    if isinstance(layer, Linear):
        return 2.0 * batch * layer.in_features * layer.out_features + batch * layer.out_features
    if isinstance(layer, BatchNorm2d) and layer._x is not None:
        return 4.0 * layer._x.size
    return 0.0


def _kind(layer) -> str:
    return {Conv2D: "conv", Linear: "linear", BatchNorm2d: "batchnorm"}.get(type(layer),
                                                                           type(layer).__name__)


def sgemm_gflops(n: int = 1024, reps: int = 5, best: bool = False) -> float:
    """Median (or best) SGEMM rate (GFLOP/s) of numpy's BLAS, n x n float32, current threads."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / float(np.min(times) if best else np.median(times)) / 1e9


def _per_byte(fn, nbytes: int, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / nbytes


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "hostname": platform.node(),
            "python": platform.python_version(), "numpy": np.__version__,
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def profile_model(model, batch: int, iters: int = 5, warmup: int = 1) -> dict:
    """Median per-layer forward / backward / update times of `model` (see module docstring)."""
    L = len(model.layers)
    data = SyntheticDataset(batch * (iters + warmup), model.input_shape, model.num_classes, seed=1)
    loss = SoftmaxCrossEntropy()
    pre, ready = np.zeros(L), np.zeros(L)

    def on_pre_forward(i, layer):
        pre[i] = time.perf_counter()

    def on_grad_ready(i, layer):
        ready[i] = time.perf_counter()

    hooks = [model.register_pre_forward_hook(on_pre_forward),
             model.register_grad_ready_hook(on_grad_ready)]
    fwd, bwd, upd, sgemm = [], [], [], []
    momentum = {p.name: np.zeros(p.data.size, np.float32) for p in model.parameters()}
    try:
        for k in range(iters + warmup):
            x, y = data[np.arange(k * batch, (k + 1) * batch)]
            model.zero_grad()
            logits = model.forward(x, train=True)
            end_forward = time.perf_counter()
            loss.forward(logits, y)             # timed in the last layer's backward
            model.backward(loss.backward())
            update = np.zeros(L)
            for i, layer in enumerate(model.layers):
                start = time.perf_counter()
                for p in layer.params:
                    sgd_update(p.data.reshape(-1), p.grad.reshape(-1), momentum[p.name],
                               1e-6, 0.9, 0.0, False)
                update[i] = time.perf_counter() - start
            if k < warmup:
                continue
            sgemm.append(sgemm_gflops(n=512, reps=3))   # same load as this iteration
            f = np.empty(L)
            f[:-1] = pre[1:] - pre[:-1]
            f[-1] = end_forward - pre[-1]
            b = np.empty(L)
            b[-1] = ready[-1] - end_forward
            b[:-1] = ready[:-1] - ready[1:]
            fwd.append(f)
            bwd.append(b)
            upd.append(update)
    finally:
        for h in hooks:
            h.remove()
    fwd, bwd, upd = (1e3 * np.median(np.array(a), axis=0) for a in (fwd, bwd, upd))
    layers = []
    for i, layer in enumerate(model.layers):
        name = layer.params[0].name.rsplit(".", 1)[0]
        entry = {"name": name, "index": i, "kind": _kind(layer),
                 "params": int(sum(p.data.size for p in layer.params)),
                 "grad_bytes": int(sum(p.grad.nbytes for p in layer.params)),
                 "param_bytes": [int(p.grad.nbytes) for p in layer.params],
                 "fwd_ms": round(float(fwd[i]), 4), "bwd_ms": round(float(bwd[i]), 4),
                 "update_ms": round(float(upd[i]), 4),
                 "flops_fwd": forward_flops(layer, batch)}
        if isinstance(layer, Linear):
            entry["in_features"], entry["out_features"] = layer.in_features, layer.out_features
        layers.append(entry)
    return {"layers": layers, "sgemm_gflops_interleaved": round(float(np.median(sgemm)), 2)}


def main(argv=None):
    configure(progress_thread=False)
    args = parse_args(argv)
    if args.sgemm_only:
        cnn.set_num_threads(1)
        info = machine_info()
        info["sgemm_gflops_1thread_median"] = round(sgemm_gflops(reps=30), 2)
        info["sgemm_gflops_1thread"] = round(sgemm_gflops(reps=30, best=True), 2)
        info["note"] = ("numpy SGEMM 1024^3 float32, one thread; sgemm_gflops_1thread is the best "
                        "of 30 runs, and of every earlier run recorded in this file (the "
                        "machine's capability: on a shared, loaded machine a single run is low)")
        if args.output and os.path.exists(args.output):
            with open(args.output) as f:
                old = json.load(f)
            info["runs"] = old.get("runs", []) + [[info["loadavg_1min"], info["sgemm_gflops_1thread"]]]
            info["sgemm_gflops_1thread"] = max(r[1] for r in info["runs"])
        else:
            info["runs"] = [[info["loadavg_1min"], info["sgemm_gflops_1thread"]]]
        text = json.dumps(info, indent=1)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        print(text)
        return info
    cnn.set_num_threads(args.threads)
    model = models.build(args.model, seed=0)
    load_before = os.getloadavg()[0]
    result = profile_model(model, args.batch_size_per_rank, args.iters, args.warmup)
    grads = np.concatenate([p.grad.reshape(-1) for p in model.parameters()])
    flat = np.empty_like(grads)
    copy_s = _per_byte(lambda: flat.__setitem__(slice(None), grads), grads.nbytes)
    check_s = _per_byte(lambda: np.isfinite(grads.sum(dtype=np.float64)), grads.nbytes)
    bn_bytes = sum(a.nbytes for _, a in model.buffers()
                   if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim > 0)
    info = machine_info()
    info["loadavg_1min_before"] = round(load_before, 2)
    info["sgemm_gflops_1thread_after"] = round(_sgemm_one_thread(args.threads), 2)
    # the reference for scaling to another CPU: SGEMM timed between the profiled
    # iterations, so that a shared machine's load cancels out (to first order)
    info["sgemm_gflops_1thread"] = result.pop("sgemm_gflops_interleaved")
    out = {"model": args.model, "batch_per_rank": args.batch_size_per_rank,
           "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
           "machine": info, "bn_bytes": int(bn_bytes),
           "copy_s_per_byte": copy_s, "check_s_per_byte": check_s,
           "total_fwd_ms": round(sum(l["fwd_ms"] for l in result["layers"]), 3),
           "total_bwd_ms": round(sum(l["bwd_ms"] for l in result["layers"]), 3),
           "total_update_ms": round(sum(l["update_ms"] for l in result["layers"]), 3),
           "total_grad_bytes": int(sum(l["grad_bytes"] for l in result["layers"])),
           **result}
    text = json.dumps(out, indent=1)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"{args.model} b={args.batch_size_per_rank} threads={args.threads}: "
              f"fwd {out['total_fwd_ms']:.1f} ms, bwd {out['total_bwd_ms']:.1f} ms, "
              f"update {out['total_update_ms']:.1f} ms, load {info['loadavg_1min']} -> {args.output}")
    else:
        print(text)
    return out


def _sgemm_one_thread(threads: int) -> float:
    cnn.set_num_threads(1)
    try:
        return sgemm_gflops()
    finally:
        cnn.set_num_threads(threads)


if __name__ == "__main__":
    main()
