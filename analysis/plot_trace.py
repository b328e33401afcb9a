"""Draw a Chrome trace written by ``engine.train --trace`` as a timeline picture.

    python -m analysis.plot_trace trace.json -o timeline.png [--start MS] [--end MS]

One band per (rank, thread): the layers' forward (blue) and backward (orange)
on the compute thread, the waits for communication (red), and the chunks in
flight on the progress thread (green allreduce, purple reduce-scatter, brown
allgather; overlapping chunks are stacked). Wherever a compute band is busy
while the progress band is too, communication is hidden; red is exposed.
Compute and wait bars carry their layer's name where it fits (features.10 ->
f10, classifier.0 -> c0, "wait reduce-scatter layer 9" -> rs 9).
"""

from __future__ import annotations

import argparse
import json
import sys

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "wait": "tab:red",
          "allreduce": "tab:green", "reduce_scatter": "tab:purple", "allgather": "tab:brown",
          "alltoall": "tab:olive"}
THREAD_NAMES = {0: "compute", 1: "waits", 2: "progress"}


FIGURE_WIDTH_IN, DPI = 14, 120
_WAIT_WORDS = {"reduce-scatter": "rs", "allgather": "ag", "allreduce": "ar", "layer": ""}


def short_label(name: str) -> str:
    """A layer name short enough for a bar: 'features.10' -> 'f10', 'classifier.0' -> 'c0'."""
    for prefix, short in (("features.", "f"), ("classifier.", "c"), ("layer", "")):
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name


def span_label(event: dict) -> str:
    """The label drawn on a compute or wait bar ('' for the progress thread's chunks)."""
    words = event.get("name", "").split()
    if event.get("cat") in ("forward", "backward") and words:
        return short_label(words[-1])
    if event.get("cat") == "wait" and len(words) > 1:
        return " ".join(w for w in (_WAIT_WORDS.get(w, w) for w in words[1:]) if w)
    return ""


def load_spans(path):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def plot(spans, output, start_ms=None, end_ms=None, title=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if start_ms is not None or end_ms is not None:
        lo = -float("inf") if start_ms is None else start_ms * 1e3
        hi = float("inf") if end_ms is None else end_ms * 1e3
        spans = [e for e in spans if e["ts"] + e["dur"] >= lo and e["ts"] <= hi]
    if not spans:
        raise SystemExit("plot_trace: no events to draw (empty trace or time window)")
    rows = sorted({(e["pid"], e["tid"]) for e in spans})
    row_of = {r: k for k, r in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_IN, 1.0 + 0.6 * len(rows)))
    lanes_end: dict = {}
    t0 = min(e["ts"] for e in spans) if start_ms is None else start_ms * 1e3
    t1 = max(e["ts"] + e["dur"] for e in spans) if end_ms is None else end_ms * 1e3
    px_per_us = 0.85 * FIGURE_WIDTH_IN * DPI / max(t1 - t0, 1.0)
    for e in sorted(spans, key=lambda e: e["ts"]):
        row = row_of[(e["pid"], e["tid"])]
        height, offset = 0.8, 0.0
        if e["tid"] == 2:     # stack overlapping chunks in sub-lanes
            lanes = lanes_end.setdefault(row, [])
            lane = next((k for k, t in enumerate(lanes) if t <= e["ts"]), len(lanes))
            if lane == len(lanes):
                lanes.append(0.0)
            lanes[lane] = e["ts"] + e["dur"]
            height, offset = 0.8 / 4, (lane % 4) * 0.8 / 4
        compute = e["tid"] != 2       # white edges show where one layer ends and the next starts
        ax.broken_barh([(e["ts"] / 1e3, max(e["dur"], 1.0) / 1e3)],
                       (row - 0.4 + offset, height), color=COLORS.get(e.get("cat"), "grey"),
                       edgecolor="white" if compute else None, linewidth=0.4 if compute else 0)
        label = span_label(e)
        if label and e["dur"] * px_per_us > 6 * len(label) + 4:    # ~6 px a character
            ax.text((e["ts"] + e["dur"] / 2) / 1e3, row, label, ha="center", va="center",
                    fontsize=6, color="white", clip_on=True)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {pid} {THREAD_NAMES.get(tid, tid)}" for pid, tid in rows])
    ax.invert_yaxis()
    if start_ms is not None or end_ms is not None:
        ax.set_xlim(left=start_ms, right=end_ms)
    ax.set_xlabel("time (ms)")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(COLORS), fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(output, dpi=DPI)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.plot_trace", description=__doc__.split("\n")[0])
    p.add_argument("trace", help="Chrome-trace JSON from engine.train --trace")
    p.add_argument("-o", "--output", default="timeline.png")
    p.add_argument("--start", type=float, default=None, help="window start (ms)")
    p.add_argument("--end", type=float, default=None, help="window end (ms)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    plot(load_spans(args.trace), args.output, args.start, args.end, args.title or args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
