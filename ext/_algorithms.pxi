# The progress thread's own allreduce algorithms, built on point-to-point
# messages (included by _progress.pyx; docs/allreduce_algorithms.md).
#
# MPI's MPI_Iallreduce picks its algorithm from MPICH's thresholds; these two
# let the engine choose per request instead:
#
# - recursive doubling (latency-optimised): lg P steps, each exchanging the
#   whole chunk with one partner and adding it in;
# - ring (bandwidth-optimised): a reduce-scatter of P - 1 steps, then an
#   allgather of P - 1 steps, each moving 1/P of the chunk to the right-hand
#   neighbour.
#
# A chunk runs as a sequence of steps in one slot of the progress thread. Each
# step is exactly one MPI request (MPI_Isendrecv, or MPI_Isend / MPI_Irecv
# alone where a rank only sends or only receives), so the loop in
# progress_main tests it like any other slot; when it completes, next_step()
# adds what arrived and posts the following step into the same slot.
#
# Messages: point-to-point traffic never matches a collective (MPI keeps the
# two apart on one communicator). Each chunk gets its own tag, the count of
# such chunks this engine has posted (the same on every rank, since every rank
# posts the same chunks in the same order), so the steps of two chunks in
# flight between the same two ranks never match each other; within a chunk
# the steps run in order on both sides and MPI's non-overtaking rule pairs
# them up.
#
# Bitwise identical results on every rank: a ring block is reduced on one rank
# only and then copied to the others; in recursive doubling both partners add
# the same two vectors, lower rank's first (IEEE addition is commutative, so
# both get the same bits either way; the fixed order keeps that visible).

ctypedef struct step_t:
    int send_to             # rank this step sends to, -1 for none
    int recv_from           # rank this step receives from, -1 for none
    long long send_offset   # elements from the start of the chunk
    long long send_count
    long long recv_offset   # where the received values go (or are added)
    long long recv_count
    int add                 # 1: receive into scratch, then add it in; 0: receive in place
    int received_is_lower   # the received partial holds lower ranks (it goes on the left)


cdef inline void ring_block(long long n, int size, int b, long long* offset,
                            long long* count) noexcept nogil:
    """Block b of a chunk of n elements split like engine.partition(n, size)."""
    cdef long long q = n // size
    cdef long long extra = n % size
    count[0] = q + 1 if b < extra else q
    offset[0] = b * q + (b if b < extra else extra)


cdef int ring_step(int rank, int size, long long n, int step, step_t* s) noexcept nogil:
    """Step `step` of the ring allreduce on `rank`; 1 if there is no such step (done).

    Steps 0 .. P-2 (reduce-scatter): send block rank - step to the right,
    receive block rank - step - 1 from the left and add own values to it.
    After them this rank holds block rank + 1 reduced over every rank.
    Steps P-1 .. 2P-3 (allgather, t = step - (P-1)): send block rank + 1 - t,
    receive block rank - t, which its owner finished.
    """
    cdef int t
    if step >= 2 * (size - 1):
        return 1
    s.send_to = (rank + 1) % size
    s.recv_from = (rank - 1 + size) % size
    if step < size - 1:
        ring_block(n, size, (rank - step + size) % size, &s.send_offset, &s.send_count)
        ring_block(n, size, (rank - step - 1 + 2 * size) % size, &s.recv_offset, &s.recv_count)
        s.add = 1
        s.received_is_lower = 1   # the partial travelled from the ranks before this one
    else:
        t = step - (size - 1)
        ring_block(n, size, (rank + 1 - t + size) % size, &s.send_offset, &s.send_count)
        ring_block(n, size, (rank - t + size) % size, &s.recv_offset, &s.recv_count)
        s.add = 0
        s.received_is_lower = 0
    return 0


cdef int recursive_doubling_step(int rank, int size, long long n, int step,
                                 step_t* s) noexcept nogil:
    """Step `step` of recursive doubling on `rank`; 1 if there is no such step (done).

    With P = 2^L + rem, the first 2 rem ranks fold pairwise: each even one
    sends its chunk to the odd one above it (step 0) and waits for the result
    (step 1). The 2^L remaining ranks (the odd ones of those pairs, new rank
    rank // 2, and ranks >= 2 rem, new rank rank - rem) run L exchange steps,
    partner = new rank XOR 2^i, and the odd ones finally send the result back
    down.
    """
    cdef int pof2 = 1
    cdef int levels = 0
    cdef int rem, newrank, partner_new, partner, first
    while 2 * pof2 <= size:
        pof2 *= 2
        levels += 1
    rem = size - pof2
    s.send_offset = 0
    s.recv_offset = 0
    s.send_count = n
    s.recv_count = n
    s.send_to = -1
    s.recv_from = -1
    s.add = 0
    s.received_is_lower = 0
    if rank < 2 * rem and rank % 2 == 0:      # folded away: hand over, get the result
        if step == 0:
            s.send_to = rank + 1
        elif step == 1:
            s.recv_from = rank + 1
        else:
            return 1
        return 0
    first = 0
    if rank < 2 * rem:                        # odd rank of a folded pair
        if step == 0:                         # take the even partner's values in
            s.recv_from = rank - 1
            s.add = 1
            s.received_is_lower = 1
            return 0
        if step == levels + 1:                # hand the result back down
            s.send_to = rank - 1
            return 0
        if step > levels + 1:
            return 1
        first = 1
        newrank = rank // 2
    else:
        if step >= levels:
            return 1
        newrank = rank - rem
    partner_new = newrank ^ (1 << (step - first))
    partner = partner_new * 2 + 1 if partner_new < rem else partner_new + rem
    s.send_to = partner
    s.recv_from = partner
    s.add = 1
    s.received_is_lower = partner < rank
    return 0


cdef int plan_step(engine_t* e, request_t* r, long long n, int step, step_t* s) noexcept nogil:
    """The step of r's algorithm for this rank; 1 once the chunk is complete."""
    if r.algorithm == ALGORITHM_RING:
        return ring_step(e.rank, e.size, n, step, s)
    return recursive_doubling_step(e.rank, e.size, n, step, s)


cdef void add_received(char* data, const char* scratch, long long count, int itemsize,
                       int received_is_lower) noexcept nogil:
    """data = scratch + data (received lower) or data + scratch, elementwise."""
    cdef long long i
    cdef float* fd = <float*>data
    cdef const float* fs = <const float*>scratch
    cdef double* dd = <double*>data
    cdef const double* ds = <const double*>scratch
    if itemsize == 4:
        if received_is_lower:
            for i in range(count):
                fd[i] = fs[i] + fd[i]
        else:
            for i in range(count):
                fd[i] = fd[i] + fs[i]
    else:
        if received_is_lower:
            for i in range(count):
                dd[i] = ds[i] + dd[i]
        else:
            for i in range(count):
                dd[i] = dd[i] + ds[i]


cdef inline char* chunk_start(request_t* r, int chunk) noexcept nogil:
    return r.buf + chunk * r.chunk_elems * r.itemsize


cdef int post_step(engine_t* e, int k) noexcept nogil:
    """Post slot k's current step as one MPI request.

    Returns 0 once posted, 1 if the chunk has no steps left, an MPI error code otherwise.
    """
    cdef slot_t* slot = &e.slots[k]
    cdef request_t* r = slot.req
    cdef long long n = piece_length(r.count, r.chunk_elems, slot.chunk)
    cdef char* data = chunk_start(r, slot.chunk)
    cdef char* send
    cdef char* recv
    cdef step_t s
    if plan_step(e, r, n, slot.step, &s):
        return 1
    send = data + s.send_offset * r.itemsize
    recv = slot.staging if s.add else data + s.recv_offset * r.itemsize
    if s.recv_from < 0:
        return MPI_Isend(send, <int>s.send_count, r.dtype, s.send_to, slot.tag, e.comm,
                         &e.mpi_reqs[k])
    if s.send_to < 0:
        return MPI_Irecv(recv, <int>s.recv_count, r.dtype, s.recv_from, slot.tag, e.comm,
                         &e.mpi_reqs[k])
    return MPI_Isendrecv(send, <int>s.send_count, r.dtype, s.send_to, slot.tag,
                         recv, <int>s.recv_count, r.dtype, s.recv_from, slot.tag,
                         e.comm, &e.mpi_reqs[k])


cdef int start_algorithm_chunk(engine_t* e, int k, request_t* r, int chunk) noexcept nogil:
    """Post the first step of chunk `chunk` of an allreduce run by our own algorithm.

    Returns 0 once posted, -1 out of memory, an MPI error code otherwise.
    """
    cdef long long n = piece_length(r.count, r.chunk_elems, chunk)
    cdef int rc
    # Received partials land in scratch before they are added: a whole chunk
    # for recursive doubling, one block (at most ceil(n / P)) for the ring.
    cdef long long scratch = n if r.algorithm == ALGORITHM_RECURSIVE_DOUBLING else n // e.size + 1
    e.slots[k].req = r
    e.slots[k].chunk = chunk
    e.slots[k].step = 0
    e.slots[k].tag = <int>(e.algorithm_chunks % e.tag_ub)
    e.algorithm_chunks += 1
    e.slots[k].staging = <char*>malloc(scratch * r.itemsize + 1)
    if e.slots[k].staging == NULL:
        return -1
    rc = post_step(e, k)
    return MPI_SUCCESS if rc == 1 else rc     # P = 1 has no step (the engine posts "mpi" there)


cdef int next_step(engine_t* e, int k) noexcept nogil:
    """Slot k's step completed: add what arrived and post the next step in the same slot.

    Returns 1 if a step was posted (the chunk goes on), 0 once the chunk is
    complete or has failed (the error is recorded on the request).
    """
    cdef slot_t* slot = &e.slots[k]
    cdef request_t* r = slot.req
    cdef long long n = piece_length(r.count, r.chunk_elems, slot.chunk)
    cdef step_t s
    cdef int rc
    if not plan_step(e, r, n, slot.step, &s) and s.add:
        add_received(chunk_start(r, slot.chunk) + s.recv_offset * r.itemsize, slot.staging,
                     s.recv_count, r.itemsize, s.received_is_lower)
    slot.step += 1
    rc = post_step(e, k)
    if rc == 0:
        return 1
    if rc != 1:     # neither posted nor finished: MPI's error code
        mpi_ok(r, b"posting an algorithm step", rc)
    return 0


def algorithm_steps(int algorithm, int rank, int size, long long n):
    """The steps `rank` runs for one chunk of n elements (tests and teaching).

    Returns a list of (send_to, send_offset, send_count, recv_from,
    recv_offset, recv_count, add, received_is_lower) tuples, -1 for no peer;
    tests/test_algorithm_steps.py replays them for many P without MPI.
    """
    cdef request_t r
    cdef engine_t e
    cdef step_t s
    cdef int step = 0
    if algorithm not in (ALGORITHM_RECURSIVE_DOUBLING, ALGORITHM_RING):
        raise ValueError(f"no steps for algorithm code {algorithm}: only ours have them")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside [0, {size})")
    r.algorithm = algorithm
    e.rank = rank
    e.size = size
    steps = []
    while not plan_step(&e, &r, n, step, &s):
        steps.append((s.send_to, s.send_offset, s.send_count, s.recv_from, s.recv_offset,
                      s.recv_count, s.add, s.received_is_lower))
        step += 1
    return steps
