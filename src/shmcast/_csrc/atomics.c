/*
 * The Atomics type: acquire loads, release stores, atomic add / exchange /
 * compare-exchange and a full fence on aligned 32- and 64-bit words of a
 * writable buffer, and futex wait (with a timeout) and wake on its 32-bit
 * words, as *shared* futexes (the peers are other processes).  Waits release
 * the GIL.  On platforms without futexes, `wait32` polls the word with short
 * sleeps (the documented fallback; `HAVE_FUTEX` tells which one is in use).
 */
#include "native.h"

#include <errno.h>
#include <time.h>

#if SHMCAST_HAVE_FUTEX
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ---- 64-bit words ------------------------------------------------------ */

static PyObject *
Atomics_load64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    ARGC(1, "load64");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 8) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(WORD64(self, off), __ATOMIC_ACQUIRE));
}

static PyObject *
Atomics_store64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t v;
    ARGC(2, "store64");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 8) < 0 || parse_u64(args[1], &v) < 0)
        return NULL;
    __atomic_store_n(WORD64(self, off), v, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_add64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t v;
    ARGC(2, "add64");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 8) < 0 || parse_u64(args[1], &v) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_add_fetch(WORD64(self, off), v, __ATOMIC_SEQ_CST));
}

static PyObject *
Atomics_cas64(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t expected, desired;
    ARGC(3, "cas64");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 8) < 0 ||
        parse_u64(args[1], &expected) < 0 || parse_u64(args[2], &desired) < 0)
        return NULL;
    int ok = __atomic_compare_exchange_n(WORD64(self, off), &expected, desired, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyBool_FromLong(ok);
}

/* ---- 32-bit words ------------------------------------------------------ */

static PyObject *
Atomics_load32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    ARGC(1, "load32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(WORD32(self, off), __ATOMIC_ACQUIRE));
}

static PyObject *
Atomics_store32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t v;
    ARGC(2, "store32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0 || parse_u64(args[1], &v) < 0)
        return NULL;
    __atomic_store_n(WORD32(self, off), (uint32_t)v, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_exchange32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t v;
    ARGC(2, "exchange32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0 || parse_u64(args[1], &v) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_exchange_n(WORD32(self, off), (uint32_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
Atomics_add32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t v;
    ARGC(2, "add32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0 || parse_u64(args[1], &v) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_add_fetch(WORD32(self, off), (uint32_t)v, __ATOMIC_SEQ_CST));
}

static PyObject *
Atomics_cas32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t e, d;
    ARGC(3, "cas32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0 ||
        parse_u64(args[1], &e) < 0 || parse_u64(args[2], &d) < 0)
        return NULL;
    uint32_t expected = (uint32_t)e;
    int ok = __atomic_compare_exchange_n(WORD32(self, off), &expected, (uint32_t)d, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyBool_FromLong(ok);
}

static PyObject *
Atomics_fence(AtomicsObject *self, PyObject *Py_UNUSED(ignored))
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* ---- futex ------------------------------------------------------------- */

#if SHMCAST_HAVE_FUTEX
static long
futex_wake_raw(uint32_t *addr, int n)
{
    /* Shared futex: no FUTEX_PRIVATE_FLAG, the waiters are other processes. */
    return syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}
#endif

/* Wake anyone in futex_wait on the word at `wake_off`.  Returns the number woken. */
long
shmcast_wake_word(AtomicsObject *self, Py_ssize_t off, int n)
{
#if SHMCAST_HAVE_FUTEX
    long r = futex_wake_raw(WORD32(self, off), n);
    return r < 0 ? 0 : r;
#else
    (void)self; (void)off; (void)n;
    return 0;   /* pollers see the word change by themselves */
#endif
}

static PyObject *
Atomics_wait32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t expected;
    double timeout;
    ARGC(3, "wait32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0 || parse_u64(args[1], &expected) < 0)
        return NULL;
    timeout = PyFloat_AsDouble(args[2]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(timeout >= 0.0) || timeout > 86400.0) {
        PyErr_SetString(PyExc_ValueError, "wait32 timeout must be between 0 and 86400 seconds");
        return NULL;
    }
    uint32_t *addr = WORD32(self, off);
    int result;     /* 1: woken or value differs, 0: timed out */
    int err = 0;

    self->waiters++;
    Py_BEGIN_ALLOW_THREADS
#if SHMCAST_HAVE_FUTEX
    struct timespec ts;
    ts.tv_sec = (time_t)timeout;
    ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, (uint32_t)expected, &ts, NULL, 0);
    if (r == 0) {
        result = 1;
    } else if (errno == EAGAIN || errno == EINTR) {
        result = 1;  /* value already changed, or a signal: let the caller re-check */
    } else if (errno == ETIMEDOUT) {
        result = 0;
    } else {
        result = -1;
        err = errno;
    }
#else
    /* Polling fallback: look at the word every 50 us until it changes or time runs out. */
    struct timespec start, now, nap = {0, 50000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    result = 0;
    for (;;) {
        if (__atomic_load_n(addr, __ATOMIC_ACQUIRE) != (uint32_t)expected) { result = 1; break; }
        clock_gettime(CLOCK_MONOTONIC, &now);
        double el = (double)(now.tv_sec - start.tv_sec) + 1e-9 * (double)(now.tv_nsec - start.tv_nsec);
        if (el >= timeout) break;
        nanosleep(&nap, NULL);
    }
#endif
    Py_END_ALLOW_THREADS
    self->waiters--;
    if (result < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (PyErr_CheckSignals() < 0)
        return NULL;
    return PyBool_FromLong(result);
}

static PyObject *
Atomics_wake32(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off, n;
    ARGC(2, "wake32");
    if (parse_off(args, 0, &off) < 0 || check_word(self, off, 4) < 0 || parse_off(args, 1, &n) < 0)
        return NULL;
    if (n < 1 || n > INT32_MAX)
        n = INT32_MAX;
    return PyLong_FromLong(shmcast_wake_word(self, off, (int)n));
}

/*
 * min_seq(first_off, stride, count, state_rel, mask, lo, hi, valid) -> int or None
 *
 * The gating sequence: the minimum of the 64-bit sequence at
 * first_off + i*stride (acquire loads) over the entries whose 32-bit state at
 * first_off + i*stride + state_rel has a bit in `mask`.  None if no entry
 * qualifies.  One call instead of a Python loop over readers.
 *
 * Nothing read is trusted: a state that is not one bit of `valid`, or a
 * qualifying sequence outside [lo, hi] (the range the caller can prove for
 * it), raises SegmentError naming the entry.
 */
static PyObject *
Atomics_min_seq(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, stride, count, state_rel, mask, valid;
    uint64_t lo, hi;
    ARGC(8, "min_seq");
    if (parse_off(args, 0, &first) < 0 || parse_off(args, 1, &stride) < 0 ||
        parse_off(args, 2, &count) < 0 || parse_off(args, 3, &state_rel) < 0 ||
        parse_off(args, 4, &mask) < 0 || parse_u64(args[5], &lo) < 0 ||
        parse_u64(args[6], &hi) < 0 || parse_off(args, 7, &valid) < 0)
        return NULL;
    if (count < 0 || stride < 0) {
        PyErr_SetString(PyExc_ValueError, "min_seq: negative count or stride");
        return NULL;
    }
    /* Every entry lies in the buffer (checked before any is read, so that a bad count is an
     * IndexError, not the state of the first line past the end). */
    if (count > 0) {
        if (first < 0 || (stride > 0 && count - 1 > (self->len - first) / stride)) {
            PyErr_Format(PyExc_IndexError,
                         "min_seq: %zd entries from offset %zd run past the buffer", count, first);
            return NULL;
        }
        Py_ssize_t last = first + (count - 1) * stride;
        if (check_word(self, last, 8) < 0 || check_word(self, last + state_rel, 4) < 0)
            return NULL;
    }
    uint64_t best = UINT64_MAX;
    int found = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t off = first + i * stride;
        if (check_word(self, off, 8) < 0 || check_word(self, off + state_rel, 4) < 0)
            return NULL;
        uint32_t st = __atomic_load_n(WORD32(self, off + state_rel), __ATOMIC_ACQUIRE);
        if (st == 0 || (st & (st - 1)) != 0 || (st & ~(uint32_t)valid) != 0) {
            PyErr_Format(shmcast_SegmentError,
                         "corrupted queue: participant %zd has an unknown state %u", i,
                         (unsigned)st);
            return NULL;
        }
        if (!((uint32_t)mask & st))
            continue;
        uint64_t v = __atomic_load_n(WORD64(self, off), __ATOMIC_ACQUIRE);
        if (v < lo || v > hi) {
            PyErr_Format(shmcast_SegmentError,
                         "corrupted queue: participant %zd is at sequence %llu, outside the "
                         "possible range %llu..%llu",
                         i, (unsigned long long)v, (unsigned long long)lo,
                         (unsigned long long)hi);
            return NULL;
        }
        if (v < best)
            best = v;
        found = 1;
    }
    if (!found)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(best);
}

static PyObject *
Atomics_release(AtomicsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->waiters > 0) {
        PyErr_SetString(PyExc_BufferError, "cannot release: a thread is waiting on this buffer");
        return NULL;
    }
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyObject *
Atomics_get_released(AtomicsObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->base == NULL);
}

static PyObject *
Atomics_get_nbytes(AtomicsObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->base == NULL ? 0 : self->len);
}

static int
Atomics_init(AtomicsObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Atomics", kwlist, &obj))
        return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Atomics already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (((uintptr_t)self->view.buf) % 8 != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "buffer is not 8-byte aligned");
        return -1;
    }
    self->base = (char *)self->view.buf;
    self->len = self->view.len;
    self->waiters = 0;
    return 0;
}

static void
Atomics_dealloc(AtomicsObject *self)
{
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Atomics_methods[] = {
    {"load64", (PyCFunction)(void (*)(void))Atomics_load64, METH_FASTCALL, "load64(off) -> int: acquire load."},
    {"store64", (PyCFunction)(void (*)(void))Atomics_store64, METH_FASTCALL, "store64(off, v): release store."},
    {"add64", (PyCFunction)(void (*)(void))Atomics_add64, METH_FASTCALL, "add64(off, v) -> int: atomic add (seq_cst), returns the new value."},
    {"cas64", (PyCFunction)(void (*)(void))Atomics_cas64, METH_FASTCALL, "cas64(off, expected, desired) -> bool (seq_cst)."},
    {"load32", (PyCFunction)(void (*)(void))Atomics_load32, METH_FASTCALL, "load32(off) -> int: acquire load."},
    {"store32", (PyCFunction)(void (*)(void))Atomics_store32, METH_FASTCALL, "store32(off, v): release store."},
    {"exchange32", (PyCFunction)(void (*)(void))Atomics_exchange32, METH_FASTCALL, "exchange32(off, v) -> old (seq_cst: a full fence)."},
    {"add32", (PyCFunction)(void (*)(void))Atomics_add32, METH_FASTCALL, "add32(off, v) -> int: atomic add (seq_cst), returns the new value."},
    {"cas32", (PyCFunction)(void (*)(void))Atomics_cas32, METH_FASTCALL, "cas32(off, expected, desired) -> bool (seq_cst)."},
    {"fence", (PyCFunction)Atomics_fence, METH_NOARGS, "fence(): full (seq_cst) memory fence."},
    {"wait32", (PyCFunction)(void (*)(void))Atomics_wait32, METH_FASTCALL,
     "wait32(off, expected, timeout) -> bool: sleep while the word equals expected; False on timeout."},
    {"wake32", (PyCFunction)(void (*)(void))Atomics_wake32, METH_FASTCALL, "wake32(off, n) -> int: wake up to n waiters."},
    {"min_seq", (PyCFunction)(void (*)(void))Atomics_min_seq, METH_FASTCALL,
     "min_seq(first_off, stride, count, state_rel, mask, lo, hi, valid) -> int | None."},
    {"release", (PyCFunction)Atomics_release, METH_NOARGS, "release(): drop the buffer; later calls raise."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Atomics_getset[] = {
    {"released", (getter)Atomics_get_released, NULL, "True after release().", NULL},
    {"nbytes", (getter)Atomics_get_nbytes, NULL, "Size of the buffer in bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject AtomicsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.Atomics",
    .tp_basicsize = sizeof(AtomicsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Atomics(buffer): atomic operations and futexes on words of a writable buffer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Atomics_init,
    .tp_dealloc = (destructor)Atomics_dealloc,
    .tp_methods = Atomics_methods,
    .tp_getset = Atomics_getset,
};
