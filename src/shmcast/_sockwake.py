"""An async reader's wake-up socket: one wake-up from the publisher to the event loop.

A broadcast reader awaiting in an event loop sleeps on a descriptor the loop watches: an
``AF_UNIX`` datagram socket of its own, bound in the abstract namespace at an address derived
from what the writer reads in the segment (:func:`address`: the queue's nonce, the reader's
index and the pid in its participant line).  Nothing is passed between the processes and
nothing is left in the file system: the kernel frees the name when the socket is closed or
the process ends.  The sleep (docs/protocol.md, P3 "on a socket"):

1. drain the socket (a datagram left from an earlier wake);
2. mark the reader's line (``sleeping = SLEEP_SOCKET``) and count the sleep in the queue's
   ``sock_sleepers`` word;
3. announce, as a futex sleeper does (``announced`` and ``sleepers``);
4. re-check; if the condition holds, undo and take;
5. else await the socket's readability (with a look and the waiter's tick in a timer
   callback now and then, and at once when the writer's pidfd says it ended), undo, and go
   round.

A wake that decides to wake (the writer's publish, a close or detach) sends one byte to every
marked reader while the count is non-zero (``_csrc/sockwake.c``).  A datagram stays until it is
drained, so a signal sent after step 1 is not lost; the ordering argument is in
docs/protocol.md and at :meth:`shmcast._ring.RingReader.sock_arm`.

Anyone may send to an abstract address: a stray datagram only wakes the reader, which always
re-checks, and a drain reads a bounded number of datagrams.  If the address is taken
(squatted), or the writer runs in another network namespace (where the address names another
socket, or none), the reader keeps the helper thread of :mod:`shmcast._aio` instead.

A socket belongs to the process that bound it: an inherited one is closed in a forked child
(an endpoint refuses to work there anyway), and it is close-on-exec.

Only queues whose readers fit the spare CPUs (:data:`SOCKET_READERS_MAX`: the CPUs this
process may use, minus the writer's) sleep on sockets.  The kernel treats a datagram's wake-up
as a hand-over (a "synchronous" wake-up: the sender is expected to sleep soon) and tends to
run the woken reader on the sender's CPU; one reader there costs nothing, but a writer that
wakes more readers than there are other CPUs queues them on its own core, where a futex
wake-up spreads them.  Measured with four readers on two CPUs (docs/benchmarks.md, "asyncio
readers"): the socket's p50 was about three times the helper thread's.  Such queues keep the
helper thread.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ._loopwake import LoopSleeper
from ._wait import SPARE_CPUS

#: Datagrams one drain reads at most (a hostile sender cannot keep a drain going: what is
#: left only makes the next await return at once, and the reader re-checks).
DRAIN_MAX = 64

#: Queues of at most this many readers sleep on sockets (see the module docstring); larger
#: ones keep the helper thread.  The spare CPUs of this process, at least one.
SOCKET_READERS_MAX = max(1, SPARE_CPUS)


def address(nonce: int, index: int, pid: int) -> bytes:
    """The abstract-namespace address of reader ``index`` of the queue with ``nonce``, held
    by process ``pid`` (the name ``_csrc/sockwake.c`` sends to)."""
    return b"\0shmcast-%016x-%d-%d" % (nonce, index, pid)


def same_netns(pid: int) -> bool:
    """True if process ``pid`` provably shares this process's network namespace (where
    abstract socket names live); False if it does not or that cannot be read."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


class WakeSocket(LoopSleeper):
    """One reader endpoint's wake-up socket in this process.

    Who may call: the thread of the event loop that awaits on the endpoint (one call at a time,
    which the endpoint enforces).  Raises OSError from the constructor if the address cannot be
    bound (taken, or no socket can be made): the caller falls back to the helper thread.
    """

    def __init__(self, nonce: int, index: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.bind(address(nonce, index, os.getpid()))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        super().__init__()

    def _fileno(self) -> int:
        return self._sock.fileno()

    def _release(self) -> None:
        self._sock.close()  # its name is free again

    def drain(self) -> None:
        """Step 1: read what is pending (at most DRAIN_MAX datagrams)."""
        recv = self._sock.recv
        for _ in range(DRAIN_MAX):
            try:
                recv(16)
            except (BlockingIOError, InterruptedError):
                return

    def arm(self, waiter: Any) -> bool:
        """Steps 2-4 (mark, announce, re-check): True if the condition holds (undone)."""
        return waiter.sock_arm()

    def disarm(self, waiter: Any) -> None:
        waiter.sock_disarm()


__all__ = ["DRAIN_MAX", "WakeSocket", "address", "same_netns"]
