#!/usr/bin/env bash
# Build the engine on a machine without a package index (a cluster node or a
# loaned benchmark machine) from files carried in a folder, into a prefix.
#
#   PYTHON=python3 bench/offline_build.sh WHEELS_DIR PREFIX
#   eval "$(bench/offline_build.sh --env PREFIX)"     # PATH, PYTHONPATH, LD_LIBRARY_PATH
#
# WHEELS_DIR holds mpich-*.whl (PyPI's MPICH) and mpi4py-*.tar.gz; the
# interpreter must already have numpy, numba, cython, setuptools,
# threadpoolctl and tqdm. MPICH goes into PREFIX (bin/, lib/, include/),
# mpi4py is compiled against it, then the Cython extension in place, as
# `make` does in a virtualenv. LD_LIBRARY_PATH puts PREFIX/lib first: a
# machine image may carry another libmpi.so.12 on its library path, and
# mpi4py then fails to import (undefined MPI symbols).
set -euo pipefail
PYTHON=${PYTHON:-python3}
site() { "$PYTHON" -c "import sys; print(f'$1/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages')"; }
if [ "${1:-}" = "--env" ]; then
    prefix=$(cd "${2:?usage: --env PREFIX}" && pwd)
    echo "export PATH=$prefix/bin:\$PATH PYTHONPATH=$(site "$prefix"):$(cd "$(dirname "$0")/.." && pwd)" \
         "LD_LIBRARY_PATH=$prefix/lib:\${LD_LIBRARY_PATH:-}"
    exit 0
fi
wheels=${1:?usage: bench/offline_build.sh WHEELS_DIR PREFIX}
prefix=${2:?usage: bench/offline_build.sh WHEELS_DIR PREFIX}
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
cd "$(dirname "$0")/.."
"$PYTHON" -m pip install -q --no-index --no-deps --prefix "$prefix" "$wheels"/mpich-*.whl
env MPICC="$prefix/bin/mpicc" "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-binary mpi4py --prefix "$prefix" "$wheels"/mpi4py-*.tar.gz
export PYTHONPATH="$(site "$prefix"):$PWD" LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}"
env CC="$prefix/bin/mpicc" "$PYTHON" setup.py -q build_ext --inplace
"$PYTHON" -c "import mpi4py.MPI as M, ext._progress; print('built:', M.Get_library_version().splitlines()[0])"
