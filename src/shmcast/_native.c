/*
 * shmcast._native: the few things Python cannot do on shared memory.
 *
 *   - acquire loads, release stores, atomic add / compare-exchange and a full
 *     fence on aligned 32- and 64-bit words of a writable buffer;
 *   - futex wait (with a timeout) and wake on a 32-bit word of that buffer,
 *     as *shared* futexes (the peers are other processes);
 *   - shm_open / shm_unlink, which the standard library does not expose;
 *   - `core_to_core_ns`: a diagnostic for benchmarks, the round trip of one
 *     cache line between two CPUs (too fast to see from Python);
 *   - `Cursor`: the steps of the protocol that run once per message (publish
 *     or take one contiguous message, hand slots over), so that the common
 *     case costs one call into C; measured, a 64-byte put or get costs a
 *     quarter to a third of the same steps written in Python.
 *
 * Everything else (layout, the rest of the protocol, waiting, liveness) is
 * Python.  The memory-ordering argument is in docs/protocol.md.
 *
 * Words are addressed by byte offset into the buffer an `Atomics` object was
 * built on; offsets are checked for bounds and natural alignment.  Waits
 * release the GIL.  On platforms without futexes, `wait32` polls the word with
 * short sleeps (documented fallback; `HAVE_FUTEX` tells which one is in use).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#define SHMCAST_HAVE_FUTEX 1
#else
#define SHMCAST_HAVE_FUTEX 0
#endif

typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* valid while base != NULL */
    char *base;
    Py_ssize_t len;
    long waiters;        /* threads inside wait32 with the GIL released */
} AtomicsObject;

static int
check_word(AtomicsObject *self, Py_ssize_t off, Py_ssize_t width)
{
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a released Atomics object");
        return -1;
    }
    if (off < 0 || off > self->len - width) {
        PyErr_Format(PyExc_IndexError, "offset %zd out of range for a %zd-byte buffer", off, self->len);
        return -1;
    }
    if (off % width != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", off, width);
        return -1;
    }
    return 0;
}

#define WORD64(self, off) ((uint64_t *)((self)->base + (off)))
#define WORD32(self, off) ((uint32_t *)((self)->base + (off)))

static int
parse_off(PyObject *const *args, Py_ssize_t i, Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(args[i]);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static int
parse_u64(PyObject *arg, uint64_t *out)
{
    /* Accept any int; negative values wrap (two's complement), as C does. */
    unsigned long long v = PyLong_AsUnsignedLongLongMask(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

#define ARGC(n, name)                                                           \
    if (nargs != (n)) {                                                         \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", \
                     (n), nargs);                                               \
        return NULL;                                                            \
    }

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
static long
wake_word(AtomicsObject *self, Py_ssize_t off, int n)
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
    return PyLong_FromLong(wake_word(self, off, (int)n));
}

/*
 * min_seq(first_off, stride, count, state_rel, mask) -> int or None
 *
 * The gating sequence: the minimum of the 64-bit sequence at
 * first_off + i*stride (acquire loads) over the entries whose 32-bit state at
 * first_off + i*stride + state_rel has a bit in `mask`.  None if no entry
 * qualifies.  One call instead of a Python loop over readers.
 */
static PyObject *
Atomics_min_seq(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, stride, count, state_rel, mask;
    ARGC(5, "min_seq");
    if (parse_off(args, 0, &first) < 0 || parse_off(args, 1, &stride) < 0 ||
        parse_off(args, 2, &count) < 0 || parse_off(args, 3, &state_rel) < 0 ||
        parse_off(args, 4, &mask) < 0)
        return NULL;
    if (count < 0 || stride < 0) {
        PyErr_SetString(PyExc_ValueError, "min_seq: negative count or stride");
        return NULL;
    }
    uint64_t best = UINT64_MAX;
    int found = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t off = first + i * stride;
        if (check_word(self, off, 8) < 0 || check_word(self, off + state_rel, 4) < 0)
            return NULL;
        uint32_t st = __atomic_load_n(WORD32(self, off + state_rel), __ATOMIC_ACQUIRE);
        if (!((uint32_t)mask & st))
            continue;
        uint64_t v = __atomic_load_n(WORD64(self, off), __ATOMIC_ACQUIRE);
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
     "min_seq(first_off, stride, count, state_rel, mask) -> int | None."},
    {"release", (PyCFunction)Atomics_release, METH_NOARGS, "release(): drop the buffer; later calls raise."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Atomics_getset[] = {
    {"released", (getter)Atomics_get_released, NULL, "True after release().", NULL},
    {"nbytes", (getter)Atomics_get_nbytes, NULL, "Size of the buffer in bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AtomicsType = {
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

/* ---- Cursor: the per-message fast path ---------------------------------- */

/*
 * A Cursor is one endpoint's position in one ring, and the code that runs once
 * per message: publish a contiguous message (writer), take one (reader), and
 * hand slots over (both).  It is the protocol of docs/protocol.md, the same
 * steps the Python slow path takes, done in one call so that a small message
 * costs one crossing into C instead of a dozen.  Anything out of the ordinary
 * (a wrap, a full ring, padding, a streamed or corrupted message) makes the
 * fast path decline (False / None) and the caller takes the Python path, which
 * reads and writes the same state through the members below.
 *
 * Geometry (byte offsets into the Atomics buffer, checked once at creation):
 *   data_off, desc_off     slot data and descriptors of this ring;
 *   seq_off, msgs_off      this endpoint's sequence and message-count words;
 *   peer_seq_off           the word that bounds this endpoint (reader: write_seq;
 *                          writer: unused, its bound is the cached gate);
 *   flag_off, futex_off, wake_n
 *                          the Dekker hand-over after each store of seq_off:
 *                          writer: sleepers / data_futex / all (P1+P3);
 *                          reader: writer_sleeping / space_futex / 1 (P2+P4);
 *   count_off              writer (optional): the readers' announcement count
 *                          (P3); with it, the writer wakes only if, besides
 *                          flag_off being non-zero, the count moved since its
 *                          last wake (cursor_flush says why).
 * State (members, read and written by the Python slow path too):
 *   pos      slots filled (writer) or consumed (reader);
 *   stored   the value last stored at seq_off (pos - stored slots are held back);
 *   msgs     messages counted (the writer's next message number);
 *   bound    writer: the cached gate (slots below it are free, I1);
 *            reader: write_seq as last seen (never ahead of the real one, I2);
 *   early    writer: from this position on, a message of EARLY_WRAP_MIN bytes
 *            or more is declined, so that the Python path may wrap early
 *            (RingWriter.begin_contiguous says why).
 *
 * Descriptors are little-endian (checked below), laid out as _layout.DESC.
 */
#include <structmember.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the shmcast segment layout is little-endian"
#endif

#define DESC_SIZE 32
#define FLAG_FIRST 1u
#define FLAG_CONTIG 8u
#define FLAG_PAD 4u
#define KIND_SHIFT 8
#define MAX_PARTS 8
/* Copies at least this large release the GIL. */
#define BIG_COPY (256 * 1024)
/* Messages at least this large are declined at and after `early` (writer). */
#define EARLY_WRAP_MIN (64 * 1024)

typedef struct {
    uint64_t total;
    uint32_t nbytes;
    uint32_t flags;
    uint64_t msg_no;
    uint64_t reserved;
} Desc;

typedef struct {
    PyObject_HEAD
    AtomicsObject *atomics;
    Py_ssize_t n_slots, slot_size, data_off, desc_off;
    Py_ssize_t seq_off, msgs_off, peer_seq_off, flag_off, futex_off;
    int wake_n;
    Py_ssize_t count_off;   /* writer: the announcement count (-1: use flag_off) */
    uint64_t woken_at;      /* writer: the count as loaded before the last wake */
    unsigned long long pos, stored, msgs, bound, early;
} CursorObject;

static char *
cursor_base(CursorObject *self)
{
    char *base = self->atomics->base;
    if (base == NULL)
        PyErr_SetString(PyExc_ValueError, "operation on a released segment");
    return base;
}

/*
 * Store pos at seq_off and wake the peer if it announced it sleeps (P1+P3 /
 * P2+P4): the release store, a full fence, then the look at the announcement
 * (flag_off non-zero: a reader, or the writer, is asleep or about to be).
 *
 * With count_off (the writer, P3), the writer also looks at the count of
 * sleeps the readers ever announced, and wakes only if it moved since the look
 * before the last wake as well.  Each look alone is a sound reason to skip
 * (a reader that needs this wake is counted by both), so both must say
 * "wake".  Skipping on the count is safe because a reader loads the
 * futex word *before* it announces (docs/protocol.md P3, steps 1-2): a reader
 * counted at that look loaded the word before the bump that followed the look,
 * so that bump made its futex_wait return at once, or that wake reached it,
 * or it never slept; to sleep again it must announce again, which moves the
 * count.  (A reader announcing first could load the bumped word and then sleep
 * through the next message: the model's BROKEN_ANNOUNCE_FIRST.)  Why both: a
 * reader that was woken but has not run yet still counts in `sleepers`, so
 * with the flag alone a writer publishing faster than readers are scheduled
 * made one futex_wake system call per message; the count alone would wake for
 * readers that announced since and are awake again.
 */
static void
cursor_flush(CursorObject *self, char *base)
{
    if (self->stored == self->pos)
        return;
    self->stored = self->pos;
    __atomic_store_n((uint64_t *)(base + self->seq_off), (uint64_t)self->pos, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t count = 0;
    if (self->count_off >= 0) {
        count = __atomic_load_n((uint64_t *)(base + self->count_off), __ATOMIC_RELAXED);
        if (count == self->woken_at)
            return;
    }
    if (__atomic_load_n((uint32_t *)(base + self->flag_off), __ATOMIC_RELAXED) == 0)
        return;
    self->woken_at = count;
    __atomic_add_fetch((uint32_t *)(base + self->futex_off), 1, __ATOMIC_SEQ_CST);
    wake_word(self->atomics, self->futex_off, self->wake_n);
}

static void
copy_bytes(AtomicsObject *atomics, char *dst, const char *src, Py_ssize_t n)
{
    if (n < BIG_COPY) {
        memcpy(dst, src, (size_t)n);
        return;
    }
    atomics->waiters++;   /* the mapping cannot be released meanwhile */
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst, src, (size_t)n);
    Py_END_ALLOW_THREADS
    atomics->waiters--;
}

static PyObject *
Cursor_flush(CursorObject *self, PyObject *Py_UNUSED(ignored))
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    cursor_flush(self, base);
    Py_RETURN_NONE;
}

/*
 * put(parts, kind, publish) -> bool   (writer)
 *
 * Store a message, the concatenation of `parts` (bytes-like), contiguously at
 * the writer's position and publish it (P1, then the P3 wake) unless
 * `publish` is false (then it is held back until flush()).  Declines (False,
 * nothing written) if the message would wrap around the end of the ring, if
 * the cached gate does not cover it (I1), if it is large and the writer is at
 * or past `early`, or if there are more than MAX_PARTS parts.  The caller
 * checks the size against the capacity first.
 */
static PyObject *
Cursor_put(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(3, "put");
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    Py_ssize_t kind = PyLong_AsSsize_t(args[1]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    int publish = PyObject_IsTrue(args[2]);
    if (publish < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "put: parts must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n_parts = PySequence_Fast_GET_SIZE(seq);
    if (n_parts > MAX_PARTS) {
        Py_DECREF(seq);
        Py_RETURN_FALSE;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer views[MAX_PARTS];
    Py_ssize_t got = 0, total = 0;
    PyObject *result = NULL;
    for (; got < n_parts; got++) {
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        total += views[got].len;
    }
    uint64_t slot = (uint64_t)self->slot_size, n = (uint64_t)self->n_slots;
    uint64_t k = total == 0 ? 1 : ((uint64_t)total + slot - 1) / slot;
    uint64_t idx = self->pos % n;
    if (k > n - idx || self->pos + k > self->bound ||
        (self->pos >= self->early && total >= EARLY_WRAP_MIN)) {
        result = Py_False;
        goto done;
    }
    char *dst = base + self->data_off + idx * slot;
    for (Py_ssize_t i = 0; i < n_parts; i++) {
        copy_bytes(self->atomics, dst, views[i].buf, views[i].len);
        dst += views[i].len;
    }
    Desc *d = (Desc *)(base + self->desc_off + idx * DESC_SIZE);
    d->total = (uint64_t)total;
    d->nbytes = (uint32_t)((uint64_t)total < slot ? (uint64_t)total : slot);
    d->flags = FLAG_FIRST | FLAG_CONTIG | ((uint32_t)kind << KIND_SHIFT);
    d->msg_no = self->msgs;
    d->reserved = 0;
    self->msgs++;
    __atomic_store_n((uint64_t *)(base + self->msgs_off), (uint64_t)self->msgs, __ATOMIC_RELEASE);
    self->pos += k;
    if (publish)
        cursor_flush(self, base);   /* P1: after every plain store above */
    result = Py_True;
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    Py_DECREF(seq);
    Py_XINCREF(result);
    return result;
}

/* The contiguous message at the reader's position, or NULL (no error set) to decline. */
static const Desc *
cursor_head(CursorObject *self, char *base, uint64_t *k_out)
{
    if (self->pos >= self->bound) {
        /* P1: acquire load; the descriptor and data loads below come after it. */
        uint64_t w = __atomic_load_n((uint64_t *)(base + self->peer_seq_off), __ATOMIC_ACQUIRE);
        if (w <= self->pos)
            return NULL;
        self->bound = w;
    }
    uint64_t slot = (uint64_t)self->slot_size, n = (uint64_t)self->n_slots;
    uint64_t idx = self->pos % n;
    const Desc *d = (const Desc *)(base + self->desc_off + idx * DESC_SIZE);
    uint32_t flags = d->flags;
    if ((flags & (FLAG_FIRST | FLAG_CONTIG | FLAG_PAD)) != (FLAG_FIRST | FLAG_CONTIG))
        return NULL;   /* padding, a streamed message or a continuation: the Python path */
    uint64_t total = d->total;
    uint64_t k = total == 0 ? 1 : (total + slot - 1) / slot;
    if (total > n * slot || k > n - idx || self->pos + k > self->bound)
        return NULL;   /* corrupted: the Python path reports it */
    *k_out = k;
    return d;
}

/*
 * next() -> (kind, offset, nbytes, slots) | None   (reader)
 *
 * The contiguous message at the reader's position, if one is published (I2),
 * as its kind, the offset of its bytes in the buffer, its size and the slots
 * it takes; the caller reads it, then calls finish(slots).  None (declined)
 * when nothing is published, or the next slot is padding, part of a streamed
 * message or corrupted.  Never blocks.
 */
static PyObject *
Cursor_next(CursorObject *self, PyObject *Py_UNUSED(ignored))
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t k;
    const Desc *d = cursor_head(self, base, &k);
    if (d == NULL)
        Py_RETURN_NONE;
    uint64_t idx = self->pos % (uint64_t)self->n_slots;
    return Py_BuildValue("(kKKK)", (unsigned long)(d->flags >> KIND_SHIFT),
                         (unsigned long long)(self->data_off + idx * (uint64_t)self->slot_size),
                         (unsigned long long)d->total, (unsigned long long)k);
}

static void
cursor_finish(CursorObject *self, char *base, uint64_t k, int defer)
{
    self->msgs++;
    __atomic_store_n((uint64_t *)(base + self->msgs_off), (uint64_t)self->msgs, __ATOMIC_RELEASE);
    self->pos += k;
    if (!defer)
        cursor_flush(self, base);   /* P2: after the caller's loads of the message */
}

/*
 * finish(slots, defer) -> None   (reader)
 *
 * Count a delivered message and release its slots (P2, then the P4 wake); with
 * `defer` true, hold the release back until flush().
 */
static PyObject *
Cursor_finish(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(2, "finish");
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t k;
    if (parse_u64(args[0], &k) < 0)
        return NULL;
    int defer = PyObject_IsTrue(args[1]);
    if (defer < 0)
        return NULL;
    cursor_finish(self, base, k, defer);
    Py_RETURN_NONE;
}

/*
 * take_bytes(kind) -> bytes | None   (reader)
 *
 * next(), a copy into a new bytes object and finish() in one call, for a
 * contiguous message of the given kind.  None (nothing taken) where next()
 * declines or the message is of another kind.
 */
static PyObject *
Cursor_take_bytes(CursorObject *self, PyObject *arg)
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    long kind = PyLong_AsLong(arg);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    uint64_t k;
    const Desc *d = cursor_head(self, base, &k);
    if (d == NULL || (long)(d->flags >> KIND_SHIFT) != kind)
        Py_RETURN_NONE;
    Py_ssize_t total = (Py_ssize_t)d->total;
    uint64_t idx = self->pos % (uint64_t)self->n_slots;
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    copy_bytes(self->atomics, PyBytes_AS_STRING(out),
               base + self->data_off + idx * (uint64_t)self->slot_size, total);
    cursor_finish(self, base, k, 0);
    return out;
}

static int
Cursor_init(CursorObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"atomics", "n_slots", "slot_size", "data_off", "desc_off",
                             "seq_off", "msgs_off", "peer_seq_off", "flag_off", "futex_off",
                             "wake_n", "count_off", NULL};
    PyObject *atomics;
    int wake_n;
    self->count_off = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nnnnnnnnni|$n:Cursor", kwlist,
                                     &AtomicsType, &atomics, &self->n_slots, &self->slot_size,
                                     &self->data_off, &self->desc_off, &self->seq_off,
                                     &self->msgs_off, &self->peer_seq_off, &self->flag_off,
                                     &self->futex_off, &wake_n, &self->count_off))
        return -1;
    AtomicsObject *a = (AtomicsObject *)atomics;
    if (a->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "Cursor on a released Atomics object");
        return -1;
    }
    if (self->n_slots < 1 || self->slot_size < 1 || self->data_off < 0 || self->desc_off < 0 ||
        self->n_slots > (a->len - self->data_off) / self->slot_size ||
        self->n_slots > (a->len - self->desc_off) / DESC_SIZE ||
        self->desc_off % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "Cursor: the ring does not fit in the buffer");
        return -1;
    }
    if (check_word(a, self->seq_off, 8) < 0 || check_word(a, self->msgs_off, 8) < 0 ||
        check_word(a, self->peer_seq_off, 8) < 0 || check_word(a, self->flag_off, 4) < 0 ||
        check_word(a, self->futex_off, 4) < 0 ||
        (self->count_off >= 0 && check_word(a, self->count_off, 8) < 0))
        return -1;
    /* No wake yet: the first publish wakes whatever the count (a reader may
     * have announced before this writer attached). */
    self->woken_at = ~(uint64_t)0;
    self->wake_n = wake_n < 1 ? INT32_MAX : wake_n;
    Py_INCREF(atomics);
    Py_XSETREF(self->atomics, a);
    self->pos = self->stored = __atomic_load_n(WORD64(a, self->seq_off), __ATOMIC_ACQUIRE);
    self->msgs = __atomic_load_n(WORD64(a, self->msgs_off), __ATOMIC_ACQUIRE);
    self->bound = 0;
    self->early = ~0ULL;   /* never, until the writer sets it */
    return 0;
}

static void
Cursor_dealloc(CursorObject *self)
{
    Py_XDECREF(self->atomics);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Cursor_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Cursor_put, METH_FASTCALL,
     "put(parts, kind, publish) -> bool: store and publish a contiguous message, or decline."},
    {"next", (PyCFunction)Cursor_next, METH_NOARGS,
     "next() -> (kind, offset, nbytes, slots) | None: the published contiguous message, if any."},
    {"finish", (PyCFunction)(void (*)(void))Cursor_finish, METH_FASTCALL,
     "finish(slots, defer): count a message and release its slots (unless deferred)."},
    {"take_bytes", (PyCFunction)Cursor_take_bytes, METH_O,
     "take_bytes(kind) -> bytes | None: next(), copy and finish() in one call."},
    {"flush", (PyCFunction)Cursor_flush, METH_NOARGS,
     "flush(): store pos if it moved, and wake the peer if it sleeps."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Cursor_members[] = {
    {"pos", T_ULONGLONG, offsetof(CursorObject, pos), 0, "Slots filled (writer) or consumed (reader)."},
    {"stored", T_ULONGLONG, offsetof(CursorObject, stored), 0, "The value last stored in the sequence word."},
    {"msgs", T_ULONGLONG, offsetof(CursorObject, msgs), 0, "Messages counted."},
    {"bound", T_ULONGLONG, offsetof(CursorObject, bound), 0,
     "Writer: the cached gate; reader: write_seq as last seen."},
    {"early", T_ULONGLONG, offsetof(CursorObject, early), 0,
     "Writer: from this position on, put() declines messages of EARLY_WRAP_MIN bytes or more."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CursorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.Cursor",
    .tp_basicsize = sizeof(CursorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Cursor(atomics, ...): one endpoint's position in one ring, and its per-message fast path.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cursor_init,
    .tp_dealloc = (destructor)Cursor_dealloc,
    .tp_methods = Cursor_methods,
    .tp_members = Cursor_members,
};

/*
 * scan(cursors, start) -> int
 *
 * The index of the first reader cursor, in round-robin order from `start`,
 * with a published slot at its position (I2: an acquire load of its peer's
 * sequence, which also refreshes the cursor's `bound`); -1 if none has one.
 * A gather reader's look at all its rings in one call.
 */
static PyObject *
native_scan(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(2, "scan");
    if (!PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan: cursors must be a list of Cursor objects");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t j = ((start + i) % n + n) % n;
        PyObject *item = PyList_GET_ITEM(args[0], j);
        if (!PyObject_TypeCheck(item, &CursorType)) {
            PyErr_SetString(PyExc_TypeError, "scan: cursors must be a list of Cursor objects");
            return NULL;
        }
        CursorObject *c = (CursorObject *)item;
        char *base = cursor_base(c);
        if (base == NULL)
            return NULL;
        if (c->pos < c->bound)
            return PyLong_FromSsize_t(j);
        uint64_t w = __atomic_load_n((uint64_t *)(base + c->peer_seq_off), __ATOMIC_ACQUIRE);
        if (w > c->pos) {
            c->bound = w;
            return PyLong_FromSsize_t(j);
        }
    }
    return PyLong_FromLong(-1);
}

/* ---- POSIX shared memory names ---------------------------------------- */

static PyObject *
native_shm_open(PyObject *Py_UNUSED(mod), PyObject *args)
{
    const char *name;
    int flags, mode, fd;
    if (!PyArg_ParseTuple(args, "sii:shm_open", &name, &flags, &mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fd = shm_open(name, flags | O_CLOEXEC, (mode_t)mode);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
    return PyLong_FromLong(fd);
}

static PyObject *
native_shm_unlink(PyObject *Py_UNUSED(mod), PyObject *args)
{
    const char *name;
    int r;
    if (!PyArg_ParseTuple(args, "s:shm_unlink", &name))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = shm_unlink(name);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
    Py_RETURN_NONE;
}

/* ---- core-to-core round trip (a benchmark diagnostic) ------------------ */

#if defined(__linux__)
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
static PyObject *
native_core_to_core_ns(PyObject *Py_UNUSED(mod), PyObject *args)
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

static PyMethodDef module_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))native_scan, METH_FASTCALL,
     "scan(cursors, start) -> int: the first reader cursor (round robin) with a published slot, or -1."},
    {"shm_open", native_shm_open, METH_VARARGS, "shm_open(name, flags, mode) -> fd (close-on-exec)."},
    {"shm_unlink", native_shm_unlink, METH_VARARGS, "shm_unlink(name): remove a shared-memory name."},
#if defined(__linux__)
    {"core_to_core_ns", native_core_to_core_ns, METH_VARARGS,
     "core_to_core_ns(cpu_a, cpu_b, rounds, batches, timeout) -> [float]: mean round trip of a "
     "cache line between two CPUs, per batch, in ns."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "shmcast._native",
    "Atomics and futexes on shared memory (the native core of shmcast).", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&AtomicsType) < 0 || PyType_Ready(&CursorType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&AtomicsType);
    if (PyModule_AddObject(m, "Atomics", (PyObject *)&AtomicsType) < 0) {
        Py_DECREF(&AtomicsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CursorType);
    if (PyModule_AddObject(m, "Cursor", (PyObject *)&CursorType) < 0) {
        Py_DECREF(&CursorType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "HAVE_FUTEX", SHMCAST_HAVE_FUTEX) < 0 ||
        PyModule_AddIntConstant(m, "EARLY_WRAP_MIN", EARLY_WRAP_MIN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
