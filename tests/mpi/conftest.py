"""Run under `mpiexec -n P python -m pytest tests/mpi`: every rank runs every test.

- One failing rank must never leave the others waiting in a collective: a
  failed test prints the rank and aborts the whole job (ChainerMN's
  global_except_hook idea, applied to pytest reports).
- Every rank must draw the same hypothesis examples, so the MPI profile is
  derandomized (examples are a function of the test alone, not of a random
  seed), keeps no example database, and does not shrink (shrinking differs
  per rank once one rank fails).
- Only rank 0 prints pytest's report; other ranks' terminal reporter writes
  to /dev/null (their failures still reach stderr before the abort).
"""

import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from _pytest._io import TerminalWriter
from hypothesis import HealthCheck, Phase, settings
from mpi4py import MPI

from cnn.runtime import configure

configure(progress_thread=True)     # every MPI test runs beside a progress thread

settings.register_profile(
    "mpi",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=25,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
settings.load_profile("mpi")

WORLD = MPI.COMM_WORLD


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if WORLD.rank != 0 and reporter is not None:
        reporter._tw = TerminalWriter(open(os.devnull, "w"))   # pinned pytest: see requirements


def pytest_runtest_logreport(report):
    if report.failed and WORLD.size > 1:
        sys.stderr.write(f"\n[rank {WORLD.rank}/{WORLD.size}] {report.nodeid} failed "
                         f"in {report.when}:\n{report.longreprtext}\n"
                         f"[rank {WORLD.rank}] aborting the job so no rank hangs\n")
        sys.stderr.flush()
        WORLD.Abort(1)


def pytest_sessionfinish(session, exitstatus):
    # A rank that skipped everything must still not leave before the others.
    try:
        WORLD.Barrier()
    except Exception:
        traceback.print_exc()


@pytest.fixture(scope="session")
def images28():
    """Random 28 x 28 images for LeNet (three FC layers): 96 samples, 10 classes."""
    rng = np.random.default_rng(11)
    return (rng.standard_normal((96, 1, 28, 28)).astype(np.float32),
            rng.integers(0, 10, 96).astype(np.int64))


@pytest.fixture
def shared_dir():
    """A directory every rank sees (created by rank 0, removed after the test)."""
    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="mpi-test-") if comm.rank == 0 else None
    path = Path(comm.bcast(path))
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
