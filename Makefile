# Communication-efficient data-parallel CNN training: build, test, benchmark.
#
#   make              virtualenv + pinned dependencies + MPICH wheel + Cython build
#   make run          the main job (2 ranks) on the embedded default
#   make test         serial tests, MPI tests under 1, 2, 3 and 4 ranks, docs-check
#   make docs-check   run every command of docs/tutorial.md and check its output
#   make test-N       MPI tests under N ranks only (N = 1..4)
#   make check        a tiny smoke benchmark
#   make bench        the benchmark suite; results go to bench/results/ and the README
#   make bench-full   the same with the 10 Gbit/s link and more iterations
#   make lint         ruff + cython-lint + stubtest (ext/_progress.pyi against the build)
#   make torch        optional: PyTorch CPU for peer benchmarks and parity tests
#   make clean
#
# A system MPI (clusters): make MPICC=/path/to/mpicc
#   mpi4py is then compiled against that MPI too, and mpiexec is taken from the
#   same directory as mpicc (override with MPIEXEC=...).

SHELL := /bin/bash

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTHON ?= python3

ifdef MPICC
SYSTEM_MPI := 1
MPIEXEC ?= $(dir $(MPICC))mpiexec
else
MPICC := $(BIN)/mpicc
MPIEXEC ?= $(BIN)/mpiexec
endif

STAMP := $(VENV)/.deps-stamp
EXT_SRC := $(wildcard ext/*.pyx ext/*.pxd ext/*.pxi ext/*.h)
EXT_SO := $(wildcard ext/_progress*.so)

# Tests run oversubscribed on small machines; numba and BLAS get one thread
# per rank unless the caller says otherwise.
export OMP_NUM_THREADS ?= 1
export NUMBA_NUM_THREADS ?= 2
export PYTHONDONTWRITEBYTECODE := 1
MPI_TEST_ENV := NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
PYTEST_MPI := -m pytest tests/mpi -q -x -p no:cacheprovider --timeout=600

.PHONY: all deps build run test test-serial test-1 test-2 test-3 test-4 docs-check check bench bench-full torch lint clean

all: build

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(VENV)/bin/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
ifndef SYSTEM_MPI
	$(BIN)/pip install -q mpich==5.0.2
endif
	env MPICC=$(MPICC) $(BIN)/pip install -q --no-binary mpi4py --no-build-isolation mpi4py==4.1.2
	touch $@

deps: $(STAMP)

build: $(STAMP) ext/.built

ext/.built: $(STAMP) setup.py $(EXT_SRC)
	env CC=$(MPICC) MPICC=$(MPICC) $(PY) setup.py -q build_ext --inplace
	$(PY) -c "import site, sys; open(site.getsitepackages()[0] + '/overlap_cnn.pth', 'w').write(sys.argv[1] + '\n')" $(CURDIR)
	touch $@

run: build
	$(MPIEXEC) -n 2 $(PY) -m engine.train

test: test-serial test-1 test-2 test-3 test-4 docs-check

test-serial: build
	$(PY) -m pytest tests -q -p no:cacheprovider --ignore=tests/mpi --timeout=900

test-1 test-2 test-3 test-4: test-%: build
	env $(MPI_TEST_ENV) $(MPIEXEC) -n $* $(PY) $(PYTEST_MPI)

# The tutorial's commands, run as a reader would (the venv first on PATH);
# its emulated links need root, like bench/netlink.
docs-check: build
	env $(MPI_TEST_ENV) $(PY) docs/check_tutorial.py docs/tutorial.md

check: build
	$(MPIEXEC) -n 2 $(PY) -m bench.overlap --quick --sizes 1MiB
	$(MPIEXEC) -n 2 $(PY) -m bench.step --model digits --strategy multistep --iters 3

bench: build
	PY=$(PY) MPIEXEC=$(MPIEXEC) bench/suite.sh default

bench-full: build
	PY=$(PY) MPIEXEC=$(MPIEXEC) bench/suite.sh full

# Optional: PyTorch CPU for the peer benchmarks (DDP) and the parity tests.
torch: $(STAMP)
	$(BIN)/pip install -q torch==2.13.0

lint: build
	$(BIN)/ruff check engine cnn bench tests analysis docs setup.py
	PATH=$(BIN):$$PATH $(BIN)/cython-lint ext/*.pyx ext/*.pxd ext/*.pxi
	$(PY) -m mypy.stubtest ext._progress --allowlist ext/stubtest_allowlist.txt

clean:
	rm -rf build ext/*.c ext/*.so ext/.built .pytest_cache .mypy_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
