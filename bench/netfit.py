"""Fit the cost model's alpha, beta, gamma (and this engine's per-chunk overhead)
on whatever link the ranks talk over.

    mpiexec -n 2 python -m bench.netfit -o bench/results/netfit_loopback.json
    bench/netlink --rate 1gbit -- mpiexec -n 2 python -m bench.netfit \\
        -o bench/results/netfit_1gbit.json

Three sweeps over message sizes (8 B ... --max-bytes), medians of timed
repetitions after one untimed one, measured by rank 0 with every rank in step:

1. ping-pong between ranks 0 and 1 (MPI Send/Recv), half the round trip,
   t(n) = alpha + n beta: alpha by least squares over the messages <= 2 KiB,
   the link's beta over those >= 256 KiB. One straight line through all sizes
   would be wrong twice: MPI switches from eager to rendezvous, and tc tbf
   lets a burst (128 KiB here) through at loopback speed;
2. gamma, the reduction time per byte, measured locally (out = a + b on
   float32, 4 MiB), since a sum at P = 2 cannot tell gamma from beta;
3. blocking MPI Allreduce (float32 sum): beta by least squares on the sizes
   >= 256 KiB, with the cost model's allreduce_time(n, P) and alpha, gamma
   fixed. This is the beta written to "network" (what collectives see); it
   differs from the ping-pong one where both directions share one medium:
   bench/netlink shapes loopback with a single tbf qdisc, so the two ranks'
   simultaneous sends share 1 rate and beta comes out about twice the
   ping-pong's;
4. the engine's allreduce (Exchanger.allreduce_async + wait, default
   chunk_bytes 1 MiB and credit 4), simulated by costmodel.Channel: the
   progress thread's poll delay (poll_s, paid per negotiation round and per
   completion), an overhead per posted chunk (chunk_overhead_s) and per byte
   of a posted chunk (chunk_beta: non-blocking transfers advance only at the
   thread's polls) are fitted;
5. interference: SGEMM blocks on the main thread, alone and with small
   allreduces posted between them; the compute time lost per request is
   request_cpu_s (large here, where 2 ranks and their progress threads share
   2 cores with whatever else runs; 0 on a node whose engine thread owns a core).

6. auto's calibration: the engine's own allreduce algorithms ("mpi",
   "recursive_doubling", "ring"), timed through one Exchanger at the
   engine's default chunk (post + wait, float32 mean), over 4 KiB ..
   --algorithms-max-bytes in factors of 2; each repetition runs the three
   in an order shuffled per repetition, and a time is the median, over
   repetitions, of the slowest rank's. Written under "algorithms" (a list, one entry per P and
   chunk_bytes, with the thresholds it gives; --algorithms-chunk-bytes
   calibrates another chunk); Exchanger(algorithm="auto")
   takes its thresholds from it (costmodel.measured_auto_thresholds).
   ``--only-algorithms`` runs this sweep alone and merges it into the
   existing -o file (replacing the entry for the same P and chunk):

       bench/netlink --rate 1gbit -- mpiexec -n 2 python -m bench.netfit \\
           --only-algorithms -o bench/results/netfit_1gbit.json

Each fit is linear least squares on relative errors (each point weighted by
1/t), with the parameters clipped at zero. The JSON holds the fitted "network" (the
fields of costmodel.Network), the raw sweeps and the fit residuals.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
from mpi4py import MPI

from analysis import costmodel as cm
from bench.common import shuffled
from cnn.runtime import configure
from engine.exchanger import Exchanger


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.netfit", description=__doc__.split("\n")[0])
    p.add_argument("--max-bytes", type=int, default=8 << 20)
    p.add_argument("--budget-s", type=float, default=0.5,
                   help="approximate seconds of repetitions per size and sweep")
    p.add_argument("--link", default=os.environ.get("NETLINK_RATE", "loopback"))
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--algorithms-max-bytes", type=int, default=64 << 20,
                   help="largest request of auto's calibration sweep (6.)")
    p.add_argument("--algorithms-budget-s", type=float, default=1.5,
                   help="approximate seconds of repetitions per size of sweep 6 (3 algorithms)")
    p.add_argument("--algorithms-chunk-bytes", type=int, default=cm.Engine().chunk_bytes,
                   help="the Exchanger's chunk_bytes in sweep 6 (auto is calibrated per chunk; "
                        "default the engine's)")
    p.add_argument("--only-algorithms", action="store_true",
                   help="run only sweep 6 and merge it into the existing -o file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: sizes up to 256 KiB, short budgets")
    args = p.parse_args(argv)
    if args.quick:
        args.max_bytes = min(args.max_bytes, 256 << 10)
        args.algorithms_max_bytes = min(args.algorithms_max_bytes, 256 << 10)
        args.budget_s = min(args.budget_s, 0.05)
        args.algorithms_budget_s = min(args.algorithms_budget_s, 0.05)
    return args


ALGORITHM_SIZES_FROM = 4 << 10
ALGORITHM_MIN_REPS = 5
FIXED_ALGORITHMS = ("mpi", "recursive_doubling", "ring")


SMALL_BYTES = 2048          # latency-bound: alpha
LARGE_BYTES = 256 << 10     # bandwidth-bound: beta (past tbf's burst and MPI's eager limit)


def sizes(max_bytes: int) -> list[int]:
    out, n = [], 8
    while n <= max_bytes:
        out.append(n)
        n *= 4
    return out


def timed(fn, comm, budget_s: float) -> float:
    """Median seconds of fn() (every rank calls it), reps chosen from a first call."""
    comm.Barrier()
    start = time.perf_counter()
    fn()
    first = comm.bcast(time.perf_counter() - start, root=0)
    reps = int(min(50, max(3, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return comm.bcast(float(np.median(times)), root=0)


def ping_pong(comm, n: int, budget_s: float) -> float:
    buf = np.zeros(max(1, n // 4), np.float32)
    rank = comm.rank

    def once():
        if rank == 0:
            comm.Send(buf, dest=1)
            comm.Recv(buf, source=1)
        elif rank == 1:
            comm.Recv(buf, source=0)
            comm.Send(buf, dest=0)

    return timed(once, comm, budget_s) / 2


def weighted_lstsq(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """argmin_x sum(((a x - t) / t)^2), then clipped at 0 (refit without clipped columns)."""
    w = 1.0 / t
    keep = np.ones(a.shape[1], bool)
    for _ in range(a.shape[1]):
        x = np.zeros(a.shape[1])
        x[keep] = np.linalg.lstsq(a[:, keep] * w[:, None], t * w, rcond=None)[0]
        if (x[keep] >= 0).all():
            return x
        keep &= x > 0
    return np.zeros(a.shape[1])


def _fit_offsets(cols: np.ndarray, measured: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """argmin_x sum(((zero + cols x - measured) / measured)^2), x clipped at 0."""
    w = 1.0 / measured
    keep = np.ones(cols.shape[1], bool)
    for _ in range(cols.shape[1]):
        x = np.zeros(cols.shape[1])
        x[keep] = np.linalg.lstsq(cols[:, keep] * w[:, None], (measured - zero) * w,
                                  rcond=None)[0]
        if (x[keep] >= 0).all():
            return x
        keep &= x > 0
    return np.zeros(cols.shape[1])


def interference(comm, budget_s: float, blocks: int = 40, per_block: int = 4) -> float:
    """Compute-thread seconds lost per request posted while computing.

    The main thread runs `blocks` SGEMM blocks (~2 ms each); in the loaded
    run it posts `per_block` small allreduces (64 KiB) after each block, as a
    strategy does from its hooks, and waits for all of them at the end. The
    extra compute time, over the requests posted, is ``request_cpu_s``.
    """
    import cnn

    cnn.set_num_threads(1)
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    n = max(1, int(2e-3 * 2 * 256 ** 3 / 1e9 * 30))     # matmuls for ~2 ms at ~30 GFLOP/s
    bufs = [np.ones(16384, np.float32) for _ in range(blocks * per_block)]

    def compute_only():
        for _ in range(blocks):
            for _ in range(n):
                a @ a

    with Exchanger(comm) as ex:        # the engine's defaults, as in training
        def with_requests():
            handles = []
            for b in range(blocks):
                for _ in range(n):
                    a @ a
                handles += [ex.allreduce_async(bufs[b * per_block + k], op="sum")
                            for k in range(per_block)]
            busy = time.perf_counter()
            for h in handles:
                h.wait()
            return busy

        base, loaded = [], []
        for _ in range(max(3, int(budget_s * 4))):
            comm.Barrier()
            start = time.perf_counter()
            compute_only()
            base.append(time.perf_counter() - start)
            comm.Barrier()
            start = time.perf_counter()
            loaded.append(with_requests() - start)
    extra = float(np.median(loaded) - np.median(base))
    extra = comm.allreduce(extra, op=MPI.MAX)
    return max(0.0, extra / (blocks * per_block))


def algorithm_sweep(comm, max_bytes: int, budget_s: float, engine: cm.Engine) -> dict:
    """Sweep 6: seconds per allreduce of each of the engine's algorithms, by request size.

    Returns the "algorithms" entry of the netfit JSON for this P and chunk:
    ranks, chunk_bytes, max_inflight, sizes (m,), median_s {algorithm: (m,)},
    the tie tolerance and the thresholds they give.
    """
    sizes_, n = [], ALGORITHM_SIZES_FROM
    while n <= max_bytes:
        sizes_.append(n)
        n *= 2
    medians = {a: [] for a in FIXED_ALGORITHMS}
    with Exchanger(comm, chunk_bytes=engine.chunk_bytes, max_inflight=engine.max_inflight) as ex:
        def once(buf, algorithm):
            comm.Barrier()
            start = time.perf_counter()
            # "mean", as training and bench/algorithms.py use: its division is part of the cost
            ex.allreduce_async(buf, op="mean", algorithm=algorithm).wait()
            return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)

        for n in sizes_:
            buf = np.ones(n // 4, np.float32)
            first = sum(once(buf, a) for a in FIXED_ALGORITHMS)    # also warms every path up
            reps = comm.bcast(int(min(200, max(ALGORITHM_MIN_REPS, budget_s / first))), root=0)
            samples = {a: [] for a in FIXED_ALGORITHMS}
            for rep in range(reps):     # shuffled: drift and link state hit all three alike
                for a in shuffled(FIXED_ALGORITHMS, rep):
                    samples[a].append(once(buf, a))
            for a in FIXED_ALGORITHMS:
                medians[a].append(float(np.median(samples[a])))
    auto = cm.measured_auto_thresholds(sizes_, medians)
    return {"ranks": comm.size, "chunk_bytes": engine.chunk_bytes,
            "max_inflight": engine.max_inflight, "sizes": sizes_, "median_s": medians,
            "tie": cm.MEASURED_TIE, "thresholds": auto.spec()}


def merge_sweep(result: dict, sweep: dict) -> dict:
    """`result` with `sweep` in its "algorithms" list, replacing one for the same P and chunk."""
    kept = [s for s in result.get("algorithms") or []
            if (s.get("ranks"), s.get("chunk_bytes")) != (sweep["ranks"], sweep["chunk_bytes"])]
    return {**result, "algorithms": sorted(kept + [sweep],
                                           key=lambda s: (s["ranks"], s["chunk_bytes"]))}


def print_sweep(sweep: dict) -> None:
    print(f"algorithms at P={sweep['ranks']}, chunk {sweep['chunk_bytes']} B "
          f"(median of the slowest rank, us): {sweep['thresholds']}")
    for i, n in enumerate(sweep["sizes"]):
        t = {a: sweep["median_s"][a][i] for a in FIXED_ALGORITHMS}
        print(f"  {n:>9} B  " + "  ".join(f"{a} {1e6 * t[a]:10.1f}" for a in FIXED_ALGORITHMS))


def only_algorithms(comm, args) -> dict:
    """--only-algorithms: sweep 6, merged into the -o file (created if missing)."""
    if not args.output:
        raise SystemExit("--only-algorithms needs -o FILE (the netfit JSON to merge into)")
    sweep = algorithm_sweep(comm, args.algorithms_max_bytes, args.algorithms_budget_s,
                            cm.Engine(chunk_bytes=args.algorithms_chunk_bytes))
    result = {}
    if comm.rank == 0:
        if os.path.exists(args.output):
            with open(args.output) as f:
                result = json.load(f)
        result = merge_sweep(result, sweep)
        with open(args.output, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        print_sweep(sweep)
    return result


def main(argv=None):
    configure(progress_thread=True)
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    P = comm.size
    if P < 2:
        raise SystemExit("bench.netfit needs at least 2 ranks (mpiexec -n 2 ...)")
    if args.only_algorithms:
        return only_algorithms(comm, args)
    load = os.getloadavg()[0]
    ns = sizes(args.max_bytes)

    # 1. ping-pong: alpha from the small messages, the link's beta from the large ones
    pp = np.array([ping_pong(comm, n, args.budget_s) for n in ns])
    nsa = np.array(ns, float)
    small, large = nsa <= SMALL_BYTES, nsa >= LARGE_BYTES
    alpha = float(weighted_lstsq(np.ones((small.sum(), 1)), pp[small])[0])
    beta_p2p = float(weighted_lstsq(nsa[large, None], pp[large] - alpha)[0])

    # 2. gamma: the local reduction itself (out = a + b, per byte of the vector)
    a = np.ones(LARGE_BYTES // 4 * 16, np.float32)
    b, out = a.copy(), np.empty_like(a)
    gamma_local = timed(lambda: np.add(a, b, out=out), comm, args.budget_s) / a.nbytes

    # 3. MPI allreduce: the beta the collectives see, given alpha and gamma
    ar = []
    for n in ns:
        buf = np.ones(max(1, n // 4), np.float32)
        res = np.empty_like(buf)
        ar.append(timed(lambda buf=buf, res=res: comm.Allreduce(buf, res, op=MPI.SUM), comm,
                        args.budget_s))
    ar_t = np.array(ar)
    unit_beta = cm.Network(alpha=0.0, beta=1.0, gamma=0.0)
    base = cm.Network(alpha=alpha, beta=0.0, gamma=gamma_local)
    col = np.array([cm.allreduce_time(n, P, unit_beta) for n in ns])
    rest = np.array([cm.allreduce_time(n, P, base) for n in ns])
    beta = float(weighted_lstsq(col[large, None], ar_t[large] - rest[large])[0])
    gamma = gamma_local
    # also: a joint fit of all three on the allreduce sweep alone (for comparison)
    joint = weighted_lstsq(np.array([[cm.allreduce_time(n, P, cm.Network(1.0, 0.0, 0.0)),
                                      cm.allreduce_time(n, P, cm.Network(0.0, 1.0, 0.0)),
                                      cm.allreduce_time(n, P, cm.Network(0.0, 0.0, 1.0))]
                                     for n in ns]), ar_t)

    # 4. the engine: its poll delay and per-chunk overhead beyond the collectives
    engine = cm.Engine()
    ex_t = []
    with Exchanger(comm, chunk_bytes=engine.chunk_bytes, max_inflight=engine.max_inflight) as ex:
        for n in ns:
            buf = np.ones(max(1, n // 4), np.float32)
            ex_t.append(timed(lambda buf=buf: ex.allreduce_async(buf, op="sum").wait(), comm,
                              args.budget_s))
    ex_arr = np.array(ex_t)

    def engine_time(n, poll_s, overhead_s, chunk_beta=0.0):
        net = cm.Network(alpha=alpha, beta=beta, gamma=gamma, poll_s=poll_s,
                         chunk_overhead_s=overhead_s, chunk_beta=chunk_beta)
        return cm.blocking_comm_time([cm.LayerCost("x", 0, "x", n // 4, n, 0.0, 0.0, 0.0)],
                                     net, P, engine)

    # the model is linear in (poll_s, chunk_overhead_s, chunk_beta): columns by finite differences
    zero = np.array([engine_time(n, 0.0, 0.0) for n in ns])
    cols = np.array([[(engine_time(n, 1e-6, 0.0) - z) / 1e-6, (engine_time(n, 0.0, 1e-6) - z) / 1e-6,
                      (engine_time(n, 0.0, 0.0, 1e-12) - z) / 1e-12]
                     for n, z in zip(ns, zero)])
    poll_s, overhead, chunk_beta = _fit_offsets(cols, ex_arr, zero)
    # 5. interference: compute slowed down by the engine's thread (no core of its own)
    request_cpu = interference(comm, args.budget_s)
    # 6. auto's calibration: the engine's algorithms timed against each other
    algorithms = algorithm_sweep(comm, args.algorithms_max_bytes, args.algorithms_budget_s,
                                 replace(engine, chunk_bytes=args.algorithms_chunk_bytes))
    net = cm.Network(alpha=float(alpha), beta=float(beta), gamma=gamma, poll_s=float(poll_s),
                     chunk_overhead_s=float(overhead), chunk_beta=float(chunk_beta),
                     request_cpu_s=float(request_cpu))

    def predicted(kind, n):
        if kind == "pingpong":
            return alpha + n * beta_p2p
        if kind == "allreduce":
            return cm.allreduce_time(n, P, net)
        return engine_time(n, net.poll_s, net.chunk_overhead_s, net.chunk_beta)

    sweep = [{"bytes": n, "pingpong_s": a, "allreduce_s": b, "exchanger_allreduce_s": c,
              "model_pingpong_s": predicted("pingpong", n),
              "model_allreduce_s": predicted("allreduce", n),
              "model_exchanger_s": predicted("exchanger", n)}
             for n, a, b, c in zip(ns, pp, ar, ex_t)]
    result = {
        "link": args.link, "ranks": P, "loadavg_1min": round(load, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "network": {k: getattr(net, k) for k in ("alpha", "beta", "gamma", "chunk_overhead_s",
                                                  "chunk_beta", "request_cpu_s", "poll_s",
                                                  "allreduce_short_bytes",
                                                  "reduce_scatter_long_bytes",
                                                  "allgather_short_bytes", "allreduce_large")},
        "bandwidth_GBps": round(1e-9 / beta, 4) if beta > 0 else None,
        "pingpong_beta": beta_p2p,
        "pingpong_bandwidth_GBps": round(1e-9 / beta_p2p, 4) if beta_p2p > 0 else None,
        "joint_allreduce_fit": {"alpha": joint[0], "beta": joint[1], "gamma": joint[2]},
        "sweep": sweep,
    }
    if comm.rank == 0:
        if args.output and os.path.exists(args.output):     # keep sweeps for other P / chunks
            with open(args.output) as f:
                result["algorithms"] = json.load(f).get("algorithms") or []
        result = merge_sweep(result, algorithms)
        text = json.dumps(result, indent=1)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        print(f"{args.link}: alpha {alpha * 1e6:.2f} us, beta {beta * 1e9:.4f} ns/B "
              f"({result['bandwidth_GBps']} GB/s; ping-pong {beta_p2p * 1e9:.4f} ns/B), "
              f"gamma {gamma * 1e9:.4f} ns/B, "
              f"poll {poll_s * 1e6:.1f} us, chunk overhead {overhead * 1e6:.1f} us + "
              f"{chunk_beta * 1e9:.3f} ns/B, "
              f"request cpu {request_cpu * 1e6:.1f} us  (load {load:.2f})")
        for s in sweep:
            print(f"  {s['bytes']:>9} B  pingpong {1e6 * s['pingpong_s']:10.1f} us "
                  f"(model {1e6 * s['model_pingpong_s']:10.1f})  allreduce "
                  f"{1e6 * s['allreduce_s']:10.1f} (model {1e6 * s['model_allreduce_s']:10.1f})  "
                  f"engine {1e6 * s['exchanger_allreduce_s']:10.1f} "
                  f"(model {1e6 * s['model_exchanger_s']:10.1f})")
        print_sweep(algorithms)
    return result


if __name__ == "__main__":
    main()
