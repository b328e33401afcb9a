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
