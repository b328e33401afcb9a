"""Build the Cython progress engine (ext/_progress.pyx) against the MPI in use.

The extension must be compiled with the same MPI that mpi4py was built with:
`make` passes CC=<mpicc> (the mpich wheel's, or MPICC=... for a system MPI).
"""

import os
import shutil

import mpi4py
from Cython.Build import cythonize
from setuptools import Extension, setup

mpicc = os.environ.get("MPICC") or os.environ.get("CC") or shutil.which("mpicc")
if not mpicc:
    raise SystemExit("setup.py: no MPI compiler found; run `make` or set MPICC=/path/to/mpicc")
os.environ["CC"] = mpicc
os.environ["LDSHARED"] = f"{mpicc} -shared"

extensions = [
    Extension(
        "ext._progress",
        sources=["ext/_progress.pyx"],
        include_dirs=[mpi4py.get_include(), "ext"],
        extra_compile_args=["-O2", "-pthread", "-Wno-unused-function", "-Wno-format-truncation"],
        extra_link_args=["-pthread"],
    )
]

setup(
    name="overlap-cnn",
    version="0.1.0",
    packages=["cnn", "engine", "ext", "bench"],
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
