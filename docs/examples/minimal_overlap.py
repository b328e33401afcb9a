"""The whole idea of the engine in plain mpi4py and one Python thread.

    mpiexec -n 2 python docs/examples/minimal_overlap.py [--steps 20] [--no-thread]

A two-layer network (x -> relu(x W1) -> W2) trained by data-parallel SGD.
Backprop yields dW2 first: its allreduce is posted at once, and dW1 is
computed while it travels. Without a thread (--no-thread) nobody calls into
MPI during that computation, so the transfer mostly waits for Wait(); with
the progress thread it advances meanwhile. numpy's matrix products release
the GIL, so the two threads really run at once.
"""
import argparse
import queue
import threading
import time

import numpy as np
from mpi4py import MPI


class ProgressThread:
    """Owns the exchange's MPI calls: posts each Iallreduce and tests it until done."""

    def __init__(self, comm):
        self.comm = comm.Dup()           # our collectives never meet the caller's
        self.todo = queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def allreduce_async(self, buf):
        done = threading.Event()
        self.todo.put((buf, done))       # the buffer stays referenced until done
        return done

    def run(self):
        active = []
        while True:
            while not self.todo.empty() or not active:      # block only when idle
                buf, done = self.todo.get()
                active.append((self.comm.Iallreduce(MPI.IN_PLACE, buf), done))
            for req, done in [a for a in active if a[0].Test()]:
                done.set()
                active.remove((req, done))
            time.sleep(50e-6)            # back off: leave the cores to the compute


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-thread", action="store_true")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(0)                   # same initial weights everywhere
    w1 = rng.standard_normal((512, 1024)).astype(np.float32) * 0.03
    w2 = rng.standard_normal((1024, 1024)).astype(np.float32) * 0.03
    x = np.random.default_rng(1 + comm.rank).standard_normal((1024, 512)).astype(np.float32)
    target = np.tanh(x @ x.T / 512)                  # each rank its own samples
    engine = None if args.no_thread else ProgressThread(comm)
    start, exposed = time.perf_counter(), 0.0
    for step in range(args.steps):
        h = np.maximum(x @ w1, 0)
        err = h @ w2 - target
        loss = comm.allreduce(float((err ** 2).mean())) / comm.size
        dw2 = h.T @ err / len(x)
        wait = (engine.allreduce_async(dw2).wait if engine
                else comm.Iallreduce(MPI.IN_PLACE, dw2).Wait)
        dw1 = x.T @ ((err @ w2.T) * (h > 0)) / len(x)   # overlaps dw2's allreduce
        t0 = time.perf_counter()
        wait()                                       # what was not hidden shows here
        exposed += time.perf_counter() - t0
        comm.Allreduce(MPI.IN_PLACE, dw1)
        w2 -= 0.01 * dw2 / comm.size                  # the averaged gradient
        w1 -= 0.01 * dw1 / comm.size
        if comm.rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {loss:.5f}")
    elapsed = time.perf_counter() - start
    same = comm.allreduce(float(np.abs(w1 - comm.bcast(w1)).max()), op=MPI.MAX) == 0.0
    if comm.rank == 0:
        print(f"{'no thread' if args.no_thread else 'progress thread'}: "
              f"{1e3 * elapsed / args.steps:.1f} ms per step, of which "
              f"{1e3 * exposed / args.steps:.1f} ms waiting for dW2's allreduce; "
              f"replicas identical: {same}")


if __name__ == "__main__":
    main()
