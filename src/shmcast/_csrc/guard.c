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
 *
 * A Hold is the guard held across a view() block, which outlives the call that
 * made it.  `guard.hold()` takes the guard and returns the Hold in one call;
 * the caller then finds the message and gives it to the Hold (`set`), and the
 * `with` statement enters and exits it.  Its __enter__ returns the value and
 * marks the message delivered; its __exit__ consumes it (the reader cursor's
 * finish, in C), releases the views it was given and gives the guard back.  A
 * Hold released or dropped before its block was entered (the caller raised,
 * or a signal handler did) gives the guard back and consumes nothing: the
 * message is still there.  Nothing in between runs Python code, so no exception can land
 * between handing the value over and consuming the message.
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

static int guard_refuse(GuardObject *self);
static void guard_idle(GuardObject *self);

static void
guard_release(GuardObject *self)
{
    self->busy = 0;
    if (self->closed) {
        /* Keep any error indicator across the call. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        guard_idle(self);
        PyErr_Restore(type, value, tb);
    }
}

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

/* 0 if a call may take the guard now; -1 with the exception (InheritedEndpoint,
 * QueueClosed, or RuntimeError while another call holds it) if not. */
static int
guard_may_take(GuardObject *self)
{
    if (guard_refuse(self) < 0)
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this queue endpoint is already in use: by another thread, or by an "
                        "enclosing reserve()/view() block of the same thread");
        return -1;
    }
    return 0;
}

static PyObject *
Guard_enter(GuardObject *self, PyObject *Py_UNUSED(ignored))
{
    if (guard_may_take(self) < 0)
        return NULL;
    self->busy = 1;
    Py_RETURN_NONE;
}

static PyObject *
Guard_exit(GuardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    guard_release(self);
    Py_RETURN_FALSE;
}

static PyObject *Guard_hold(GuardObject *self, PyObject *Py_UNUSED(ignored));

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
    {"hold", (PyCFunction)Guard_hold, METH_NOARGS,
     "hold() -> Hold: take the guard as __enter__ does, for a block that outlives the call."},
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

/* ---- Hold: the guard held across a view() block ---------------------------- */

typedef struct {
    PyObject_HEAD
    GuardObject *guard;     /* NULL once given back */
    PyObject *value;        /* what __enter__ returns */
    PyObject *cursor;       /* the reader cursor to finish on, or NULL */
    unsigned long long slots;
    PyObject *views;        /* tuple of memoryviews to release at exit, or NULL */
    PyObject *stash;        /* a list whose first item the value is, or NULL */
    int entered;
} HoldObject;

static void
hold_give_back(HoldObject *self)
{
    GuardObject *guard = self->guard;
    if (guard == NULL)
        return;
    self->guard = NULL;
    guard_release(guard);
    Py_DECREF(guard);
}

static PyObject *
Guard_hold(GuardObject *self, PyObject *Py_UNUSED(ignored))
{
    if (guard_may_take(self) < 0)
        return NULL;
    HoldObject *hold = PyObject_GC_New(HoldObject, &HoldType);
    if (hold == NULL)
        return NULL;
    hold->value = hold->cursor = hold->views = hold->stash = NULL;
    hold->slots = 0;
    hold->entered = 0;
    self->busy = 1;
    hold->guard = (GuardObject *)Py_NewRef(self);
    PyObject_GC_Track(hold);
    return (PyObject *)hold;
}

static PyObject *
Hold_set(HoldObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"value", "cursor", "slots", "views", "stash", NULL};
    PyObject *value, *cursor = Py_None, *views = Py_None, *stash = Py_None;
    unsigned long long slots = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$OKOO:set", kwlist, &value, &cursor,
                                     &slots, &views, &stash))
        return NULL;
    if (self->guard == NULL || self->entered) {
        PyErr_SetString(PyExc_RuntimeError, "Hold.set: the block was entered or given back");
        return NULL;
    }
    if ((cursor != Py_None && !PyObject_TypeCheck(cursor, &CursorType)) ||
        (views != Py_None && !PyTuple_Check(views)) || (stash != Py_None && !PyList_Check(stash))) {
        PyErr_SetString(PyExc_TypeError, "Hold.set: a Cursor, a tuple of views, a list");
        return NULL;
    }
    Py_XSETREF(self->value, Py_NewRef(value));
    Py_XSETREF(self->cursor, cursor == Py_None ? NULL : Py_NewRef(cursor));
    Py_XSETREF(self->views, views == Py_None ? NULL : Py_NewRef(views));
    Py_XSETREF(self->stash, stash == Py_None ? NULL : Py_NewRef(stash));
    self->slots = slots;
    Py_RETURN_NONE;
}

static PyObject *
Hold_enter(HoldObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->guard == NULL || self->value == NULL || self->entered) {
        PyErr_SetString(PyExc_RuntimeError, "a view() block can be entered once");
        return NULL;
    }
    if (self->stash != NULL && PySequence_DelItem(self->stash, 0) < 0)
        return NULL;
    self->entered = 1;
    return Py_NewRef(self->value);
}

static void
hold_release_views(HoldObject *self)
{
    if (self->views == NULL)
        return;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->views); i++) {
        PyObject *r = PyObject_CallMethod(PyTuple_GET_ITEM(self->views, i), "release", NULL);
        if (r == NULL)
            PyErr_Clear();   /* still exported by what was made of it: it goes with that */
        Py_XDECREF(r);
    }
    Py_CLEAR(self->views);
}

static PyObject *
Hold_exit(HoldObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int failed = 0;
    Py_CLEAR(self->value);
    hold_release_views(self);
    if (self->entered && self->cursor != NULL) {
        failed = shmcast_cursor_finish_viewed(self->cursor, self->slots) < 0;
        Py_CLEAR(self->cursor);
    }
    hold_give_back(self);
    if (failed)
        return NULL;
    Py_RETURN_FALSE;
}

static PyObject *
Hold_release(HoldObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->entered) {   /* a block in progress gives the guard back at its exit */
        Py_CLEAR(self->value);
        hold_release_views(self);
        Py_CLEAR(self->cursor);
        Py_CLEAR(self->stash);
        hold_give_back(self);
    }
    Py_RETURN_NONE;
}

static int
Hold_traverse(HoldObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->guard);
    Py_VISIT(self->value);
    Py_VISIT(self->cursor);
    Py_VISIT(self->views);
    Py_VISIT(self->stash);
    return 0;
}

static int
Hold_clear(HoldObject *self)
{
    Py_CLEAR(self->value);
    Py_CLEAR(self->cursor);
    Py_CLEAR(self->views);
    Py_CLEAR(self->stash);
    hold_give_back(self);
    return 0;
}

static void
Hold_dealloc(HoldObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->value);
    hold_release_views(self);   /* never entered, or left without exit: nothing consumed */
    Py_CLEAR(self->cursor);
    Py_CLEAR(self->stash);
    hold_give_back(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Hold_methods[] = {
    {"set", (PyCFunction)(void (*)(void))Hold_set, METH_VARARGS | METH_KEYWORDS,
     "set(value, *, cursor=None, slots=0, views=None, stash=None): the message of the block."},
    {"release", (PyCFunction)Hold_release, METH_NOARGS,
     "release(): give the guard back, consuming nothing (before the block is entered)."},
    {"__enter__", (PyCFunction)Hold_enter, METH_NOARGS,
     "Hand the value over; the message counts as delivered."},
    {"__exit__", (PyCFunction)(void (*)(void))Hold_exit, METH_FASTCALL,
     "Consume the message, release the views, give the guard back."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject HoldType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.Hold",
    .tp_basicsize = sizeof(HoldObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A view() block: the endpoint's guard, held until the block exits (Guard.hold()).",
    .tp_traverse = (traverseproc)Hold_traverse,
    .tp_clear = (inquiry)Hold_clear,
    .tp_dealloc = (destructor)Hold_dealloc,
    .tp_methods = Hold_methods,
};
