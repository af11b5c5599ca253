#include "native.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>

/*
 * Two threads, pinned to CPUs a and b, pass one cache line back and forth:
 * the "ping" thread stores an odd number, the "pong" thread answers with the
 * next even one.  Each round trip moves the line twice between the CPUs'
 * caches, so its time is what any shared-memory hand-over between those two
 * CPUs pays at the least.  On a virtual machine it also tells where the host
 * has put the two virtual CPUs: on one core complex with a shared L3 (tens of
 * nanoseconds) or on two (hundreds).  Acquire/release suffice: each side only
 * waits for the other's value of the one word.
 */
typedef struct {
    _Alignas(64) uint64_t word;
    _Alignas(64) int cpu;
    long rounds;
    int stop;            /* set by the ping side when it gives up */
    int error;           /* errno of the pong side's pinning, 0 if none */
} PingPong;

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int
pin_self(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *
pong_main(void *arg)
{
    PingPong *pp = arg;
    int err = pin_self(pp->cpu);
    if (err) {
        __atomic_store_n(&pp->error, err, __ATOMIC_RELEASE);
        return NULL;
    }
    for (uint64_t i = 1; i <= (uint64_t)pp->rounds; i++) {
        while (__atomic_load_n(&pp->word, __ATOMIC_ACQUIRE) != 2 * i - 1)
            if (__atomic_load_n(&pp->stop, __ATOMIC_RELAXED))
                return NULL;
        __atomic_store_n(&pp->word, 2 * i, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Runs on its own thread, pinned to cpu a; fills means[batches] (ns per round
 * trip).  Returns 0, an errno, or ETIMEDOUT past the deadline. */
static int
ping_batches(PingPong *pp, int cpu_a, long batches, double *means, uint64_t deadline)
{
    int err = pin_self(cpu_a);
    if (err)
        return err;
    long per = pp->rounds / batches;
    uint64_t i = 1;
    for (long b = 0; b < batches; b++) {
        uint64_t t0 = now_ns();
        for (long k = 0; k < per; k++, i++) {
            __atomic_store_n(&pp->word, 2 * i - 1, __ATOMIC_RELEASE);
            unsigned spins = 0;
            while (__atomic_load_n(&pp->word, __ATOMIC_ACQUIRE) != 2 * i) {
                if ((err = __atomic_load_n(&pp->error, __ATOMIC_ACQUIRE)) != 0)
                    return err;
                if (++spins % 4096 == 0 && now_ns() > deadline)
                    return ETIMEDOUT;
            }
        }
        means[b] = (double)(now_ns() - t0) / (double)per;
    }
    return 0;
}

typedef struct {
    PingPong *pp;
    int cpu;
    long batches;
    double *means;
    uint64_t deadline;
    int result;
} PingArgs;

static void *
ping_main(void *arg)
{
    PingArgs *a = arg;
    a->result = ping_batches(a->pp, a->cpu, a->batches, a->means, a->deadline);
    __atomic_store_n(&a->pp->stop, 1, __ATOMIC_RELAXED);
    return NULL;
}

/*
 * core_to_core_ns(cpu_a, cpu_b, rounds, batches, timeout) -> list of floats:
 * the mean round trip of each batch, in nanoseconds.  Neither thread is the
 * caller's, so the caller's own CPU affinity is left alone; the GIL is
 * released throughout.
 */
PyObject *
shmcast_core_to_core_ns(PyObject *Py_UNUSED(mod), PyObject *args)
{
    int cpu_a, cpu_b;
    long rounds, batches;
    double timeout;
    if (!PyArg_ParseTuple(args, "iilld:core_to_core_ns", &cpu_a, &cpu_b, &rounds, &batches,
                          &timeout))
        return NULL;
    if (cpu_a < 0 || cpu_b < 0 || cpu_a >= CPU_SETSIZE || cpu_b >= CPU_SETSIZE || cpu_a == cpu_b) {
        PyErr_Format(PyExc_ValueError,
                     "core_to_core_ns: need two different CPUs in [0, %d), got %d and %d",
                     CPU_SETSIZE, cpu_a, cpu_b);
        return NULL;
    }
    if (batches < 1 || rounds < batches || !(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "core_to_core_ns: need batches >= 1, rounds >= batches and timeout > 0");
        return NULL;
    }
    if (timeout > 3600.0)
        timeout = 3600.0; /* a deadline in range of the clock's nanoseconds */
    double *means = PyMem_Calloc((size_t)batches, sizeof(double));
    PingPong *pp = NULL;
    if (means == NULL || posix_memalign((void **)&pp, 64, sizeof *pp) != 0) {
        PyMem_Free(means);
        return PyErr_NoMemory();
    }
    memset(pp, 0, sizeof *pp);
    pp->cpu = cpu_b;
    pp->rounds = rounds / batches * batches;
    PingArgs ping = {pp, cpu_a, batches, means, 0, 0};
    pthread_t pong_thread, ping_thread;
    int err;
    Py_BEGIN_ALLOW_THREADS
    ping.deadline = now_ns() + (uint64_t)(timeout * 1e9);
    err = pthread_create(&pong_thread, NULL, pong_main, pp);
    if (err == 0) {
        err = pthread_create(&ping_thread, NULL, ping_main, &ping);
        if (err == 0) {
            pthread_join(ping_thread, NULL);
            err = ping.result;
        } else {
            __atomic_store_n(&pp->stop, 1, __ATOMIC_RELAXED);
        }
        pthread_join(pong_thread, NULL);
    }
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (err == ETIMEDOUT)
        PyErr_Format(PyExc_TimeoutError, "core_to_core_ns: no answer from CPU %d within %g s",
                     cpu_b, timeout);
    else if (err)
        PyErr_Format(PyExc_OSError, "core_to_core_ns: cannot run a thread on CPU %d or %d: %s",
                     cpu_a, cpu_b, strerror(err));
    else if ((result = PyList_New(batches)) != NULL) {
        for (long b = 0; b < batches; b++) {
            PyObject *v = PyFloat_FromDouble(means[b]);
            if (v == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, b, v);
        }
    }
    free(pp);
    PyMem_Free(means);
    return result;
}
#endif
