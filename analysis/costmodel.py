"""The alpha-beta-gamma cost model and an event simulation of every strategy
(docs/algorithm.md §2), for any number of ranks P.

    from analysis import costmodel as cm
    prof = cm.load_profile("bench/results/profile_resnet20_b32.json")
    net = cm.Network.from_json("bench/results/netfit_1gbit.json")
    r = cm.simulate(prof.layers, net, "priority", P=2, profile=prof)
    r.iter_s, r.exposed_comm_s, r.overlap_efficiency

Two parts, both pure Python:

1. **Collective costs** (Thakur, Rabenseifner & Gropp, "Optimization of
   collective communication operations in MPICH", IJHPCA 19(1), 2005), with
   alpha the latency of one message (s), beta the transfer time per byte
   (s/B), gamma the local reduction time per byte (s/B), n the bytes of the
   whole vector, P the ranks, lg = ceil(log2 P):

   ======================  =============================================  ================
   collective              time                                           MPICH uses it
   ======================  =============================================  ================
   allreduce, recursive    lg (alpha + n beta + n gamma)                  n < 2 KiB
   doubling
   allreduce, Rabenseifner 2 lg alpha + 2 (P-1)/P n beta + (P-1)/P n gamma  n >= 2 KiB
   allreduce, ring         2 (P-1) alpha + (same beta and gamma terms)     (option)
   reduce-scatter,         lg alpha + (P-1)/P n (beta + gamma)            n < 512 KiB
   recursive halving
   reduce-scatter,         (P-1) alpha + (P-1)/P n (beta + gamma)         n >= 512 KiB
   pairwise
   allgather, recursive    lg alpha + (P-1)/P n beta                      n < 80 KiB
   doubling / Bruck
   allgather, ring         (P-1) alpha + (P-1)/P n beta                   n >= 80 KiB
   ======================  =============================================  ================

   The thresholds are MPICH's classic defaults (MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE
   = 2048, MPIR_CVAR_REDSCAT_COMMUTATIVE_LONG_MSG_SIZE = 524288,
   MPIR_CVAR_ALLGATHER_SHORT_MSG_SIZE = 81920; MPICH 3.x ``mpir_cvars``); they are
   fields of `Network`, so a machine file can override them. For a P that is
   not a power of two, MPICH's allreduce first folds the extra ranks into
   their neighbours and finally sends them the result: lg is then taken of
   P', the largest power of two <= P, plus 2 alpha + 2 n beta + n gamma
   (`_fold`); the ring needs no fold. The engine's own allreduce algorithms
   (``Exchanger(algorithm=...)``: recursive doubling, ring, and "auto", which
   picks one per request by `AutoThresholds`) are costed by
   `algorithm_time`; docs/allreduce_algorithms.md.

2. **This engine's overheads and an event simulation.** The progress thread
   (ext/_progress.pyx) admits a request only after a negotiation round (a
   272-byte MIN-allreduce plus a poll delay, `Network.round_s`), splits
   allreduces into chunks of `Engine.chunk_bytes` (reduce-scatters and
   allgathers too, along each rank's slice: `Channel.chunk_sizes`), runs an
   allreduce with `Engine.algorithm`, keeps at most `Engine.max_inflight` chunks
   posted (the credit), and posts the next chunk, lowest (priority, sequence)
   first, one round after a slot frees. Each posted chunk costs
   `Network.chunk_overhead_s` + `Network.chunk_beta` per byte on top of its
   collective, and each posted request costs the compute thread
   `Network.request_cpu_s` (the engine's thread preempting it where it has no
   core of its own). The link is one sequential channel: a chunk starts at
   max(its commit time, end of the previous chunk). The compute thread runs
   exactly the hooks of the strategy (engine/strategies/*.py) and the
   trainer (engine/trainer.py: the loss/flag allreduce at priority -1 that
   every step waits for, the BN-statistics allreduce), and blocks where they
   wait.

   **Fully-connected layers in multistep** (engine/strategies/multistep.py,
   ``fc_mode``, default ``"auto"``). A Linear layer takes, per step, one of
   three paths (`fc_path`); ``"auto"`` takes the one that moves the fewest
   values per rank (multistep.choose_fc_mode): ``"reduce_scatter"`` (the
   conv path, N_in N_out), ``"alltoall"`` (B (ceil(N_in/P) + N_out)) or
   ``"activations"`` (B (N_in + N_out), never fewer than the all-to-all),
   B the global batch, all x (P-1)/P, the weight allgather aside. The model
   follows the engine's hooks exactly:

   - ``"alltoall"`` (the paper's path): forward, just *before* the layer's
     forward, post an all-to-all of its input X (B/P x N_in per rank, 4 B/P
     N_in bytes held per rank, each rank keeping N_in/P neurons);
   - ``"activations"``: forward, right *after* the layer's forward, post an
     allgather of X (B/P x N_in per rank -> B x N_in, 4 B N_in bytes);
   - both: backward, just before the layer's backward, post an allgather of
     its output errors dY (4 B N_out bytes); the layer's backward no longer
     forms the weight gradient, so it costs (1 - FC_WEIGHT_GRAD_SHARE) x
     bwd_s; no reduce-scatter is posted (bias included);
   - both: after backprop (finish_step, input side first), wait for the two
     exchanges, then compute this rank's part of the weight gradient over
     the global batch: 2 B N_in N_out / P FLOPs, the FLOPs of the per-rank
     weight-gradient GEMM (2 (B/P) N_in N_out) it replaces, so it costs
     FC_WEIGHT_GRAD_SHARE x bwd_s (the bias slice, a column sum of dY, is
     neglected); then the 1/P update and the weight allgather as for a conv
     layer.
   - Under ``"alltoall"`` and ``"auto"`` a Linear layer owns weight columns
     (rows of W^T): the next forward copies W from the gathered W^T, and on
     the reduce-scatter path the gradient is transposed before it is posted;
     both copies are charged at ``copy_s_per_byte``.

   ``multistep-alltoall``, ``multistep-activations`` and
   ``multistep-reduce_scatter`` (`FC_VARIANTS`) are multistep with that
   ``fc_mode`` fixed, so that one sweep compares the paths side by side.

The simulation runs a few iterations back to back and reports the last one
(the steady state, where the deferred updates and allgathers of iteration k are
paid in the forward of k+1), as bench/step.py measures it.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import deque
from dataclasses import dataclass, field, replace

from engine.strategies.bucketed import bucket_indices
from engine.strategies.multistep import FC_MODES, choose_fc_mode
from ext import _progress

__all__ = ["ALLREDUCE_ALGORITHMS", "AutoThresholds", "FC_MODES", "FC_VARIANTS",
           "FC_WEIGHT_GRAD_SHARE", "STRATEGIES", "Channel", "Engine", "LayerCost", "Network",
           "Profile", "Result", "algorithm_time", "allgather_time", "allreduce_time",
           "alltoall_time", "auto_thresholds", "measured_auto_thresholds", "measured_sweep",
           "netfit_auto_thresholds", "blocking_comm_time", "fc_path", "form_buckets",
           "fuse_units", "load_profile", "lower_bound", "recursive_doubling_time",
           "reduce_scatter_time", "ring_time", "scale_layers", "sent_bytes", "simulate"]

#: strategies the engine implements (engine/strategies/*.py)
STRATEGIES = ("blocking", "layerwise", "bucketed", "priority", "multistep")
#: multistep with a fixed ``fc_mode`` (engine/strategies/multistep.py FC_MODES),
#: to compare the FC paths in one sweep
FC_VARIANTS = tuple(f"multistep-{mode}" for mode in FC_MODES if mode != "auto")

#: Share of a Linear layer's profiled backward that is the weight-gradient
#: GEMM dW = dY^T X. dW and dX = dY W cost 2 b N_in N_out FLOPs each; the bias
#: sum and the parameter-free layers attributed to the layer are small next
#: to them, so half. (At the profile's tiny batch the layer is memory-bound
#: and dW, which also accumulates into the N_out x N_in gradient, takes a
#: larger share; at the target's batch, where the times are scaled linearly,
#: FLOPs dominate.)
FC_WEIGHT_GRAD_SHARE = 0.5

STATS_PRIORITY = -1          # engine/trainer.py: the loss/flag allreduce
ROUND_BYTES = _progress.NEGOTIATION_LEN * 8     # the negotiation round: long longs


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """One link (or one machine's interconnect) in the alpha-beta-gamma model.

    Attributes
    ----------
    alpha : float
        Latency per message, s.
    beta : float
        Transfer time per byte, s/B (1 / bandwidth).
    gamma : float
        Local reduction time per byte, s/B.
    chunk_overhead_s : float
        Extra time per chunk posted by this engine (post, test, wake), s.
    chunk_beta : float
        Extra time per byte of a chunk posted by this engine, s/B: a
        non-blocking collective advances only when the progress thread polls
        (every ``poll_us``), so a multi-step transfer is slower than the
        blocking call the alpha-beta-gamma terms describe. Fitted by
        bench/netfit.py; 0 for a machine file.
    request_cpu_s : float
        Compute-thread time lost per posted request: where the progress thread
        has no core of its own (this 2-core machine, 2 ranks), its wake-ups,
        negotiation rounds and polls preempt the compute threads. Measured by
        bench/netfit.py (compute slowed down by requests in flight); 0 where
        the engine's thread has a core to itself (PCNN pins it to one).
    poll_s : float
        Delay before the progress thread notices a completed round or chunk
        (it sleeps ``poll_us`` between polls; the mean delay is half of it).
    allreduce_large : {"rabenseifner", "ring"}
        Latency term for large allreduces: 2 lg P alpha or 2 (P-1) alpha.
    """

    alpha: float
    beta: float
    gamma: float = 0.0
    chunk_overhead_s: float = 0.0
    chunk_beta: float = 0.0
    request_cpu_s: float = 0.0
    poll_s: float = 25e-6
    allreduce_short_bytes: int = 2048
    reduce_scatter_long_bytes: int = 524288
    allgather_short_bytes: int = 81920
    allreduce_large: str = "rabenseifner"

    def round_s(self, P: int) -> float:
        """One negotiation round of the engine: a 272-byte MIN-allreduce + a poll delay."""
        return allreduce_time(ROUND_BYTES, P, self) + self.poll_s if P > 1 else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> Network:
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("alpha", "beta") if f not in d]
        if missing:
            raise ValueError(f"a network needs at least alpha and beta; missing {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str) -> Network:
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d.get("network", d))


@dataclass(frozen=True)
class Engine:
    """The exchanger's configuration; the defaults are the engine's own (ext/_progress.pxd)."""

    chunk_bytes: int = _progress.DEFAULT_CHUNK_BYTES
    #: least bytes of one rank's piece in a reduce-scatter/allgather/alltoall chunk
    min_piece_bytes: int = _progress.DEFAULT_MIN_PIECE_BYTES
    max_inflight: int = _progress.DEFAULT_MAX_INFLIGHT
    bucket_bytes: int = 1 << 20
    #: Exchanger(algorithm=...): one of ALLREDUCE_ALGORITHMS
    algorithm: str = "mpi"
    #: "auto"'s thresholds; None: the model's own (`auto_thresholds(net, P)`),
    #: as the Exchanger computes them from the same netfit file
    auto: AutoThresholds | None = None
    #: one collective per unit (a conv and its batch norm, a layer's weight and
    #: bias; cnn Model.param_groups), as the engine does; False: one per tensor,
    #: the engine before units (to compare)
    fuse_units: bool = True


@dataclass(frozen=True)
class LayerCost:
    """One parameter layer, as measured by analysis/profile.py (times in seconds).

    ``fwd_s`` and ``bwd_s`` include the parameter-free layers attributed to
    this one (see analysis/profile.py); ``param_bytes`` lists the gradient bytes
    of each parameter tensor (`Engine.fuse_units` False: layerwise/priority
    post one request per tensor).
    """

    name: str
    index: int
    kind: str
    params: int
    grad_bytes: int
    fwd_s: float
    bwd_s: float
    update_s: float
    flops_fwd: float = 0.0
    param_bytes: tuple = ()
    in_features: int = 0       # Linear layers: multistep's FC path (0: unknown)
    out_features: int = 0

    @property
    def tensors(self) -> tuple:
        return self.param_bytes or (self.grad_bytes,)


@dataclass
class Profile:
    """A profile file: the layers plus what the trainer adds around them."""

    layers: list
    batch_per_rank: int = 1
    bn_bytes: int = 0              # BN running statistics averaged after each step
    copy_s_per_byte: float = 0.0   # packing gradients into a flat buffer
    check_s_per_byte: float = 0.0  # the trainer's per-layer finiteness check (grad-ready hook)
    meta: dict = field(default_factory=dict)


def load_profile(path: str) -> Profile:
    """Read analysis/profile.py's JSON (times in ms) into a `Profile` (times in s)."""
    with open(path) as f:
        d = json.load(f)
    layers = [LayerCost(name=l["name"], index=l["index"], kind=l["kind"], params=l["params"],
                        grad_bytes=l["grad_bytes"], fwd_s=l["fwd_ms"] * 1e-3,
                        bwd_s=l["bwd_ms"] * 1e-3, update_s=l["update_ms"] * 1e-3,
                        flops_fwd=l.get("flops_fwd", 0.0),
                        param_bytes=tuple(l.get("param_bytes", ())),
                        in_features=l.get("in_features", 0), out_features=l.get("out_features", 0))
              for l in d["layers"]]
    return Profile(layers, d.get("batch_per_rank", 1), d.get("bn_bytes", 0),
                   d.get("copy_s_per_byte", 0.0), d.get("check_s_per_byte", 0.0), d)


def scale_layers(layers, *, compute: float = 1.0, batch: float = 1.0, update: float = 1.0):
    """Layers with forward/backward times x compute x batch and update times x update.

    Linear scaling in the batch is a first-order approximation (small batches
    use the cores less well, so it overestimates small-batch times slightly).
    """
    return [replace(l, fwd_s=l.fwd_s * compute * batch, bwd_s=l.bwd_s * compute * batch,
                    update_s=l.update_s * update) for l in layers]


# ---------------------------------------------------------------------------
# Collective costs (Thakur, Rabenseifner & Gropp 2005)
# ---------------------------------------------------------------------------

def _lg(P: int) -> int:
    return math.ceil(math.log2(P)) if P > 1 else 0


def _fold(nbytes: float, P: int, net: Network) -> tuple[int, float]:
    """(P', seconds): the largest power of two P' <= P, and what folding the other
    P - P' ranks in and out costs (their whole vector in, added; the result back)."""
    pof2 = 1 << (P.bit_length() - 1)
    if pof2 == P:
        return P, 0.0
    return pof2, 2 * net.alpha + nbytes * (2 * net.beta + net.gamma)


def allreduce_time(nbytes: float, P: int, net: Network) -> float:
    """Seconds for an MPI allreduce of `nbytes` bytes over P ranks (see module table)."""
    if P <= 1 or nbytes <= 0:
        return 0.0
    if nbytes < net.allreduce_short_bytes:
        return recursive_doubling_time(nbytes, P, net)
    if net.allreduce_large == "ring":
        return ring_time(nbytes, P, net)
    pof2, fold = _fold(nbytes, P, net)
    frac = (pof2 - 1) / pof2
    return (2 * _lg(pof2) * net.alpha + 2 * frac * nbytes * net.beta + frac * nbytes * net.gamma
            + fold)


def recursive_doubling_time(nbytes: float, P: int, net: Network) -> float:
    """Recursive doubling (MPICH's short allreduce; the engine's "recursive_doubling"):
    lg P' (alpha + n beta + n gamma) plus the fold of the other P - P' ranks."""
    if P <= 1 or nbytes <= 0:
        return 0.0
    pof2, fold = _fold(nbytes, P, net)
    return _lg(pof2) * (net.alpha + nbytes * (net.beta + net.gamma)) + fold


def ring_time(nbytes: float, P: int, net: Network) -> float:
    """Ring reduce-scatter + ring allgather (the engine's "ring"), any P:
    2 (P-1) alpha + 2 (P-1)/P n beta + (P-1)/P n gamma."""
    if P <= 1 or nbytes <= 0:
        return 0.0
    frac = (P - 1) / P
    return 2 * (P - 1) * net.alpha + 2 * frac * nbytes * net.beta + frac * nbytes * net.gamma


def reduce_scatter_time(nbytes: float, P: int, net: Network) -> float:
    """Seconds for a reduce-scatter of an `nbytes`-byte vector (each rank keeps 1/P)."""
    if P <= 1 or nbytes <= 0:
        return 0.0
    frac = (P - 1) / P
    steps = _lg(P) if nbytes < net.reduce_scatter_long_bytes else P - 1
    return steps * net.alpha + frac * nbytes * (net.beta + net.gamma)


def allgather_time(nbytes: float, P: int, net: Network) -> float:
    """Seconds for an allgather into an `nbytes`-byte vector (each rank brings 1/P)."""
    if P <= 1 or nbytes <= 0:
        return 0.0
    frac = (P - 1) / P
    steps = _lg(P) if nbytes < net.allgather_short_bytes else P - 1
    return steps * net.alpha + frac * nbytes * net.beta


def alltoall_time(nbytes_per_rank: float, P: int, net: Network) -> float:
    """Seconds for an all-to-all where each rank holds `nbytes_per_rank` (pairwise, P-1 steps)."""
    if P <= 1 or nbytes_per_rank <= 0:
        return 0.0
    return (P - 1) * net.alpha + (P - 1) / P * nbytes_per_rank * net.beta


def sent_bytes(kind: str, nbytes: float, P: int, net: Network, algorithm: str = "mpi") -> float:
    """Bytes one rank sends for one collective (the byte count of its beta term above).

    `nbytes` as for the time functions: the whole vector, or for ``alltoall``
    what each rank holds. `algorithm` (allreduce only) as in `algorithm_time`.
    """
    if P <= 1 or nbytes <= 0:
        return 0.0
    frac = (P - 1) / P
    if kind == "allreduce":
        if algorithm == "ring" or (algorithm == "mpi" and nbytes >= net.allreduce_short_bytes):
            return 2 * frac * nbytes
        pof2 = 1 << (P.bit_length() - 1)     # recursive doubling, plus the fold's result
        return _lg(pof2) * nbytes + (nbytes if pof2 != P else 0.0)
    if kind in ("reduce_scatter", "allgather", "alltoall"):
        return frac * nbytes
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# Which allreduce algorithm the engine runs (Exchanger(algorithm=...))
# ---------------------------------------------------------------------------

#: Exchanger's ``algorithm`` values: "mpi" is MPI_Iallreduce (MPICH chooses),
#: the next two are the progress thread's own (ext/_algorithms.pxi), "auto"
#: picks one of the three per request with `AutoThresholds`.
ALLREDUCE_ALGORITHMS = ("auto", "mpi", "recursive_doubling", "ring")


def algorithm_time(nbytes: float, P: int, net: Network, algorithm: str) -> float:
    """Seconds for one allreduce of `nbytes` bytes run by `algorithm` (not "auto")."""
    if algorithm == "mpi":
        return allreduce_time(nbytes, P, net)
    if algorithm == "recursive_doubling":
        return recursive_doubling_time(nbytes, P, net)
    if algorithm == "ring":
        return ring_time(nbytes, P, net)
    raise ValueError(f"unknown allreduce algorithm {algorithm!r}; expected one of "
                     f"{ALLREDUCE_ALGORITHMS[1:]} (resolve 'auto' with AutoThresholds.choose)")


@dataclass(frozen=True)
class AutoThresholds:
    """How ``algorithm="auto"`` picks, by the bytes of a request (all its chunks alike).

    nbytes < recursive_doubling_below: "recursive_doubling"; nbytes >= ring_from:
    "ring"; otherwise "mpi". Where measurements order the algorithms otherwise
    (the ring best at a few MiB and MPI's own above, say), `bands` replaces
    the two thresholds: ((below_bytes, algorithm), ...) with increasing
    bounds, the last one inf. Every rank must hold the same thresholds (the
    chosen algorithm is part of the cross-rank signature check, so a mismatch
    fails the request on every rank rather than hanging).
    """

    recursive_doubling_below: float = 0.0
    ring_from: float = math.inf
    #: where the thresholds came from, for printing ("measured at P=2, ...")
    source: str = field(default="", compare=False)
    bands: tuple = ()

    def __post_init__(self):
        if self.bands:
            bounds = [float(b) for b, _ in self.bands]
            if bounds != sorted(bounds) or bounds[-1] != math.inf:
                raise ValueError(f"auto bands need increasing bounds ending with inf, got {bounds}")
            unknown = [a for _, a in self.bands if a not in _FIXED]
            if unknown:
                raise ValueError(f"auto bands name unknown algorithms {unknown}; "
                                 f"expected {', '.join(_FIXED)}")

    def choose(self, nbytes: float) -> str:
        if self.bands:
            return next(a for below, a in self.bands if nbytes < below)
        if nbytes < self.recursive_doubling_below:
            return "recursive_doubling"
        if nbytes >= self.ring_from:
            return "ring"
        return "mpi"

    def __str__(self) -> str:
        def show(b):
            return "never" if b == math.inf else f"{int(b)} B"
        suffix = f" ({self.source})" if self.source else ""
        if self.bands:
            parts = [f"{a} below {show(b)}" for b, a in self.bands[:-1]]
            return f"auto: {', '.join(parts)}, {self.bands[-1][1]} above{suffix}"
        below = ("any size" if self.recursive_doubling_below == math.inf
                 else show(self.recursive_doubling_below))
        return (f"auto: recursive_doubling below {below}, "
                f"ring from {show(self.ring_from)}, mpi in between" + suffix)

    def spec(self) -> str:
        """The EXCHANGER_AUTO_THRESHOLDS form, which `parse` reads back."""
        def show(b):
            return "inf" if b == math.inf else str(int(b))
        if self.bands:
            return "bands=" + ";".join(f"{a}:{show(b)}" for b, a in self.bands)
        return (f"recursive_doubling_below={show(self.recursive_doubling_below)},"
                f"ring_from={show(self.ring_from)}")

    @classmethod
    def parse(cls, text: str) -> AutoThresholds:
        """From "recursive_doubling_below=65536,ring_from=inf" or
        "bands=recursive_doubling:65536;ring:4194304;mpi:inf" (the
        EXCHANGER_AUTO_THRESHOLDS forms)."""
        text = text.strip()
        if text.startswith("bands="):
            bands = []
            for item in filter(None, (part.strip() for part in text[6:].split(";"))):
                algorithm, _, below = item.partition(":")
                try:
                    bands.append((float(below), algorithm.strip()))
                except ValueError:
                    raise ValueError(f"bad auto band {item!r}: expected ALGORITHM:BYTES "
                                     "(inf for the last)") from None
            if not bands:
                raise ValueError("bands= needs at least one ALGORITHM:BYTES band")
            return cls(bands=tuple(bands))
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key.strip() not in ("recursive_doubling_below", "ring_from") or not value:
                raise ValueError(f"bad auto threshold {item!r}: expected "
                                 "recursive_doubling_below=BYTES and/or ring_from=BYTES, "
                                 "or bands=ALGORITHM:BYTES;...")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"bad auto threshold {item!r}: {value!r} is not a number "
                                 "of bytes (inf for never)") from None
        return cls(**values)

    def with_source(self, source: str) -> AutoThresholds:
        return AutoThresholds(self.recursive_doubling_below, self.ring_from, source, self.bands)


def auto_thresholds(net: Network, P: int) -> AutoThresholds:
    """The thresholds at which the model's cheapest algorithm changes, for P ranks.

    The three costs (`algorithm_time`) are compared on a grid of request sizes
    (8 B .. 1 GiB, 16 points per doubling), each request taken as one message
    (a first-order view of a chunked request); ties go to "mpi". Recursive
    doubling wins below some size (fewest messages, but it sends the whole
    chunk lg P times); the ring wins from some size on only where MPICH's
    algorithm pays for folding a non-power-of-two P (the ring needs none).
    """
    if P <= 1:
        return AutoThresholds()
    grid = [8 * 2 ** (i / 16) for i in range(16 * 27 + 1)]
    times = [{a: algorithm_time(n, P, net, a) for a in ("mpi", "recursive_doubling", "ring")}
             for n in grid]
    # Recursive doubling up to the first size where it is strictly slower than
    # another (below MPICH's short threshold "mpi" is the same algorithm: a tie).
    rd_below = 0.0
    for n, t in zip(grid, times):
        if t["recursive_doubling"] > min(t.values()):
            break
        rd_below = n * 2 ** (1 / 16)
    # The ring from the size on which it stays strictly the fastest.
    ring_from = math.inf
    for n, t in zip(reversed(grid), reversed(times)):
        if n < rd_below or t["ring"] >= min(t["mpi"], t["recursive_doubling"]):
            break
        ring_from = n
    return AutoThresholds(math.ceil(rd_below), ring_from if ring_from == math.inf
                          else math.ceil(ring_from))


#: measured times within this fraction of each other count as tied (repeated
#: medians on a shared 2-core machine move by a few per cent)
MEASURED_TIE = 0.03
_FIXED = ("mpi", "recursive_doubling", "ring")


def measured_auto_thresholds(sizes, times: dict, tie: float = MEASURED_TIE,
                             source: str = "") -> AutoThresholds:
    """auto's thresholds from timed runs of the three algorithms (bench/netfit.py).

    At each measured size the pick is "mpi" if it is within `tie` of the
    fastest, else the fastest. Where the picks run recursive doubling, then
    "mpi", then the ring as the size grows (the order the cost model
    expects), the result is the two classic thresholds; otherwise it is one
    band per run of equal picks. Each boundary sits at the geometric midpoint
    of the two grid points it separates; below the smallest and above the
    largest size measured, the nearest pick holds. Every measured size so
    gets an algorithm at most `tie` slower than the fastest, and never slower
    than "mpi" by more than `tie`.

    Parameters
    ----------
    sizes : sequence of int, shape (m,)
        Request bytes, increasing.
    times : dict of str to sequence of float, each shape (m,)
        Seconds per allreduce for "mpi", "recursive_doubling" and "ring".
    tie : float
        Relative difference below which two times are taken as equal.
    source : str
        Carried into the result, for printing.
    """
    sizes = [float(n) for n in sizes]
    if sorted(set(sizes)) != sizes or not sizes:
        raise ValueError(f"measured sizes must be distinct and increasing, got {sizes}")
    missing = [a for a in _FIXED if a not in times]
    if missing:
        raise ValueError(f"measured times lack {', '.join(missing)}")
    if any(len(times[a]) != len(sizes) for a in _FIXED):
        raise ValueError("every algorithm needs one time per measured size")
    picks = []
    for i in range(len(sizes)):
        t = {a: float(times[a][i]) for a in _FIXED}
        best = min(t, key=t.get)
        picks.append("mpi" if t["mpi"] <= (1 + tie) * t[best] else best)

    def between(i):       # a threshold between grid points i - 1 and i
        return math.ceil(math.sqrt(sizes[i - 1] * sizes[i]))

    bands = []            # (first index, algorithm) of each run of equal picks
    for i, a in enumerate(picks):
        if not bands or bands[-1][1] != a:
            bands.append((i, a))
    order = [a for _, a in bands]
    if order in ([], ["recursive_doubling"], ["mpi"], ["ring"], ["recursive_doubling", "mpi"],
                 ["mpi", "ring"], ["recursive_doubling", "ring"],
                 ["recursive_doubling", "mpi", "ring"]):
        starts = {a: i for i, a in bands}
        rd_below = (math.inf if order == ["recursive_doubling"]
                    else 0 if "recursive_doubling" not in starts
                    else between(bands[1][0]))
        ring_from = (math.inf if "ring" not in starts
                     else 0 if starts["ring"] == 0 else between(starts["ring"]))
        return AutoThresholds(rd_below, ring_from, source=source)
    bounds = [between(i) for i, _ in bands[1:]] + [math.inf]
    return AutoThresholds(source=source, bands=tuple(
        (b, a) for b, (_, a) in zip(bounds, bands, strict=True)))


def _bytes_label(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def measured_sweep(netfit: dict, P: int, chunk_bytes: int) -> tuple[dict | None, str]:
    """The netfit's timed sweep of the algorithms for `P` ranks at `chunk_bytes`, if any.

    Returns (sweep, why): sweep None when there is none for this P and chunk,
    with `why` saying what there is instead (for the printed source).
    """
    sweeps = netfit.get("algorithms") or []
    for_p = [s for s in sweeps if s.get("ranks") == P]
    for s in for_p:
        if s.get("chunk_bytes") == chunk_bytes:
            return s, ""
    if for_p:
        return None, (f"its measured sweep at P={P} is for chunk "
                      f"{', '.join(_bytes_label(s.get('chunk_bytes')) for s in for_p)}, not "
                      f"{_bytes_label(chunk_bytes)}")
    if sweeps:
        return None, (f"it has measured sweeps for P={sorted({s.get('ranks') for s in sweeps})}, "
                      f"not P={P}")
    return None, "it has no measured sweep"


def netfit_auto_thresholds(path: str, P: int, chunk_bytes: int) -> AutoThresholds:
    """auto's thresholds from a bench/netfit.py JSON: its measured sweep of the
    algorithms for `P` ranks and `chunk_bytes` if it holds one, else the cost
    model (`auto_thresholds`) on its fitted network; `source` says which."""
    with open(path) as f:
        d = json.load(f)
    sweep, why = measured_sweep(d, P, chunk_bytes)
    if sweep is not None:
        return measured_auto_thresholds(
            sweep["sizes"], sweep["median_s"], sweep.get("tie", MEASURED_TIE),
            source=f"measured at P={P}, chunk {_bytes_label(chunk_bytes)}, {path}")
    if P <= 1:
        return AutoThresholds(source="one rank: nothing to exchange")
    auto = auto_thresholds(Network.from_dict(d.get("network", d)), P)
    return auto.with_source(f"cost model from {path}; {why}")


# ---------------------------------------------------------------------------
# The engine's channel: negotiation, chunks, credit, priorities
# ---------------------------------------------------------------------------

class _Request:
    __slots__ = ("seq", "priority", "chunks", "admit", "done", "remaining", "label")

    def __init__(self, seq, priority, chunks, admit, label):
        self.seq, self.priority, self.chunks, self.admit = seq, priority, chunks, admit
        self.remaining = len(chunks)
        self.done = admit if not chunks else math.inf
        self.label = label


class Channel:
    """The progress thread and the link, simulated.

    A request enqueued at time t is admitted at t + round_s (negotiation). A
    credit slot frees round_s after its chunk finishes (the round that posts the
    next chunk). When a slot is free, the admitted chunk with the lowest
    (priority, seq) is committed; committed chunks cross the link one after
    another in commit order.
    """

    def __init__(self, net: Network, P: int, engine: Engine):
        self.net, self.P, self.engine = net, P, engine
        if engine.algorithm not in ALLREDUCE_ALGORITHMS:
            raise ValueError(f"unknown allreduce algorithm {engine.algorithm!r}; expected one "
                             f"of {ALLREDUCE_ALGORITHMS}")
        self.auto = engine.auto
        if engine.algorithm == "auto" and self.auto is None:
            self.auto = auto_thresholds(net, P)
        self.round_s = net.round_s(P)
        self.slots = [0.0] * max(1, engine.max_inflight)   # heap of slot-free times
        self.waiting: deque = deque()    # requests not yet admitted (admission is FIFO)
        self.ready: list = []            # heap of (priority, seq, chunk index, request)
        self.link_free = 0.0
        self.seq = 0
        self.busy_s = 0.0                # link time used (all chunks)
        self.sent_bytes = 0.0            # bytes this rank sends (all requests posted)
        self.log: list | None = []       # (label, start, end) when tracing

    def allreduce_algorithm(self, nbytes: float) -> str:
        """The algorithm the engine runs an allreduce of `nbytes` with (Exchanger.algorithm_for)."""
        if self.engine.algorithm != "auto":
            return self.engine.algorithm
        return self.auto.choose(nbytes)

    def chunk_sizes(self, kind: str, nbytes: float) -> list:
        """Bytes of the whole vector moved by each chunk the engine posts (Engine.enqueue).

        An allreduce is cut into chunks of chunk_bytes. A reduce-scatter,
        allgather or all-to-all (`nbytes`: what each rank holds) is cut along
        each rank's slice (4-byte elements): chunk c is piece c of every
        rank's slice, of chunk_bytes / 4 / P elements but at least
        min_piece_bytes / 4, so it moves about max(chunk_bytes,
        P min_piece_bytes) in all.
        """
        cb = self.engine.chunk_bytes
        if kind == "allreduce":
            n_chunks = max(1, math.ceil(nbytes / cb))
            return [cb] * (n_chunks - 1) + [nbytes - cb * (n_chunks - 1)]
        if kind in ("reduce_scatter", "allgather", "alltoall"):
            piece = 4 * max(1, self.engine.min_piece_bytes // 4,       # bytes of one rank's piece
                            cb // 4 // self.P)
            largest_slice = 4 * math.ceil(nbytes / 4 / self.P)   # rank 0's (partition)
            n_chunks = max(1, math.ceil(largest_slice / piece))
            return [piece * self.P] * (n_chunks - 1) + [
                max(0.0, nbytes - piece * self.P * (n_chunks - 1))]
        return [nbytes]

    def chunk_time(self, kind: str, nbytes: float, algorithm: str = "mpi") -> float:
        if kind == "allreduce":
            t = algorithm_time(nbytes, self.P, self.net, algorithm)
        elif kind == "reduce_scatter":
            t = reduce_scatter_time(nbytes, self.P, self.net)
        elif kind == "allgather":
            t = allgather_time(nbytes, self.P, self.net)
        elif kind == "alltoall":
            t = alltoall_time(nbytes, self.P, self.net)
        else:
            raise ValueError(kind)
        if self.P <= 1:
            return 0.0
        return t + self.net.chunk_overhead_s + self.net.chunk_beta * nbytes

    def enqueue(self, t: float, kind: str, nbytes: float, priority: int, label: str = "") -> _Request:
        """Post a collective at time t (the compute thread's clock); returns its request."""
        self.advance(t)
        if self.P <= 1:
            return _Request(self.seq, priority, [], t, label)
        sizes = self.chunk_sizes(kind, nbytes)
        algorithm = self.allreduce_algorithm(nbytes) if kind == "allreduce" else "mpi"
        chunks = [self.chunk_time(kind, s, algorithm) for s in sizes]
        self.sent_bytes += sum(sent_bytes(kind, s, self.P, self.net, algorithm) for s in sizes)
        r = _Request(self.seq, priority, chunks, t + self.round_s, label)
        self.seq += 1
        self.waiting.append(r)          # enqueue times never decrease: FIFO by admission
        return r

    def _next_decision(self) -> float:
        """When the next chunk is committed: a free slot and an admitted chunk."""
        if self.ready:
            return self.slots[0]
        return max(self.slots[0], self.waiting[0].admit)

    def advance(self, until: float) -> None:
        """Commit every chunk whose commit decision falls at or before `until`."""
        while self.ready or self.waiting:
            when = self._next_decision()
            if when > until:
                return
            while self.waiting and self.waiting[0].admit <= when:
                r = self.waiting.popleft()
                for k in range(len(r.chunks)):
                    heapq.heappush(self.ready, (r.priority, r.seq, k, r))
            _, _, k, r = heapq.heappop(self.ready)     # lowest (priority, seq) admitted
            start = max(when, self.link_free)
            end = start + r.chunks[k]
            self.link_free = end
            self.busy_s += r.chunks[k]
            heapq.heapreplace(self.slots, end + self.round_s)
            r.remaining -= 1
            if r.remaining == 0:
                r.done = end + self.net.poll_s
            if self.log is not None:
                self.log.append((r.label, start, end))

    def completion(self, r: _Request) -> float:
        """When `r` completes (everything posted so far may be committed meanwhile)."""
        while r.done == math.inf:
            self.advance(self._next_decision())
        return r.done


# ---------------------------------------------------------------------------
# The compute thread of each strategy (mirrors engine/strategies/*.py)
# ---------------------------------------------------------------------------

@dataclass
class Result:
    """What one simulated steady-state iteration costs (seconds)."""

    strategy: str
    P: int
    iter_s: float
    compute_s: float       # forward + backward + full local update, no communication
    comm_s: float          # one blocking allreduce of all gradients through the engine
    exposed_comm_s: float  # iter_s - compute_s
    overlap_efficiency: float
    channel_busy_s: float  # link time of this iteration's chunks
    compute_thread_s: float  # compute-thread busy time of this iteration (no waits)
    sent_bytes: float = 0.0  # bytes each rank sends in this iteration's collectives
    waits: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("strategy", "P")}
        for k in ("iter_s", "compute_s", "comm_s", "exposed_comm_s", "channel_busy_s",
                  "compute_thread_s"):
            d[k.replace("_s", "_ms")] = round(1e3 * getattr(self, k), 4)
        d["overlap_efficiency"] = round(self.overlap_efficiency, 4)
        d["sent_mb"] = round(self.sent_bytes / 1e6, 4)
        return d


class _Thread:
    """The compute thread's clock, with timed waits (Strategy.wait)."""

    def __init__(self, channel: Channel):
        self.t = 0.0
        self.busy = 0.0
        self.channel = channel
        self.waited = 0.0

    def compute(self, dt: float) -> None:
        self.t += dt
        self.busy += dt

    def wait(self, r: _Request) -> None:
        done = self.channel.completion(r)
        if done > self.t:
            self.waited += done - self.t
            self.t = done

    def post(self, kind, nbytes, priority, label="") -> _Request:
        r = self.channel.enqueue(self.t, kind, nbytes, priority, label)
        if self.channel.P > 1:
            self.compute(self.channel.net.request_cpu_s)
        return r


def fuse_units(layers) -> list:
    """The engine's units (cnn ``natural_units``): a conv and the batch norm right after it
    become one LayerCost (times and bytes summed; hooks at the conv's index)."""
    out, i = [], 0
    while i < len(layers):
        a = layers[i]
        b = layers[i + 1] if i + 1 < len(layers) else None
        if a.kind == "conv" and b is not None and b.kind == "batchnorm":
            out.append(replace(a, name=f"{a.name}+{b.name}", params=a.params + b.params,
                               grad_bytes=a.grad_bytes + b.grad_bytes, fwd_s=a.fwd_s + b.fwd_s,
                               bwd_s=a.bwd_s + b.bwd_s, update_s=a.update_s + b.update_s,
                               flops_fwd=a.flops_fwd + b.flops_fwd,
                               param_bytes=a.tensors + b.tensors))
            i += 2
        else:
            out.append(a)
            i += 1
    return [replace(layer, index=k) for k, layer in enumerate(out)]


def form_buckets(layers, bucket_bytes: int) -> list[list[int]]:
    """Layer indices per bucket, formed by the strategy's own rule (bucketed.bucket_indices)."""
    return bucket_indices([layer.grad_bytes for layer in layers], bucket_bytes)


def fc_path(layer: LayerCost, global_batch: float, fc_mode: str = "auto", P: int = 1) -> str:
    """How multistep exchanges `layer`'s gradient: ``"alltoall"``, ``"activations"`` or
    ``"reduce_scatter"``.

    The engine's rule (engine/strategies/multistep.py, `choose_fc_mode`): only
    Linear layers leave the conv path; ``"auto"`` takes the path with the
    fewest values per rank at global batch B on P ranks. A layer whose shape
    is unknown (``in_features`` 0) takes the conv path.
    """
    if fc_mode not in FC_MODES:
        raise ValueError(f"fc_mode must be one of {FC_MODES}, got {fc_mode!r}")
    n_in, n_out = layer.in_features, layer.out_features
    if layer.kind != "linear" or fc_mode == "reduce_scatter" or n_in <= 0 or n_out <= 0:
        return "reduce_scatter"
    if fc_mode != "auto":
        return fc_mode
    return choose_fc_mode(int(global_batch), n_in, n_out, P)


def _fc_layers(strategy: str, layers, global_batch: float, fc_mode: str, P: int) -> dict:
    """{layer index: (N_in, N_out, path)} of the Linear layers off the conv path this step."""
    if strategy != "multistep":
        return {}
    out = {}
    for i, layer in enumerate(layers):
        path = fc_path(layer, global_batch, fc_mode, P)
        if path != "reduce_scatter":
            out[i] = (layer.in_features, layer.out_features, path)
    return out


def _transposed_layers(strategy: str, layers, fc_mode: str) -> dict:
    """{layer index: weight bytes} of the Linear layers that own weight columns (W^T rows)."""
    if strategy != "multistep" or fc_mode not in ("alltoall", "auto"):
        return {}
    return {i: 4 * l.in_features * l.out_features for i, l in enumerate(layers)
            if l.kind == "linear" and l.in_features > 0 and l.out_features > 0}


def _iteration(strategy, layers, th: _Thread, state: dict, P: int, prof: Profile, engine: Engine,
               global_batch: int):
    """One Trainer.step of `strategy` on the simulated compute thread."""
    L = len(layers)
    copy = prof.copy_s_per_byte
    pending = state.setdefault("pending", {})       # layer -> requests to wait for in pre_forward
    fc = state["fc"]                  # multistep: FC layers on the alltoall / activations path
    transposed = state["transposed"]  # multistep: FC layers owning W^T rows -> weight bytes
    gathers = {}                      # layer -> [inputs request, errors request]

    def tensors(i):
        """Bytes of each request of layer i: one per unit, or per tensor (Engine.fuse_units
        False, and multistep's FC layers off the conv path)."""
        if engine.fuse_units and i not in fc and i not in transposed:
            return (layers[i].grad_bytes,)
        return layers[i].tensors

    # ---- forward (pre_forward hooks) ----
    for i, layer in enumerate(layers):
        if strategy in ("layerwise", "priority"):
            for r in pending.pop(i, ()):
                th.wait(r)
            if state.get("update_deferred"):
                th.compute(layer.update_s)
        elif strategy == "bucketed":
            if i in pending:
                for r in pending.pop(i):
                    th.wait(r)
                th.compute(layer.update_s)
        elif strategy == "multistep":
            waited = pending.pop(i, ())
            for r in waited:
                th.wait(r)
            if waited and i in transposed:
                th.compute(copy * transposed[i])       # W = (W^T)^T after the rows' allgather
        if i in fc and fc[i][2] == "alltoall":
            # the Linear wrapper, before its forward: all-to-all of X, B/P x N_in/P per pair
            gathers[i] = [th.post("alltoall", 4 * global_batch / P * fc[i][0], i,
                                  f"alltoall inputs {i}")]
        th.compute(layer.fwd_s)
        if i in fc and fc[i][2] == "activations":
            # the Linear wrapper, after its forward: allgather of X into B x N_in
            gathers[i] = [th.post("allgather", 4 * global_batch * fc[i][0], i,
                                  f"allgather inputs {i}")]
    # ---- backward (grad_ready hooks) ----
    rs = {}
    for i in reversed(range(L)):
        layer = layers[i]
        bwd = layer.bwd_s
        if i in fc:
            # the Linear wrapper, before its backward: allgather of dY (B/P x N_out -> B x N_out);
            # the backward then skips the weight gradient
            gathers[i].append(th.post("allgather", 4 * global_batch * fc[i][1], i,
                                      f"allgather errors {i}"))
            bwd -= FC_WEIGHT_GRAD_SHARE * layer.bwd_s
        th.compute(bwd + prof.check_s_per_byte * layer.grad_bytes)
        if strategy in ("layerwise", "priority"):
            prio = i if strategy == "priority" else 0
            pending[i] = [th.post("allreduce", b, prio, f"allreduce {i}") for b in tensors(i)]
        elif strategy == "bucketed":
            for bucket in state["buckets"]:
                if bucket[0] == i:
                    nbytes = sum(layers[j].grad_bytes for j in bucket)
                    th.compute(copy * nbytes)
                    r = th.post("allreduce", nbytes, 0, f"bucket {bucket[0]}..{bucket[-1]}")
                    for j in bucket:
                        pending[j] = [r]
        elif strategy == "multistep" and i not in fc:
            if i in transposed:
                th.compute(copy * transposed[i])       # G^T, reduce-scattered by rows
            rs[i] = [th.post("reduce_scatter", b, i, f"reduce-scatter {i}")
                     for b in tensors(i)]
    # ---- end_backward ----
    total = sum(l.grad_bytes for l in layers)
    flat = None
    if strategy == "blocking":
        th.compute(copy * total)
        flat = th.post("allreduce", total, 0, "allreduce all")
    bn = None
    if prof.bn_bytes:
        th.compute(copy * prof.bn_bytes)
        bn = th.post("allreduce", prof.bn_bytes, 0, "BN statistics")
    th.wait(th.post("allreduce", 8 * (3 + L), STATS_PRIORITY, "loss and flags"))
    # ---- finish_step ----
    if strategy == "blocking":
        th.wait(flat)
        th.compute(sum(l.update_s for l in layers))
    elif strategy in ("layerwise", "priority"):
        state["update_deferred"] = True
    elif strategy == "multistep":
        for i in range(L):
            for r in rs.get(i, ()) or gathers.get(i, ()):
                th.wait(r)
            if i in fc:
                # this rank's part of the gradient over the global batch (rows of W^T or a
                # band of W), 2 B N_in N_out / P FLOPs = the per-rank dW GEMM skipped in backprop
                th.compute(FC_WEIGHT_GRAD_SHARE * layers[i].bwd_s)
            th.compute(layers[i].update_s / P)
            pending[i] = [th.post("allgather", b, i, f"allgather {i}") for b in tensors(i)]
    if bn is not None:
        th.wait(bn)


def simulate(layers, net: Network, strategy: str, P: int, *, engine: Engine = Engine(),
             profile: Profile | None = None, iterations: int = 4, global_batch: int | None = None,
             fc_mode: str = "auto", trace: bool = False) -> Result:
    """Predict one steady-state iteration of `strategy` on P ranks.

    Parameters
    ----------
    layers : list of LayerCost
        Per-rank costs at the per-rank batch (already scaled to the target).
    net : Network
    strategy : str
        One of STRATEGIES or FC_VARIANTS (multistep with that ``fc_mode``).
    P : int
        Ranks.
    engine : Engine
    profile : Profile, optional
        Supplies ``bn_bytes`` and ``copy_s_per_byte`` (0 if absent).
    iterations : int
        Back-to-back iterations simulated; the last one is reported.
    global_batch : int, optional
        Only for ``multistep`` (the FC path's choice and activation volumes);
        default P x batch_per_rank.
    fc_mode : {"auto", "alltoall", "activations", "reduce_scatter"}
        ``multistep``'s option of the same name (engine/strategies/multistep.py);
        ignored by the other strategies and by FC_VARIANTS (which fix it).

    Returns
    -------
    Result
    """
    if strategy not in STRATEGIES + FC_VARIANTS:
        raise ValueError(f"unknown strategy {strategy!r}")
    name = strategy
    if strategy in FC_VARIANTS:
        strategy, fc_mode = "multistep", strategy[len("multistep-"):]
    if P < 1:
        raise ValueError(f"P must be >= 1, got {P}")
    if fc_mode not in FC_MODES:
        raise ValueError(f"fc_mode must be one of {FC_MODES}, got {fc_mode!r}")
    layers = list(layers)
    prof = profile or Profile(layers)
    if engine.fuse_units and strategy in ("layerwise", "priority", "multistep"):
        layers = fuse_units(layers)
    if global_batch is None:
        global_batch = P * prof.batch_per_rank
    channel = Channel(net, P, engine)
    channel.log = [] if trace else None
    th = _Thread(channel)
    state = {"buckets": form_buckets(layers, engine.bucket_bytes),
             "fc": _fc_layers(strategy, layers, global_batch, fc_mode, P),
             "transposed": _transposed_layers(strategy, layers, fc_mode)}
    starts = []
    for _ in range(iterations):
        starts.append((th.t, th.busy, channel.busy_s, channel.sent_bytes))
        th.waited = 0.0
        _iteration(strategy, layers, th, state, P, prof, engine, global_batch)
    iter_s = th.t - starts[-1][0]
    thread_s = th.busy - starts[-1][1]
    # the last iteration's channel use: its own chunks may still run after it ends
    busy = channel.busy_s - starts[-1][2]
    sent = channel.sent_bytes - starts[-1][3]
    compute_s = sum(l.fwd_s + l.bwd_s + l.update_s for l in layers)
    comm_s = blocking_comm_time(layers, net, P, engine)
    exposed = iter_s - compute_s
    denominator = min(compute_s, comm_s)
    efficiency = (compute_s + comm_s - iter_s) / denominator if denominator > 0 else 1.0
    result = Result(name, P, iter_s, compute_s, comm_s, exposed, efficiency, busy, thread_s,
                    sent)
    if trace:
        result.waits = channel.log
    return result


def blocking_comm_time(layers, net: Network, P: int, engine: Engine = Engine()) -> float:
    """One allreduce of all gradients through the engine, alone (bench/step.py's comm_ms)."""
    channel = Channel(net, P, engine)
    channel.log = None
    r = channel.enqueue(0.0, "allreduce", sum(l.grad_bytes for l in layers), 0)
    return channel.completion(r)


def lower_bound(result: Result) -> float:
    """The physical limit: neither the compute thread nor the link can be busier than the iteration."""
    return max(result.compute_thread_s, result.channel_busy_s)
