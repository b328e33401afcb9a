# Declarations of the progress engine: the C structures shared by the
# progress thread (which never holds the GIL) and the Python-facing classes.

from mpi4py.libmpi cimport MPI_Comm, MPI_Datatype, MPI_Op, MPI_Request, MPI_Status

include "_sys.pxi"

# cpdef: also module attributes of ext._progress, so that Python (engine/,
# analysis/, bench/) imports these numbers instead of retyping them.
cpdef enum:
    MAX_SLOTS = 256             # most MPI requests outstanding (the max_inflight cap)
    NEGOTIATION_WINDOW = 16     # not-yet-agreed requests one negotiation round can admit
    NEGOTIATION_LEN = 34        # 2 + 2 * NEGOTIATION_WINDOW
    ERRMSG_LEN = 512

cpdef enum:
    # The engine's defaults, for Exchanger, Trainer, engine.train, the
    # benchmarks and the cost model alike. 1 MiB chunks: what training and
    # every recorded step benchmark use (small enough for a priority request
    # to overtake a large one after a few ms on a 1 Gbit/s link).
    DEFAULT_CHUNK_BYTES = 1048576
    DEFAULT_MAX_INFLIGHT = 4    # credit: keeps the link busy, few enough for priorities
    DEFAULT_POLL_US = 200       # longest sleep between polls (the backoff's ceiling)
    # Least bytes of one rank's piece in a reduce-scatter / allgather / all-to-all
    # chunk: each chunk pays (P - 1) messages, so a piece of chunk_bytes / P would
    # be all latency at large P. 64 KiB is >= 3x (alpha + per-chunk overhead) /
    # beta on every link fitted here (loopback 11 KiB, 1 Gbit/s 3 KiB, 10 Gbit/s
    # 21 KiB: bench/results/netfit_*.json), so a step's latency stays <= 25 %.
    DEFAULT_MIN_PIECE_BYTES = 65536

cdef enum:
    KIND_ALLREDUCE = 0
    KIND_REDUCE_SCATTER = 1
    KIND_ALLGATHER = 2
    KIND_ALLTOALL = 3

cdef enum:
    # How an allreduce chunk is run (ext/_algorithms.pxi)
    ALGORITHM_MPI = 0                   # MPI_Iallreduce: MPI picks its own algorithm
    ALGORITHM_RECURSIVE_DOUBLING = 1    # ours, latency-optimised
    ALGORITHM_RING = 2                  # ours, bandwidth-optimised

cdef enum:
    STATE_QUEUED = 0    # enqueued here; not yet known to be enqueued on every rank
    STATE_AGREED = 1    # every rank enqueued it: its chunks may be posted
    STATE_DONE = 2
    STATE_FAILED = 3

ctypedef struct request_t:
    long long seq           # posting order on this rank (same on every rank)
    int kind
    int priority            # lower is posted first
    int mean                # divide the result by the communicator size
    int in_place            # allgather: the slice already sits in `out`
    int fault               # test hook: post with MPI_OP_NULL (MPI rejects it)
    int algorithm           # allreduce: ALGORITHM_*
    char* buf               # allreduce: data (in place); the others: send buffer
    # out: reduce-scatter: this rank's slice; allgather: the full result;
    # all-to-all: P blocks of counts[rank] elements, one from each rank
    char* out
    long long count         # elements in the full array
    int itemsize
    MPI_Datatype dtype
    MPI_Op op
    # allreduce: elements per chunk; reduce-scatter / allgather: elements per
    # rank's piece of a chunk
    long long chunk_elems
    int nchunks
    int chunks_posted
    int chunks_done
    int chunks_inflight
    int state
    int failed              # an error is recorded; FAILED once nothing is in flight
    long long signature     # hash of (kind, count, dtype, op, priority), checked across ranks
    int* counts             # partition: elements owned by each rank
    int* displs             # partition: offset of each rank's slice
    double t_enqueue
    double t_first_post
    double t_done
    char errmsg[ERRMSG_LEN]
    request_t* next

ctypedef struct slot_t:
    request_t* req
    int chunk
    long long nbytes
    double t_post
    # reduce-scatter / allgather chunk: each rank's piece (all-to-all: 4 x size
    # ints, see post_alltoall_chunk)
    int* counts
    int* displs                 # allgather chunk: where each piece lands in `out`
    char* staging               # reduce-scatter: pieces packed; our algorithms: received partial
    int step                    # our allreduce algorithms: the step in flight
    int tag                     # our allreduce algorithms: this chunk's message tag

ctypedef struct trace_event_t:
    long long seq
    int chunk
    int kind
    long long nbytes
    double t_post
    double t_done

cdef enum:
    # Which pthread objects __cinit__ has initialised (only those are destroyed)
    READY_LOCK = 1
    READY_WAKE = 2
    READY_CHANGED = 4

ctypedef struct engine_t:
    MPI_Comm comm
    int size
    int rank
    long long chunk_bytes
    long long min_piece_bytes   # least bytes per rank's piece (reduce-scatter, allgather, alltoall)
    int max_inflight
    long poll_us
    int pin_cpu
    int slice_us                # requested scheduler slice (EEVDF), 0 = kernel default
    int nice                    # nice value of the thread, 0 = unchanged
    pthread_t thread
    int thread_started
    int sync_ready              # READY_* bits
    pthread_mutex_t lock
    pthread_cond_t wake         # to the thread: new work, close or abandon
    pthread_cond_t changed      # from the thread: a request finished, or it exited
    # Guarded by `lock`:
    request_t* head             # unfinished requests in seq order
    request_t* tail
    long long n_enqueued
    int closing
    int abandon
    int exited
    int leaked                  # requests were abandoned with MPI operations in flight
    long long bytes_posted
    long long chunks_posted
    long long requests_completed
    long long requests_failed
    long long rounds
    double inflight_seconds
    double thread_cpu_seconds
    trace_event_t* trace
    long long trace_len
    long long trace_cap
    # Owned by the progress thread alone:
    long long agreed            # requests seq < agreed are enqueued on every rank
    int nactive
    MPI_Request mpi_reqs[MAX_SLOTS]
    slot_t slots[MAX_SLOTS]
    MPI_Request round_req
    int round_active
    long long round_send[NEGOTIATION_LEN]
    long long round_recv[NEGOTIATION_LEN]
    long long algorithm_chunks  # chunks posted with our own algorithms (their tags)
    int tag_ub                  # MPI_TAG_UB of the communicator


ctypedef struct poll_t:
    # What one poll of MPI found (poll_once, without the lock), for
    # apply_completions (under the lock).
    int outcount                # slots completed; -code when the whole MPI_Testsome failed
    int test_rc                 # MPI_Testsome's return code
    int round_done              # the negotiation round: 1 completed, -1 its test failed
    int round_rc                # MPI_Test's return code for the round
    int indices[MAX_SLOTS]
    MPI_Status statuses[MAX_SLOTS]
    MPI_Status round_status


# The stall responder (a thread of its own; see StallResponder in the .pyx).
cdef enum:
    STALL_QUERY_TAG = 7301
    STALL_REPLY_TAG = 7302
    STALL_QUERY_LEN = 1         # [query id]
    STALL_REPLY_LEN = 4         # [query id, requests enqueued, completed, failed]

ctypedef struct responder_t:
    MPI_Comm comm
    engine_t* engine            # counters read under engine.lock
    long poll_us
    pthread_t thread
    int started
    int sync_ready              # READY_LOCK | READY_WAKE once initialised
    int stop                    # guarded by lock
    long long answered
    pthread_mutex_t lock
    pthread_cond_t wake
