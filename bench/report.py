"""Turn the JSON results in bench/results/ into tables, plots and the README's
performance section.

    python -m bench.report            # after bench/suite.sh (make bench)

Reads overlap_*.json (bench.overlap), step_*.json (bench.step),
throughput_*.json (bench.cnn_throughput); writes bench/results/summary.md,
bench/results/overlap.png, bench/results/step.png, and replaces the text
between the `<!-- bench:begin -->` and `<!-- bench:end -->` markers of
README.md with the summary. Nothing is measured here.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.profile import machine_info  # noqa: E402
from bench.common import size_label  # noqa: E402

RESULTS = "bench/results"
STRATEGIES = ["blocking", "layerwise", "bucketed", "priority", "multistep", "lazy", "ddp", "mpi4py"]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(pattern):
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            data = json.load(f)
        out.extend(data if isinstance(data, list) else [data])
    return out


def link_key(link):
    return {"loopback": 0}.get(link, 1) * 1e12 + (_rate(link) or 0)


def _rate(link):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", link or "")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] if m else None


def machine():
    info = machine_info()
    return (f"{info['cpu'] or 'unknown CPU'}, {info['cores']} cores, Linux {platform.release()}, "
            f"Python {info['python']}")


def overlap_section(rows, headline=False):
    """The overlap table; `headline` keeps the emulated links' 1 MiB and larger rows (README)."""
    if not rows:
        return []
    all_rows = rows
    if headline:
        rows = [r for r in rows if r.get("link") != "loopback" and r["bytes"] >= 1 << 20]
    lines = ["### Engine overlap (bench/overlap.py, 2 ranks, float32 allreduce)", "",
             "`mpiexec -n 2 python -m bench.overlap` (loopback) and "
             "`bench/netlink --rate 1gbit -- mpiexec -n 2 python -m bench.overlap` (emulated link).", "",
             "| link | impl | size | t_pure ms | t_compute ms | t_overall ms | overlap % "
             "| thread CPU ms/op |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (link_key(r.get("link")), r["bytes"], r["impl"])):
        lines.append(f"| {r.get('link', '?')} | {r['impl']} | {size_label(r['bytes'])} | "
                     f"{r['t_pure_ms']:.2f} | {r['t_compute_ms']:.2f} | {r['t_overall_ms']:.2f} | "
                     f"{r['overlap_pct']:.1f} | {r.get('progress_cpu_ms_per_op', 0):.2f} |")
    fig, ax = plt.subplots(figsize=(7, 4))
    series = sorted({(r.get("link"), r["impl"]) for r in all_rows},
                    key=lambda k: (link_key(k[0]), k[1]))
    for link, impl in series:
        pts = sorted((r["bytes"], r["overlap_pct"]) for r in all_rows
                     if r.get("link") == link and r["impl"] == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if impl == "engine" else "--", label=f"{impl}, {link}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("overlap %")
    ax.set_ylim(0, 105)
    ax.axhline(90, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Communication hidden behind a compute loop (2 ranks)")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "overlap.png"), dpi=110)
    plt.close(fig)
    note = (["", "Emulated links, 1 MiB and larger; every size and loopback in "
             "`bench/results/summary.md`."] if headline else [])
    return lines + note + ["", "![overlap](bench/results/overlap.png)", ""]


def step_section(rows):
    if not rows:
        return []
    lines = ["### One training step per strategy (bench/step.py, 2 ranks, 1 compute thread each)", "",
             "`mpiexec -n 2 python -m bench.step --model M --strategy S --batch-size-per-rank 32` "
             "(inside `bench/netlink --rate 1gbit --` for the emulated link). "
             "Overlap efficiency = (compute + comm - iter) / min(compute, comm): "
             "0 none, 1 the physical limit.", "",
             "| model | link | strategy | iter ms | compute ms | comm ms | exposed comm ms | "
             "overlap eff. | MB posted/iter | thread CPU s/iter |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {s: i for i, s in enumerate(STRATEGIES)}
    rows = sorted(rows, key=lambda r: (r["model"], link_key(r.get("link")),
                                       order.get(r["strategy"], 99)))
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('link', '?')} | {r['strategy']} | {r['iter_ms']:.1f} | "
                     f"{r['compute_ms']:.1f} | {r['comm_ms']:.1f} | {r['exposed_comm_ms']:.1f} | "
                     f"{r['overlap_efficiency']:.2f} | {r['bytes_per_iter'] / 1e6:.1f} | "
                     f"{'n/a' if r['progress_cpu_s'] is None else format(r['progress_cpu_s'], '.3f')} |")
    groups = sorted({(r["model"], r.get("link")) for r in rows}, key=lambda g: (g[0], link_key(g[1])))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, (model, link) in zip(axes[0], groups):
        sub = [r for r in rows if r["model"] == model and r.get("link") == link]
        ax.bar([r["strategy"] for r in sub], [r["iter_ms"] for r in sub], color="tab:blue")
        ax.axhline(sub[0]["compute_ms"], color="tab:green", lw=1, label="compute only")
        ax.axhline(sub[0]["compute_ms"] + sub[0]["comm_ms"], color="tab:red", lw=1,
                   label="compute + blocking allreduce")
        ax.set_title(f"{model}, {link}", fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.set_ylabel("ms / iteration")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "step.png"), dpi=110)
    plt.close(fig)
    return lines + ["", "![step](bench/results/step.png)", ""]


def throughput_section(rows):
    if not rows:
        return []
    lines = ["### CNN throughput vs PyTorch (bench/cnn_throughput.py)", "",
             "`python -m bench.cnn_throughput --model M --batch 64 --threads T --compare-torch`: "
             "one training step (forward, backward, SGD) timed after warm-up, median over the "
             "steps of one fresh process; the two frameworks alternate for `--rounds` processes "
             "each and the table gives the median round (every round in the next column; at 2 "
             "threads, the core probe taken before each round in the last: ~1.1 when the two "
             "threads had two cores to themselves, ~3 when they slowed each other down, see "
             "`bench/coreprobe.py`).", "",
             "| model | batch | threads | ours img/s | PyTorch img/s | ratio | ours peak MB "
             "| PyTorch peak MB | rounds, ours / PyTorch img/s | core probe, ours / PyTorch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    def rounds(values, spec=".0f"):
        return "n/a" if not values else ", ".join(format(v, spec) for v in values)
    for r in sorted(rows, key=lambda r: (r["model"], r["threads"])):
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {fmt(r['ours_img_s'], '.1f')} | "
                     f"{fmt(r.get('torch_img_s'), '.1f')} | {fmt(r.get('ratio'), '.3f')} | "
                     f"{fmt(r.get('ours_peak_mb'), '.0f')} | {fmt(r.get('torch_peak_mb'), '.0f')} | "
                     f"{rounds(r.get('ours_img_s_rounds'))} / {rounds(r.get('torch_img_s_rounds'))} | "
                     f"{rounds(r.get('ours_probe_rounds'), '.2f')} / "
                     f"{rounds(r.get('torch_probe_rounds'), '.2f')} |")
    return lines + [""]


def timeline_section():
    pictures = sorted(glob.glob(os.path.join(RESULTS, "timeline_*_*.png")),
                      key=lambda p: (link_key(p.rsplit("_", 1)[1][:-4]), p))
    if not pictures:
        return []
    lines = ["### Timelines (engine/trace.py, analysis/plot_trace.py)", "",
             "Three iterations of vgg16-cifar (global batch 64, 2 ranks) traced with `--trace` and "
             "drawn with `python -m analysis.plot_trace`: per rank, forward and backward of each layer "
             "(labelled where the bar is wide enough), waits, and each chunk on the progress thread "
             "from post to completion. At 1 Gbit/s the step is communication-bound, at 10 Gbit/s "
             "compute-bound. Open `bench/results/trace_*.json` in Perfetto for the details.", ""]
    for path in pictures:
        name = os.path.basename(path)[len("timeline_"):-4]
        strategy, link = name.rsplit("_", 1)
        lines += [f"**{strategy}, {link}**", "", f"![{name}](bench/results/{os.path.basename(path)})", ""]
    return lines


def model_check_section(rows):
    if not rows:
        return []
    lines = ["### Cost model: predicted vs measured iteration time (bench/model_check.py, 2 ranks)", "",
             "`python -m bench.model_check --json` (it runs each strategy for real on each link and "
             "predicts it with `analysis/costmodel.py` from the profiled layers and the fitted "
             "alpha-beta-gamma of `bench/netfit.py`).", "",
             "| model | link | strategy | predicted ms | measured ms | error |",
             "|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], link_key(r.get("link")), r["strategy"])):
        lines.append(f"| {r['model']} | {r['link']} | {r['strategy']} | {r['predicted_ms']:.1f} | "
                     f"{r['measured_ms']:.1f} | {100 * r['rel_error']:+.1f} % |")
    worst = max(abs(r["rel_error"]) for r in rows)
    within = sum(abs(r["rel_error"]) <= 0.15 for r in rows)
    return lines + ["", f"{within} of {len(rows)} predictions within 15 %; worst {100 * worst:.1f} %.", ""]


def simulate_section():
    path = os.path.join(RESULTS, "simulate_cori.json")
    if not os.path.exists(path):
        return []
    lines = ["### Strong scaling beyond this machine (bench/simulate.py, cost model)", "",
             "`python -m bench.simulate` simulates ImageNet training on Cori Phase-I and on a 100 Gbit/s "
             "InfiniBand cluster from the per-layer profile of this machine (scaled to a Haswell core) "
             "and published network parameters. Published points are marked; "
             "`bench/results/simulate_notes.md` explains where the model agrees and why not elsewhere; "
             "full tables in `bench/results/simulate_cori.md` and `simulate_ib100.md`.", "",
             "![scaling](bench/results/simulate_cori.png)", ""]
    return lines


def ensemble_section(rows):
    """Shared vs separate pipeline; the sound measurements (medians of rounds,
    with CPU factors) replace the earlier single-round rows once there are any."""
    rows = [r for r in rows if "img_s_per_member" in r]
    sound = [r for r in rows if "cpu_factor" in r]
    if sound:
        return ensemble_factor_section(sound)
    if not rows:
        return []
    r0 = rows[0]
    lines = ["### Ensemble training: shared vs separate data pipeline (bench/ensemble.py)", "",
             f"`python -m bench.ensemble`: K members of {r0['model']}, one rank each, one epoch "
             f"of {r0['iters']} steps of {r0['batch_size']} CIFAR-shaped images (zlib decode, "
             "random crop + flip, normalisation); CPU seconds of all ranks and of the pipeline "
             "alone (docs/ensemble.md).", "",
             "| members | pipeline | CPU s | pipeline CPU s | wall s / epoch | img/s per member |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["members"], r["pipeline"] != "shared")):
        lines.append(f"| {r['members']} | {r['pipeline']} | {r['cpu_s']:.2f} | "
                     f"{r['pipeline_cpu_s']:.3f} | {r['wall_s']:.2f} | "
                     f"{r['img_s_per_member']:.1f} |")
    lines.append("")
    if os.path.exists(os.path.join(RESULTS, "ensemble.png")):
        lines += ["![ensemble](bench/results/ensemble.png)", ""]
    return lines


def ensemble_factor_section(rows):
    """One row per model and K: each pipeline's CPU and img/s, its factor and the bound."""
    r0 = rows[0]
    ones = [p for p in ("shared", "distributed") if any(r["pipeline"] == p for r in rows)]
    lines = ["### Ensemble training: one data pipeline vs one per member (bench/ensemble.py)", "",
             f"`python -m bench.ensemble [--model M]`: K members, one rank each, "
             f"{r0['timed_iters']} timed steps of {r0['batch_size']} CIFAR-shaped images (zlib "
             "decode, random crop + flip, normalisation), median of "
             f"{r0['rounds']} rounds. shared: rank 0 makes every batch; distributed: every rank "
             "makes B/P samples of it; separate: every member makes its own. p/t: the "
             "pipeline's CPU per image over the training's; the CPU factor (separate / one "
             "pipeline) is bounded by K(p+t)/(p+Kt) (docs/ensemble.md).", "",
             "| model | K | pipeline rank | p/t | CPU s "
             + " | ".join(ones) + " | separate | CPU factor "
             + " | ".join(f"{p} (bound)" if i == 0 else p for i, p in enumerate(ones))
             + " | img/s per member " + " | ".join(ones) + " | separate |",
             "|---|---:|---|---:|" + "---:|" * (3 * len(ones) + 2)]
    # A --pipeline-rank run (its shared jobs have one more rank) is its own set.
    keys = sorted({(r["model"], r["members"], r.get("pipeline_rank_run", False)) for r in rows})
    for model, k, rank_run in keys:
        runs = {r["pipeline"]: r for r in rows if r["model"] == model and r["members"] == k
                and r.get("pipeline_rank_run", False) == rank_run}
        if "separate" not in runs or not set(ones) & set(runs):
            continue
        separate = runs["separate"]

        def cell(p, key, fmt, runs=runs):
            return format(runs[p][key], fmt) if p in runs else "-"
        factors = [cell(p, "cpu_factor", ".2f") for p in ones]
        factors[0] += f" ({separate['cpu_factor_bound']:.2f})"
        lines.append(f"| {model} | {k} | {'yes' if rank_run else 'no'} | "
                     f"{separate['p_over_t']:.3f} | "
                     + " | ".join(cell(p, "cpu_s", ".2f") for p in ones)
                     + f" | {separate['cpu_s']:.2f} | " + " | ".join(factors) + " | "
                     + " | ".join(cell(p, "img_s_per_member", ".1f") for p in ones)
                     + f" | {separate['img_s_per_member']:.1f} |")
    lines.append("")
    for model in sorted({m for m, _, _ in keys}):
        if os.path.exists(os.path.join(RESULTS, f"ensemble_{model}.png")):
            lines += [f"![ensemble {model}](bench/results/ensemble_{model}.png)", ""]
    return lines


def stragglers_section(rows, headline=False):
    """The straggler table; `headline` keeps the largest factor's rows (README)."""
    rows = [r for r in rows if "hidden_fraction" in r]
    if not rows:
        return []
    note = ""
    if headline:
        worst = max(r["straggler_factor"] for r in rows)
        rows = [r for r in rows if r["straggler_factor"] == worst]
        note = f" Factor {worst:g} only here; every factor in `bench/results/summary.md`."
    lines = ["### Stragglers (bench/stragglers.py)", "",
             "The last rank's layers slowed by a factor (`--straggler`); hidden fraction = "
             "1 - (iteration increase) / (straggler's extra compute): 0 = the whole delay shows, "
             "1 = none (docs/stragglers.md)." + note, "",
             "| model | ranks | link | strategy | factor | iter ms | straggler delay ms | "
             "hidden fraction |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        hidden = "" if r["hidden_fraction"] is None else f"{r['hidden_fraction']:.2f}"
        lines.append(f"| {r['model']} | {r['ranks']} | {r['link']} | {r['strategy']} | "
                     f"{r['straggler_factor']:g} | {r['iter_ms']:.1f} | "
                     f"{r['straggler_delay_ms']:.1f} | {hidden} |")
    lines.append("")
    for name in ("blocking", "multistep"):
        if os.path.exists(os.path.join(RESULTS, f"stragglers_timeline_{name}.png")):
            lines += [f"**worst case, {name}**", "",
                      f"![{name}](bench/results/stragglers_timeline_{name}.png)", ""]
    return lines


def checkpoint_section(rows):
    rows = [r for r in rows if r.get("mode") in ("none", "sync", "async")]
    if not rows:
        return []
    r0 = rows[0]
    lines = ["### Checkpoints in the background (bench/checkpoint_async.py)", "",
             f"{r0['model']}, {r0['ranks']} ranks, a checkpoint ({r0['checkpoint_mb']:.0f} MB) "
             "every N steps, written synchronously or by the background writer: mean step "
             "time and what checkpointing adds (target: async < 5 % where sync adds more). "
             "multistep's momentum is sharded: `single` gathers it before rank 0 writes one "
             "file (a collective on the critical path in either mode), `sharded` has every "
             "rank write its own slices (engine/checkpointing.py); priority's momentum is "
             "replicated and rank 0 writes it.", "",
             "| link | strategy | format | every N steps | mode | step ms | overhead |",
             "|---|---|---|---:|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (link_key(r.get("link", "loopback")),
                                         r.get("strategy", ""), r.get("format", "single"),
                                         r.get("every") or 0)):
        lines.append(f"| {r.get('link', 'loopback')} | {r.get('strategy', '')} | "
                     f"{r.get('format', 'single')} | {r.get('every') or '-'} | {r['mode']} | "
                     f"{r['step_ms']:.1f} | {100 * r['overhead']:+.1f} % |")
    return lines + [""]


def algorithms_section(rows):
    rows = [r for r in rows if "algorithm" in r and "t_ms" in r]
    if not rows:
        return []
    ranks = rows[0]["ranks"]
    lines = ["### Allreduce algorithms (bench/algorithms.py)", "",
             f"`mpiexec -n {ranks} python -m bench.algorithms` (inside `bench/netlink --rate R --` for "
             "the emulated links): one float32 allreduce (op mean, 1 MiB chunks), median ms of the "
             "slowest rank; auto's thresholds per link below the table "
             "(docs/allreduce_algorithms.md).",
             "", "| link | size | mpi | recursive doubling | ring | auto (chose) | auto / best "
             "| auto / mpi |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["link"], r["bytes"]), {})[r["algorithm"]] = r
    for (link, nbytes), t in sorted(by.items(), key=lambda kv: (link_key(kv[0][0]), kv[0][1])):
        if not all(a in t for a in ("mpi", "recursive_doubling", "ring", "auto")):
            continue
        best = min(t[a]["t_ms"] for a in ("mpi", "recursive_doubling", "ring"))
        auto = t["auto"]
        lines.append(f"| {link} | {size_label(nbytes)} | {t['mpi']['t_ms']:.3f} | "
                     f"{t['recursive_doubling']['t_ms']:.3f} | {t['ring']['t_ms']:.3f} | "
                     f"{auto['t_ms']:.3f} ({auto.get('chose', '?')}) | {auto['t_ms'] / best:.2f} | "
                     f"{auto['t_ms'] / t['mpi']['t_ms']:.2f} |")
    lines.append("")
    for link in sorted({r["link"] for r in rows}, key=link_key):
        auto = next((r for r in rows if r["link"] == link and "thresholds" in r), None)
        if auto is not None:
            lines.append(f"- {link}: `{auto['thresholds']}` ({auto['source'] or 'given'})")
    return lines + [""]


def faults_section(reports):
    reports = [r for r in reports if isinstance(r, dict) and "scenarios" in r]
    if not reports:
        return []
    lines = ["### Faults (bench/faults.py)", "",
             "`python bench/faults.py`: each scenario on a real job (docs/faults.md).", "",
             "| ranks | scenario | detected | s to detection | ranks exited | iterations lost | "
             "checkpoint loads | resume correct |", "|---:|---|---|---:|---:|---:|---|---|"]
    for rep in reports:
        for s in rep["scenarios"]:
            seconds = s.get("seconds_to_detection")
            lines.append(f"| {s['ranks']} | {s['scenario']} | {s['detected']} | "
                         f"{'' if seconds is None else f'{seconds:.2f}'} | {s['ranks_exited']} | "
                         f"{'' if s['data_lost_iterations'] is None else s['data_lost_iterations']} | "
                         f"{s.get('checkpoint_loads')} | {s.get('resume_correct')} |")
    return lines + [""]


def sections(headline: bool) -> str:
    """All tables as markdown: every row for summary.md, the headline rows for the README."""
    parts = [f"Tables written on {machine()}; the 2-core VM's CPU model changes between "
             "sessions, and each table is from the run its JSON records (the headlines above "
             "say where and when). Regenerate with `make bench` (`make bench-full` adds the "
             "10 Gbit/s link); raw JSON in `bench/results/`.", ""]
    parts += throughput_section(load("throughput_*.json"))
    parts += overlap_section(load("overlap_*.json"), headline)
    parts += step_section(load("step_*.json"))
    parts += timeline_section()
    parts += model_check_section(load("model_check_*.json"))
    parts += simulate_section()
    parts += algorithms_section(load("algorithms_*.json"))
    parts += faults_section(load("faults_*.json"))
    parts += ensemble_section(load("ensemble*.json"))
    parts += stragglers_section(load("stragglers*.json"), headline)
    parts += checkpoint_section(load("checkpoint_async*.json"))
    return "\n".join(parts)


def main():
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write(sections(headline=False).replace("](bench/results/", "](") + "\n")
    text = sections(headline=True)
    if os.path.exists("README.md"):
        with open("README.md") as f:
            readme = f.read()
        if BEGIN in readme and END in readme:
            head, rest = readme.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            with open("README.md", "w") as f:
                f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(text)


if __name__ == "__main__":
    main()
