"""Exercise 1 of docs/tutorial.md: what happens when ranks post collectives in different orders?

    mpiexec -n 2 python docs/examples/exercise_order.py              # same order: fine
    mpiexec -n 2 python docs/examples/exercise_order.py --swap-on 1  # rank 1 swaps two posts

Every rank posts an allreduce of a 1000-element array and one of a
2000-element array. With --swap-on R, rank R posts them the other way round.
Plain MPI would match the first collective of one rank with the first of the
other: a hang or a silently wrong sum. The engine's negotiation round
compares a signature of each request (kind, count, dtype, op, priority)
across ranks, so every rank gets the same clear error instead.
"""
import argparse

import numpy as np
from mpi4py import MPI

from engine import ExchangeError, Exchanger


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--swap-on", type=int, default=-1, help="the rank that swaps its two posts")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    small = np.full(1000, comm.rank, np.float32)
    large = np.full(2000, comm.rank, np.float32)
    order = [small, large] if comm.rank != args.swap_on else [large, small]
    with Exchanger(comm) as ex:
        handles = [ex.allreduce_async(a, op="sum") for a in order]
        try:
            for h in handles:
                h.wait(timeout=30)
        except ExchangeError as e:
            print(f"rank {comm.rank}: ExchangeError: {e}", flush=True)
            return 1
    expected = comm.size * (comm.size - 1) / 2           # the sum of the ranks
    correct = bool((small == expected).all() and (large == expected).all())
    print(f"rank {comm.rank}: both sums correct: {correct}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
