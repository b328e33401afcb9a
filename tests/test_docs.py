"""docs/: the tutorial checker (make docs-check) and the layout the README promises."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))

import check_tutorial  # noqa: E402

DOC = """
```console
$ echo one \\
  two
one two
$ echo three
three
```
<!-- check: one two -->
<!-- check: ^three$ -->

```sh
$ not a checked block
```

```console
$ exit 3
```
<!-- exit: 3 -->
"""


def test_blocks_are_parsed_with_continuations_checks_and_exit_codes():
    found = list(check_tutorial.blocks(DOC))
    assert [(commands, checks, code) for _, commands, checks, code in found] == [
        (["echo one \\\n  two", "echo three"], ["one two", "^three$"], 0),
        (["exit 3"], [], 3),
    ]


def test_a_failed_check_fails_the_run(tmp_path):
    doc = tmp_path / "t.md"
    doc.write_text(DOC + "\n```console\n$ echo four\n```\n<!-- check: five -->\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "check_tutorial.py"), str(doc)],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert "no match for /five/" in p.stdout
    assert "2 of 3 blocks pass" in p.stdout


def test_no_reference_outside_the_repository():
    p = subprocess.run(["git", "grep", "-n", "-e", "shared/", "--", ":!tests/test_docs.py"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.stdout == ""


def test_readme_layout_table_matches_the_tree():
    """Every path the layout table names exists, and every top-level folder is in it."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| ([^|]+) \|", table, re.M)
    named = []
    for cell in cells:
        items = re.findall(r"`([^`]+)`", cell)
        for k, item in enumerate(items):   # `cnn/layers/conv.py`, `winograd.py`: beside the first
            path = item if k == 0 or "/" in item else os.path.join(os.path.dirname(items[0]), item)
            named.append(path)
            assert os.path.exists(os.path.join(ROOT, path)), f"README layout names {path!r}"
    assert named, "no layout table in the README"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    folders = {line.split("/")[0] for line in tracked.splitlines() if "/" in line}
    folders -= {".ci"}
    covered = {path.split("/")[0] for path in named}
    assert folders <= covered, f"top-level folders missing from the README layout: {folders - covered}"
