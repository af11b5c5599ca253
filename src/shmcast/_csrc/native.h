/*
 * What the parts of shmcast._native share: the Atomics object (a writable
 * buffer and the offsets into it), argument helpers, and the few functions one
 * part calls in another.  See module.c for what the native core is for.
 */
#ifndef SHMCAST_NATIVE_H
#define SHMCAST_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#if defined(__linux__)
#define SHMCAST_HAVE_FUTEX 1
#else
#define SHMCAST_HAVE_FUTEX 0
#endif

/* An Atomics object: a writable buffer whose words are addressed by byte offset. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* valid while base != NULL */
    char *base;
    Py_ssize_t len;
    long waiters;        /* threads inside wait32 (or a long copy) with the GIL released */
} AtomicsObject;

extern PyTypeObject AtomicsType;
extern PyTypeObject CursorType;
extern PyTypeObject GuardType;
extern PyTypeObject HoldType;
extern PyTypeObject LeaseType;
extern PyTypeObject FutexRingType;

/* module.c: the exception classes of shmcast._errors that the native code
 * raises, registered once by set_errors() (RuntimeError until then). */
extern PyObject *shmcast_SegmentError;
extern PyObject *shmcast_ClosedError;
extern PyObject *shmcast_InheritedError;

/* Check that a `width`-byte word at `off` lies in the buffer, naturally aligned. */
static inline int
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

static inline int
parse_off(PyObject *const *args, Py_ssize_t i, Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(args[i]);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static inline int
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

/* atomics.c: wake up to n waiters of the futex word at `off`; the number woken. */
long shmcast_wake_word(AtomicsObject *self, Py_ssize_t off, int n);

/* cursor.c: a reader cursor's finish(k) at a view() block's exit, its payload checked again
 * where the queue has checksums; for Hold (0, or -1 with an error). */
int shmcast_cursor_finish_viewed(PyObject *cursor, uint64_t k);

/* cursor.c: messages at least this large are declined at and after `early` (writer). */
#define SHMCAST_EARLY_WRAP_MIN (64 * 1024)
PyObject *shmcast_scan(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);

/* sockwake.c: the socket signal to async readers asleep on a socket (their line's
 * sleeping word holds SHMCAST_SLEEP_SOCKET); the number of datagrams sent.  *fd is the
 * sending socket, created on first need (-1 until then), the caller's to close. */
#define SHMCAST_SLEEP_SOCKET 2u
int shmcast_sock_signal(char *base, Py_ssize_t count_off, Py_ssize_t lines_off,
                        Py_ssize_t n_lines, uint64_t nonce, int *fd);
PyObject *shmcast_sock_signal_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);

/* crc32c.c: CRC-32C of n bytes, continuing from crc (0 to start). */
void shmcast_crc32c_init(void);
uint32_t shmcast_crc32c(uint32_t crc, const void *data, size_t n);
int shmcast_crc32c_hardware(void);
PyObject *shmcast_crc32c_py(PyObject *mod, PyObject *args, PyObject *kwds);

/* guard.c: count forks in the child, from module initialisation on. */
int shmcast_guard_init(void);

/* load.c: how crowded the CPUs are (a hint for the wait policy). */
PyObject *shmcast_runnable_tasks(PyObject *mod, PyObject *args);

#if defined(__linux__)
/* probe.c */
PyObject *shmcast_core_to_core_ns(PyObject *mod, PyObject *args);
#endif

#endif
