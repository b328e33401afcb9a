# cython: language_level=3
"""The progress engine: one C thread per process that owns non-blocking MPI
collectives and drives them to completion while Python computes.

Python (engine/exchanger.py) validates arrays and enqueues requests here; the
thread negotiates with its peers which requests every rank has enqueued, posts
their chunks as MPI_Iallreduce / MPI_Ireduce_scatter / MPI_Iallgatherv /
MPI_Ialltoallv, tests
them, and wakes whoever waits. The thread never touches a Python object and
never takes the GIL.
"""

from cpython.ref cimport Py_INCREF
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset, strncpy
from libc.stdio cimport snprintf
from libc.limits cimport LLONG_MAX

from mpi4py.libmpi cimport (
    MPI_Comm_rank, MPI_Comm_size, MPI_DOUBLE,
    MPI_ERR_IN_STATUS, MPI_Error_string, MPI_FLOAT, MPI_IN_PLACE, MPI_LONG_LONG,
    MPI_MAX_ERROR_STRING, MPI_MIN, MPI_OP_NULL, MPI_Iallgatherv, MPI_Iallreduce, MPI_Ialltoallv,
    MPI_Ireduce_scatter, MPI_Irecv, MPI_Isend, MPI_Isendrecv, MPI_REQUEST_NULL, MPI_Status,
    MPI_SUCCESS, MPI_SUM, MPI_TAG_UB, MPI_Comm_get_attr, MPI_Test, MPI_Testsome, MPI_UNDEFINED,
    MPI_ANY_SOURCE, MPI_Iprobe, MPI_Recv, MPI_Send,
)
cimport mpi4py.MPI as MPI
cimport cython

import os as _os


# ----------------------------------------------------------------------------
# Small helpers (no GIL)
# ----------------------------------------------------------------------------

cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


cdef inline double thread_cpu_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(<clockid_t>CLOCK_THREAD_CPUTIME_ID, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


cdef inline void sleep_us(long us) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = us // 1000000
    ts.tv_nsec = (us % 1000000) * 1000
    nanosleep(&ts, NULL)


# ----------------------------------------------------------------------------
# Return codes: one check for MPI, one for pthreads
# ----------------------------------------------------------------------------
#
# In the progress thread (no GIL, no exceptions) a failed MPI call is recorded
# on its request by mpi_ok and raised by Python at wait(). Python-facing code
# (__init__, enqueue, close) raises at once through check_mpi and
# check_pthread, naming the call.

cdef void mpi_error_text(int code, char* text) noexcept nogil:
    """MPI's own string for `code` into text[MPI_MAX_ERROR_STRING + 1]."""
    cdef int length = 0
    memset(text, 0, MPI_MAX_ERROR_STRING + 1)
    if MPI_Error_string(code, text, &length) != MPI_SUCCESS:
        strncpy(text, b"unknown MPI error", MPI_MAX_ERROR_STRING)


cdef void record_mpi_error(request_t* r, const char* where, int code) noexcept nogil:
    """Store MPI's own error string on the request; raised later at wait()."""
    cdef char text[MPI_MAX_ERROR_STRING + 1]
    mpi_error_text(code, text)
    if not r.failed:
        snprintf(r.errmsg, ERRMSG_LEN, b"%s failed (MPI error %d): %s", where, code, text)
    r.failed = 1


cdef bint mpi_ok(request_t* r, const char* where, int code) noexcept nogil:
    """The progress thread's check of an MPI return code: 1 on success; else
    the error is recorded on `r` (when there is one) and 0 returned."""
    if code == MPI_SUCCESS:
        return 1
    if r != NULL:
        record_mpi_error(r, where, code)
    return 0


cdef int check_mpi(int code, str call) except -1:
    """Raise RuntimeError naming `call` and MPI's error string unless `code` is MPI_SUCCESS."""
    cdef char text[MPI_MAX_ERROR_STRING + 1]
    if code != MPI_SUCCESS:
        mpi_error_text(code, text)
        raise RuntimeError(f"{call} failed (MPI error {code}): "
                           f"{text.decode('utf-8', 'replace')}")
    return 0


cdef int check_pthread(int code, str call) except -1:
    """Raise OSError naming `call` unless the pthread call returned 0 (pthreads return errno)."""
    if code != 0:
        raise OSError(code, f"{call} failed: {_os.strerror(code)}")
    return 0


cdef void finish_request(engine_t* e, request_t* r) noexcept nogil:
    """Under the lock: unlink a request that has nothing in flight and wake waiters."""
    cdef request_t* p = e.head
    cdef request_t* prev = NULL
    while p != NULL and p != r:
        prev = p
        p = p.next
    if p != NULL:
        if prev == NULL:
            e.head = r.next
        else:
            prev.next = r.next
        if e.tail == r:
            e.tail = prev
    r.next = NULL
    r.t_done = now()
    if r.failed:
        r.state = STATE_FAILED
        e.requests_failed += 1
    else:
        r.state = STATE_DONE
        e.requests_completed += 1
    pthread_cond_broadcast(&e.changed)


include "_algorithms.pxi"


# ----------------------------------------------------------------------------
# Posting and completing chunks (progress thread only)
# ----------------------------------------------------------------------------

cdef inline long long piece_length(long long total, long long chunk_elems, int c) noexcept nogil:
    """Elements of chunk c in a run of `total` split into chunks of chunk_elems (may be 0)."""
    cdef long long n = total - c * chunk_elems
    return 0 if n < 0 else (chunk_elems if n > chunk_elems else n)


cdef int fail_post(engine_t* e, int k, request_t* r, const char* what) noexcept nogil:
    """A chunk could not be set up (out of memory): the request fails, nothing is posted."""
    free_slot_buffers(&e.slots[k])
    snprintf(r.errmsg, ERRMSG_LEN, b"out of memory %s chunk %d", what, r.chunks_posted)
    r.failed = 1
    r.chunks_posted += 1
    return -1


cdef void free_slot_buffers(slot_t* s) noexcept nogil:
    free(s.counts)
    free(s.displs)
    free(s.staging)
    s.counts = NULL
    s.displs = NULL
    s.staging = NULL


cdef int post_alltoall_chunk(engine_t* e, request_t* r, int k, int c,
                             long long* nposted) noexcept nogil:
    """Chunk c of an all-to-all: piece c of every block, straight from and into the arrays.

    Block q of the send buffer (r.counts[q] elements at r.displs[q]) goes to
    rank q; the block from rank p lands at p * r.counts[rank] in `out`. Chunk
    c is elements [c*chunk_elems, (c+1)*chunk_elems) of every block, so no
    packing is needed: MPI_Ialltoallv takes the displacements as they are.
    Returns MPI's code, or -1 (request failed) when out of memory.
    """
    cdef int p
    cdef long long offset = c * r.chunk_elems
    cdef long long own = r.counts[e.rank]
    cdef int* v = <int*>malloc(4 * e.size * sizeof(int))
    cdef int* send_counts
    cdef int* send_displs
    cdef int* recv_counts
    cdef int* recv_displs
    nposted[0] = 0
    e.slots[k].counts = v          # one allocation, freed by free_slot_buffers
    if v == NULL:
        return fail_post(e, k, r, b"posting")
    send_counts = v
    send_displs = v + e.size
    recv_counts = v + 2 * e.size
    recv_displs = v + 3 * e.size
    for p in range(e.size):
        send_counts[p] = <int>piece_length(r.counts[p], r.chunk_elems, c)
        send_displs[p] = <int>(r.displs[p] + offset)
        recv_counts[p] = <int>piece_length(own, r.chunk_elems, c)
        recv_displs[p] = <int>(p * own + offset)
        nposted[0] += send_counts[p]
    return MPI_Ialltoallv(r.buf, send_counts, send_displs, r.dtype, r.out, recv_counts,
                          recv_displs, r.dtype, e.comm, &e.mpi_reqs[k])


cdef int post_chunk(engine_t* e, request_t* r) noexcept nogil:
    """Post chunk `r.chunks_posted` of a request into a free slot. 0 on success."""
    cdef int c = r.chunks_posted
    cdef long long offset, n
    cdef int rc
    cdef int k = e.nactive
    cdef MPI_Datatype dtype = r.dtype
    cdef void* send
    cdef int p
    cdef long long piece, packed
    e.mpi_reqs[k] = MPI_REQUEST_NULL
    e.slots[k].counts = NULL
    e.slots[k].displs = NULL
    e.slots[k].staging = NULL
    if r.kind == KIND_ALLREDUCE and r.algorithm != ALGORITHM_MPI:
        n = piece_length(r.count, r.chunk_elems, c)
        rc = start_algorithm_chunk(e, k, r, c)
        if rc == -1:
            return fail_post(e, k, r, b"for the scratch of")
    elif r.kind == KIND_ALLREDUCE:
        offset = c * r.chunk_elems
        n = piece_length(r.count, r.chunk_elems, c)
        rc = MPI_Iallreduce(MPI_IN_PLACE, r.buf + offset * r.itemsize, <int>n, dtype,
                            MPI_OP_NULL if r.fault else r.op, e.comm, &e.mpi_reqs[k])
    elif r.kind == KIND_ALLTOALL:
        rc = post_alltoall_chunk(e, r, k, c, &n)
        if rc < 0:
            return rc
    else:
        # Chunk c of a reduce-scatter / allgather is piece c of every rank's
        # slice: elements [c*chunk_elems, (c+1)*chunk_elems) of each block.
        e.slots[k].counts = <int*>malloc(e.size * sizeof(int))
        e.slots[k].displs = <int*>malloc(e.size * sizeof(int))
        if e.slots[k].counts == NULL or e.slots[k].displs == NULL:
            return fail_post(e, k, r, b"posting")
        n = 0
        offset = c * r.chunk_elems
        for p in range(e.size):
            piece = piece_length(r.counts[p], r.chunk_elems, c)
            e.slots[k].counts[p] = <int>piece
            e.slots[k].displs[p] = <int>(r.displs[p] + offset)
            n += piece
        if r.kind == KIND_REDUCE_SCATTER:
            # MPI wants the pieces contiguous in rank order: pack them.
            e.slots[k].staging = <char*>malloc(n * r.itemsize + 1)
            if e.slots[k].staging == NULL:
                return fail_post(e, k, r, b"packing")
            packed = 0
            for p in range(e.size):
                memcpy(e.slots[k].staging + packed * r.itemsize,
                       r.buf + e.slots[k].displs[p] * r.itemsize,
                       e.slots[k].counts[p] * r.itemsize)
                packed += e.slots[k].counts[p]
            rc = MPI_Ireduce_scatter(e.slots[k].staging, r.out + offset * r.itemsize,
                                     e.slots[k].counts, dtype, r.op, e.comm, &e.mpi_reqs[k])
        else:
            send = (MPI_IN_PLACE if r.in_place else
                    <void*>(r.buf + offset * r.itemsize))
            rc = MPI_Iallgatherv(send, e.slots[k].counts[e.rank], dtype, r.out,
                                 e.slots[k].counts, e.slots[k].displs, dtype, e.comm,
                                 &e.mpi_reqs[k])
    r.chunks_posted += 1
    if not mpi_ok(r, b"posting a chunk", rc):
        free_slot_buffers(&e.slots[k])
        return rc
    if r.t_first_post == 0.0:
        r.t_first_post = now()
    e.slots[k].req = r
    e.slots[k].chunk = c
    e.slots[k].nbytes = n * r.itemsize
    e.slots[k].t_post = now()
    e.nactive += 1
    r.chunks_inflight += 1
    e.chunks_posted += 1
    e.bytes_posted += n * r.itemsize
    return 0


cdef void divide_by_size(engine_t* e, request_t* r, int chunk) noexcept nogil:
    """'mean' = the sum from MPI divided by P, on every rank alike (bitwise equal)."""
    cdef char* base
    cdef long long n, i
    cdef float* f
    cdef double* d
    cdef double p = e.size
    cdef float pf = <float>e.size
    if r.kind == KIND_ALLREDUCE:
        base = r.buf + chunk * r.chunk_elems * r.itemsize
        n = piece_length(r.count, r.chunk_elems, chunk)
    else:
        base = r.out + chunk * r.chunk_elems * r.itemsize
        n = piece_length(r.counts[e.rank], r.chunk_elems, chunk)
    if r.itemsize == 4:
        f = <float*>base
        for i in range(n):
            f[i] = f[i] / pf
    else:
        d = <double*>base
        for i in range(n):
            d[i] = d[i] / p


cdef int complete_slot(engine_t* e, int k, int error_code) noexcept nogil:
    """Under the lock: account for the completion of slot k. Returns 1 if its request finished."""
    cdef request_t* r = e.slots[k].req
    cdef double t = now()
    cdef trace_event_t* ev
    r.chunks_inflight -= 1
    free_slot_buffers(&e.slots[k])
    e.inflight_seconds += t - e.slots[k].t_post
    if mpi_ok(r, b"a chunk", error_code):
        r.chunks_done += 1
    if e.trace != NULL:
        if e.trace_len == e.trace_cap:
            ev = <trace_event_t*>realloc(e.trace, 2 * e.trace_cap * sizeof(trace_event_t))
            if ev != NULL:
                e.trace = ev
                e.trace_cap *= 2
        if e.trace_len < e.trace_cap:
            ev = &e.trace[e.trace_len]
            ev.seq = r.seq
            ev.chunk = e.slots[k].chunk
            ev.kind = r.kind
            ev.nbytes = e.slots[k].nbytes
            ev.t_post = e.slots[k].t_post
            ev.t_done = t
            e.trace_len += 1
    if r.chunks_inflight == 0 and (r.chunks_done == r.nchunks or r.failed):
        finish_request(e, r)
        return 1
    return 0


# ----------------------------------------------------------------------------
# Negotiation: which requests has every rank enqueued?
# ----------------------------------------------------------------------------

cdef int round_needed(engine_t* e) noexcept nogil:
    """Under the lock: is there anything a negotiation round could unlock?"""
    cdef request_t* r
    if e.n_enqueued > e.agreed:
        return 1
    if e.nactive >= e.max_inflight:
        return 0
    r = e.head
    while r != NULL:
        if r.state == STATE_AGREED and not r.failed and r.chunks_posted < r.nchunks:
            return 1
        r = r.next
    return 0


cdef int start_round(engine_t* e) noexcept nogil:
    """Under the lock: post the MIN-allreduce that agrees on what may be posted next.

    Layout: [enqueued count, free slots, signature of requests agreed..agreed+W-1,
    minus the same signatures]. MIN over ranks gives the count every rank has
    reached, the slots free everywhere, and (through the negated copy) the
    maximum signature: min == max proves every rank enqueued the same request.
    """
    cdef int j
    cdef request_t* r = e.head
    cdef long long seq
    for j in range(NEGOTIATION_LEN):
        e.round_send[j] = LLONG_MAX
    e.round_send[0] = e.n_enqueued
    e.round_send[1] = e.max_inflight - e.nactive
    while r != NULL:
        seq = r.seq - e.agreed
        if 0 <= seq < NEGOTIATION_WINDOW:
            e.round_send[2 + seq] = r.signature
            e.round_send[2 + NEGOTIATION_WINDOW + seq] = -r.signature
        r = r.next
    e.round_req = MPI_REQUEST_NULL
    cdef int rc = MPI_Iallreduce(e.round_send, e.round_recv, NEGOTIATION_LEN, MPI_LONG_LONG,
                                 MPI_MIN, e.comm, &e.round_req)
    if rc != MPI_SUCCESS:
        return rc
    e.round_active = 1
    e.rounds += 1
    return 0


cdef request_t* next_to_post(engine_t* e) noexcept nogil:
    """The agreed request whose next chunk goes first: lowest (priority, seq)."""
    cdef request_t* best = NULL
    cdef request_t* r = e.head
    while r != NULL:
        if r.state == STATE_AGREED and not r.failed and r.chunks_posted < r.nchunks:
            if best == NULL or r.priority < best.priority:
                best = r     # the list is in seq order, so ties keep the older one
        r = r.next
    return best


cdef void apply_round(engine_t* e) noexcept nogil:
    """Under the lock: admit newly agreed requests and post as many chunks as every rank can."""
    cdef long long everywhere = e.round_recv[0]
    cdef long long budget = e.round_recv[1]
    cdef long long admit = everywhere - e.agreed
    cdef long long j
    cdef request_t* r
    cdef request_t* nxt
    if admit > NEGOTIATION_WINDOW:
        admit = NEGOTIATION_WINDOW
    r = e.head
    while r != NULL:
        nxt = r.next
        j = r.seq - e.agreed
        if 0 <= j < admit:
            r.state = STATE_AGREED
            if e.round_recv[2 + j] != -e.round_recv[2 + NEGOTIATION_WINDOW + j]:
                snprintf(r.errmsg, ERRMSG_LEN,
                         b"request #%lld does not match across ranks: every rank must post "
                         b"the same collective (kind, element count, dtype, op, priority, "
                         b"allreduce algorithm) "
                         b"in the same order", r.seq)
                r.failed = 1
            if r.failed or r.nchunks == 0:
                finish_request(e, r)
        r = nxt
    if admit > 0:
        e.agreed += admit
    while budget > 0:
        r = next_to_post(e)
        if r == NULL:
            break
        post_chunk(e, r)
        if r.failed and r.chunks_inflight == 0:
            finish_request(e, r)
        budget -= 1


cdef void abandon_all(engine_t* e) noexcept nogil:
    """Under the lock: fail every unfinished request; MPI may still own their buffers."""
    cdef request_t* r = e.head
    cdef request_t* nxt
    while r != NULL:
        nxt = r.next
        if r.chunks_inflight > 0 or e.round_active:
            e.leaked = 1
        if not r.failed:
            snprintf(r.errmsg, ERRMSG_LEN,
                     b"the exchanger was closed before request #%lld completed "
                     b"(%d of %d chunks done): a peer rank never posted the matching collective",
                     r.seq, r.chunks_done, r.nchunks)
            r.failed = 1
        r.chunks_inflight = 0
        finish_request(e, r)
        r = nxt
    e.nactive = 0
    e.round_active = 0


# ----------------------------------------------------------------------------
# The progress loop
# ----------------------------------------------------------------------------
#
# Design constraints, in order of importance:
#  1. Every rank issues the same collectives in the same order on the engine's
#     communicator, or MPI matches the wrong operations (a hang or silent
#     corruption). Which chunk goes next therefore depends only on information
#     every rank shares: the agreed set of requests (from the negotiation
#     round), their (priority, seq) order and the number of free slots agreed
#     in that round, never on local timing.
#  2. Non-blocking collectives only advance while someone calls into MPI, so
#     this thread keeps testing everything in flight while Python computes.
#  3. It must not steal a core from the compute threads: between polls it
#     backs off (1, 2, 4, ... up to poll_us microseconds after the last event),
#     and with nothing to do it blocks on a condition variable.
#  4. It never touches a Python object and never takes the GIL; errors are
#     stored on the request and raised by Python at wait().
#  5. A buffer is never released while MPI may still write to it: a request
#     finishes only once none of its chunks is in flight, and until then the
#     Engine holds its Request (which holds the arrays; see Engine.live).
#
# One pass of the loop: under the lock, decide (start a negotiation round,
# sleep when idle); poll_once without it; apply_completions under it.

cdef void configure_thread(engine_t* e) noexcept nogil:
    """Timer slack, scheduler slice, nice value and core of the calling (progress) thread."""
    cdef cpu_set_t cpus
    progress_set_timer_slack(1000)
    if e.slice_us > 0:
        progress_request_slice(<unsigned long long>e.slice_us * 1000)
    if e.nice != 0:
        progress_set_nice(e.nice)
    if e.pin_cpu >= 0:
        CPU_ZERO(&cpus)
        CPU_SET(e.pin_cpu, &cpus)
        pthread_setaffinity_np(pthread_self(), sizeof(cpu_set_t), &cpus)


cdef void poll_once(engine_t* e, poll_t* p) noexcept nogil:
    """Without the lock (Python may enqueue meanwhile): one MPI_Testsome over the
    slots in flight, then one MPI_Test of the negotiation round, results into `p`."""
    p.outcount = 0
    p.test_rc = MPI_SUCCESS
    if e.nactive > 0:
        p.test_rc = MPI_Testsome(e.nactive, e.mpi_reqs, &p.outcount, p.indices, p.statuses)
        if p.outcount == MPI_UNDEFINED:
            p.outcount = 0
        if p.test_rc != MPI_SUCCESS and p.test_rc != MPI_ERR_IN_STATUS:
            p.outcount = -p.test_rc    # the whole call failed: every slot fails
    p.round_done = 0
    p.round_rc = MPI_SUCCESS
    if e.round_active:
        p.round_rc = MPI_Test(&e.round_req, &p.round_done, &p.round_status)
        if p.round_rc != MPI_SUCCESS:
            p.round_done = -1


cdef int apply_completions(engine_t* e, poll_t* p) noexcept nogil:
    """Under the lock: complete or advance the slots `poll_once` found done, then
    apply a completed negotiation round.

    Returns 1 if anything progressed, 0 if nothing did, -1 if the round
    failed (everything is abandoned and the thread must exit).
    """
    cdef int i, j, k, rc
    cdef int progressed = 0
    if p.outcount < 0:
        for k in range(e.nactive):
            complete_slot(e, k, -p.outcount)
        e.nactive = 0
        progressed = 1
    elif p.outcount > 0:
        for i in range(p.outcount):
            k = p.indices[i]
            rc = MPI_SUCCESS
            if p.test_rc == MPI_ERR_IN_STATUS:    # only then are the error fields set
                rc = p.statuses[i].MPI_ERROR
            if rc == MPI_SUCCESS and e.slots[k].req.algorithm != ALGORITHM_MPI:
                if next_step(e, k):
                    continue        # the chunk's next step now occupies slot k
            if rc == MPI_SUCCESS and e.slots[k].req.mean and not e.slots[k].req.failed:
                divide_by_size(e, e.slots[k].req, e.slots[k].chunk)
            complete_slot(e, k, rc)
        # Compact the live slots (completed requests are MPI_REQUEST_NULL now).
        j = 0
        for k in range(e.nactive):
            if e.mpi_reqs[k] != MPI_REQUEST_NULL:
                e.mpi_reqs[j] = e.mpi_reqs[k]
                e.slots[j] = e.slots[k]
                j += 1
        e.nactive = j
        progressed = 1
    if p.round_done == -1:
        mpi_ok(e.head, b"the negotiation round", p.round_rc)
        e.round_active = 0
        abandon_all(e)
        return -1
    if p.round_done:
        e.round_active = 0
        apply_round(e)
        progressed = 1
    return progressed


cdef void* progress_main(void* arg) noexcept nogil:
    cdef engine_t* e = <engine_t*>arg
    cdef int progressed
    cdef long backoff_us = 1
    cdef poll_t poll
    configure_thread(e)

    pthread_mutex_lock(&e.lock)
    while True:
        if e.abandon:
            abandon_all(e)
            break
        if not e.round_active and round_needed(e):
            if not mpi_ok(e.head, b"the negotiation round", start_round(e)):
                # The communicator itself is broken: fail everything rather than hang.
                abandon_all(e)
                break
        if e.nactive == 0 and not e.round_active:
            if e.closing and e.head == NULL:
                break
            if not round_needed(e):
                e.thread_cpu_seconds = thread_cpu_now()
                pthread_cond_wait(&e.wake, &e.lock)
                continue
        pthread_mutex_unlock(&e.lock)
        poll_once(e, &poll)
        pthread_mutex_lock(&e.lock)
        progressed = apply_completions(e, &poll)
        if progressed < 0:
            break
        if progressed:
            backoff_us = 1
        elif e.nactive > 0 or e.round_active:
            # Exponential backoff to poll_us: quick follow-ups right after
            # something happened (the next step of a collective is often
            # imminent), a slow steady poll while transfers run.
            pthread_mutex_unlock(&e.lock)
            sleep_us(backoff_us)
            pthread_mutex_lock(&e.lock)
            backoff_us = min(2 * backoff_us, e.poll_us)

    e.thread_cpu_seconds = thread_cpu_now()
    e.exited = 1
    pthread_cond_broadcast(&e.changed)
    pthread_mutex_unlock(&e.lock)
    return NULL


# ----------------------------------------------------------------------------
# Python-facing classes
# ----------------------------------------------------------------------------

# The C enums by name, for engine/exchanger.py and engine/trace.py (never retyped there).
KINDS = {"allreduce": KIND_ALLREDUCE, "reduce_scatter": KIND_REDUCE_SCATTER,
         "allgather": KIND_ALLGATHER, "alltoall": KIND_ALLTOALL}
KIND_NAMES = {code: name for name, code in KINDS.items()}
STATES = {"queued": STATE_QUEUED, "agreed": STATE_AGREED, "done": STATE_DONE,
          "failed": STATE_FAILED}
#: allreduce algorithms: MPI_Iallreduce, or the progress thread's own (_algorithms.pxi)
ALGORITHM_CODES = {"mpi": ALGORITHM_MPI, "recursive_doubling": ALGORITHM_RECURSIVE_DOUBLING,
                   "ring": ALGORITHM_RING}


# Requests an engine had to abandon while MPI still owned their buffers
# (Engine.close timed out): kept for the life of the process.
_LEAKED = []


@cython.no_gc_clear     # __dealloc__ needs `engine` and `arrays` even when collected in a cycle
cdef class Request:
    """One enqueued collective, as seen from Python. Owns its C record and its arrays.

    Its Engine holds it until it has finished (Engine.live), so dropping
    every Python reference to a request and its arrays while chunks are in
    flight is safe.
    """
    cdef request_t* r
    cdef Engine engine
    cdef readonly object arrays      # every buffer MPI reads or writes
    cdef readonly str description
    cdef bint enqueued               # linked into the engine's list

    def __dealloc__(self):
        cdef engine_t* e
        cdef int unsafe = 0
        if self.r == NULL:
            return
        if self.enqueued:
            e = self.engine.e
            pthread_mutex_lock(&e.lock)
            unsafe = self.r.state < STATE_DONE or e.leaked
            pthread_mutex_unlock(&e.lock)
        if unsafe:
            # Only reachable when a garbage cycle takes the Engine's `live`
            # with it: the thread may still use the record and MPI the
            # arrays, so both are leaked rather than freed.
            Py_INCREF(self.arrays)
            self.r = NULL
            return
        free(self.r.counts)
        free(self.r.displs)
        free(self.r)
        self.r = NULL

    @property
    def seq(self):
        return self.r.seq

    cpdef int state(self):
        cdef int s
        pthread_mutex_lock(&self.engine.e.lock)
        s = self.r.state
        pthread_mutex_unlock(&self.engine.e.lock)
        return s

    def finished(self):
        return self.state() >= STATE_DONE

    def failed(self):
        return self.state() == STATE_FAILED

    def error_message(self):
        return self.r.errmsg.decode("utf-8", "replace")

    def wait(self, timeout=None):
        """Block (without the GIL) until finished; False on timeout."""
        cdef engine_t* e = self.engine.e
        cdef double deadline = -1.0
        cdef timespec ts
        cdef int rc = 0
        if timeout is not None:
            deadline = now() + max(0.0, float(timeout))
        with nogil:
            pthread_mutex_lock(&e.lock)
            while self.r.state < STATE_DONE:
                if deadline < 0:
                    pthread_cond_wait(&e.changed, &e.lock)
                else:
                    ts.tv_sec = <long>deadline
                    ts.tv_nsec = <long>((deadline - ts.tv_sec) * 1e9)
                    rc = pthread_cond_timedwait(&e.changed, &e.lock, &ts)
                    if rc == ETIMEDOUT and self.r.state < STATE_DONE:
                        break
            rc = self.r.state
            pthread_mutex_unlock(&e.lock)
        return rc >= STATE_DONE

    def progress(self):
        """A snapshot for error messages: (state, done, in flight, posted, total chunks)."""
        pthread_mutex_lock(&self.engine.e.lock)
        snapshot = (self.r.state, self.r.chunks_done, self.r.chunks_inflight,
                    self.r.chunks_posted, self.r.nchunks)
        pthread_mutex_unlock(&self.engine.e.lock)
        return snapshot

    def times(self):
        """(enqueue, first post, done) on the CLOCK_MONOTONIC clock (= time.monotonic())."""
        return (self.r.t_enqueue, self.r.t_first_post, self.r.t_done)


@cython.no_gc_clear     # __dealloc__ may still need `live`
cdef class Engine:
    """The C progress engine of one communicator. engine.Exchanger wraps it."""
    cdef engine_t* e
    cdef readonly int size
    cdef readonly int rank
    cdef long long next_seq
    cdef object comm     # keeps the MPI communicator object alive
    # seq -> Request for every request not yet seen finished: the engine, not
    # its caller, keeps the buffers alive while MPI may touch them.
    cdef dict live

    def __cinit__(self):
        self.live = {}

    # __init__, not __cinit__, takes the arguments so that its signature is
    # introspectable (the .pyi stub is checked against it by stubtest).
    def __init__(self, MPI.Comm comm not None, long long chunk_bytes, int max_inflight,
                 long poll_us, int pin_cpu=-1, bint trace=False, int slice_us=0, int nice=0,
                 long long min_piece_bytes=DEFAULT_MIN_PIECE_BYTES):
        cdef pthread_condattr_t attr
        cdef int* tag_ub = NULL
        cdef int found = 0
        if self.e != NULL:
            raise RuntimeError("an Engine is initialised once")
        if max_inflight < 1 or max_inflight > MAX_SLOTS:
            raise ValueError(f"max_inflight must be in [1, {MAX_SLOTS}], got {max_inflight}")
        if min_piece_bytes < 0:
            raise ValueError(f"min_piece_bytes must be >= 0, got {min_piece_bytes}")
        self.e = <engine_t*>calloc(1, sizeof(engine_t))
        if self.e == NULL:
            raise MemoryError()
        self.comm = comm
        self.e.comm = comm.ob_mpi
        check_mpi(MPI_Comm_size(self.e.comm, &self.e.size), "MPI_Comm_size")
        check_mpi(MPI_Comm_rank(self.e.comm, &self.e.rank), "MPI_Comm_rank")
        self.size = self.e.size
        self.rank = self.e.rank
        self.e.chunk_bytes = chunk_bytes
        self.e.min_piece_bytes = min_piece_bytes
        self.e.max_inflight = max_inflight
        self.e.poll_us = poll_us
        self.e.pin_cpu = pin_cpu
        self.e.slice_us = slice_us
        self.e.nice = nice
        self.e.round_req = MPI_REQUEST_NULL
        self.e.tag_ub = 32767       # the least MPI_TAG_UB the standard allows
        check_mpi(MPI_Comm_get_attr(self.e.comm, MPI_TAG_UB, &tag_ub, &found),
                  "MPI_Comm_get_attr(MPI_TAG_UB)")
        if found:
            self.e.tag_ub = tag_ub[0]
        check_pthread(pthread_mutex_init(&self.e.lock, NULL), "pthread_mutex_init")
        self.e.sync_ready |= READY_LOCK
        check_pthread(pthread_condattr_init(&attr), "pthread_condattr_init")
        try:
            check_pthread(pthread_condattr_setclock(&attr, CLOCK_MONOTONIC),
                          "pthread_condattr_setclock(CLOCK_MONOTONIC)")
            check_pthread(pthread_cond_init(&self.e.wake, &attr), "pthread_cond_init")
            self.e.sync_ready |= READY_WAKE
            check_pthread(pthread_cond_init(&self.e.changed, &attr), "pthread_cond_init")
            self.e.sync_ready |= READY_CHANGED
        finally:
            pthread_condattr_destroy(&attr)
        if trace:
            self.e.trace_cap = 4096
            self.e.trace = <trace_event_t*>malloc(self.e.trace_cap * sizeof(trace_event_t))
        check_pthread(pthread_create(&self.e.thread, NULL, progress_main, self.e),
                      "pthread_create (the progress thread)")
        self.e.thread_started = 1

    def __dealloc__(self):
        if self.e == NULL:
            return
        if self.e.thread_started:
            # Never free state a running thread uses: shut it down first.
            with nogil:
                pthread_mutex_lock(&self.e.lock)
                self.e.abandon = 1
                pthread_cond_signal(&self.e.wake)
                pthread_mutex_unlock(&self.e.lock)
                pthread_join(self.e.thread, NULL)
            self.e.thread_started = 0
        if self.e.leaked:
            # MPI may still touch this memory and the requests' arrays:
            # leaking them is the safe choice.
            if self.live:
                _LEAKED.append(list(self.live.values()))
            return
        if self.e.sync_ready & READY_LOCK:
            pthread_mutex_destroy(&self.e.lock)
        if self.e.sync_ready & READY_WAKE:
            pthread_cond_destroy(&self.e.wake)
        if self.e.sync_ready & READY_CHANGED:
            pthread_cond_destroy(&self.e.changed)
        free(self.e.trace)
        free(self.e)
        self.e = NULL

    cdef int ready(self) except -1:
        if self.e == NULL:
            raise RuntimeError("Engine.__init__ was never called")
        return 0

    def enqueue(self, int kind, size_t buf_address, size_t out_address, long long count,
                int itemsize, str op, int priority, long long signature, object counts,
                object arrays, str description, bint fault=False, int algorithm=ALGORITHM_MPI):
        """Hand a validated request to the thread.

        The caller (engine.Exchanger) has checked dtype, contiguity and sizes;
        `arrays` holds every buffer: the returned Request keeps it, and the
        engine keeps the Request until the thread has finished with it.
        `count` is the full array's element count (n of the partition).
        `algorithm` (ALGORITHM_*) says how an allreduce's chunks run.
        """
        self.ready()
        cdef Request req = Request.__new__(Request)
        cdef request_t* r = <request_t*>calloc(1, sizeof(request_t))
        cdef int p
        cdef long long offset = 0
        if r == NULL:
            raise MemoryError()
        req.r = r
        req.engine = self
        req.arrays = arrays
        r.kind = kind
        r.priority = priority
        r.mean = 1 if op == "mean" else 0
        r.op = MPI_SUM
        r.fault = fault
        # One rank has nothing to exchange: MPI's allreduce is then a no-op.
        r.algorithm = algorithm if kind == KIND_ALLREDUCE and self.size > 1 else ALGORITHM_MPI
        if r.algorithm not in (ALGORITHM_MPI, ALGORITHM_RECURSIVE_DOUBLING, ALGORITHM_RING):
            raise ValueError(f"unknown allreduce algorithm code {algorithm}")
        r.signature = signature
        r.itemsize = itemsize
        r.dtype = MPI_FLOAT if itemsize == 4 else MPI_DOUBLE
        r.buf = <char*>buf_address
        r.count = count
        if kind == KIND_ALLREDUCE:
            r.chunk_elems = max(1, self.e.chunk_bytes // r.itemsize)
            r.nchunks = <int>((r.count + r.chunk_elems - 1) // r.chunk_elems)
        else:
            r.out = <char*>out_address
            # piece c of every rank's block: chunk_bytes / P in all, but never less than
            # min_piece_bytes per rank, since each chunk pays (P - 1) messages' latency
            r.chunk_elems = max(1, self.e.min_piece_bytes // r.itemsize,
                                self.e.chunk_bytes // r.itemsize // self.size)
            r.nchunks = <int>((counts[0] + r.chunk_elems - 1) // r.chunk_elems)
            r.counts = <int*>malloc(self.size * sizeof(int))
            r.displs = <int*>malloc(self.size * sizeof(int))
            if r.counts == NULL or r.displs == NULL:
                raise MemoryError()
            for p in range(self.size):
                r.counts[p] = counts[p]
                r.displs[p] = offset
                offset += counts[p]
            if kind == KIND_ALLGATHER:
                r.in_place = (r.buf == r.out + r.displs[self.rank] * r.itemsize)
        r.t_enqueue = now()
        self.pending()           # let go of the requests that have finished meanwhile
        check_pthread(pthread_mutex_lock(&self.e.lock), "pthread_mutex_lock")
        if self.e.closing or self.e.exited or self.e.abandon:
            pthread_mutex_unlock(&self.e.lock)
            raise RuntimeError("the exchanger is closed")
        r.seq = self.next_seq
        self.next_seq += 1
        if self.e.tail == NULL:
            self.e.head = r
        else:
            self.e.tail.next = r
        self.e.tail = r
        self.e.n_enqueued += 1
        self.live[r.seq] = req
        req.enqueued = True
        pthread_cond_signal(&self.e.wake)
        pthread_mutex_unlock(&self.e.lock)
        req.description = description.format(seq=r.seq)
        return req

    def pending(self):
        """The requests not yet finished, in posting order; forgets the finished ones.

        Until a request is seen finished here, the engine holds it (and so its
        arrays): the progress thread and MPI may still use them.
        """
        self.ready()
        cdef Request req
        cdef int leaked
        unfinished = []
        finished = []
        pthread_mutex_lock(&self.e.lock)
        leaked = self.e.leaked
        for seq, req in self.live.items():
            (unfinished if req.r.state < STATE_DONE else finished).append(seq)
        pthread_mutex_unlock(&self.e.lock)
        if not leaked:      # else MPI may still use the abandoned ones' arrays: keep them
            for seq in finished:
                del self.live[seq]
        return [self.live[seq] for seq in unfinished]

    def close(self, double timeout):
        """Let the thread finish what is pending, failing it after `timeout` seconds.

        Returns True if everything finished, False if requests were abandoned.
        """
        self.ready()
        cdef double deadline = now() + timeout
        cdef timespec ts
        cdef int clean = 1
        cdef int rc
        if not self.e.thread_started:
            return not self.e.leaked
        with nogil:
            pthread_mutex_lock(&self.e.lock)
            self.e.closing = 1
            pthread_cond_signal(&self.e.wake)
            while not self.e.exited:
                ts.tv_sec = <long>deadline
                ts.tv_nsec = <long>((deadline - ts.tv_sec) * 1e9)
                if pthread_cond_timedwait(&self.e.changed, &self.e.lock, &ts) == ETIMEDOUT:
                    if not self.e.exited:
                        clean = 0
                        self.e.abandon = 1
                        pthread_cond_signal(&self.e.wake)
                        break
            pthread_mutex_unlock(&self.e.lock)
            rc = pthread_join(self.e.thread, NULL)
        check_pthread(rc, "pthread_join (the progress thread)")
        self.e.thread_started = 0
        if self.e.leaked:
            # MPI may still write into these arrays: keep them for good.
            _LEAKED.append(list(self.live.values()))
        self.live.clear()
        return bool(clean) and not self.e.leaked

    @property
    def leaked(self):
        self.ready()
        return bool(self.e.leaked)

    def thread_cpu_seconds(self):
        self.ready()
        cdef clockid_t cid
        cdef timespec ts
        if self.e.thread_started and not self.e.exited:
            if pthread_getcpuclockid(self.e.thread, &cid) == 0:
                if clock_gettime(cid, &ts) == 0:
                    return ts.tv_sec + 1e-9 * ts.tv_nsec
        return self.e.thread_cpu_seconds

    def stats(self):
        self.ready()
        pthread_mutex_lock(&self.e.lock)
        d = {
            "bytes_posted": self.e.bytes_posted,
            "chunks_posted": self.e.chunks_posted,
            "requests_enqueued": self.e.n_enqueued,
            "requests_completed": self.e.requests_completed,
            "requests_failed": self.e.requests_failed,
            "negotiation_rounds": self.e.rounds,
            "chunk_seconds_in_flight": self.e.inflight_seconds,
        }
        pthread_mutex_unlock(&self.e.lock)
        d["progress_thread_cpu_s"] = self.thread_cpu_seconds()
        return d

    def drain_trace(self):
        """Return and forget the recorded chunk events: (seq, chunk, kind, bytes, t_post, t_done)."""
        self.ready()
        events = []
        cdef long long i
        if self.e.trace == NULL:
            return events
        pthread_mutex_lock(&self.e.lock)
        for i in range(self.e.trace_len):
            ev = self.e.trace[i]
            events.append((ev.seq, ev.chunk, KIND_NAMES[ev.kind], ev.nbytes, ev.t_post, ev.t_done))
        self.e.trace_len = 0
        pthread_mutex_unlock(&self.e.lock)
        return events


def monotonic():
    """The clock the engine stamps events with (CLOCK_MONOTONIC, seconds)."""
    return now()


# ----------------------------------------------------------------------------
# Stall responder: answers "how far have you got?" while Python may be stuck
# ----------------------------------------------------------------------------
#
# A rank that has waited too long for a collective asks its peers, point to
# point on a communicator of their own (so nothing can match the engine's
# collectives), how many requests they have enqueued. The answer comes from
# this thread, which never takes the GIL: a rank whose Python is busy or hung
# still answers, and one that does not answer is stopped, dead or swapped out.

cdef void* responder_main(void* arg) noexcept nogil:
    cdef responder_t* s = <responder_t*>arg
    cdef long long query[STALL_QUERY_LEN]
    cdef long long reply[STALL_REPLY_LEN]
    cdef int flag
    cdef MPI_Status status
    cdef timespec ts
    cdef double deadline
    while True:
        pthread_mutex_lock(&s.lock)
        if not s.stop:
            deadline = now() + 1e-6 * s.poll_us
            ts.tv_sec = <long>deadline
            ts.tv_nsec = <long>((deadline - ts.tv_sec) * 1e9)
            pthread_cond_timedwait(&s.wake, &s.lock, &ts)
        if s.stop:
            pthread_mutex_unlock(&s.lock)
            break
        pthread_mutex_unlock(&s.lock)
        while True:
            flag = 0
            if MPI_Iprobe(MPI_ANY_SOURCE, STALL_QUERY_TAG, s.comm, &flag, &status) != MPI_SUCCESS:
                break
            if not flag:
                break
            if MPI_Recv(query, STALL_QUERY_LEN, MPI_LONG_LONG, status.MPI_SOURCE,
                        STALL_QUERY_TAG, s.comm, &status) != MPI_SUCCESS:
                break
            reply[0] = query[0]
            pthread_mutex_lock(&s.engine.lock)
            reply[1] = s.engine.n_enqueued
            reply[2] = s.engine.requests_completed
            reply[3] = s.engine.requests_failed
            pthread_mutex_unlock(&s.engine.lock)
            # A few bytes: sent eagerly, so this returns even if the asker is gone.
            MPI_Send(reply, STALL_REPLY_LEN, MPI_LONG_LONG, status.MPI_SOURCE,
                     STALL_REPLY_TAG, s.comm)
            s.answered += 1
    return NULL


cdef class StallResponder:
    """A C thread that answers peers' stall queries with this engine's counters.

    Parameters
    ----------
    engine : Engine
        Whose counters are reported (read under its lock).
    comm : mpi4py.MPI.Comm
        A communicator used for nothing else (queries and replies only).
    poll_us : int
        How often the thread looks for a query; one MPI_Iprobe each time.
    """
    cdef responder_t* s
    cdef Engine engine
    cdef object comm
    query_tag = STALL_QUERY_TAG
    reply_tag = STALL_REPLY_TAG
    reply_len = STALL_REPLY_LEN

    def __init__(self, Engine engine not None, MPI.Comm comm not None, long poll_us):
        cdef pthread_condattr_t attr
        if self.s != NULL:
            raise RuntimeError("a StallResponder is initialised once")
        engine.ready()
        if poll_us < 1:
            raise ValueError(f"poll_us must be >= 1, got {poll_us}")
        self.s = <responder_t*>calloc(1, sizeof(responder_t))
        if self.s == NULL:
            raise MemoryError()
        self.engine = engine
        self.comm = comm
        self.s.comm = comm.ob_mpi
        self.s.engine = engine.e
        self.s.poll_us = poll_us
        check_pthread(pthread_mutex_init(&self.s.lock, NULL), "pthread_mutex_init")
        self.s.sync_ready |= READY_LOCK
        check_pthread(pthread_condattr_init(&attr), "pthread_condattr_init")
        try:
            check_pthread(pthread_condattr_setclock(&attr, CLOCK_MONOTONIC),
                          "pthread_condattr_setclock(CLOCK_MONOTONIC)")
            check_pthread(pthread_cond_init(&self.s.wake, &attr), "pthread_cond_init")
            self.s.sync_ready |= READY_WAKE
        finally:
            pthread_condattr_destroy(&attr)
        check_pthread(pthread_create(&self.s.thread, NULL, responder_main, self.s),
                      "pthread_create (the stall responder)")
        self.s.started = 1

    def stop(self):
        """Stop and join the thread (idempotent); afterwards no MPI call is made."""
        if self.s == NULL or not self.s.started:
            return
        with nogil:
            pthread_mutex_lock(&self.s.lock)
            self.s.stop = 1
            pthread_cond_signal(&self.s.wake)
            pthread_mutex_unlock(&self.s.lock)
            pthread_join(self.s.thread, NULL)
        self.s.started = 0

    @property
    def answered(self):
        """Queries answered so far."""
        return 0 if self.s == NULL else self.s.answered

    def __dealloc__(self):
        if self.s == NULL:
            return
        self.stop()
        if self.s.sync_ready & READY_LOCK:
            pthread_mutex_destroy(&self.s.lock)
        if self.s.sync_ready & READY_WAKE:
            pthread_cond_destroy(&self.s.wake)
        free(self.s)
        self.s = NULL
