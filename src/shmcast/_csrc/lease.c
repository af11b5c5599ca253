/*
 * Lease: a read-only buffer over a piece of a shared region, for a reader that
 * keeps a large out-of-band buffer without copying it out of shared memory
 * (shmcast/_region.py).
 *
 * The reader marked the piece as its own (a 32-bit word in the region, its pid
 * in place of "pending") before it built the lease.  Every view of the lease
 * (memoryview, numpy array, ...) holds a reference to it; when the last one is
 * gone the lease is deallocated and hands the piece back: a compare-exchange of
 * the mark from the owner's value to 0, with release ordering, so that every
 * load the reader made from the piece happens before the writer's acquire load
 * that finds the mark clear and lets it write there again.  (A mark that no
 * longer holds the owner's value was cleared by the writer's liveness check or
 * is corrupted: then it is left alone.)
 *
 * The lease holds the region's mapping (a buffer export of its mmap), so the
 * memory stays mapped while any view lives, whatever the queue does meanwhile.
 * Views are read-only: no reader can change what another receives.
 */
#include "native.h"

#include <stddef.h>

typedef struct {
    PyObject_HEAD
    Py_buffer map;          /* the region's mapping, writable (for the mark) */
    char *data;
    Py_ssize_t len;
    uint32_t *mark;
    uint32_t owner;
} LeaseObject;

static int
lease_init(LeaseObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "length", "mark", "owner", NULL};
    PyObject *buffer;
    Py_ssize_t off, len, mark;
    unsigned long owner;
    if (self->map.obj != NULL) {
        PyErr_SetString(PyExc_TypeError, "Lease is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onnnk:Lease", kwlist, &buffer, &off, &len,
                                     &mark, &owner))
        return -1;
    if (owner == 0 || owner > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "Lease owner must be a non-zero 32-bit value");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->map, PyBUF_WRITABLE) < 0)
        return -1;
    Py_ssize_t size = self->map.len;
    if (off < 0 || len < 0 || off > size || len > size - off || mark < 0 ||
        mark > size - 4 || mark % 4 != 0) {
        PyBuffer_Release(&self->map);
        self->map.obj = NULL;
        PyErr_SetString(PyExc_ValueError, "Lease: piece or mark outside the buffer");
        return -1;
    }
    self->data = (char *)self->map.buf + off;
    self->len = len;
    self->mark = (uint32_t *)((char *)self->map.buf + mark);
    self->owner = (uint32_t)owner;
    return 0;
}

static void
lease_dealloc(LeaseObject *self)
{
    if (self->map.obj != NULL) {
        uint32_t expected = self->owner;
        __atomic_compare_exchange_n(self->mark, &expected, 0, 0, __ATOMIC_RELEASE,
                                    __ATOMIC_RELAXED);
        PyBuffer_Release(&self->map);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lease_getbuffer(LeaseObject *self, Py_buffer *view, int flags)
{
    if (self->map.obj == NULL) {
        PyErr_SetString(PyExc_BufferError, "Lease not initialized");
        return -1;
    }
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->len, 1, flags);
}

static PyBufferProcs lease_as_buffer = {
    .bf_getbuffer = (getbufferproc)lease_getbuffer,
};

static PyObject *
lease_held(LeaseObject *self, void *Py_UNUSED(closure))
{
    if (self->map.obj == NULL)
        Py_RETURN_FALSE;
    return PyBool_FromLong(__atomic_load_n(self->mark, __ATOMIC_ACQUIRE) == self->owner);
}

static PyObject *
lease_nbytes(LeaseObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->map.obj == NULL ? 0 : self->len);
}

static PyGetSetDef lease_getset[] = {
    {"held", (getter)lease_held, NULL, "True while the mark still names this lease's owner.", NULL},
    {"nbytes", (getter)lease_nbytes, NULL, "Bytes of the piece.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject LeaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.Lease",
    .tp_basicsize = sizeof(LeaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lease(buffer, offset, length, mark, owner): a read-only view of "
              "buffer[offset:offset+length]; when the last view is gone, the 32-bit word at "
              "`mark` goes from `owner` to 0 (compare-exchange, release).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lease_init,
    .tp_dealloc = (destructor)lease_dealloc,
    .tp_as_buffer = &lease_as_buffer,
    .tp_getset = lease_getset,
};
