# C library declarations used by the progress thread, kept apart from the
# engine itself (the mpi4py / CuPy split). Everything here is callable
# without the GIL.

from posix.time cimport clock_gettime, nanosleep, timespec, clockid_t, CLOCK_MONOTONIC


cdef extern from "<errno.h>" nogil:
    enum:
        ETIMEDOUT


cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_THREAD_CPUTIME_ID


cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass
    void CPU_ZERO(cpu_set_t*)
    void CPU_SET(int, cpu_set_t*)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_create(pthread_t*, const pthread_attr_t*,
                       void* (*)(void*) noexcept nogil, void*)
    int pthread_join(pthread_t, void**)
    pthread_t pthread_self()
    int pthread_mutex_init(pthread_mutex_t*, const pthread_mutexattr_t*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_condattr_init(pthread_condattr_t*)
    int pthread_condattr_setclock(pthread_condattr_t*, clockid_t)
    int pthread_condattr_destroy(pthread_condattr_t*)
    int pthread_cond_init(pthread_cond_t*, const pthread_condattr_t*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_timedwait(pthread_cond_t*, pthread_mutex_t*, const timespec*)
    int pthread_cond_signal(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_getcpuclockid(pthread_t, clockid_t*)
    int pthread_setaffinity_np(pthread_t, size_t, const cpu_set_t*)


cdef extern from *:
    """
    #include <stdint.h>
    #include <unistd.h>
    #include <sys/resource.h>
    #include <sys/syscall.h>

    /* Linux >= 6.12 (EEVDF): a SCHED_OTHER thread may ask for a shorter time
       slice, so that when it wakes it preempts a busy compute thread within
       about that slice instead of waiting for a scheduler tick. The layout is
       the kernel's struct sched_attr, version 0 (48 bytes). */
    struct progress_sched_attr {
        uint32_t size, sched_policy;
        uint64_t sched_flags;
        int32_t sched_nice;
        uint32_t sched_priority;
        uint64_t sched_runtime, sched_deadline, sched_period;
    };
    static int progress_request_slice(uint64_t slice_ns) {
    #ifdef SYS_sched_setattr
        struct progress_sched_attr a = {0};
        a.size = sizeof(a);
        a.sched_runtime = slice_ns;
        return (int)syscall(SYS_sched_setattr, 0, &a, 0);
    #else
        (void)slice_ns;
        return -1;
    #endif
    }
    #include <sys/prctl.h>
    /* nanosleep(poll_us) oversleeps by the timer slack (50 us by default);
       the progress thread wants its poll interval to mean what it says. */
    static int progress_set_timer_slack(unsigned long ns) {
        return prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0);
    }
    static int progress_set_nice(int nice) {
        return setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
    }
    """
    int progress_request_slice(unsigned long long slice_ns) nogil
    int progress_set_nice(int nice) nogil
    int progress_set_timer_slack(unsigned long ns) nogil
