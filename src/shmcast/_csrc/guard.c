/*
 * The Guard type: the call guard of one queue endpoint.
 *
 * An endpoint serves one call at a time, only after it was opened and before
 * it is closed, and only in the process that created or attached it.  Every
 * call of an endpoint runs inside `with guard:`, and `__enter__` refuses:
 *   - in a process forked from the one that made the guard (the child's copy
 *     of the endpoint would consume the parent's stream: InheritedEndpoint),
 *     told by a count of forks that a pthread_atfork handler bumps in every
 *     child; no system call on the hot path;
 *   - after close() (QueueClosed);
 *   - while another call is under way (RuntimeError).
 *
 * Why in C: a guard taken by Python code can be left taken for ever when a
 * signal handler raises (KeyboardInterrupt) between the statement that takes
 * it and the `try` that would give it back.  `__enter__` and `__exit__` here
 * run no Python code and the interpreter runs no signal handler between a
 * C-level `__enter__` and the block it guards, so the guard is given back
 * whatever the block raises, and whenever.
 *
 * close() may come from another thread while a call blocks: the guard then
 * calls `on_idle` (which unmaps the segment) when that call leaves, or at once
 * if the endpoint is idle; exactly once either way.
 */
#include "native.h"

#include <pthread.h>
#include <unistd.h>

static unsigned long fork_generation;

static void
count_fork_in_child(void)
{
    fork_generation++;
}

int
shmcast_guard_init(void)
{
    return pthread_atfork(NULL, NULL, count_fork_in_child) == 0 ? 0 : -1;
}

typedef struct {
    PyObject_HEAD
    char busy, closed;
    unsigned long generation;   /* fork_generation in the process that made it */
    long pid;                   /* that process, for messages */
    PyObject *what;             /* how messages name the endpoint */
    PyObject *on_idle;          /* called once closed and idle; then cleared */
} GuardObject;

static int
guard_refuse(GuardObject *self)
{
    if (self->generation != fork_generation) {
        PyErr_Format(shmcast_InheritedError,
                     "%U was created or attached in process %ld, not in this one (%ld): a "
                     "forked process must attach an index of its own",
                     self->what, self->pid, (long)getpid());
        return -1;
    }
    if (self->closed) {
        PyErr_Format(shmcast_ClosedError, "%U is closed", self->what);
        return -1;
    }
    return 0;
}

static void
guard_idle(GuardObject *self)
{
    PyObject *job = self->on_idle;
    if (job == NULL)
        return;
    self->on_idle = NULL;
    PyObject *r = PyObject_CallNoArgs(job);
    if (r == NULL)
        PyErr_WriteUnraisable(job);
    Py_XDECREF(r);
    Py_DECREF(job);
}

static PyObject *
Guard_enter(GuardObject *self, PyObject *Py_UNUSED(ignored))
{
    if (guard_refuse(self) < 0)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this queue endpoint is already in use: by another thread, or by an "
                        "enclosing reserve()/view() block of the same thread");
        return NULL;
    }
    self->busy = 1;
    Py_RETURN_NONE;
}

static PyObject *
Guard_exit(GuardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    self->busy = 0;
    if (self->closed) {
        /* Keep any error indicator across the call. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        guard_idle(self);
        PyErr_Restore(type, value, tb);
    }
    Py_RETURN_FALSE;
}

static PyObject *
Guard_check(GuardObject *self, PyObject *Py_UNUSED(ignored))
{
    if (guard_refuse(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Guard_close(GuardObject *self, PyObject *Py_UNUSED(ignored))
{
    self->closed = 1;
    if (!self->busy)
        guard_idle(self);
    Py_RETURN_NONE;
}

static PyObject *
Guard_get_closed(GuardObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->closed);
}

static PyObject *
Guard_get_busy(GuardObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->busy);
}

static PyObject *
Guard_get_owned(GuardObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->generation == fork_generation);
}

static int
Guard_init(GuardObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"what", "on_idle", NULL};
    PyObject *what, *on_idle = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|O:Guard", kwlist, &what, &on_idle))
        return -1;
    if (on_idle != Py_None && !PyCallable_Check(on_idle)) {
        PyErr_SetString(PyExc_TypeError, "Guard: on_idle must be callable or None");
        return -1;
    }
    Py_INCREF(what);
    Py_XSETREF(self->what, what);
    Py_XSETREF(self->on_idle, on_idle == Py_None ? NULL : Py_NewRef(on_idle));
    self->busy = self->closed = 0;
    self->generation = fork_generation;
    self->pid = (long)getpid();
    return 0;
}

static int
Guard_traverse(GuardObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_idle);
    return 0;
}

static int
Guard_clear(GuardObject *self)
{
    Py_CLEAR(self->on_idle);
    return 0;
}

static void
Guard_dealloc(GuardObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->what);
    Py_CLEAR(self->on_idle);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Guard_methods[] = {
    {"__enter__", (PyCFunction)Guard_enter, METH_NOARGS,
     "Take the guard: InheritedEndpoint in a forked process, QueueClosed after close(), "
     "RuntimeError while another call is under way."},
    {"__exit__", (PyCFunction)(void (*)(void))Guard_exit, METH_FASTCALL,
     "Give the guard back (and, if closed meanwhile, run on_idle)."},
    {"check", (PyCFunction)Guard_check, METH_NOARGS,
     "check(): raise as __enter__ would for a forked process or a closed endpoint."},
    {"close", (PyCFunction)Guard_close, METH_NOARGS,
     "close(): refuse every later call; run on_idle now if idle, else when the call leaves."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Guard_getset[] = {
    {"closed", (getter)Guard_get_closed, NULL, "True after close().", NULL},
    {"busy", (getter)Guard_get_busy, NULL, "True while a call holds the guard.", NULL},
    {"owned", (getter)Guard_get_owned, NULL,
     "True in the process that made the guard (False in a forked child).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.Guard",
    .tp_basicsize = sizeof(GuardObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Guard(what, on_idle=None): the call guard of one queue endpoint.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Guard_init,
    .tp_traverse = (traverseproc)Guard_traverse,
    .tp_clear = (inquiry)Guard_clear,
    .tp_dealloc = (destructor)Guard_dealloc,
    .tp_methods = Guard_methods,
    .tp_getset = Guard_getset,
};
