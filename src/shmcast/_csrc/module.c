/*
 * shmcast._native: the few things Python cannot do on shared memory.
 *
 *   - atomics.c: the Atomics type: acquire loads, release stores, atomic add /
 *     compare-exchange and a full fence on aligned 32- and 64-bit words of a
 *     writable buffer, and futex wait (with a timeout) and wake on its words,
 *     as *shared* futexes (the peers are other processes);
 *   - cursor.c: the Cursor type, the steps of the protocol that run once per
 *     message (publish or take one contiguous message, hand slots over), so
 *     that the common case costs one call into C; measured, a 64-byte put or
 *     get costs a quarter to a third of the same steps written in Python;
 *   - guard.c: the Guard type, the call guard of an endpoint (one call at a
 *     time, refused after close and in a forked child);
 *   - crc32c.c: CRC-32C for the optional payload checksums;
 *   - lease.c: the Lease type, a read-only view of a piece of a shared region
 *     that hands the piece back (clears its mark) when its last view is gone;
 *   - sockwake.c: the datagram a wake sends to an async reader asleep on its
 *     own socket (docs/protocol.md, P3);
 *   - uring.c: the FutexRing type, a futex wait submitted through io_uring, whose
 *     descriptor an event loop watches (docs/protocol.md, P3);
 *   - load.c: `runnable_tasks`, how crowded the CPUs are, for the futex
 *     wait policy's choice between spinning and sleeping;
 *   - probe.c: `core_to_core_ns`, a diagnostic for benchmarks, the round trip
 *     of one cache line between two CPUs (too fast to see from Python);
 *   - this file: shm_open / shm_unlink, which the standard library does not
 *     expose, and the module itself.
 *
 * Everything else (layout, the rest of the protocol, waiting, liveness) is
 * Python.  The memory-ordering argument is in docs/protocol.md.
 *
 * Words are addressed by byte offset into the buffer an `Atomics` object was
 * built on; offsets are checked for bounds and natural alignment.
 */
#include "native.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

/* ---- the exception classes the native code raises ---------------------- */

PyObject *shmcast_SegmentError;
PyObject *shmcast_ClosedError;
PyObject *shmcast_InheritedError;

static PyObject *
native_set_errors(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *segment, *closed, *inherited;
    if (!PyArg_ParseTuple(args, "OOO:set_errors", &segment, &closed, &inherited))
        return NULL;
    PyObject *given[] = {segment, closed, inherited};
    for (int i = 0; i < 3; i++)
        if (!PyExceptionClass_Check(given[i])) {
            PyErr_SetString(PyExc_TypeError, "set_errors: exception classes expected");
            return NULL;
        }
    Py_XSETREF(shmcast_SegmentError, Py_NewRef(segment));
    Py_XSETREF(shmcast_ClosedError, Py_NewRef(closed));
    Py_XSETREF(shmcast_InheritedError, Py_NewRef(inherited));
    Py_RETURN_NONE;
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

static PyMethodDef module_methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))shmcast_crc32c_py, METH_VARARGS | METH_KEYWORDS,
     "crc32c(data, value=0, portable=False) -> int: CRC-32C (Castagnoli) of a buffer."},
    {"set_errors", native_set_errors, METH_VARARGS,
     "set_errors(segment_error, closed_error, inherited_error): the classes the native code raises."},
    {"scan", (PyCFunction)(void (*)(void))shmcast_scan, METH_FASTCALL,
     "scan(cursors, start) -> int: the first reader cursor (round robin) with a published slot, or -1."},
    {"sock_signal", (PyCFunction)(void (*)(void))shmcast_sock_signal_py, METH_FASTCALL,
     "sock_signal(atomics, count_off, lines_off, n_lines, nonce) -> int: signal async sleepers."},
    {"shm_open", native_shm_open, METH_VARARGS, "shm_open(name, flags, mode) -> fd (close-on-exec)."},
    {"shm_unlink", native_shm_unlink, METH_VARARGS, "shm_unlink(name): remove a shared-memory name."},
    {"runnable_tasks", shmcast_runnable_tasks, METH_NOARGS,
     "runnable_tasks() -> int: tasks runnable now on the machine (/proc/loadavg), or -1."},
#if defined(__linux__)
    {"core_to_core_ns", shmcast_core_to_core_ns, METH_VARARGS,
     "core_to_core_ns(cpu_a, cpu_b, rounds, batches, timeout) -> [float]: mean round trip of a "
     "cache line between two CPUs, per batch, in ns."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmcast._native",
    .m_doc = "Atomics and futexes on shared memory (the native core of shmcast).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyTypeObject *types[] = {&AtomicsType, &CursorType, &GuardType, &HoldType, &LeaseType,
                             &FutexRingType};
    const char *names[] = {"Atomics", "Cursor", "Guard", "Hold", "Lease", "FutexRing"};
    for (int i = 0; i < 6; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    shmcast_crc32c_init();
    if (shmcast_guard_init() < 0) {
        PyErr_SetString(PyExc_OSError, "shmcast._native: pthread_atfork failed");
        return NULL;
    }
    if (shmcast_SegmentError == NULL) {
        shmcast_SegmentError = Py_NewRef(PyExc_RuntimeError);
        shmcast_ClosedError = Py_NewRef(PyExc_RuntimeError);
        shmcast_InheritedError = Py_NewRef(PyExc_RuntimeError);
    }
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    for (int i = 0; i < 6; i++)
        if (PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) < 0)
            goto fail;
    if (PyModule_AddIntConstant(m, "HAVE_FUTEX", SHMCAST_HAVE_FUTEX) < 0 ||
        PyModule_AddIntConstant(m, "EARLY_WRAP_MIN", SHMCAST_EARLY_WRAP_MIN) < 0 ||
        PyModule_AddIntConstant(m, "CRC32C_HARDWARE", shmcast_crc32c_hardware()) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
