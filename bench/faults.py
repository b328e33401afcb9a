"""Fault scenarios of `engine.train`, each run for real under mpiexec, and what the
operator sees: was the fault detected, how fast, with which message, which
ranks exited, how many iterations were lost, and does resuming give the
weights of an uninterrupted run.

    python bench/faults.py [--quick] [--ranks 2] [--json] [--json-out FILE]

Scenarios (digits model, synthetic-free, seconds each):

- sigstop:    SIGSTOP the last rank mid-run; the others name it and end the job
              after --timeout; resume on the same ranks.
- kill9:      kill -9 the last rank mid-run; the launcher ends the job; resume
              on one rank fewer.
- corrupt:    truncate the checkpoint, then --resume: a clear error naming it.
- full_disk:  a tmpfs with room for 1.5 checkpoints, so the second write fails
              (needs root to mount; skipped otherwise): a clear error, the
              previous checkpoint intact.
- supervise:  `engine.supervise --shrink` with kill -9 of the last rank: the
              restart on fewer ranks finishes the run.
- overhead:   the normal path with and without the stall watch: microseconds
              per small allreduce, interleaved repeats, medians.

"resume_correct" compares the final weights with an uninterrupted run of the
same length on the first rank count: bitwise on the same rank count, within
rtol 1e-4 on fewer ranks (only the summation order of the gradient differs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnn.checkpoint import CheckpointError, load_checkpoint, sharded_files  # noqa: E402

CHECKPOINT = "checkpoint.npz"
BATCH = 12


class Run:
    """One launched command (mpiexec + engine.train, or engine.supervise), with its
    ranks found through an environment tag (MPICH's hydra sets PMI_RANK)."""

    def __init__(self, command: list[str], workdir: Path, name: str):
        self.tag = uuid.uuid4().hex
        self.out = open(workdir / f"{name}.out", "w+")
        self.err_path = workdir / f"{name}.err"
        self.err = open(self.err_path, "w+")
        env = {**os.environ, "FAULTS_TAG": self.tag, "OMP_NUM_THREADS": "1",
               "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.start = time.monotonic()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.out,
                                     stderr=self.err, start_new_session=True)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of this run's live training processes."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = dict(kv.split("=", 1) for kv in
                           (entry / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in kv)
            except OSError:
                continue
            if env.get("FAULTS_TAG") == self.tag and "PMI_RANK" in env:
                found[int(env["PMI_RANK"])] = int(entry.name)
        return found

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self) -> str:
        """stderr, then stdout (hydra reports a killed rank on stdout)."""
        self.out.flush()
        return self.stderr() + Path(self.out.name).read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        """Leave nothing behind: continue and kill whatever of this run is still alive."""
        for pid in self.ranks().values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close()
        self.err.close()


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def train_args(cfg, ckpt_dir: Path, log: Path | None = None, *extra) -> list[str]:
    args = ["--model", "digits", "--dataset", "digits", "--batch-size", str(BATCH),
            "--iters", str(cfg.iters), "--checkpoint-dir", str(ckpt_dir),
            "--checkpoint-every", str(cfg.checkpoint_every), "--no-progress", "--threads", "1",
            "--stall-warn", str(cfg.stall_warn), "--timeout", str(cfg.timeout)]
    return args + (["--log", str(log)] if log else []) + list(extra)


def train_command(ranks: int, args: list[str]) -> list[str]:
    return [mpiexec(), "-n", str(ranks), sys.executable, "-m", "engine.train", *args]


def checkpoint_iteration(path: Path) -> int | None:
    try:
        return load_checkpoint(path).iteration
    except (FileNotFoundError, CheckpointError):
        return None


def last_logged_iteration(log: Path) -> int:
    """Iterations completed according to rank 0's JSON-lines log (line-buffered)."""
    done = 0
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue          # the line being written when the job died
            if record.get("kind") == "iteration":
                done = record["iteration"] + 1
    return done


def wait_until(predicate, timeout: float, run: Run | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if run is not None and run.proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.02)
    return False


def first_line(text: str, *needles: str) -> str:
    for line in text.splitlines():
        if any(n in line for n in needles):
            return line.strip()
    return ""


def compare(path: Path, reference: dict, same_ranks: bool) -> dict:
    """Final weights of a resumed run against the uninterrupted reference."""
    try:
        got = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        return {"resume_correct": False, "resume_error": str(e)}
    if got.iteration != reference["iteration"]:
        return {"resume_correct": False,
                "resume_error": f"ended at iteration {got.iteration}, not "
                                f"{reference['iteration']}"}
    diff = max(float(np.abs(got.params[n] - reference["params"][n]).max())
               for n in reference["params"])
    if same_ranks:
        ok = all(np.array_equal(got.params[n], reference["params"][n])
                 for n in reference["params"])
    else:
        ok = all(np.allclose(got.params[n], reference["params"][n], rtol=1e-4, atol=1e-6)
                 for n in reference["params"])
    return {"resume_correct": bool(ok), "resume_max_abs_diff": diff,
            "resume_compared": "bitwise" if same_ranks else "rtol 1e-4"}


def inject_midrun(cfg, work: Path, name: str, ranks: int, sig: int) -> tuple[dict, Path]:
    """Launch, wait for a checkpoint and one more interval under way, send `sig`
    to the last rank, and record what happens until the job has ended."""
    ckpt_dir, log = work / name, work / f"{name}.jsonl"
    run = Run(train_command(ranks, train_args(cfg, ckpt_dir, log)), work, name)
    record = {"scenario": name, "ranks": ranks}
    try:
        target = cfg.checkpoint_every + cfg.checkpoint_every // 2
        if not wait_until(lambda: last_logged_iteration(log) >= target, 120, run):
            record.update(detected=False, error="the run did not get going: " + run.stderr()[-400:])
            return record, ckpt_dir
        victim = run.ranks().get(ranks - 1)
        t0 = time.monotonic()
        os.kill(victim, sig)
        reached = last_logged_iteration(log)
        saved = checkpoint_iteration(ckpt_dir / CHECKPOINT) or 0
        warn_at = None
        if sig == signal.SIGSTOP:
            if wait_until(lambda: "stalled" in run.stderr(), cfg.timeout + 30, run):
                warn_at = time.monotonic() - t0
        status = run.wait(cfg.timeout + 60)
        ended = time.monotonic() - t0
        err = run.output()
        message = (first_line(err, "stalled") if sig == signal.SIGSTOP else
                   first_line(err, "EXIT STRING") or first_line(err, "BAD TERMINATION"))
        alive = run.ranks()
        record.update(
            fault="SIGSTOP last rank" if sig == signal.SIGSTOP else "kill -9 last rank",
            detected=status is not None and status != 0 and bool(message),
            seconds_to_detection=round(warn_at if warn_at is not None else ended, 2),
            seconds_to_exit=None if status is None else round(ended, 2),
            exit_status=status, message=message,
            gave_up_line=first_line(err, "gave up"),
            ranks_exited=ranks - len(alive), data_lost_iterations=reached - saved,
            checkpoint_iteration=saved,
            checkpoint_loads=checkpoint_iteration(ckpt_dir / CHECKPOINT) == saved)
    finally:
        run.cleanup()
    return record, ckpt_dir


def resume(cfg, work: Path, ckpt_dir: Path, ranks: int, name: str) -> int | None:
    run = Run(train_command(ranks, train_args(cfg, ckpt_dir, None, "--resume")), work, name)
    try:
        return run.wait(300)
    finally:
        run.cleanup()


def scenario_corrupt(cfg, work: Path, source: Path) -> dict:
    ckpt_dir = work / "corrupt"
    ckpt_dir.mkdir()
    data = (source / CHECKPOINT).read_bytes()
    (ckpt_dir / CHECKPOINT).write_bytes(data[: len(data) // 2])
    run = Run(train_command(cfg.ranks, train_args(cfg, ckpt_dir, None, "--resume")), work,
              "corrupt")
    try:
        status = run.wait(300)
        seconds = time.monotonic() - run.start
        err = run.stderr()
    finally:
        run.cleanup()
    message = first_line(err, "engine.train: error")
    return {"scenario": "corrupt", "ranks": cfg.ranks, "fault": "checkpoint truncated to half",
            "detected": status == 2 and str(ckpt_dir / CHECKPOINT) in message and
            "Traceback" not in err,
            "seconds_to_detection": round(seconds, 2), "exit_status": status,
            "message": message, "ranks_exited": cfg.ranks, "data_lost_iterations": None,
            "resume_correct": None}


def checkpoint_bytes(directory: Path) -> int:
    """One checkpoint's size on disk: all ranks' files when sharded (engine/checkpointing.py)."""
    shards = sharded_files(directory / CHECKPOINT)      # the committed generation only
    return sum(path.stat().st_size for _, path in shards) if shards \
        else (directory / CHECKPOINT).stat().st_size


def scenario_full_disk(cfg, work: Path, size_bytes: int) -> dict:
    """A tmpfs with room for one checkpoint and a half: the first write fits, the
    second (temporary file beside the previous checkpoint) runs out of space."""
    mount = work / "tmpfs"
    mount.mkdir()
    record = {"scenario": "full_disk", "ranks": cfg.ranks,
              "fault": "tmpfs with room for 1.5 checkpoints (the second write fails)"}
    size = -(-3 * size_bytes // 2 // 4096) * 4096
    if subprocess.call(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                       stderr=subprocess.DEVNULL) != 0:
        record.update(detected=None, skipped="mounting a tmpfs needs root")
        return record
    log = work / "full_disk.jsonl"
    run = Run(train_command(cfg.ranks, train_args(cfg, mount / "ckpt", log)), work, "full_disk")
    try:
        status = run.wait(cfg.timeout + 120)
        err = run.stderr()
        saved = cfg.checkpoint_every
        seconds = time.monotonic() - run.start
        message = first_line(err, "could not write checkpoint")
        record.update(detected=status == 1 and bool(message),
                      seconds_to_detection=None, seconds_to_exit=round(seconds, 2),
                      exit_status=status,
                      message=message, ranks_exited=cfg.ranks - len(run.ranks()),
                      data_lost_iterations=last_logged_iteration(log) - saved,
                      checkpoint_iteration=saved,
                      checkpoint_loads=checkpoint_iteration(mount / "ckpt" / CHECKPOINT) == saved,
                      resume_correct=None)
    finally:
        run.cleanup()
        subprocess.call(["umount", str(mount)])
    return record


def scenario_supervise(cfg, work: Path, reference: dict) -> dict:
    ckpt_dir, log = work / "supervise", work / "supervise.jsonl"
    attempts = work / "supervise-attempts.jsonl"
    command = [sys.executable, "-m", "engine.supervise", "-n", str(cfg.ranks), "--shrink",
               "--max-restarts", "2", "--log", str(attempts), "--",
               *train_args(cfg, ckpt_dir, log)]
    run = Run(command, work, "supervise")
    record = {"scenario": "supervise", "ranks": cfg.ranks,
              "fault": "kill -9 last rank under engine.supervise --shrink"}
    try:
        target = cfg.checkpoint_every + cfg.checkpoint_every // 2
        if not wait_until(lambda: last_logged_iteration(log) >= target, 120, run):
            record.update(detected=False, error=run.stderr()[-400:])
            return record
        reached = last_logged_iteration(log)
        saved = checkpoint_iteration(ckpt_dir / CHECKPOINT) or 0
        t0 = time.monotonic()
        os.kill(run.ranks()[cfg.ranks - 1], signal.SIGKILL)
        status = run.wait(300)
        seconds = time.monotonic() - t0
        history = [json.loads(line) for line in attempts.read_text().splitlines()] \
            if attempts.exists() else []
        record.update(detected=len(history) >= 2, seconds_to_detection=None,
                      seconds_to_finish=round(seconds, 2), exit_status=status,
                      message=first_line(run.stderr(), "engine.supervise: attempt 0 failed"),
                      ranks_exited=cfg.ranks, data_lost_iterations=reached - saved,
                      attempts=history,
                      **compare(ckpt_dir / CHECKPOINT, reference, same_ranks=False))
    finally:
        run.cleanup()
    return record


def overhead_worker(repeats: int, count: int) -> None:
    """Under mpiexec: the latency of a 1 KB allreduce with the stall watch off and
    on (its responder thread probes for queries 5 times a second)."""
    from mpi4py import MPI

    from engine import Exchanger
    comm = MPI.COMM_WORLD
    times = {"off": [], "on": []}
    a = np.ones(256, np.float32)
    for _ in range(repeats):
        for label, warn in (("off", None), ("on", 60.0)):
            with Exchanger(stall_warn_s=warn) as ex:
                for _ in range(count // 10):
                    ex.allreduce_async(a).wait()
                comm.Barrier()
                t = time.perf_counter()
                for _ in range(count):
                    ex.allreduce_async(a).wait()
                seconds = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
            times[label].append(1e6 * seconds / count)
    if comm.rank == 0:
        print(json.dumps({f"allreduce_1kb_us_watch_{k}": round(float(np.median(v)), 2)
                          for k, v in times.items()}))


def scenario_overhead(cfg) -> dict:
    repeats, count = (3, 500) if cfg.quick else (7, 3000)
    out = subprocess.run([mpiexec(), "-n", str(cfg.ranks), sys.executable, __file__,
                          "--overhead-worker", f"{repeats},{count}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
    record = {"scenario": "overhead", "ranks": cfg.ranks, "repeats": repeats,
              "allreduces": count}
    if out.returncode != 0:
        record["error"] = out.stderr[-400:]
        return record
    record.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/faults.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs and timeouts (smoke test)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of each job (2..4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--only", default=None, help="comma-separated scenarios to run")
    p.add_argument("--overhead-worker", default=None, help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    if cfg.overhead_worker:
        overhead_worker(*(int(v) for v in cfg.overhead_worker.split(",")))
        return 0
    if not 2 <= cfg.ranks <= 4 or BATCH % (cfg.ranks - 1):
        p.error("--ranks must be 2, 3 or 4")
    cfg.iters, cfg.checkpoint_every = (120, 20) if cfg.quick else (400, 50)
    cfg.stall_warn, cfg.timeout = (1.0, 4.0) if cfg.quick else (2.0, 10.0)
    only = set(cfg.only.split(",")) if cfg.only else None
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    report = {"ranks": cfg.ranks, "iters": cfg.iters, "checkpoint_every": cfg.checkpoint_every,
              "stall_warn_s": cfg.stall_warn, "timeout_s": cfg.timeout, "scenarios": []}
    try:
        status = subprocess.call(train_command(cfg.ranks, train_args(cfg, work / "reference")),
                                 cwd=ROOT, stdout=subprocess.DEVNULL)
        if status != 0:
            raise SystemExit(f"bench/faults.py: the reference run failed (exit status {status})")
        ref = load_checkpoint(work / "reference" / CHECKPOINT)
        reference = {"iteration": ref.iteration, "params": ref.params}

        def wanted(name):
            return only is None or name in only

        kill_dir = None
        if wanted("sigstop"):
            record, d = inject_midrun(cfg, work, "sigstop", cfg.ranks, signal.SIGSTOP)
            if resume(cfg, work, d, cfg.ranks, "sigstop-resume") == 0:
                record.update(compare(d / CHECKPOINT, reference, same_ranks=True))
            report["scenarios"].append(record)
        if wanted("kill9") or wanted("corrupt"):
            record, kill_dir = inject_midrun(cfg, work, "kill9", cfg.ranks, signal.SIGKILL)
            if wanted("corrupt"):
                report["scenarios"].append(scenario_corrupt(cfg, work, kill_dir))
            if wanted("kill9"):
                if resume(cfg, work, kill_dir, cfg.ranks - 1, "kill9-resume") == 0:
                    record.update(resumed_on=cfg.ranks - 1,
                                  **compare(kill_dir / CHECKPOINT, reference, same_ranks=False))
                report["scenarios"].insert(len(report["scenarios"]) - wanted("corrupt"), record)
        if wanted("full_disk"):
            report["scenarios"].append(scenario_full_disk(
                cfg, work, checkpoint_bytes(work / "reference")))
        if wanted("supervise"):
            report["scenarios"].append(scenario_supervise(cfg, work, reference))
        if wanted("overhead"):
            report["overhead"] = scenario_overhead(cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    if cfg.json_out:
        Path(cfg.json_out).write_text(text + "\n")
    if cfg.json:
        print(text)
    else:
        print(table(report))
    return 0


def table(report: dict) -> str:
    """The README table: one row per scenario."""
    if "overhead" in report:
        o = report["overhead"]
        rows_after = [f"\nstall watch on the normal path ({o['ranks']} ranks, 1 KB allreduce, "
                      f"median of {o['repeats']}): off {o.get('allreduce_1kb_us_watch_off')} us, "
                      f"on {o.get('allreduce_1kb_us_watch_on')} us"]
    else:
        rows_after = []
    rows = ["| scenario | detected | s to detection | ranks exited | iterations lost "
            "| resume correct | message |", "|---|---|---|---|---|---|---|"]
    for r in report["scenarios"]:
        message = (r.get("message") or r.get("skipped") or r.get("error") or "")[:140]
        rows.append(f"| {r['scenario']} | {r.get('detected')} | "
                    f"{r.get('seconds_to_detection')} | {r.get('ranks_exited')} | "
                    f"{r.get('data_lost_iterations')} | {r.get('resume_correct')} | "
                    f"{message.replace('|', '/')} |")
    return "\n".join(rows + rows_after)


if __name__ == "__main__":
    sys.exit(main())
