#include "native.h"

#include <string.h>
#include <structmember.h>

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
#define EARLY_WRAP_MIN SHMCAST_EARLY_WRAP_MIN

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
    shmcast_wake_word(self->atomics, self->futex_off, self->wake_n);
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

PyTypeObject CursorType = {
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
PyObject *
shmcast_scan(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
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
