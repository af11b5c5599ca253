"""Participant lines: who holds which index of a segment, and the rare events between them.

Every writer and reader of a segment has a line (``_layout``: sequence, state, pid, start time,
message count).  This module initialises a fresh segment's lines, reads them back *checked*,
claims a line for the calling process, and carries the rare state changes (attach, detach,
close, drop) with an unconditional wake-up (docs/protocol.md P5).

Nothing in a line is trusted: :func:`read_participant` refuses a state that is not one of the
four and a pid that cannot be a process (SegmentError), so that garbage written by a stray
process is reported as corruption, never mistaken for a dead or live peer, and never escapes as
an ``OverflowError`` from a system call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from . import _layout as L
from ._errors import AttachError, SegmentError
from ._liveness import identity, is_alive, plausible_pid
from ._native import sock_signal
from ._segment import Segment

_WAKE_ALL = 0


class Participant(NamedTuple):
    """A participant line's state, pid and start time, read consistently and checked."""

    state: int
    pid: int
    start: int

    def alive(self) -> bool:
        """The process recorded in the line still runs (pid and start time match)."""
        return is_alive(self.pid, self.start)


def read_participant(a, line: int, what: str) -> Participant:
    """The state, pid and start time of the line at ``line``; SegmentError (naming ``what``)
    if the state is not one of the four or the pid cannot be a process.

    The state is read again after the pid: a line that changed hands in between (a detach, a
    take-over) is read once more, so that a state is not paired with another owner's pid.
    """
    for _ in range(4):
        state = a.load32(line + L.STATE)
        pid, start = a.load64(line + L.PID), a.load64(line + L.START)
        if a.load32(line + L.STATE) == state:
            break
    if state not in L.STATE_NAMES:
        raise SegmentError(f"corrupted queue: {what} has an unknown state {state}")
    if pid and not plausible_pid(pid):
        raise SegmentError(f"corrupted queue: {what} records pid {pid}, which no process has")
    return Participant(state, pid, start)


def initialize(seg: Segment, header: L.Header) -> None:
    """Write a fresh segment's header and control words (creator only, before any handle is
    given out: the hand-over of the handle orders these stores before any peer's loads).

    Broadcast: the creator is the writer, every reader index is *expected*.  Gather: the
    creator is the reader (of every ring), every writer index is *expected*.
    """
    buf, a, g = seg.buf, seg.atomics, header.geometry
    header.pack_into(buf)
    pid, start = identity()
    for r in range(g.n_rings):
        ring = g.ring(r)
        if g.kind == L.KIND_BROADCAST:
            mine, theirs = [ring.writer], [ring.reader_line(i) for i in range(ring.n_readers)]
        else:
            mine, theirs = [ring.reader_line(0)], [ring.writer]
        for line in mine:
            a.store64(line + L.PID, pid)
            a.store64(line + L.START, start)
            a.store32(line + L.STATE, L.ATTACHED)
        for line in theirs:
            a.store32(line + L.STATE, L.EXPECTED)
    buf[0:8] = L.MAGIC  # last: a half-initialised segment never passes validation


def claim_line(a, line: int, what: str) -> int:
    """Take the participant line at ``line`` for the calling process; return its old state.

    The line is free if it is *expected*, *detached*, or held by a process that died.
    AttachError otherwise; SegmentError if the line is corrupted.  Ownership is the
    compare-exchange of the pid word; the caller then sets the state (P5).
    """
    pid, start = identity()
    old = read_participant(a, line, what)
    if old.pid and old.state != L.DETACHED and old.alive():
        who = "this process" if old.pid == pid else f"pid {old.pid}"
        raise AttachError(f"{what} is already attached by {who}")
    if not a.cas64(line + L.PID, old.pid, pid):
        raise AttachError(f"{what} was taken by another process just now")
    a.store64(line + L.START, start)
    return old.state


def check_index(index: object, count: int, what: str) -> int:
    """Validate a reader or writer index (AttachError with the valid range)."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise AttachError(f"{what} index must be an int, not {type(index).__name__}")
    if not 0 <= index < count:
        raise AttachError(
            f"{what} index {index} is out of range: this queue has {count} {what}(s), "
            f"indices 0 to {count - 1}"
        )
    return index


def event_wait(
    a,
    futex_off: int,
    ready: Callable[[], bool],
    deadline: float | None,
    slice_: float,
    tick: Callable[[], None] | None = None,
) -> bool:
    """Wait for a rare state change announced by P5 (bump ``futex_off``, wake all).

    The futex word is read *before* ``ready()`` is evaluated, so a change made after the check
    makes ``wait32`` return at once: no wake-up is lost.  Returns ``ready()``'s final answer.
    """
    while True:
        seen = a.load32(futex_off)
        if ready():
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if tick is not None:
            tick()
        a.wait32(futex_off, seen, slice_ if deadline is None else min(slice_, deadline - now))


def announce(a, futex_off: int) -> None:
    """The other half of :func:`event_wait`: bump the word and wake every waiter (P5)."""
    a.add32(futex_off, 1)
    a.wake32(futex_off, _WAKE_ALL)


def signal_sockets(a, ring: L.RingLayout, nonce: int) -> None:
    """After a P5/P6 wake of ``ring``'s data waiters (:func:`announce` of its data futex):
    the same wake for the readers asleep on their sockets (P3), a datagram each.  Costs one
    load when none sleeps so; bounded by the ring's reader lines whatever the segment says."""
    sock_signal(a, L.SOCK_SLEEPERS_OFF, ring.readers, ring.n_readers, nonce)
