/*
 * How crowded the CPUs are, for the futex wait policy's choice between
 * spinning and sleeping (shmcast/_wait.py, CpuLoad).
 *
 * runnable_tasks(): the number of tasks runnable right now on the whole
 * machine (the fourth field of /proc/loadavg, "running/total": the sum of the
 * run queues' lengths, this task included), or -1 where it cannot be read.  One
 * pread() on a descriptor kept open, so a look costs one short system call and
 * no allocation.
 *
 * Nothing here is shared memory or protocol: it is a hint, and a wrong hint
 * only makes a waiter spin when it could sleep or the other way round.
 */
#include "native.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <unistd.h>

/* -1: not opened yet; -2: cannot be read here (never tried again). */
static atomic_int loadavg_fd = -1;

static int
open_loadavg(void)
{
    int fd = atomic_load(&loadavg_fd);
    if (fd != -1)
        return fd;
    int fresh = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fresh < 0)
        fresh = -2;
    int expected = -1;
    if (!atomic_compare_exchange_strong(&loadavg_fd, &expected, fresh)) {
        if (fresh >= 0)
            close(fresh); /* another thread opened it first */
        return expected;
    }
    return fresh;
}

PyObject *
shmcast_runnable_tasks(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(args))
{
    int fd = open_loadavg();
    if (fd < 0)
        return PyLong_FromLong(-1);
    /* "0.52 0.58 0.59 3/467 12345\n": at most five numbers and a few spaces. */
    char text[128];
    ssize_t n = pread(fd, text, sizeof text - 1, 0);
    if (n <= 0)
        return PyLong_FromLong(-1);
    text[n] = '\0';
    /* The run count follows the third space and ends at the slash. */
    const char *p = text;
    for (int spaces = 0; spaces < 3; p++) {
        if (*p == '\0')
            return PyLong_FromLong(-1);
        if (*p == ' ')
            spaces++;
    }
    long running = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 9; p++, digits++)
        running = running * 10 + (*p - '0');
    if (digits == 0 || *p != '/')
        return PyLong_FromLong(-1);
    return PyLong_FromLong(running);
}
