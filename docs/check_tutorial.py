"""Run every command of docs/tutorial.md and check its output (`make docs-check`).

    python docs/check_tutorial.py [docs/tutorial.md] [--list]

A checked command is a line starting with "$ " inside a ```console block
(a line ending in a backslash continues on the next). The block's commands
run one after another in a shell at the repository root, with the
virtualenv's bin/ first on PATH, so the tutorial can say `python` and
`mpiexec` as a reader with an activated virtualenv would. Below the block,
HTML comments say what must hold, so the sample output shown to the reader
(timings vary) is not itself compared:

    <!-- check: REGEX -->   must match (re.search, multiline) the block's output
    <!-- exit: N -->        the last command's exit status (default 0)

A block without a check comment still has to exit with 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"```console\n(.*?)```\n((?:\s*<!--.*?-->\n)*)", re.S)
COMMENT = re.compile(r"<!--\s*(check|exit):\s*(.*?)\s*-->")


def blocks(text: str):
    """(line number, commands, checks, expected exit) for every console block."""
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        commands, current = [], None
        for raw in m.group(1).splitlines():
            if current is not None:
                current += "\n" + raw
            elif raw.startswith("$ "):
                current = raw[2:]
            else:
                continue
            if current.endswith("\\"):
                continue
            commands.append(current)
            current = None
        checks = [v for k, v in COMMENT.findall(m.group(2)) if k == "check"]
        exits = [int(v) for k, v in COMMENT.findall(m.group(2)) if k == "exit"]
        yield line, commands, checks, exits[0] if exits else 0


def run_block(commands, venv_bin: str) -> tuple[int, str]:
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
               VIRTUAL_ENV=os.path.dirname(venv_bin), PYTHONUNBUFFERED="1")
    output, rc = [], 0
    for command in commands:
        p = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600)
        output.append(p.stdout)
        rc = p.returncode
    return rc, "".join(output)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = next((a for a in args if not a.startswith("--")), os.path.join(ROOT, "docs", "tutorial.md"))
    venv_bin = os.path.dirname(sys.executable)
    with open(path) as f:
        found = list(blocks(f.read()))
    if not found:
        print(f"check_tutorial: no ```console blocks in {path}", file=sys.stderr)
        return 2
    if "--list" in args:
        for line, commands, checks, code in found:
            print(f"{path}:{line}: {' ; '.join(commands)}  (checks {len(checks)}, exit {code})")
        return 0
    failures = 0
    for line, commands, checks, code in found:
        start = time.perf_counter()
        rc, output = run_block(commands, venv_bin)
        problems = [] if rc == code else [f"exit status {rc}, expected {code}"]
        problems += [f"no match for /{c}/" for c in checks if not re.search(c, output, re.M)]
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        print(f"{os.path.relpath(path, ROOT)}:{line} ({time.perf_counter() - start:.1f} s) {status}",
              flush=True)
        if problems:
            failures += 1
            print("    $ " + "\n    $ ".join(commands))
            print("    " + output.rstrip().replace("\n", "\n    "))
    print(f"check_tutorial: {len(found) - failures} of {len(found)} blocks pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
