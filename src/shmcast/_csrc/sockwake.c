/*
 * The socket signal of an async reader's sleep (docs/protocol.md, P3 "asleep
 * on a socket"): a reader whose event loop waits on a datagram socket marks its
 * participant line (sleeping == SHMCAST_SLEEP_SOCKET) and counts itself in the
 * queue-wide `socket_sleepers` word before it announces its sleep; a wake
 * (the writer's publish, a P5 state change) that finds the count non-zero
 * sends one byte to every marked reader's socket.  The reader's address is
 * derived from what the segment says: the nonce, the reader's index and the
 * pid in its line (shmcast._sockwake.address builds the same name).  Nothing
 * is passed between the processes, and nothing read from the segment is
 * trusted: at most n_lines lines are looked at and at most n_lines datagrams
 * sent (non-blocking); an implausible pid is skipped; a refused or full
 * socket (a dead reader, a datagram already pending) is ignored.  A garbage
 * mark costs one datagram to nobody; a garbage count one scan.
 */
#include "native.h"   /* Python.h defines _GNU_SOURCE: sendmmsg */

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define LINE 128
#define SLEEPING 8
#define PID 16
#define PID_MAX (1ull << 22)   /* Linux's PID_MAX_LIMIT */

/* The abstract-namespace address of reader `index` with pid `pid`; its length. */
static socklen_t
sock_address(struct sockaddr_un *sa, uint64_t nonce, uint64_t index, uint64_t pid)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    int n = snprintf(sa->sun_path + 1, sizeof(sa->sun_path) - 1, "shmcast-%016llx-%llu-%llu",
                     (unsigned long long)nonce, (unsigned long long)index,
                     (unsigned long long)pid);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

/* Send the batch (one system call for all of them: a reader woken by the first
 * datagram cannot preempt the writer before the others are sent, as it could
 * between separate sendto calls); the number sent. */
static int
send_batch(int fd, struct mmsghdr *msgs, unsigned n)
{
    int sent = 0;
    unsigned done = 0;
    while (done < n) {
        int r = sendmmsg(fd, msgs + done, n - done, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            sent += r;
            done += (unsigned)r;
        } else {
            /* The first datagram left failed: ECONNREFUSED / ENOENT (no such reader),
             * EAGAIN (one is pending already); skip it and go on with the rest. */
            if (r < 0 && errno == EINTR)
                continue;
            done++;
        }
    }
    return sent;
}

#define BATCH 64

int
shmcast_sock_signal(char *base, Py_ssize_t count_off, Py_ssize_t lines_off, Py_ssize_t n_lines,
                    uint64_t nonce, int *fd)
{
    /* Ordered after the caller's full fence (and its futex bump, a seq_cst
     * RMW); the marks' loads after this one (acquire), so that a mark stored
     * before an announcement the caller's count load saw is seen here. */
    if (__atomic_load_n((uint32_t *)(base + count_off), __ATOMIC_SEQ_CST) == 0)
        return 0;
    static const char one = 1;
    struct sockaddr_un addrs[BATCH];
    struct iovec iov = {(void *)&one, 1};
    struct mmsghdr msgs[BATCH];
    unsigned n = 0;
    int sent = 0;
    for (Py_ssize_t i = 0; i < n_lines; i++) {
        char *line = base + lines_off + LINE * i;
        if (__atomic_load_n((uint32_t *)(line + SLEEPING), __ATOMIC_ACQUIRE) != SHMCAST_SLEEP_SOCKET)
            continue;
        uint64_t pid = __atomic_load_n((uint64_t *)(line + PID), __ATOMIC_ACQUIRE);
        if (pid == 0 || pid > PID_MAX)
            continue;
        if (*fd < 0) {
            *fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
            if (*fd < 0)
                return sent;   /* out of descriptors: the reader's slice bounds its wait */
        }
        memset(&msgs[n], 0, sizeof(msgs[n]));
        msgs[n].msg_hdr.msg_name = &addrs[n];
        msgs[n].msg_hdr.msg_namelen = sock_address(&addrs[n], nonce, (uint64_t)i, pid);
        msgs[n].msg_hdr.msg_iov = &iov;
        msgs[n].msg_hdr.msg_iovlen = 1;
        if (++n == BATCH) {
            sent += send_batch(*fd, msgs, n);
            n = 0;
        }
    }
    if (n > 0)
        sent += send_batch(*fd, msgs, n);
    return sent;
}

/* sock_signal(atomics, count_off, lines_off, n_lines, nonce) -> int: a P5 wake's signal
 * to the readers asleep on their sockets (a socket of its own, closed again). */
PyObject *
shmcast_sock_signal_py(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    ARGC(5, "sock_signal");
    if (!PyObject_TypeCheck(args[0], &AtomicsType)) {
        PyErr_SetString(PyExc_TypeError, "sock_signal: an Atomics object expected");
        return NULL;
    }
    AtomicsObject *a = (AtomicsObject *)args[0];
    Py_ssize_t count_off, lines_off, n_lines;
    uint64_t nonce;
    if (parse_off(args, 1, &count_off) < 0 || parse_off(args, 2, &lines_off) < 0 ||
        parse_off(args, 3, &n_lines) < 0 || parse_u64(args[4], &nonce) < 0)
        return NULL;
    if (check_word(a, count_off, 4) < 0)
        return NULL;
    if (n_lines < 0 || lines_off < 0 || (n_lines > 0 && (lines_off % LINE != 0 ||
        n_lines > (a->len - lines_off) / LINE))) {
        PyErr_SetString(PyExc_ValueError, "sock_signal: the lines do not fit in the buffer");
        return NULL;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int fd = -1;
    int sent = shmcast_sock_signal(a->base, count_off, lines_off, n_lines, nonce, &fd);
    if (fd >= 0)
        close(fd);
    return PyLong_FromLong(sent);
}
