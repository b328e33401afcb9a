"""Exercise 2 of docs/tutorial.md: predict how many chunks an allreduce becomes.

    mpiexec -n 2 python docs/examples/exercise_chunks.py --elements 1000000 --chunk-bytes 1048576

Posts one float32 allreduce of --elements elements through an Exchanger with
the given chunk size and prints the engine's own counters: chunks posted and
negotiation rounds. Before running it, write down your prediction.
"""
import argparse

import numpy as np
from mpi4py import MPI

from engine import Exchanger


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--elements", type=int, default=1_000_000)
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--max-inflight", type=int, default=4)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    grad = np.ones(args.elements, np.float32)
    with Exchanger(comm, chunk_bytes=args.chunk_bytes, max_inflight=args.max_inflight) as ex:
        ex.allreduce_async(grad, op="mean").wait(timeout=60)
        stats = ex.stats()
    if comm.rank == 0:
        print(f"{args.elements} float32 = {4 * args.elements} bytes, chunk_bytes {args.chunk_bytes}: "
              f"chunks_posted {stats['chunks_posted']}, negotiation_rounds {stats['negotiation_rounds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
