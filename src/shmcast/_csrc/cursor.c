/*
 * The Cursor type: one endpoint's position in one ring, and the code that runs
 * once per message: publish a contiguous message (writer), take one (reader),
 * and hand slots over (both).  It is the protocol of docs/protocol.md, done in
 * one call so that a small message costs one crossing into C instead of a
 * dozen.  Anything out of the ordinary that is still legitimate (a wrap, a full
 * ring, padding, a streamed message) makes the fast path decline (False /
 * None) and the caller takes the Python path, which reads and writes the same
 * state through the members and the slow-path methods below.
 *
 * Nothing read from the segment is trusted.  Any process that can map the
 * segment can write anything into it, so every value a Cursor reads is checked
 * before it is used, and an impossible one raises SegmentError at once:
 *   - the peer's sequence (reader: write_seq) must lie in [pos, pos + n_slots]:
 *     a writer never publishes more than a ring ahead of a gating reader (I1),
 *     and never takes a slot back;
 *   - a descriptor must carry the sequence of the slot it is read at (a stale
 *     or replayed one carries another) and a check word that hashes its fields
 *     with the queue's nonce (`key`), so that random bytes or a descriptor of
 *     another queue are refused;
 *   - lengths must fit the ring and the message's own slots;
 *   - with checksums on (a queue option), a payload must match the CRC-32C its
 *     descriptor carries, checked when the message is taken from the ring;
 *   - after a reader has read a message (or a run of slots), it looks at the
 *     descriptors again before it releases them (`finish`, `release`): the
 *     writer stores a slot's descriptor before its data, so a reader whose
 *     slot was overwritten while it read (because a stray process moved its
 *     read_seq forward) sees the new descriptor and raises, instead of
 *     delivering a torn message.  This is a seqlock's reader side: the loads of
 *     the data are ordered before the second look by an acquire fence, and the
 *     writer's descriptor stores before its data stores by a release fence.
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
 *                          last wake (cursor_flush says why);
 *   sock_off, lines_off, n_lines
 *                          writer (optional): the count of readers asleep on a
 *                          socket and the reader lines to look at when it is
 *                          non-zero: a wake also sends those readers a datagram
 *                          (sockwake.c; cursor_flush says why it is enough);
 *   key                    the queue's nonce, which keys the descriptor check;
 *   checksum               whether payloads carry a CRC-32C (the writer seals
 *                          each descriptor with it, readers check it).
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
#include "native.h"

#include <string.h>
#include <structmember.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the shmcast segment layout is little-endian"
#endif

#define DESC_SIZE 64
#define FLAG_FIRST 1u
#define FLAG_CONT 2u
#define FLAG_PAD 4u
#define FLAG_CONTIG 8u
#define FLAG_BITS 0xFu
#define KIND_SHIFT 8
#define KIND_MASK (0xFFu << KIND_SHIFT)
#define MSG_RAW 1u
#define MSG_OBJECT 2u
#define MAX_PARTS 8
/* Copies at least this large release the GIL. */
#define BIG_COPY (256 * 1024)
#define EARLY_WRAP_MIN SHMCAST_EARLY_WRAP_MIN

typedef struct {
    uint64_t total;     /* message length (FIRST, CONT), or slots in the run (PAD) */
    uint32_t check;     /* desc_check() of the other fields, keyed by the nonce */
    uint32_t flags;     /* FLAG_* bits, and the message kind in bits 8..15 */
    uint64_t msg_no;    /* message number, the same in every slot of a message */
    uint64_t seq;       /* the sequence of the slot this descriptor describes */
    uint32_t crc;       /* CRC-32C of the payload it describes (checksums on), else 0 */
    uint32_t unused[7]; /* zero: a descriptor fills a cache line of its own */
} Desc;

_Static_assert(sizeof(Desc) == DESC_SIZE, "a descriptor is one 64-byte line");

typedef struct {
    PyObject_HEAD
    AtomicsObject *atomics;
    Py_ssize_t n_slots, slot_size, data_off, desc_off;
    Py_ssize_t seq_off, msgs_off, peer_seq_off, flag_off, futex_off;
    int wake_n;
    Py_ssize_t count_off;   /* writer: the announcement count (-1: use flag_off) */
    uint64_t woken_at;      /* writer: the count as loaded before the last wake */
    Py_ssize_t sock_off;    /* writer: the socket sleepers' count (-1: none) */
    Py_ssize_t lines_off, n_lines;  /* writer: the reader lines a socket signal looks at */
    int sock_fd1;           /* writer: 1 + the socket signals are sent from (0: none yet) */
    unsigned long long signals;  /* writer: datagrams sent (statistics, tests) */
    uint64_t key;           /* the queue's nonce */
    int checksum;           /* payloads carry a CRC-32C */
    unsigned long long pos, stored, msgs, bound, early;
    PyObject *last;         /* reader: the bytes take_bytes() returned last (or NULL) */
} CursorObject;

/* A 32-bit hash of a descriptor's fields and the queue's key: random bytes
 * pass with probability 2**-32, and a descriptor copied from another queue
 * does not pass at all (another key).  Not a defence against a process that
 * knows the nonce; that process can write the ring anyway. */
static inline uint32_t
desc_check(uint64_t key, const Desc *d)
{
    uint64_t h = key ^ (d->total * 0x9E3779B97F4A7C15ull);
    h ^= (d->msg_no + 0x632BE59BD9B4E019ull) * 0xC2B2AE3D27D4EB4Full;
    h ^= (d->seq ^ ((uint64_t)d->flags << 40)) * 0x165667B19E3779F9ull;
    h ^= ((uint64_t)d->crc + 0x27D4EB2F165667C5ull) * 0x94D049BB133111EBull;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    return (uint32_t)h;
}

static char *
cursor_base(CursorObject *self)
{
    char *base = self->atomics->base;
    if (base == NULL)
        PyErr_SetString(PyExc_ValueError, "operation on a released segment");
    return base;
}

static Desc *
desc_at(CursorObject *self, char *base, uint64_t seq)
{
    return (Desc *)(base + self->desc_off + (seq % (uint64_t)self->n_slots) * DESC_SIZE);
}

static void
write_desc(CursorObject *self, char *base, uint64_t seq, uint64_t total, uint32_t flags,
           uint64_t msg_no)
{
    Desc *d = desc_at(self, base, seq);
    d->total = total;
    d->flags = flags;
    d->msg_no = msg_no;
    d->seq = seq;
    d->crc = 0;
    d->check = desc_check(self->key, d);
    /* The descriptor before the data it describes (the seqlock order above). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

/* CRC-32C of n bytes at p, with the GIL released for a large one. */
static uint32_t
payload_crc(CursorObject *self, const char *p, uint64_t n)
{
    uint32_t crc;
    if (n < BIG_COPY)
        return shmcast_crc32c(0, p, (size_t)n);
    self->atomics->waiters++;   /* the mapping cannot be released meanwhile */
    Py_BEGIN_ALLOW_THREADS
    crc = shmcast_crc32c(0, p, (size_t)n);
    Py_END_ALLOW_THREADS
    self->atomics->waiters--;
    return crc;
}

/* With checksums on: put `crc`, the CRC-32C of the payload of the slot at `seq`
 * (computed from the writer's own source, not read back from the ring, so that
 * bytes a stray process writes into the ring meanwhile are not sealed in), into
 * its descriptor, after the data stores and before the publish that follows
 * (P1 orders them for readers). */
static void
seal_crc(CursorObject *self, char *base, uint64_t seq, uint32_t crc)
{
    Desc *d = desc_at(self, base, seq);
    d->crc = crc;
    d->check = desc_check(self->key, d);
}

/* With checksums on: does the payload at p (n bytes) match the CRC-32C of the
 * descriptor of `seq`?  SegmentError (and -1) if not. */
static int
verify_payload(CursorObject *self, const Desc *d, uint64_t seq, const char *p, uint64_t n)
{
    if (!self->checksum || payload_crc(self, p, n) == d->crc)
        return 0;
    PyErr_Format(shmcast_SegmentError,
                 "corrupted message at sequence %llu: its %llu bytes fail their checksum "
                 "(another process wrote into the ring)",
                 (unsigned long long)seq, (unsigned long long)n);
    return -1;
}

/* A copy of the descriptor at `seq`, if it is the one the writer stored for
 * that very slot; else SegmentError, and -1. */
static int
read_desc(CursorObject *self, char *base, uint64_t seq, Desc *out)
{
    const Desc *d = desc_at(self, base, seq);
    memcpy(out, d, sizeof *out);
    int valid = out->check == desc_check(self->key, out);
    if (out->seq == seq && valid)
        return 0;
    if (out->seq != seq && valid)
        PyErr_Format(shmcast_SegmentError,
                     "corrupted slot at sequence %llu: it holds the descriptor of sequence "
                     "%llu (a sequence word was moved, or the ring was overwritten)",
                     (unsigned long long)seq, (unsigned long long)out->seq);
    else
        PyErr_Format(shmcast_SegmentError,
                     "corrupted slot at sequence %llu: its descriptor fails its check "
                     "(overwritten by another process, or not of this queue)",
                     (unsigned long long)seq);
    return -1;
}

/* After a reader's loads of the slots from `seq` on: is the descriptor at
 * `seq` still the one read before?  SegmentError (and -1) if not: the writer
 * has begun to reuse the slot, which it can only do if a stray process moved
 * this reader's sequence forward, or something else wrote into the ring.  One
 * descriptor tells for the whole run: the writer fills slots in sequence
 * order, the first of the run first, and stores each descriptor before the
 * data (write_desc). */
static int
recheck(CursorObject *self, char *base, uint64_t seq)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* the data loads before these loads */
    const Desc *d = desc_at(self, base, seq);
    Desc now;
    memcpy(&now, d, sizeof now);
    if (now.seq == seq && now.check == desc_check(self->key, &now))
        return 0;
    PyErr_Format(shmcast_SegmentError,
                 "the slot at sequence %llu changed while it was read: another process wrote "
                 "into the ring, or moved this reader's sequence and the writer reused it",
                 (unsigned long long)seq);
    return -1;
}

/* The peer's sequence (reader: write_seq), by an acquire load (P1), checked
 * against what the writer can have published: never behind this reader,
 * never more than a ring ahead (I1).  Returns 0 and sets *w, or -1 with
 * SegmentError. */
static int
observe(CursorObject *self, char *base, uint64_t *w)
{
    uint64_t v = __atomic_load_n((uint64_t *)(base + self->peer_seq_off), __ATOMIC_ACQUIRE);
    if (v < self->pos) {
        PyErr_Format(shmcast_SegmentError,
                     "corrupted queue: the writer's sequence %llu is behind this reader's "
                     "position %llu (sequences never go back)",
                     (unsigned long long)v, (unsigned long long)self->pos);
        return -1;
    }
    if (v - self->pos > (uint64_t)self->n_slots) {
        PyErr_Format(shmcast_SegmentError,
                     "corrupted queue: the writer's sequence %llu is more than the ring's %zd "
                     "slots ahead of this reader's position %llu",
                     (unsigned long long)v, self->n_slots, (unsigned long long)self->pos);
        return -1;
    }
    *w = v;
    return 0;
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
 *
 * A reader asleep on a socket (an event loop's reader, docs/protocol.md P3)
 * drains its socket, then marks its line and counts itself in `sock_off`,
 * then announces as above, then re-checks; a wake that decided to wake also
 * sends a datagram to every marked reader once that count is non-zero.  A
 * datagram stays until the reader drains it, so no signal sent after the
 * drain is lost.  Either the reader's re-check sees the publish, or this
 * wake's loads (after the full fence) see its announcement, and so the mark
 * stored before it (the count is loaded first, the marks after the futex bump,
 * a full barrier, with acquire loads): it sends after the drain.  The skip on
 * an unmoved count holds for the same reason as for the futex: the last wake
 * saw the announcement, hence the mark, hence sent a datagram after the
 * drain, which is still there unless the reader woke; to sleep again it must
 * announce again.
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
    if (self->sock_off >= 0) {
        int fd = self->sock_fd1 - 1;
        self->signals += (unsigned long long)shmcast_sock_signal(
            base, self->sock_off, self->lines_off, self->n_lines, self->key, &fd);
        self->sock_fd1 = fd + 1;
    }
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

static uint64_t
slots_for(uint64_t total, uint64_t slot)
{
    return total == 0 ? 1 : (total - 1) / slot + 1;
}

/* ---- both sides ------------------------------------------------------------ */

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
 * read_desc(seq) -> (total, flags, msg_no, crc)
 *
 * The descriptor of the slot at sequence `seq`, checked (SegmentError if it is
 * not the one the writer stored for that slot).  For the reader's slow path;
 * `crc` is the payload's CRC-32C where checksums are on (the caller checks it).
 */
static PyObject *
Cursor_read_desc(CursorObject *self, PyObject *arg)
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t seq;
    if (parse_u64(arg, &seq) < 0)
        return NULL;
    Desc d;
    if (read_desc(self, base, seq, &d) < 0)
        return NULL;
    return Py_BuildValue("(KkKk)", (unsigned long long)d.total, (unsigned long)d.flags,
                         (unsigned long long)d.msg_no, (unsigned long)d.crc);
}

/* ---- writer ---------------------------------------------------------------- */

/*
 * write_desc(seq, total, flags, msg_no)   (writer)
 *
 * Store the descriptor of the slot at `seq` (with its check word), ordered
 * before the data stores that follow.  The slot must be claimed (free, I1).
 */
static PyObject *
Cursor_write_desc(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(4, "write_desc");
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t seq, total, flags, msg_no;
    if (parse_u64(args[0], &seq) < 0 || parse_u64(args[1], &total) < 0 ||
        parse_u64(args[2], &flags) < 0 || parse_u64(args[3], &msg_no) < 0)
        return NULL;
    write_desc(self, base, seq, total, (uint32_t)flags, msg_no);
    Py_RETURN_NONE;
}

/*
 * seal(seq, nbytes, crc=None)   (writer)
 *
 * With checksums on, store `crc`, the CRC-32C of the payload of the slot at
 * `seq` as computed from its source, in its descriptor; ValueError without it.
 * Never computed from the ring: bytes a stray process wrote there before the
 * seal would be sealed in (reserve() on such a queue fills a private buffer
 * for that reason).  Call it after the data stores, before the publish.
 * Without checksums, nothing.
 */
static PyObject *
Cursor_seal(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "seal() takes 2 or 3 arguments");
        return NULL;
    }
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t seq, nbytes, crc = 0;
    if (parse_u64(args[0], &seq) < 0 || parse_u64(args[1], &nbytes) < 0)
        return NULL;
    int given = nargs == 3 && args[2] != Py_None;
    if (given && parse_u64(args[2], &crc) < 0)
        return NULL;
    uint64_t idx = seq % (uint64_t)self->n_slots;
    if (nbytes > (uint64_t)(self->n_slots - idx) * (uint64_t)self->slot_size) {
        PyErr_SetString(PyExc_ValueError, "seal: the bytes run past the end of the ring");
        return NULL;
    }
    if (!self->checksum)
        Py_RETURN_NONE;
    if (!given || crc > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError,
                        "seal: a ring with checksums needs the payload's CRC-32C (32 bits), "
                        "computed from its source");
        return NULL;
    }
    seal_crc(self, base, seq, (uint32_t)crc);
    Py_RETURN_NONE;
}

/*
 * count_message() -> int   (writer)
 *
 * Spend the next message number: return it, and store the count.
 */
static PyObject *
Cursor_count_message(CursorObject *self, PyObject *Py_UNUSED(ignored))
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t msg_no = self->msgs++;
    __atomic_store_n((uint64_t *)(base + self->msgs_off), (uint64_t)self->msgs, __ATOMIC_RELEASE);
    return PyLong_FromUnsignedLongLong(msg_no);
}

/* The (slots, flag) arguments of commit, publish and finish: the cursor's base, a u64 and a
 * truth value.  NULL (an exception set) if the cursor is released or an argument is bad. */
static char *
slots_and_flag(CursorObject *self, PyObject *const *args, uint64_t *k, int *flag)
{
    char *base = cursor_base(self);
    if (base == NULL || parse_u64(args[0], k) < 0)
        return NULL;
    *flag = PyObject_IsTrue(args[1]);
    return *flag < 0 ? NULL : base;
}

/*
 * commit(slots, flush) -> int   (writer)
 *
 * count_message() and publish(slots, flush) in one call, for a message whose
 * descriptor carries the count before this one: either the message is counted
 * and its slots added to the position, or neither.  Returns its number.
 */
static PyObject *
Cursor_commit(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(2, "commit");
    uint64_t k;
    int flush;
    char *base = slots_and_flag(self, args, &k, &flush);
    if (base == NULL)
        return NULL;
    uint64_t msg_no = self->msgs++;
    __atomic_store_n((uint64_t *)(base + self->msgs_off), (uint64_t)self->msgs, __ATOMIC_RELEASE);
    self->pos += k;
    if (flush)
        cursor_flush(self, base);
    return PyLong_FromUnsignedLongLong(msg_no);
}

/*
 * publish(slots, flush) -> None   (writer)
 *
 * Add `slots` filled slots to the position, and with `flush` true make them
 * and any held back visible (P1) and wake sleeping readers (P3).  One call, so
 * that an exception raised between two Python statements can never leave the
 * position and the published sequence out of step.
 */
static PyObject *
Cursor_publish(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(2, "publish");
    uint64_t k;
    int flush;
    char *base = slots_and_flag(self, args, &k, &flush);
    if (base == NULL)
        return NULL;
    self->pos += k;
    if (flush)
        cursor_flush(self, base);
    Py_RETURN_NONE;
}

/*
 * put(parts, kind, publish) -> bool   (writer)
 *
 * Store a message, the concatenation of `parts` (contiguous buffers, C or
 * Fortran order), contiguously at the writer's position and publish it (P1,
 * then the P3 wake) unless `publish` is false (then it is held back until
 * flush()).  Declines (False, nothing written) if the message would wrap
 * around the end of the ring, if the cached gate does not cover it (I1), if it
 * is large and the writer is at or past `early`, or if there are more than
 * MAX_PARTS parts.  The caller checks the size against the capacity first.
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
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_ANY_CONTIGUOUS) < 0)
            goto done;
        total += views[got].len;
    }
    uint64_t slot = (uint64_t)self->slot_size, n = (uint64_t)self->n_slots;
    uint64_t k = slots_for((uint64_t)total, slot);
    uint64_t idx = self->pos % n;
    if (k > n - idx || self->pos + k > self->bound ||
        (self->pos >= self->early && total >= EARLY_WRAP_MIN)) {
        result = Py_False;
        goto done;
    }
    write_desc(self, base, self->pos, (uint64_t)total,
               FLAG_FIRST | FLAG_CONTIG | ((uint32_t)kind << KIND_SHIFT), self->msgs);
    char *dst = base + self->data_off + idx * slot;
    uint32_t crc = 0;
    for (Py_ssize_t i = 0; i < n_parts; i++) {
        copy_bytes(self->atomics, dst, views[i].buf, views[i].len);
        if (self->checksum)
            crc = shmcast_crc32c(crc, views[i].buf, (size_t)views[i].len);
        dst += views[i].len;
    }
    if (self->checksum)
        seal_crc(self, base, self->pos, crc);
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

/* ---- reader ---------------------------------------------------------------- */

/*
 * The contiguous message at the reader's position: 1 and *k_out, *d_out set;
 * 0 if nothing is published there or the slot needs the Python path (padding,
 * a streamed message, a continuation); -1 with SegmentError if what is there
 * is impossible.
 */
static int
cursor_head(CursorObject *self, char *base, uint64_t *k_out, Desc *d_out)
{
    if (self->pos >= self->bound) {
        uint64_t w;
        if (observe(self, base, &w) < 0)   /* P1: acquire; the loads below come after */
            return -1;
        if (w == self->pos)
            return 0;
        self->bound = w;
    }
    Desc d;
    if (read_desc(self, base, self->pos, &d) < 0)
        return -1;
    if ((d.flags & FLAG_BITS) != (FLAG_FIRST | FLAG_CONTIG))
        return 0;   /* padding, a streamed message or a continuation: the Python path */
    if ((d.flags & (FLAG_BITS | KIND_MASK)) != d.flags ||
        ((d.flags & KIND_MASK) >> KIND_SHIFT) - 1u > 1u) {   /* kind must be RAW or OBJECT */
        PyErr_Format(shmcast_SegmentError, "corrupted slot at sequence %llu: flags 0x%x",
                     (unsigned long long)self->pos, (unsigned)d.flags);
        return -1;
    }
    uint64_t slot = (uint64_t)self->slot_size, n = (uint64_t)self->n_slots;
    uint64_t idx = self->pos % n;
    uint64_t k = d.total > n * slot ? n + 1 : slots_for(d.total, slot);
    if (k > n - idx) {
        PyErr_Format(shmcast_SegmentError,
                     "corrupted slot at sequence %llu: a contiguous message of %llu bytes "
                     "cannot start at slot %llu of %llu slots of %llu bytes",
                     (unsigned long long)self->pos, (unsigned long long)d.total,
                     (unsigned long long)idx, (unsigned long long)n, (unsigned long long)slot);
        return -1;
    }
    if (self->pos + k > self->bound) {
        /* Published with one store (P1): all of it is visible once any is. */
        uint64_t w;
        if (observe(self, base, &w) < 0)
            return -1;
        self->bound = w;
        if (self->pos + k > w) {
            PyErr_Format(shmcast_SegmentError,
                         "corrupted slot at sequence %llu: a contiguous message of %llu slots "
                         "is only partly published (write sequence %llu)",
                         (unsigned long long)self->pos, (unsigned long long)k,
                         (unsigned long long)w);
            return -1;
        }
    }
    *k_out = k;
    *d_out = d;
    return 1;
}

/*
 * observe() -> int   (reader)
 *
 * The writer's published sequence, by an acquire load (P1), checked
 * (SegmentError if impossible); raises `bound` to it.
 */
static PyObject *
Cursor_observe(CursorObject *self, PyObject *Py_UNUSED(ignored))
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t w;
    if (observe(self, base, &w) < 0)
        return NULL;
    if (w > self->bound)
        self->bound = w;
    return PyLong_FromUnsignedLongLong(w);
}

/*
 * next() -> (kind, offset, nbytes, slots) | None   (reader)
 *
 * The contiguous message at the reader's position, if one is published (I2),
 * as its kind, the offset of its bytes in the buffer, its size and the slots
 * it takes; the caller reads it, then calls finish(slots).  None (declined)
 * when nothing is published, or the next slot is padding or part of a
 * streamed message.  SegmentError when what is there is impossible.  Never
 * blocks.
 */
static PyObject *
Cursor_next(CursorObject *self, PyObject *Py_UNUSED(ignored))
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t k;
    Desc d;
    int found = cursor_head(self, base, &k, &d);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    uint64_t idx = self->pos % (uint64_t)self->n_slots;
    const char *data = base + self->data_off + idx * (uint64_t)self->slot_size;
    if (verify_payload(self, &d, self->pos, data, d.total) < 0)
        return NULL;
    return Py_BuildValue("(kKKK)", (unsigned long)(d.flags >> KIND_SHIFT),
                         (unsigned long long)(self->data_off + idx * (uint64_t)self->slot_size),
                         (unsigned long long)d.total, (unsigned long long)k);
}

/* Count a delivered message and release its k slots, after checking that the
 * message's first descriptor is still the one read (k == 0: a message
 * assembled privately, nothing to check or release). */
static int
cursor_finish(CursorObject *self, char *base, uint64_t k, int defer)
{
    if (k > 0 && recheck(self, base, self->pos) < 0)
        return -1;
    self->msgs++;
    __atomic_store_n((uint64_t *)(base + self->msgs_off), (uint64_t)self->msgs, __ATOMIC_RELEASE);
    self->pos += k;
    if (!defer)
        cursor_flush(self, base);   /* P2: after the caller's loads of the message */
    return 0;
}

/* The finish of a view() block (its Hold's exit): the message lay in the ring
 * all the while the caller looked at it, where any process can write.  With
 * checksums on, its payload is checked against its CRC-32C once more before
 * the finish, so that bytes changed under the caller's eyes raise SegmentError
 * (nothing consumed: the next call finds the message and refuses it) instead of
 * passing unseen.  The check at the take (Cursor_next) covers the bytes up to
 * then, this one the rest of the block. */
int
shmcast_cursor_finish_viewed(PyObject *cursor, uint64_t k)
{
    if (!PyObject_TypeCheck(cursor, &CursorType)) {
        PyErr_SetString(PyExc_TypeError, "a Cursor is needed");
        return -1;
    }
    CursorObject *self = (CursorObject *)cursor;
    char *base = cursor_base(self);
    if (base == NULL)
        return -1;
    if (k > 0 && self->checksum) {
        Desc d;
        if (read_desc(self, base, self->pos, &d) < 0)
            return -1;
        uint64_t idx = self->pos % (uint64_t)self->n_slots;
        const char *data = base + self->data_off + idx * (uint64_t)self->slot_size;
        if (d.total > k * (uint64_t)self->slot_size) {
            PyErr_Format(shmcast_SegmentError,
                         "the slot at sequence %llu changed while it was viewed",
                         (unsigned long long)self->pos);
            return -1;
        }
        if (verify_payload(self, &d, self->pos, data, d.total) < 0)
            return -1;
    }
    return cursor_finish(self, base, k, 0);
}

/*
 * finish(slots, defer) -> None   (reader)
 *
 * Count a delivered message and release its slots (P2, then the P4 wake); with
 * `defer` true, hold the release back until flush().  SegmentError (nothing
 * released) if the message's slot was reused while it was read.
 */
static PyObject *
Cursor_finish(CursorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(2, "finish");
    uint64_t k;
    int defer;
    char *base = slots_and_flag(self, args, &k, &defer);
    if (base == NULL)
        return NULL;
    if (cursor_finish(self, base, k, defer) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/*
 * release(slots) -> None   (reader)
 *
 * Hand `slots` slots read (or skipped) by the slow path back to the writer
 * (P2, then the P4 wake), after checking that their descriptors are still the
 * ones read (SegmentError otherwise, nothing released).
 */
static PyObject *
Cursor_release(CursorObject *self, PyObject *arg)
{
    char *base = cursor_base(self);
    if (base == NULL)
        return NULL;
    uint64_t k;
    if (parse_u64(arg, &k) < 0)
        return NULL;
    if (k > (uint64_t)self->n_slots || self->pos + k > self->bound) {
        PyErr_Format(PyExc_ValueError, "release: %llu slots are not all published",
                     (unsigned long long)k);
        return NULL;
    }
    if (k > 0 && recheck(self, base, self->pos) < 0)
        return NULL;
    self->pos += k;
    cursor_flush(self, base);
    Py_RETURN_NONE;
}

/*
 * take_bytes(kind) -> bytes | None   (reader)
 *
 * next(), a copy into a new bytes object and finish() in one call, for a
 * contiguous message of the given kind.  None (nothing taken) where next()
 * declines or the message is of another kind; SegmentError as next() and
 * finish() raise it.  The bytes are also kept in `last` until the caller
 * clears it: an exception raised as the call returns (a signal handler's)
 * would drop the result, and the message with it, so the caller takes it from
 * there instead (the endpoint's "delivered or still there").
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
    Desc d;
    int found = cursor_head(self, base, &k, &d);
    if (found < 0)
        return NULL;
    if (found == 0 || (long)(d.flags >> KIND_SHIFT) != kind)
        Py_RETURN_NONE;
    uint64_t idx = self->pos % (uint64_t)self->n_slots;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)d.total);
    if (out == NULL)
        return NULL;
    copy_bytes(self->atomics, PyBytes_AS_STRING(out),
               base + self->data_off + idx * (uint64_t)self->slot_size, (Py_ssize_t)d.total);
    if (verify_payload(self, &d, self->pos, PyBytes_AS_STRING(out), d.total) < 0 ||
        cursor_finish(self, base, k, 0) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    Py_XSETREF(self->last, Py_NewRef(out));
    return out;
}

/* ---- construction ---------------------------------------------------------- */

static int
Cursor_init(CursorObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"atomics", "n_slots", "slot_size", "data_off", "desc_off",
                             "seq_off", "msgs_off", "peer_seq_off", "flag_off", "futex_off",
                             "wake_n", "count_off", "key", "checksum", "sock_off",
                             "lines_off", "n_lines", NULL};
    PyObject *atomics;
    int wake_n;
    unsigned long long key = 0;
    self->count_off = -1;
    self->checksum = 0;
    self->sock_off = -1;
    self->lines_off = 0;
    self->n_lines = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nnnnnnnnni|$nKpnnn:Cursor", kwlist,
                                     &AtomicsType, &atomics, &self->n_slots, &self->slot_size,
                                     &self->data_off, &self->desc_off, &self->seq_off,
                                     &self->msgs_off, &self->peer_seq_off, &self->flag_off,
                                     &self->futex_off, &wake_n, &self->count_off, &key,
                                     &self->checksum, &self->sock_off, &self->lines_off,
                                     &self->n_lines))
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
        (self->count_off >= 0 && check_word(a, self->count_off, 8) < 0) ||
        (self->sock_off >= 0 && check_word(a, self->sock_off, 4) < 0))
        return -1;
    if (self->sock_off >= 0 &&
        (self->n_lines < 0 || self->lines_off < 0 || self->lines_off % 128 != 0 ||
         self->n_lines > (a->len - self->lines_off) / 128)) {
        PyErr_SetString(PyExc_ValueError, "Cursor: the reader lines do not fit in the buffer");
        return -1;
    }
    /* No wake yet: the first publish wakes whatever the count (a reader may
     * have announced before this writer attached). */
    self->woken_at = ~(uint64_t)0;
    self->wake_n = wake_n < 1 ? INT32_MAX : wake_n;
    self->key = (uint64_t)key;
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
    if (self->sock_fd1 > 0)
        close(self->sock_fd1 - 1);
    Py_CLEAR(self->last);
    Py_XDECREF(self->atomics);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Cursor_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Cursor_put, METH_FASTCALL,
     "put(parts, kind, publish) -> bool: store and publish a contiguous message, or decline."},
    {"write_desc", (PyCFunction)(void (*)(void))Cursor_write_desc, METH_FASTCALL,
     "write_desc(seq, total, flags, msg_no): store a slot's descriptor (writer)."},
    {"seal", (PyCFunction)(void (*)(void))Cursor_seal, METH_FASTCALL,
     "seal(seq, nbytes, crc=None): with checksums on, put the payload's CRC-32C in its descriptor."},
    {"commit", (PyCFunction)(void (*)(void))Cursor_commit, METH_FASTCALL,
     "commit(slots, flush) -> int: count a message and add its slots, publishing unless held."},
    {"count_message", (PyCFunction)Cursor_count_message, METH_NOARGS,
     "count_message() -> int: spend the next message number (writer)."},
    {"publish", (PyCFunction)(void (*)(void))Cursor_publish, METH_FASTCALL,
     "publish(slots, flush): advance by slots filled, and publish unless held back (writer)."},
    {"observe", (PyCFunction)Cursor_observe, METH_NOARGS,
     "observe() -> int: the writer's sequence, checked (reader)."},
    {"next", (PyCFunction)Cursor_next, METH_NOARGS,
     "next() -> (kind, offset, nbytes, slots) | None: the published contiguous message, if any."},
    {"finish", (PyCFunction)(void (*)(void))Cursor_finish, METH_FASTCALL,
     "finish(slots, defer): count a message and release its slots (unless deferred)."},
    {"release", (PyCFunction)Cursor_release, METH_O,
     "release(slots): hand slots read by the slow path back to the writer (reader)."},
    {"read_desc", (PyCFunction)Cursor_read_desc, METH_O,
     "read_desc(seq) -> (total, flags, msg_no, crc): a slot's descriptor, checked."},
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
    {"signals", T_ULONGLONG, offsetof(CursorObject, signals), READONLY,
     "Writer: datagrams sent to readers asleep on a socket."},
    {"checksum", T_INT, offsetof(CursorObject, checksum), READONLY,
     "Whether payloads carry a CRC-32C."},
    {"last", T_OBJECT, offsetof(CursorObject, last), 0,
     "Reader: what take_bytes() returned last, until the caller sets it to None."},
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
 * sequence, checked as observe() checks it, which also refreshes the cursor's
 * `bound`); -1 if none has one.  A gather reader's look at all its rings in
 * one call.  SegmentError if a ring's sequence is impossible.
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
        uint64_t w;
        if (observe(c, base, &w) < 0)
            return NULL;
        if (w > c->pos) {
            c->bound = w;
            return PyLong_FromSsize_t(j);
        }
    }
    return PyLong_FromLong(-1);
}
