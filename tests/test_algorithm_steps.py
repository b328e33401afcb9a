"""The progress thread's allreduce step plans (ext/_algorithms.pxi), replayed without MPI.

`_progress.algorithm_steps` returns the steps the C code posts; here every
rank's steps run against FIFO mailboxes (one per sender -> receiver pair, as
MPI's non-overtaking order guarantees), sends copying their data at post
time. This covers rank counts the MPI tests cannot reach on a small machine
(recursive doubling's fold for 1..7 extra ranks, rings of up to 16): the plan
must never deadlock, every message must land in a receive of its size, and
every rank must end with the sum, bitwise identical everywhere.
"""

from collections import deque

import numpy as np
import pytest

from ext import _progress

RECURSIVE_DOUBLING = _progress.ALGORITHM_CODES["recursive_doubling"]
RING = _progress.ALGORITHM_CODES["ring"]


def replay(algorithm, P, inputs):
    """Run every rank's plan on copies of `inputs` (P arrays); returns the results."""
    n = inputs[0].size
    data = [x.copy() for x in inputs]
    plans = [_progress.algorithm_steps(algorithm, r, P, n) for r in range(P)]
    position = [0] * P
    posted = [False] * P
    mail = {}                                   # (source, dest) -> deque of arrays
    while True:
        progressed = False
        for r in range(P):
            if position[r] == len(plans[r]):
                continue
            send_to, s_off, s_cnt, recv_from, r_off, r_cnt, add, lower = plans[r][position[r]]
            if not posted[r]:
                if send_to >= 0:
                    mail.setdefault((r, send_to), deque()).append(data[r][s_off:s_off + s_cnt].copy())
                posted[r] = True
                progressed = True
            if recv_from >= 0:
                box = mail.get((recv_from, r))
                if not box:
                    continue                    # its message has not been sent yet
                message = box.popleft()
                assert message.size == r_cnt, (r, position[r], message.size, r_cnt)
                target = data[r][r_off:r_off + r_cnt]
                if add:
                    target[...] = message + target if lower else target + message
                else:
                    target[...] = message
            position[r] += 1
            posted[r] = False
            progressed = True
        if all(position[r] == len(plans[r]) for r in range(P)):
            break
        assert progressed, f"deadlock at steps {position} of {[len(p) for p in plans]}"
    assert not any(mail.values()), "messages sent but never received"
    return data, plans


@pytest.mark.parametrize("algorithm", [RECURSIVE_DOUBLING, RING])
@pytest.mark.parametrize("P", list(range(1, 17)))
@pytest.mark.parametrize("n", [0, 1, 5, 16, 37])
def test_every_plan_completes_with_the_sum_on_every_rank(algorithm, P, n):
    integers = [((np.arange(n) * 5 + r) % 11 + r).astype(np.float64) for r in range(P)]
    results, _ = replay(algorithm, P, integers)
    for r in range(P):
        np.testing.assert_array_equal(results[r], sum(integers) if n else np.zeros(0))
    floats = [np.random.default_rng([P, r]).standard_normal(n).astype(np.float32)
              for r in range(P)]
    results, _ = replay(algorithm, P, floats)
    for r in range(1, P):
        assert results[r].tobytes() == results[0].tobytes(), "ranks disagree bitwise"
    if n:
        np.testing.assert_allclose(results[0], np.sum(floats, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("P", [2, 4, 5, 8, 12])
def test_message_counts_match_the_cost_model(P):
    """Recursive doubling: lg P' messages (+2 for the fold); ring: 2 (P - 1), each 1/P."""
    n = 1000
    pof2 = 1 << (P.bit_length() - 1)
    for r in range(P):
        rd = _progress.algorithm_steps(RECURSIVE_DOUBLING, r, P, n)
        folded = r < 2 * (P - pof2)
        expected = 2 if folded and r % 2 == 0 else (pof2.bit_length() - 1) + (2 if folded else 0)
        assert len(rd) == expected
        ring = _progress.algorithm_steps(RING, r, P, n)
        assert len(ring) == 2 * (P - 1)
        assert sum(step[2] for step in ring) == pytest.approx(2 * (P - 1) / P * n, abs=2 * P)


def test_bad_arguments():
    with pytest.raises(ValueError, match="only ours"):
        _progress.algorithm_steps(0, 0, 2, 10)
    with pytest.raises(ValueError, match="outside"):
        _progress.algorithm_steps(RING, 2, 2, 10)
