"""ext/_progress.pyi against the extension, for what mypy's stubtest cannot see.

`make lint` runs stubtest (module names, classes, methods and their
signatures). A cdef class's __init__ is a slot wrapper, whose signature
Python cannot introspect, so the constructors' parameters are compared here
with the .pyx source: a parameter added, renamed or dropped on either side
fails.
"""

import ast
import pathlib
import re

import pytest

from ext import _progress

EXT = pathlib.Path(__file__).resolve().parent.parent / "ext"


def source_constructors() -> dict[str, list[tuple[str, bool]]]:
    """class name -> [(parameter, has a default)] of each cdef class's __init__ in the .pyx."""
    text = (EXT / "_progress.pyx").read_text()
    out = {}
    for match in re.finditer(r"^cdef class (\w+)\b.*?(?=^cdef class |\Z)", text, re.M | re.S):
        init = re.search(r"^    def __init__\(self,(.*?)\):", match.group(0), re.M | re.S)
        if init is None:
            continue
        params = []
        for part in init.group(1).split(","):
            part = part.replace("not None", "").strip()
            declaration, _, default = part.partition("=")
            params.append((declaration.split()[-1], bool(default.strip())))
        out[match.group(1)] = params
    return out


def stub_constructors() -> dict[str, list[tuple[str, bool]]]:
    tree = ast.parse((EXT / "_progress.pyi").read_text())
    out = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                args = item.args.args[1:]
                first_default = len(args) - len(item.args.defaults)
                out[cls.name] = [(a.arg, i >= first_default) for i, a in enumerate(args)]
    return out


def test_the_parser_finds_the_constructors():
    found = source_constructors()
    assert set(found) == {"Engine", "StallResponder"}
    assert ("slice_us", True) in found["Engine"] and ("comm", False) in found["Engine"]


@pytest.mark.parametrize("name", sorted(source_constructors()))
def test_constructor_parameters_match_the_stub(name):
    assert stub_constructors().get(name) == source_constructors()[name]
    assert isinstance(getattr(_progress, name), type)
