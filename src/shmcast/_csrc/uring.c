/*
 * FutexRing: a futex wait that an event loop can watch (docs/protocol.md, P3 "through
 * io_uring").  An io_uring of the calling process whose only requests are FUTEX_WAITs on
 * words of a shared segment: step 4 of a P3 sleep is submitted instead of made, and the
 * ring's descriptor becomes readable when the wait ends - woken by the writer's ordinary
 * FUTEX_WAKE, or at once if the word no longer holds the value (-EAGAIN).  The writer
 * changes nothing: to it the reader is one more futex sleeper, and the kernel places the
 * woken loop as it places any futex waiter.
 *
 * The kernel must know IORING_OP_FUTEX_WAIT (Linux 6.7); the constructor submits one wait
 * on a word of its own that cannot match and raises OSError unless it completes with
 * EAGAIN, so an older kernel, a disabled io_uring or a sandbox refusing io_uring_setup all
 * raise (the caller falls back).  Defined here, not taken from <linux/io_uring.h>, are the
 * few numbers the build machine's headers may not have yet.
 *
 * Who may call: one thread at a time (the event loop's; the Python side enforces one call
 * per endpoint), in the process that made the ring.  Nothing read from the segment is used:
 * the kernel reads the word itself, and a completion's result is only reported.
 */
#include "native.h"

#if defined(__linux__)
#include <errno.h>
#include <linux/io_uring.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define OP_FUTEX_WAIT 51          /* IORING_OP_FUTEX_WAIT, Linux 6.7 */
#define FUTEX2_SIZE_U32 0x02
#define FUTEX_BITSET_ANY 0xffffffffu
#define RING_ENTRIES 8

typedef struct {
    PyObject_HEAD
    int fd;
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_len, cq_len, sqe_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned sq_entries;
} FutexRingObject;

static void
ring_unmap(FutexRingObject *self)
{
    if (self->sqe_map != NULL)
        munmap(self->sqe_map, self->sqe_len);
    if (self->cq_map != NULL && self->cq_map != self->sq_map)
        munmap(self->cq_map, self->cq_len);
    if (self->sq_map != NULL)
        munmap(self->sq_map, self->sq_len);
    self->sq_map = self->cq_map = self->sqe_map = NULL;
    if (self->fd >= 0)
        close(self->fd);   /* cancels what is still queued */
    self->fd = -1;
}

/* Queue one FUTEX_WAIT(addr, expected) tagged `tag` and submit it; 0, or -errno. */
static int
ring_submit_wait(FutexRingObject *self, uint32_t *addr, uint32_t expected, uint64_t tag)
{
    /* The queue never holds more than this one entry: io_uring_enter consumes it at once. */
    unsigned tail = *self->sq_tail;
    unsigned idx = tail & *self->sq_mask;
    struct io_uring_sqe *sqe = &self->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = OP_FUTEX_WAIT;
    sqe->fd = FUTEX2_SIZE_U32;   /* shared (no FUTEX2_PRIVATE): the wakers are other processes */
    sqe->addr = (uint64_t)(uintptr_t)addr;
    sqe->addr2 = expected;
    sqe->addr3 = FUTEX_BITSET_ANY;
    sqe->user_data = tag;
    self->sq_array[idx] = idx;
    __atomic_store_n(self->sq_tail, tail + 1, __ATOMIC_RELEASE);
    long r;
    do {
        r = syscall(__NR_io_uring_enter, self->fd, 1, 0, 0, NULL, 0);
    } while (r < 0 && errno == EINTR);
    int err = r < 0 ? errno : 0;
    if (r == 1)
        return 0;
    /* Not taken (an error, or nothing consumed): take the entry back, so that a later
     * submission is not answered by this stale one. */
    if (__atomic_load_n(self->sq_head, __ATOMIC_ACQUIRE) == tail)
        __atomic_store_n(self->sq_tail, tail, __ATOMIC_RELEASE);
    return err ? -err : -EBUSY;
}

/* Take every completion: at most `max` (tag, res) pairs into out; how many. */
static int
ring_reap(FutexRingObject *self, uint64_t *tags, int32_t *res, int max)
{
    unsigned head = *self->cq_head;
    unsigned tail = __atomic_load_n(self->cq_tail, __ATOMIC_ACQUIRE);
    int n = 0;
    while (head != tail && n < max) {
        struct io_uring_cqe *c = &self->cqes[head & *self->cq_mask];
        tags[n] = c->user_data;
        res[n] = c->res;
        n++;
        head++;
    }
    __atomic_store_n(self->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

static int
ring_setup(FutexRingObject *self)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
    if (fd < 0)
        return -errno;
    self->fd = fd;   /* io_uring descriptors are close-on-exec */
    self->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    self->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (self->cq_len > self->sq_len)
            self->sq_len = self->cq_len;
        self->cq_len = self->sq_len;
    }
    void *sq = mmap(NULL, self->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED)
        return -errno;
    self->sq_map = sq;
    void *cq = sq;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        cq = mmap(NULL, self->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                  IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED)
            return -errno;
    }
    self->cq_map = cq;
    self->sqe_len = p.sq_entries * sizeof(struct io_uring_sqe);
    void *sqes = mmap(NULL, self->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                      IORING_OFF_SQES);
    if (sqes == MAP_FAILED)
        return -errno;
    self->sqe_map = sqes;
    self->sqes = sqes;
    self->sq_entries = p.sq_entries;
    self->sq_head = (unsigned *)((char *)sq + p.sq_off.head);
    self->sq_tail = (unsigned *)((char *)sq + p.sq_off.tail);
    self->sq_mask = (unsigned *)((char *)sq + p.sq_off.ring_mask);
    self->sq_array = (unsigned *)((char *)sq + p.sq_off.array);
    self->cq_head = (unsigned *)((char *)cq + p.cq_off.head);
    self->cq_tail = (unsigned *)((char *)cq + p.cq_off.tail);
    self->cq_mask = (unsigned *)((char *)cq + p.cq_off.ring_mask);
    self->cqes = (struct io_uring_cqe *)((char *)cq + p.cq_off.cqes);

    /* Does this kernel wait on futexes through io_uring?  A wait for a value the word does
     * not hold must end at once with EAGAIN; an unknown opcode ends with EINVAL. */
    static uint32_t never = 1;
    int r = ring_submit_wait(self, &never, 0, 0);
    if (r < 0)
        return r;
    uint64_t tag;
    int32_t res;
    if (ring_reap(self, &tag, &res, 1) != 1)
        return -ENOSYS;
    if (res != -EAGAIN)
        return res < 0 ? (res == -EINVAL ? -ENOSYS : res) : -ENOSYS;
    return 0;
}

static PyObject *
FutexRing_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!PyArg_ParseTuple(args, ":FutexRing") || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "FutexRing() takes no arguments");
        return NULL;
    }
    FutexRingObject *self = (FutexRingObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->fd = -1;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = ring_setup(self);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        ring_unmap(self);
        errno = -r;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
FutexRing_dealloc(FutexRingObject *self)
{
    ring_unmap(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
check_open(FutexRingObject *self)
{
    if (self->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed FutexRing");
        return -1;
    }
    return 0;
}

static PyObject *
FutexRing_submit_wait(FutexRingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t off;
    uint64_t expected, tag;
    ARGC(4, "submit_wait");
    if (check_open(self) < 0)
        return NULL;
    if (!PyObject_TypeCheck(args[0], &AtomicsType)) {
        PyErr_SetString(PyExc_TypeError, "submit_wait() needs an Atomics object");
        return NULL;
    }
    AtomicsObject *a = (AtomicsObject *)args[0];
    if (parse_off(args, 1, &off) < 0 || check_word(a, off, 4) < 0 ||
        parse_u64(args[2], &expected) < 0 || parse_u64(args[3], &tag) < 0)
        return NULL;
    int r = ring_submit_wait(self, WORD32(a, off), (uint32_t)expected, tag);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
FutexRing_reap(FutexRingObject *self, PyObject *Py_UNUSED(arg))
{
    uint64_t tags[RING_ENTRIES * 2];
    int32_t res[RING_ENTRIES * 2];
    if (check_open(self) < 0)
        return NULL;
    int n = ring_reap(self, tags, res, RING_ENTRIES * 2);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *item = Py_BuildValue("(Ki)", (unsigned long long)tags[i], (int)res[i]);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyObject *
FutexRing_fileno(FutexRingObject *self, PyObject *Py_UNUSED(arg))
{
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->fd);
}

static PyObject *
FutexRing_close(FutexRingObject *self, PyObject *Py_UNUSED(arg))
{
    ring_unmap(self);
    Py_RETURN_NONE;
}

static PyMethodDef FutexRing_methods[] = {
    {"submit_wait", (PyCFunction)(void (*)(void))FutexRing_submit_wait, METH_FASTCALL,
     "submit_wait(atomics, off, expected, tag): queue FUTEX_WAIT(word at off, expected); its "
     "completion (tag, result) comes with reap(), the descriptor readable meanwhile."},
    {"reap", (PyCFunction)FutexRing_reap, METH_NOARGS,
     "reap() -> [(tag, result)]: the completions so far (0: woken; -11, EAGAIN: the word had "
     "changed)."},
    {"fileno", (PyCFunction)FutexRing_fileno, METH_NOARGS,
     "fileno() -> int: the descriptor, readable while a completion waits to be reaped."},
    {"close", (PyCFunction)FutexRing_close, METH_NOARGS,
     "close(): release the ring (idempotent); a wait still queued is cancelled."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject FutexRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.FutexRing",
    .tp_doc = "FutexRing(): futex waits through io_uring, for an event loop to watch (OSError "
              "where the kernel cannot).",
    .tp_basicsize = sizeof(FutexRingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = FutexRing_new,
    .tp_dealloc = (destructor)FutexRing_dealloc,
    .tp_methods = FutexRing_methods,
};

#else /* not Linux: no such ring */

static PyObject *
FutexRing_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
}

PyTypeObject FutexRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.FutexRing",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = FutexRing_new,
};
#endif
