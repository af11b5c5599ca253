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
    {"scan", (PyCFunction)(void (*)(void))shmcast_scan, METH_FASTCALL,
     "scan(cursors, start) -> int: the first reader cursor (round robin) with a published slot, or -1."},
    {"shm_open", native_shm_open, METH_VARARGS, "shm_open(name, flags, mode) -> fd (close-on-exec)."},
    {"shm_unlink", native_shm_unlink, METH_VARARGS, "shm_unlink(name): remove a shared-memory name."},
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
        PyModule_AddIntConstant(m, "EARLY_WRAP_MIN", SHMCAST_EARLY_WRAP_MIN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

