"""PyTorch DistributedDataParallel (gloo, CPU) on the same step as bench/step.py.

    mpiexec -n 2 python -m bench.peers.ddp --model vgg16-cifar --batch-size-per-rank 32 --json
    bench/netlink --rate 1gbit -- mpiexec -n 2 python -m bench.peers.ddp --model vgg16-cifar

The same architecture (bench.torch_models.build_torch_model), per-rank batch,
rank count and threads per rank as bench/step.py, and the same fields, so the
README table gets a `ddp` row next to each strategy:

- iter_ms: forward + backward (DDP overlaps its bucketed allreduce with
  backward) + SGD step;
- compute_ms: the same step on the bare module (no communication);
- comm_ms: one blocking gloo allreduce of all gradients (one flat tensor);
- overlap_efficiency = (compute + comm - iter) / min(compute, comm).
With ``--straggler RANK:FACTOR`` that rank's modules run FACTOR times slower
(`slow_down`, torch hooks; bench/stragglers.py compares it with the strategies).
mpiexec only launches the processes (ranks come from PMI_RANK / PMI_SIZE);
all communication is gloo's TCP. Needs torch (`make torch`); without it the
script says so and exits 0 so that suites skip it.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from bench.common import step_arguments

_KEEP_ALIVE = []     # DDP wrappers, until the process exits (see below)


def parse_args(argv=None):
    p = step_arguments("python -m bench.peers.ddp", __doc__.split("\n")[0])
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb (default 25)")
    p.add_argument("--rendezvous", default=None,
                   help="file for torch.distributed's file:// rendezvous (default: per job in /tmp)")
    p.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                   help="slow RANK's layers down by FACTOR (as bench.step; see slow_down)")
    p.add_argument("--straggler-mode", default="sleep", choices=("sleep", "spin"))
    return p.parse_args(argv)


def slow_down(model, factor: float, mode: str = "sleep"):
    """Make `model`'s compute `factor` times slower (torch hooks); returns the `Straggler`.

    Forward: every leaf module is timed by a pre/post forward hook pair.
    Backward: the time between one module's gradient reaching its first
    parameter (``register_post_accumulate_grad_hook``) and the next is that
    module's backward; the delay follows it. Unlike engine/straggler.py, where
    the delay comes before the grad-ready hook, DDP's own hook on the same
    gradient may run before or after this one, so a gradient can be posted
    one layer's delay early: close, not identical.
    """
    import time

    from engine.straggler import Straggler

    straggler = Straggler.__new__(Straggler)      # its accounting, without wrapping cnn layers
    straggler.factor, straggler.mode = float(factor), mode
    straggler.compute_s = straggler.delay_s = straggler._debt = 0.0
    straggler._wrapped = []
    mark = [0.0]

    def before_forward(module, inputs):
        mark[0] = time.perf_counter()

    def after_forward(module, inputs, output):
        straggler._pay(time.perf_counter() - mark[0])
        mark[0] = time.perf_counter()      # the backward of the last module starts here

    def gradient_ready(param):
        straggler._pay(time.perf_counter() - mark[0])
        mark[0] = time.perf_counter()

    for module in model.modules():
        if next(module.children(), None) is None:
            module.register_forward_pre_hook(before_forward)
            module.register_forward_hook(after_forward)
            first = next(module.parameters(recurse=False), None)
            if first is not None:
                first.register_post_accumulate_grad_hook(gradient_ready)
    return straggler


def main(argv=None) -> int:
    run(argv)
    return 0


def run(argv=None) -> dict | None:
    """Measure and report; the JSON record on every rank (None without torch)."""
    args = parse_args(argv)
    try:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        print("bench.peers.ddp: torch is not installed (run `make torch`); skipping", file=sys.stderr)
        return None
    from bench.common import report, step_record
    from bench.torch_models import build_torch_model

    rank = int(os.environ.get("PMI_RANK", os.environ.get("RANK", 0)))
    size = int(os.environ.get("PMI_SIZE", os.environ.get("WORLD_SIZE", 1)))
    # Every rank of one mpiexec job shares the launcher's process as parent.
    path = args.rendezvous or f"/tmp/ddp-rendezvous-{os.getppid()}-{size}"
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=size)

    torch.manual_seed(0)
    model = build_torch_model(args.model)
    straggler = None
    if args.straggler is not None:
        from engine.straggler import parse_straggler
        straggler_rank, factor = parse_straggler(args.straggler, size)
        if rank == straggler_rank:
            straggler = slow_down(model, factor, args.straggler_mode)
    shape = {"digits": (1, 8, 8), "lenet": (1, 28, 28)}.get(args.model, (3, 32, 32))
    if args.model in ("vgg16", "vgga", "resnet50"):
        shape = (3, 224, 224)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch_size_per_rank, *shape, generator=gen)
    num_classes = model(x[:1]).shape[1]
    y = torch.randint(0, num_classes, (args.batch_size_per_rank,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()

    def timed(step):
        times = []
        for k in range(args.warmup + args.iters):
            dist.barrier()
            start = time.perf_counter()
            step()
            if k >= args.warmup:
                times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    bare_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def bare_step():
        bare_opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        bare_opt.step()
    compute_ms = timed(bare_step)

    flat = torch.ones(sum(p.numel() for p in model.parameters()))
    comm_ms = timed(lambda: dist.all_reduce(flat))

    # Keep `ddp` alive until destroy_process_group: letting the wrapper be
    # collected earlier made gloo abort the process at exit.
    ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    _KEEP_ALIVE.append(ddp)      # callers that run() repeatedly (bench/stragglers.py) too
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

    def ddp_step():
        opt.zero_grad(set_to_none=False)
        loss_fn(ddp(x), y).backward()
        opt.step()
    delay0 = straggler.delay_s if straggler is not None else 0.0
    iter_ms = timed(ddp_step)
    # Per timed iteration (the warmup's delay is left out in proportion).
    delay_ms = (1e3 * (straggler.delay_s - delay0) / (args.warmup + args.iters)
                if straggler is not None else 0.0)

    values = torch.tensor([iter_ms, compute_ms, comm_ms, delay_ms, -compute_ms],
                          dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)     # the slowest rank's figures
    iter_ms, compute_ms, comm_ms, delay_ms, fastest = values.tolist()
    extra = {}
    if args.straggler is not None:
        extra = {"straggler_rank": straggler_rank, "straggler_factor": factor,
                 "straggler_mode": args.straggler_mode, "compute_ms_fastest": round(-fastest, 3),
                 "straggler_delay_ms": round(delay_ms, 3)}
    result = step_record(args, "ddp", size, iter_ms, compute_ms, comm_ms, 4 * flat.numel(), None,
                         bucket_mb=args.bucket_mb, **extra)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        try:
            os.unlink(path)
        except OSError:
            pass
        report(result, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
