"""Hypothesis profiles for the serial tests.

`make test` (and CI) use the derandomized "ci" profile: the examples are a
function of the test alone, so a run is reproducible and a red CI means a real
regression, not an unlucky draw. Explore with random examples locally:

    HYPOTHESIS_PROFILE=explore python -m pytest tests --ignore=tests/mpi
"""

import os

from hypothesis import settings

from cnn.runtime import configure

# The serial tests are compute alone (tests/mpi/conftest.py says otherwise
# for the MPI tests); before any kernel runs.
configure(progress_thread=False)

settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
