"""Straggler injection: one rank computes FACTOR times slower than the others.

    mpiexec -n 2 python -m engine.train --straggler 1:1.5            # rank 1 at 2/3 speed
    mpiexec -n 2 python -m bench.step --straggler 1:2.0 --straggler-mode spin

Every leaf layer's ``forward`` and ``backward`` on the straggler rank is timed
and followed by ``(FACTOR - 1)`` times its duration of extra delay, so each
layer takes FACTOR times as long and the gradient of layer l becomes ready
exactly as late as on a uniformly slower node. The strategy's hooks (waits
for pending updates, posting gradients) run outside the timed part, so
communication is not slowed: a slow node, not a slow link.

Modes:

- ``sleep`` (default): the delay is a ``time.sleep``; the core is left to
  others (the progress thread, other ranks on an oversubscribed machine),
  which matches a slower node whose own progress thread still runs.
- ``spin``: a busy loop holding the GIL, as compute would; the core stays
  busy (use it with a core per rank).

Delays shorter than `MIN_DELAY_S` are carried over to the next layer rather
than slept, since a sleep overshoots by tens of microseconds; the debt and
every overshoot are accounted, so the total delay is (FACTOR - 1) times the
compute time to within one `MIN_DELAY_S`.
"""

from __future__ import annotations

import time

__all__ = ["MIN_DELAY_S", "Straggler", "parse_straggler"]

MIN_DELAY_S = 5e-4
MODES = ("sleep", "spin")


def parse_straggler(text: str, size: int) -> tuple[int, float]:
    """``"RANK:FACTOR"`` -> (rank, factor), checked against the job size.

    Raises
    ------
    ValueError
        Naming the problem: not RANK:FACTOR, rank outside [0, size), factor < 1.
    """
    try:
        rank_text, factor_text = text.split(":")
        rank, factor = int(rank_text), float(factor_text)
    except ValueError:
        raise ValueError(f"--straggler {text!r}: expected RANK:FACTOR, e.g. 1:1.5") from None
    if not 0 <= rank < size:
        raise ValueError(f"--straggler {text!r}: rank {rank} is not in [0, {size})")
    if not factor >= 1.0 or factor == float("inf"):
        raise ValueError(f"--straggler {text!r}: factor must be a finite number >= 1 "
                         f"(1 = normal speed), got {factor}")
    return rank, factor


class Straggler:
    """Slow every leaf layer of `model` down by `factor` (until `remove`).

    Parameters
    ----------
    model : cnn.models.Model
    factor : float
        >= 1; each layer's forward and backward take this many times as long.
    mode : {"sleep", "spin"}

    Attributes
    ----------
    compute_s, delay_s : float
        Seconds spent in the layers and added after them so far.
    """

    def __init__(self, model, factor: float, mode: str = "sleep"):
        if mode not in MODES:
            raise ValueError(f"straggler mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not factor >= 1.0:
            raise ValueError(f"straggler factor must be >= 1, got {factor}")
        self.factor, self.mode = float(factor), mode
        self.compute_s = self.delay_s = 0.0
        self._debt = 0.0
        self._wrapped = []
        for _, leaf in model.leaves():
            for name in ("forward", "backward"):
                self._wrapped.append((leaf, name, vars(leaf).get(name)))
                setattr(leaf, name, self._slowed(getattr(leaf, name)))

    def _slowed(self, method):
        def slowed(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self._pay(time.perf_counter() - start)
            return out
        return slowed

    def _pay(self, seconds: float) -> None:
        self.compute_s += seconds
        self._debt += (self.factor - 1.0) * seconds
        if self._debt < MIN_DELAY_S:
            return
        start = time.perf_counter()
        if self.mode == "sleep":
            time.sleep(self._debt)
        else:
            end = start + self._debt
            while time.perf_counter() < end:
                pass
        slept = time.perf_counter() - start
        self.delay_s += slept
        self._debt -= slept          # an overshoot is paid back by the next layers

    def remove(self) -> None:
        """Restore the layers' own methods."""
        for leaf, name, own in reversed(self._wrapped):
            if own is None:
                delattr(leaf, name)
            else:
                setattr(leaf, name, own)
        self._wrapped = []
