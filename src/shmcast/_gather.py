"""``GatherQueue``: many writers, one reader (replies from N workers to one engine).

One segment holds one single-producer ring per writer; the reader, who creates the queue,
reads them all and sleeps on one futex word that every writer wakes (docs/protocol.md P3 with
the rings sharing ``sleepers`` and ``data_futex``).  Writers attach at their index, exactly as
broadcast readers do, and get backpressure from the reader as broadcast writers do.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from contextlib import AbstractContextManager
from typing import Any

from . import _layout as L
from ._aio import GatherAsync
from ._endpoint import (
    Handle,
    QueueStats,
    check_serializer,
    close_side,
    deadline_of,
)
from ._errors import QueueClosed, RoleError
from ._native import scan
from ._participants import announce, check_index, claim_line, read_participant
from ._queue import create_segment, open_segment, wait_all_attached
from ._ring import RingReader, RingWriter, SlowWait, SpinSlots, log, timeout_error
from ._serialize import Serializer
from ._wait import WaitPolicy, resolve_policy

DEFAULT_SLOTS = 16
DEFAULT_SLOT_SIZE = 64 * 1024

_GONE = L.DETACHED | L.DROPPED


class _AnyWriter:
    """The reader's Waiter when it takes from whichever writer has a message first."""

    def __init__(self, queue: GatherQueue) -> None:
        self._q = queue
        self.slow = SlowWait()
        spin = SpinSlots(queue._seg.atomics)
        self.begin_spin = spin.begin
        self.end_spin = spin.end
        self.count_spin = spin.count
        self.spinning = spin.spinning

    def ready(self) -> bool:
        q = self._q
        return scan(q._cursors, 0) >= 0 or q._all_writers_closed() or q.closed

    def sleep(self, timeout: float) -> bool:
        q = self._q
        a = q._seg.atomics
        # P3, shared by all rings: the futex word, announce, re-check, sleep (RingReader.sleep)
        seen = a.load32(L.DATA_FUTEX_OFF)
        a.add64(L.ANNOUNCED_OFF, 1)
        a.add32(L.SLEEPERS_OFF, 1)
        for line in q._reader_lines:
            a.store32(line + L.SLEEPING, 1)  # informational, for inspection
        try:
            if self.ready():
                return True
            a.wait32(L.DATA_FUTEX_OFF, seen, timeout)
            return False
        finally:
            for line in q._reader_lines:
                a.store32(line + L.SLEEPING, 0)
            a.add32(L.SLEEPERS_OFF, 0xFFFFFFFF)

    def tick(self) -> None:
        q = self._q
        q._raise_if_writer_dead()
        waited = self.slow.due(q._policy)
        if waited is not None:
            log.warning(
                "get on %s has waited %.1f s for any writer; writer states: %s",
                q.name, waited, ", ".join(
                    f"{j}={L.STATE_NAMES.get(q._writer_state(j), '?')}"
                    for j in range(q.n_writers)
                ),
            )  # fmt: skip


class GatherQueue(GatherAsync):
    """A shared-memory gather queue: ``n_writers`` writers, one reader.

    The reader creates it and hands :attr:`handle` to the writer processes, which attach at
    their index::

        replies = GatherQueue(n_writers=12)                  # the engine (reader)
        w = GatherQueue.attach(handle, writer=i)             # worker i, in its own process
        w.put(result)                                        # worker
        obj = replies.get(writer=i)                          # engine: from worker i
        i, obj = replies.get_with_sender()                   # engine: from whoever is first

    Messages from one writer arrive in the order it sent them; taking from any writer is fair
    (round robin over the writers that have something).  Geometry, wait policies, serializer,
    timeouts, zero-copy blocks, checksums and errors are as for
    :class:`~shmcast.BroadcastQueue`; the geometry is per writer's ring.

    Liveness: a writer blocked by a dead reader raises QueueBroken; the reader, once it has
    read everything a dead writer published, raises QueueBroken naming it.  Closing: the
    reader's :meth:`close` removes the segment's name and makes writers' puts raise
    QueueClosed; a writer's :meth:`close` detaches it (the reader gets QueueClosed from it
    once drained, and from :meth:`get` without ``writer`` once every writer has closed).
    """

    def __init__(
        self,
        n_writers: int,
        *,
        n_slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        wait: str | WaitPolicy | None = None,
        serializer: Serializer | None = None,
        checksum: bool = False,
    ) -> None:
        policy = resolve_policy(wait)
        serializer = check_serializer(serializer)
        seg, header, handle = create_segment(L.KIND_GATHER, n_writers, n_slots, slot_size, checksum)
        g = header.geometry
        self._setup(seg, header, handle, serializer, policy, f"GatherQueue reader of {seg.name}")
        self._rings = [
            RingReader(seg, g.ring(j), 0, policy, header=header) for j in range(n_writers)
        ]
        for j, ring in enumerate(self._rings):
            ring.label = f"{seg.name} (reader, from writer {j})"
            ring.writer_name = f"writer {j}"
            ring.warn_level = logging.WARNING  # the reader awaits replies: a long wait is news
        self._writer: RingWriter | None = None
        self._index: int | None = None
        self._reader_lines = [g.ring(j).reader_line(0) for j in range(n_writers)]
        self._cursors = [ring.cursor for ring in self._rings]
        self._next = 0
        self._any = _AnyWriter(self)
        leave = [ring.detach for ring in self._rings]
        self._finalizer = weakref.finalize(self, close_side, seg, leave, os.getpid())

    @classmethod
    def attach(
        cls,
        handle: Handle,
        writer: int,
        *,
        wait: str | WaitPolicy | None = None,
        serializer: Serializer | None = None,
    ) -> GatherQueue:
        """Attach the calling process as writer ``writer`` of the queue behind ``handle``.

        Raises SegmentError, AttachError, TypeError as :meth:`BroadcastQueue.attach` does.
        """
        policy = resolve_policy(wait)
        serializer = check_serializer(serializer)
        seg, header = open_segment(handle, L.KIND_GATHER, "gather queue")
        try:
            g = header.geometry
            index = check_index(writer, g.n_peers, "writer")
            line = g.peer_line(index)
            claim_line(seg.atomics, line, f"writer index {index}")
            ring = RingWriter(seg, g.ring(index), policy, header=header)
            ring.reader_required = True
            ring.label = f"{seg.name} (writer {index})"
            seg.atomics.store32(line + L.STATE, L.ATTACHED)
            announce(seg.atomics, L.ATTACH_FUTEX_OFF)
        except BaseException:
            seg.close()
            raise
        self = cls.__new__(cls)
        what = f"GatherQueue writer {index} of {seg.name}"
        self._setup(seg, header, handle, serializer, policy, what)
        self._rings = []
        self._writer = ring
        self._index = index
        self._reader_state = g.ring(index).reader_line(0) + L.STATE
        self._finalizer = weakref.finalize(self, close_side, seg, [ring.close], os.getpid())
        return self

    # -- properties ---------------------------------------------------------------------------

    @property
    def is_reader(self) -> bool:
        return self._writer is None

    @property
    def writer(self) -> int | None:
        """This endpoint's writer index, or None for the reader."""
        return self._index

    @property
    def n_writers(self) -> int:
        return self._geometry.n_peers

    def __repr__(self) -> str:
        role = "reader" if self._writer is None else f"writer {self._index}"
        return (
            f"<GatherQueue {role} name={self.name!r} writers={self.n_writers} "
            f"slots={self.n_slots}x{self.slot_size} wait={self._policy.name!r} "
            f"{'closed' if self.closed else 'open'}>"
        )

    def stats(self) -> QueueStats:
        """Counters of this endpoint (the reader's add up over all rings)."""
        p = self._policy.name
        if self._writer is not None:
            w = self._writer
            return QueueStats("writer", self._index, w.messages, w.write_seq, w.waits, p)
        rings = self._rings
        return QueueStats(
            "reader", None, sum(r.messages for r in rings), sum(r.read_seq for r in rings),
            sum(r.waits for r in rings), p,
        )  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------------

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until every writer index has been attached (QueueTimeout names the missing)."""
        deadline = deadline_of(timeout)
        self._guard.check()
        wait_all_attached(self._seg, self._geometry, deadline, self._policy.slice)

    # -- the put/get family -------------------------------------------------------------------

    def _sender(self) -> RingWriter:
        writer = self._writer
        if writer is None:
            raise RoleError("only writers can send to a gather queue; this endpoint is its reader")
        if self._seg.atomics.load32(self._reader_state) & _GONE:
            raise QueueClosed("the reader closed the gather queue")
        return writer

    def _writer_state(self, j: int) -> int:
        return self._seg.atomics.load32(self._geometry.peer_line(j) + L.STATE)

    def _all_writers_closed(self) -> bool:
        # No writer line is expected or attached any more: one native look at every line
        # (which also refuses a state word that holds none of the four states).
        first = self._geometry.peer_line(0) + L.SEQ
        return (
            self._seg.atomics.min_seq(first, L.GATHER_BLOCK, self.n_writers, L.STATE - L.SEQ,
                                      L.GATING, 0, (1 << 64) - 1, L.STATES) is None
        )  # fmt: skip

    def _raise_if_writer_dead(self) -> None:
        a = self._seg.atomics
        for j, ring in enumerate(self._rings):
            p = read_participant(a, self._geometry.peer_line(j), f"writer {j}")
            # Death first, data second (see RingReader.tick).
            if p.state == L.ATTACHED and not p.alive() and not ring.has_data():
                raise ring.broken()

    def _receive(self, deadline, timeout, want_kind, source):
        if self._writer is not None:
            raise RoleError("only the reader can receive from a gather queue")
        if source is not None:
            ring = self._rings[check_index(source, self.n_writers, "writer")]
            return (ring, *ring.next_message(deadline, timeout, want_kind))
        rings, cursors = self._rings, self._cursors
        while True:
            # The rings with a published slot, round robin from the one after the last taken
            # (one native call per look); a ring with only padding published is passed over.
            start = self._next
            for _ in rings:
                j = scan(cursors, start)
                if j < 0:
                    break
                ring = rings[j]
                if ring.poll():
                    self._next = j + 1
                    self._last = j
                    return (ring, *ring.next_message(deadline, timeout, want_kind))
                start = j + 1
            # Nothing published to read; a streamed message may be complete, though, and not
            # delivered yet (the call that completed it was interrupted): that comes first.
            for j, ring in enumerate(rings):
                if ring.streaming and ring.poll():
                    self._last = j
                    return (ring, *ring.next_message(deadline, timeout, want_kind))
            # Writer states before ring sequences (P6): a writer that puts and then closes
            # between the two looks is then seen with its message.
            all_closed = self._all_writers_closed()
            if scan(cursors, self._next) >= 0:
                if deadline is not None and time.monotonic() >= deadline:
                    raise timeout_error("get", timeout)
                continue  # slots were published meanwhile (each pass consumes some)
            if all_closed:
                raise QueueClosed("every writer closed the gather queue and all was read")
            for cursor in cursors:  # the writers may wait for slots we hold back (get_many)
                cursor.flush()
            self._any.slow.start()
            if not self._policy.wait(self._any, deadline):
                raise timeout_error("get", timeout)
            if self.closed:
                raise QueueClosed("the queue was closed while get was waiting")

    def get(self, timeout: float | None = None, writer: int | None = None) -> Any:
        """Receive the next message (reader only), from ``writer`` or, if None, from whichever
        writer has one (round robin).  Blocks and raises as :meth:`BroadcastQueue.get`; a
        dead writer raises QueueBroken once everything it sent was read."""
        return self._get(timeout, writer, None)

    def get_with_sender(self, timeout: float | None = None) -> tuple[int, Any]:
        """Like :meth:`get` from any writer, returning ``(writer_index, message)``."""
        obj = self._get(timeout, None, None)
        return self._last, obj

    def get_many(
        self, max_count: int = 64, timeout: float | None = None, writer: int | None = None
    ) -> list[Any]:
        """Receive up to ``max_count`` messages, as :meth:`BroadcastQueue.get_many`, from
        ``writer`` or from any writer (round robin)."""
        return self._get_many(max_count, timeout, writer)

    def get_bytes(self, timeout: float | None = None, writer: int | None = None) -> bytes:
        """Receive a raw-bytes message (MessageKindError if it is an object; it stays)."""
        return self._get(timeout, writer, L.MSG_RAW)

    def view(
        self, timeout: float | None = None, writer: int | None = None
    ) -> AbstractContextManager[Any]:
        """Zero-copy receive, as :meth:`BroadcastQueue.view`, from ``writer`` or any."""
        return self._view(timeout, writer)


__all__ = ["GatherQueue"]
