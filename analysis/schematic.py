"""Idealised timelines of blocking, layerwise and multistep, drawn from the cost model.

    python -m analysis.schematic -o schematic.png
    python -m analysis.schematic --profile bench/results/profile_resnet20_b32.json \\
        --network bench/results/netfit_1gbit.json --ranks 8 -o mine.png

Before reading a measured trace (noisy, hundreds of chunks), a reader should
see the idea: per strategy, one lane for the compute thread and one for the
link, two iterations, every bar labelled with its layer. The schedule here is
deliberately simpler than analysis/costmodel.simulate (no negotiation round,
no chunks, no credit, one collective per layer); the collective times are the
cost model's alpha-beta-gamma formulas (docs/algorithm.md §2).

- blocking: forward, backward, one allreduce of everything, update.
- layerwise: each layer's allreduce starts when its backward ends (or when
  the link is free); its update is deferred to just before its next forward.
- multistep: each layer's reduce-scatter starts when its backward ends; after
  backprop, input side first, the rank updates its 1/P slice and posts the
  allgather, which the next forward of that layer waits for.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from analysis import costmodel as cm
from analysis.plot_trace import short_label

STRATEGIES = ("blocking", "layerwise", "multistep")
COLORS = {"forward": "tab:blue", "backward": "tab:orange", "update": "tab:olive",
          "wait": "tab:red", "allreduce": "tab:green", "reduce_scatter": "tab:purple",
          "allgather": "tab:brown"}


@dataclass
class Span:
    lane: str      # "compute" or "link"
    kind: str      # a key of COLORS
    label: str     # the layer it belongs to
    start: float   # seconds
    end: float


class _Lanes:
    """The compute thread's clock and the link's, with the spans drawn on each."""

    def __init__(self):
        self.t = 0.0
        self.link_free = 0.0
        self.spans: list[Span] = []

    def compute(self, kind: str, label: str, dt: float) -> None:
        self.spans.append(Span("compute", kind, label, self.t, self.t + dt))
        self.t += dt

    def wait_until(self, t: float, label: str) -> None:
        if t > self.t:
            self.spans.append(Span("compute", "wait", label, self.t, t))
            self.t = t

    def communicate(self, kind: str, label: str, ready: float, dt: float) -> float:
        """A collective that may start at `ready`; the link carries one at a time."""
        start = max(ready, self.link_free)
        self.link_free = start + dt
        self.spans.append(Span("link", kind, label, start, self.link_free))
        return self.link_free


def schedule(strategy: str, layers, net: cm.Network, P: int,
             iterations: int = 2) -> tuple[list[Span], float]:
    """The spans of `iterations` back-to-back iterations of one strategy, and
    the steady-state iteration time (s).

    One more iteration is scheduled than drawn: the time from the start of the
    last drawn iteration's forward to the next one's is the iteration time,
    and spans are cut where that next iteration begins.

    Parameters
    ----------
    strategy : {"blocking", "layerwise", "multistep"}
    layers : list of analysis.costmodel.LayerCost
        Per-layer compute times and gradient bytes, input side first.
    net : analysis.costmodel.Network
    P : int
        Ranks (the collective times depend on it).
    iterations : int
        Iterations drawn (>= 1).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if P < 1 or iterations < 1:
        raise ValueError(f"need P >= 1 and iterations >= 1, got P={P}, iterations={iterations}")
    lanes = _Lanes()
    ready = {l.index: 0.0 for l in layers}     # when layer l's next forward may start
    deferred: set = set()                      # layerwise: updates due before the forward
    starts = []
    for _ in range(iterations + 1):
        starts.append(lanes.t)
        for l in layers:
            lanes.wait_until(ready[l.index], l.name)
            if l.index in deferred:
                lanes.compute("update", l.name, l.update_s)
            lanes.compute("forward", l.name, l.fwd_s)
        done = {}
        for l in reversed(layers):
            lanes.compute("backward", l.name, l.bwd_s)
            if strategy == "layerwise":
                done[l.index] = lanes.communicate("allreduce", l.name, lanes.t,
                                                  cm.allreduce_time(l.grad_bytes, P, net))
            elif strategy == "multistep":
                done[l.index] = lanes.communicate("reduce_scatter", l.name, lanes.t,
                                                  cm.reduce_scatter_time(l.grad_bytes, P, net))
        if strategy == "blocking":
            total = sum(l.grad_bytes for l in layers)
            end = lanes.communicate("allreduce", "all layers", lanes.t,
                                    cm.allreduce_time(total, P, net))
            lanes.wait_until(end, "all layers")
            for l in layers:
                lanes.compute("update", l.name, l.update_s)
        elif strategy == "layerwise":
            ready = done
            deferred = {l.index for l in layers}
        else:
            for l in layers:
                lanes.wait_until(done[l.index], l.name)
                lanes.compute("update", l.name, l.update_s / P)
                ready[l.index] = lanes.communicate("allgather", l.name, lanes.t,
                                                   cm.allgather_time(l.grad_bytes, P, net))
    # the last iteration starts at its first forward (after any wait for layer 0)
    cut = next(s.start for s in lanes.spans if s.start >= starts[-1] and s.kind == "forward")
    previous = next(s.start for s in lanes.spans if s.start >= starts[-2] and s.kind == "forward")
    spans = [Span(s.lane, s.kind, s.label, s.start, min(s.end, cut))
             for s in lanes.spans if s.start < cut]
    return spans, cut - previous


def plot(results: dict, output: str, title: str) -> None:
    """One panel per strategy: the compute lane above the link lane, bars labelled by layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    end = max(s.end for spans, _ in results.values() for s in spans)
    fig, axes = plt.subplots(len(results), 1, figsize=(15, 1.6 * len(results) + 1.2),
                             sharex=True, squeeze=False)
    for ax, (strategy, (spans, iteration)) in zip(axes[:, 0], results.items()):
        for s in spans:
            row = 0 if s.lane == "compute" else 1
            width = s.end - s.start
            ax.broken_barh([(1e3 * s.start, 1e3 * width)], (row - 0.4, 0.8),
                           color=COLORS[s.kind], edgecolor="white", linewidth=0.5)
            # a label only where it fits: about 7 px per character at this size
            if width / end * 15 * 100 > 7 * len(short_label(s.label)) + 4:
                ax.text(1e3 * (s.start + width / 2), row, short_label(s.label), ha="center",
                        va="center", fontsize=6, color="white", clip_on=True)
        ax.set_yticks([0, 1])
        ax.set_yticklabels(["compute", "link"])
        ax.invert_yaxis()
        ax.set_title(f"{strategy}: {1e3 * iteration:.0f} ms per iteration (steady state)",
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time (ms)")
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
               loc="lower center", ncol=len(COLORS), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.schematic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="bench/results/profile_vgg16_b2.json",
                   help="per-layer times from python -m analysis.profile")
    p.add_argument("--network", default="bench/results/netfit_10gbit.json",
                   help="alpha-beta-gamma of the link: a bench.netfit result or bench/machines/*.json")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("-o", "--output", default="schematic.png")
    args = p.parse_args(argv)
    profile = cm.load_profile(args.profile)
    net = cm.Network.from_json(args.network)
    results = {s: schedule(s, profile.layers, net, args.ranks)
               for s in args.strategies.split(",")}
    for strategy, (_, iteration) in results.items():
        print(f"{strategy:10s} {1e3 * iteration:9.1f} ms per iteration")
    model = profile.meta.get("model", args.profile)
    link = os.path.basename(args.network)
    plot(results, args.output, f"{model}, batch {profile.batch_per_rank} per rank, "
                               f"P = {args.ranks}, link {link} (idealised, cost model)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
