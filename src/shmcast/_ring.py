"""The ring protocol: slots, sequences, backpressure, waiting and liveness.

This module moves *slots*; it knows nothing of objects.  The rules it follows, and the
memory-ordering argument behind each one, are in docs/protocol.md; the comments below cite them
as P1..P6.  In brief:

- the writer fills slots with plain stores and publishes them with one release store of
  ``write_seq`` (P1), followed by a full fence and a look at ``announced`` (the count of sleeps
  readers announced) and ``sleepers``: it wakes them if one sleeps and the count moved since
  its last wake (P3);
- a reader copies slots out and releases them with a release store of its own ``read_seq`` (P2),
  followed by a full fence and a look at ``writer_sleeping`` (P4);
- each endpoint's position lives in a native :class:`~shmcast._native.Cursor`, which also does
  the common case of a whole message in one call (``put`` for the writer, ``next``/``finish``
  and ``take_bytes`` for a reader: the steps above, in the same order).  Whatever it declines
  (a wrap, a full ring, padding, streamed or corrupted messages) is done here, on the same
  state;
- the writer reuses a slot only when every gating reader has released it (I1).  It caches the
  gating sequence (the minimum ``read_seq``) and recomputes it, in one native call, only when the
  cache says the ring is full;
- a waiter that must sleep announces itself, re-checks, and sleeps on a futex word for at most one
  slice (P3/P4), so that it also looks at its peer's liveness once per slice;
- nothing read from the segment is trusted (docs/protocol.md, "Trust"): every sequence is
  checked against what its writer can have written (the Cursor's ``observe`` and the bounds
  given to ``min_seq``), every descriptor against its slot's sequence and its check word, every
  length against the ring and its message, every state and pid by
  :func:`~shmcast._participants.read_participant`.  An impossible value raises SegmentError at
  once; every loop over slots is bounded by the ring's geometry;
- every change of an endpoint's position is one native call (``publish``, ``release``,
  ``finish``), so an exception raised between two statements (a signal handler's
  KeyboardInterrupt) never leaves the position and the stored sequence out of step, and a
  streamed message's progress is derived from the position, never kept beside it.

Who may call what: a :class:`RingWriter` belongs to the one writer process, a :class:`RingReader`
to the process attached at its index.  Neither is thread-safe; the queue serializes calls.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from . import _layout as L
from ._errors import (
    MessageKindError,
    MessageTooLarge,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    SegmentError,
)
from ._liveness import exit_fd
from ._native import EARLY_WRAP_MIN, Cursor, crc32c
from ._participants import announce, read_participant, signal_sockets
from ._segment import Segment
from ._wait import WaitPolicy

log = logging.getLogger("shmcast")

_DEC = 0xFFFFFFFF  # adding this to a u32 subtracts one
_WAKE_ALL = 0
_FLAG_BITS = L.FLAG_FIRST | L.FLAG_CONT | L.FLAG_PAD | L.FLAG_CONTIG
_KINDS = (L.MSG_RAW, L.MSG_OBJECT)
#: While the readers keep up, large messages (``EARLY_WRAP_MIN`` bytes and up) use only about
#: this much of the ring, so that it stays in the processor's cache; see
#: :meth:`RingWriter._early_wrap`.
HOT_BYTES = 4 << 20


def timeout_error(what: str, timeout_of: float | None) -> QueueTimeout:
    """The QueueTimeout a blocking ``what`` raises when its ``timeout`` ran out."""
    return QueueTimeout(f"{what} timed out" + (f" after {timeout_of:g} s" if timeout_of else ""))


class RingWriter:
    """The writer's side of one ring: claim free slots, fill, publish."""

    def __init__(
        self,
        seg: Segment,
        ring: L.RingLayout,
        policy: WaitPolicy,
        on_dead_reader: str = "raise",
        *,
        header: L.Header,
    ) -> None:
        if on_dead_reader not in ("raise", "drop"):
            raise ValueError(f"on_dead_reader must be 'raise' or 'drop', not {on_dead_reader!r}")
        self._a = seg.atomics
        self._buf = seg.buf
        self._ring = ring
        self._n = ring.n_slots
        self._slot = ring.slot_size
        self.policy = policy
        self.on_dead_reader = on_dead_reader
        # The position and the per-message fast path.  cursor.pos: slots filled (published,
        # or held back); cursor.stored: the value last stored in write_seq; cursor.msgs: the
        # next message number; cursor.bound: the cached gate, slots below it are free (I1).
        self.cursor = Cursor(
            self._a, ring.n_slots, ring.slot_size, ring.data_off, ring.desc_off,
            ring.writer + L.SEQ, ring.writer + L.MSGS, ring.writer + L.SEQ,
            ring.sleepers, ring.data_futex, _WAKE_ALL, count_off=ring.announced,
            key=header.nonce, checksum=header.checksum, **self._signal_args(ring, header),
        )  # fmt: skip
        self._nonce = header.nonce
        # Large messages stay within the first HOT_BYTES of the ring while the readers keep
        # up (see begin_contiguous); cursor.early is where the next look at that is due.
        # (A ring no larger than that keeps the Cursor's default: never.)
        self._hot = max(1, HOT_BYTES // ring.slot_size)
        if self._hot < ring.n_slots:
            self.cursor.early = self._lap_start() + self._hot
        self._need = 0  # slots the current wait asks for
        self.waits = 0  # statistics: how often a put had to wait for space
        self.label = "queue"  # how log messages name this endpoint
        self.closing = False  # set by close() from another thread: blocked calls return
        #: True for a gather ring: with its one reader gone, the ring is closed (a broadcast
        #: ring with no reader left runs freely).
        self.reader_required = False
        self._orphaned = False
        self._slow = SlowWait()
        self._spin = SpinSlots(self._a)
        self.begin_spin = self._spin.begin
        self.end_spin = self._spin.end
        self.count_spin = self._spin.count
        self.spinning = self._spin.spinning

    @staticmethod
    def _signal_args(ring: L.RingLayout, header: L.Header) -> dict:
        """The Cursor's socket signal (P3, readers asleep on a socket): a broadcast ring's
        readers may sleep so; a gather reader sleeps on the futex (docs/protocol.md)."""
        if header.geometry.kind != L.KIND_BROADCAST:
            return {}
        return {"sock_off": L.SOCK_SLEEPERS_OFF, "lines_off": ring.readers,
                "n_lines": ring.n_readers}  # fmt: skip

    # -- the Waiter protocol, for space (P4) --------------------------------------------------

    def _gating(self) -> int:
        ring, c = self._ring, self.cursor
        # A gating reader has consumed only published slots (at most ``stored``), and is never
        # more than a ring behind the writer's position (I1, and "Joining late" for a reader
        # that takes an index over): anything else in its sequence word is corruption.
        m = self._a.min_seq(
            ring.readers, L.LINE, ring.n_readers, L.STATE - L.SEQ, L.GATING,
            max(0, c.pos - self._n), c.stored, L.STATES,
        )  # fmt: skip
        if m is None:
            if self.reader_required:
                self._orphaned = True
                return self.cursor.pos  # nothing is free: nobody will ever read it
            # With no gating reader, the ring runs freely, one ring-length at a time, so that
            # a reader joining later is taken into account within n_slots slots.
            m = self.cursor.pos
        return m + self._n

    def ready(self) -> bool:
        c = self.cursor
        c.bound = self._gating()
        return c.pos + self._need <= c.bound or self.closing or self._orphaned

    def sleep(self, timeout: float) -> bool:
        a, ring = self._a, self._ring
        a.exchange32(ring.writer + L.SLEEPING, 1)  # P4: announce (exchange: a full fence) ...
        try:
            seen = a.load32(ring.space_futex)
            if self.ready():  # ... re-check ...
                return True
            a.wait32(ring.space_futex, seen, timeout)  # ... and sleep only if still full
            return False
        finally:
            a.store32(ring.writer + L.SLEEPING, 0)

    def tick(self) -> None:
        """Look at the readers that hold the writer back; a dead one raises or is dropped.
        After a long wait, log who holds the writer back."""
        a, ring = self._a, self._ring
        w = self.cursor.pos
        limit = w + self._need - self._n  # readers below this sequence block us
        report = self._slow.due(self.policy)
        blockers = []
        for i in range(ring.n_readers):
            line = ring.reader_line(i)
            p = read_participant(a, line, f"reader {i}")
            seq = a.load64(line + L.SEQ)
            if not p.state & L.GATING or seq >= limit:
                continue
            if p.state == L.EXPECTED:
                blockers.append(f"reader {i} (not attached yet)")
                continue
            pid = p.pid
            if p.alive():
                blockers.append(f"reader {i} (pid {pid}, alive) is {w - seq} slots behind")
                continue
            # pid 0 on an attached line: a remote reader its publisher found dead (it went
            # silent or lost its connection; docs/protocol.md, "Remote readers").
            who = f"pid {pid}" if pid else "remote, its connection lost or silent"
            if self.on_dead_reader == "drop":
                if a.cas32(line + L.STATE, L.ATTACHED, L.DROPPED):
                    log.warning("reader %d (%s) died; dropped it", i, who)
                    announce(a, L.ATTACH_FUTEX_OFF)
                continue
            raise QueueBroken(
                f"reader {i} ({who}) died without releasing slot {seq}; "
                "the writer cannot reuse it (on_dead_reader='drop' goes on without it)",
                peer=f"reader {i}",
                pid=pid,
            )
        if report is not None and blockers:
            log.warning(
                "put on %s has waited %.1f s for space: %s",
                self.label, report, "; ".join(blockers),
            )  # fmt: skip

    # -- slots --------------------------------------------------------------------------------

    def claim(self, k: int, deadline: float | None, timeout: float | None = None) -> None:
        """Block until slots ``[w, w+k)`` are free (I1).  QueueTimeout, QueueBroken, and
        QueueClosed if this endpoint, or the reader of a gather ring, closes meanwhile."""
        c = self.cursor
        if c.pos + k <= c.bound:
            return
        self._need = k
        if not self.ready():
            self.flush()  # readers cannot free what they cannot see
            self.waits += 1
            self._slow.start()
            if not self.policy.wait(self, deadline):
                raise timeout_error("put", timeout)
        if self.closing:
            raise QueueClosed("the queue was closed while put was waiting")
        if self._orphaned:
            raise QueueClosed("the reader closed the gather queue")

    def publish(self, k: int) -> None:
        """Make the next ``k`` filled slots, and any held back, visible (P1) and wake sleeping
        readers (P3)."""
        self.cursor.publish(k, True)

    def flush(self) -> None:
        """Publish the slots held back by ``publish=False``."""
        self.cursor.flush()

    def begin_contiguous(
        self, total: int, kind: int, deadline: float | None, timeout: float | None = None
    ) -> tuple[int, memoryview]:
        """Claim room for a contiguous message of ``total`` bytes of ``kind``; return (slots,
        region).

        The region is writable until :meth:`commit_contiguous`; nothing is published before
        that, so abandoning it sends nothing.  A run of padding is published first if the
        message would otherwise wrap around the end of the ring.  The message's descriptor is
        stored now, before the caller's data (the order readers check, docs/protocol.md).
        """
        slot, n = self._slot, self._n
        k = max(1, -(-total // slot))
        if k > n:
            raise MessageTooLarge(
                f"{total} bytes do not fit in the ring at once (capacity {n * slot} bytes)"
            )
        c = self.cursor
        idx = c.pos % n
        pad = 0
        if idx + k > n:
            pad = n - idx
        elif c.pos >= c.early and total >= EARLY_WRAP_MIN:
            pad = self._early_wrap(idx, k)
        if pad:
            self.claim(pad, deadline, timeout)
            c.write_desc(c.pos, pad, L.FLAG_PAD, c.msgs)
            self.publish(pad)
            idx = 0
        self.claim(k, deadline, timeout)
        c.write_desc(c.pos, total, L.FLAG_FIRST | L.FLAG_CONTIG | (kind << L.KIND_SHIFT), c.msgs)
        off = self._ring.data_at(idx)
        return k, self._buf[off : off + total]

    def _lap_start(self) -> int:
        c = self.cursor
        return c.pos - c.pos % self._n

    def _early_wrap(self, idx: int, k: int) -> int:
        """Slots of padding to wrap early with, or 0 to go on in this lap.

        A ring much larger than the processor's cache is slow to stream large messages
        through: every message lands on memory that left the cache a lap ago, so the writer
        and each reader move it to and from main memory (measured: 1 MiB messages through a
        32 MiB ring reach under half the rate they reach through a 4 MiB one).  So once a lap
        passes ``HOT_BYTES``, a large message goes back to the start of the ring, behind a run
        of padding, if the readers have already freed the room there: no wait is added.  If
        they have not, the lap goes on and the whole ring serves as a buffer, as before.  The
        native fast path declines large messages from ``cursor.early`` on, so this runs once
        per lap while the readers keep up, and for each large message past the hot region while
        they lag.  Padding is published as at the end of a lap (P1).
        """
        c, n = self.cursor, self._n
        lap_end = c.pos - idx + n
        if lap_end + k > c.bound:
            c.bound = self._gating()
            if lap_end + k > c.bound:
                c.early = c.pos + k  # look again at the next large message
                return 0
        c.early = lap_end + self._hot
        return n - idx

    def commit_contiguous(
        self, k: int, total: int, publish: bool = True, crc: int | None = None
    ) -> None:
        """Publish the message of ``total`` bytes begun by :meth:`begin_contiguous`; with
        ``publish=False`` hold it back until :meth:`flush` (or the next publish, or a wait for
        space) to batch.  ``crc``: the message's CRC-32C as computed from its source, where
        the queue has checksums (needed there; None without checksums)."""
        c = self.cursor
        c.seal(c.pos, total, crc)
        c.commit(k, publish)  # counted and published in one call: both, or neither

    def write_streamed(
        self,
        parts: list[memoryview],
        total: int,
        kind: int,
        deadline: float | None,
        timeout: float | None = None,
    ) -> None:
        """Send a message larger than the ring, publishing slots as readers free them.

        If this raises half-way (timeout, dead reader), the message number is already spent:
        readers see the next message start with another number and drop the unfinished one.
        """
        for _ in self.stream_steps(parts, total, kind):
            self.claim(1, deadline, timeout)

    def stream_steps(self, parts: list[memoryview], total: int, kind: int) -> Iterator[None]:
        """The steps of :meth:`write_streamed`, for a caller that waits its own way (asyncio):
        a generator that yields whenever it needs a free slot; the caller claims one
        (``claim(1, ...)``) before it resumes the generator.  Abandoning it half-way sends
        nothing: readers drop the unfinished message, as after a timeout."""
        slot, n = self._slot, self._n
        c = self.cursor
        msg_no = c.count_message()
        source = _Source(parts)
        done = 0
        flags = L.FLAG_FIRST | (kind << L.KIND_SHIFT)
        while done < total:
            yield
            idx = c.pos % n
            b = min(c.bound - c.pos, n - idx, -(-(total - done) // slot))
            nbytes = min(total - done, b * slot)
            for j in range(b):  # descriptors before data, as readers check them
                c.write_desc(c.pos + j, total, flags, msg_no)
                flags = L.FLAG_CONT | (kind << L.KIND_SHIFT)
            off = self._ring.data_at(idx)
            if c.checksum:  # slot by slot, each sealed with the CRC of its source bytes
                for j in range(b):
                    size = min(slot, nbytes - j * slot)
                    at = off + j * slot
                    c.seal(c.pos + j, size, source.copy_into(self._buf[at : at + size], True))
            else:
                source.copy_into(self._buf[off : off + nbytes])
            done += nbytes
            self.publish(b)

    def close(self) -> None:
        """Mark this ring's writer gone and wake its readers (P6), and a put of ours blocked
        in another thread."""
        self.flush()  # P6: everything before closed
        self.closing = True
        announce(self._a, self._ring.space_futex)
        self._a.store32(self._ring.writer + L.STATE, L.DETACHED)
        announce(self._a, self._ring.data_futex)
        signal_sockets(self._a, self._ring, self._nonce)
        announce(self._a, L.ATTACH_FUTEX_OFF)

    @property
    def write_seq(self) -> int:
        return self.cursor.pos

    @property
    def messages(self) -> int:
        return self.cursor.msgs


class SpinSlots:
    """The segment's ``spinners`` count: at most ``limit`` of its processes spin eagerly at once;
    and its ``spinning`` count: how many spin now, eagerly or politely.

    Only the spin phase of :class:`~shmcast.FutexWait` uses them, on its slow path (a wait that
    found nothing); a process refused a place spins politely or sleeps, and ``spinning`` tells
    its look at the CPUs' load (:class:`~shmcast._wait.CpuLoad`) which runnable tasks only
    spin.  A process killed while spinning leaves a count one too high: one eager spinner fewer
    from then on, or one runnable task taken for a spinner, never a hang.  Both are hints,
    outside the protocol: nothing waits on them.
    """

    __slots__ = ("_a",)

    def __init__(self, atomics) -> None:
        self._a = atomics

    def count(self, delta: int) -> None:
        self._a.add32(L.SPINNING_OFF, delta & 0xFFFFFFFF)

    def spinning(self) -> int:
        n = self._a.load32(L.SPINNING_OFF)
        return n if n < 1 << 16 else 0  # a count gone below zero (corrupted): none

    def begin(self, limit: int) -> bool:
        if limit <= 0:
            return False
        if self._a.add32(L.SPINNERS_OFF, 1) <= limit:
            return True
        self._a.add32(L.SPINNERS_OFF, _DEC)
        return False

    def end(self) -> None:
        self._a.add32(L.SPINNERS_OFF, _DEC)


class SlowWait:
    """When to log a long wait: after ``policy.warn_after`` seconds, then after twice as long
    each time (capped at ten minutes between messages)."""

    __slots__ = ("_next", "_started")

    def __init__(self) -> None:
        self._started = 0.0
        self._next = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._next = 0.0

    def due(self, policy: WaitPolicy) -> float | None:
        """Seconds waited if a message is due now, else None."""
        if policy.warn_after is None:
            return None
        waited = time.monotonic() - self._started
        if waited < max(self._next, policy.warn_after):
            return None
        self._next = waited + min(max(waited, policy.warn_after), 600.0)
        return waited

    def due_in(self, policy: WaitPolicy) -> float:
        """Seconds until the next message is due (infinity: none will be)."""
        if policy.warn_after is None:
            return math.inf
        return max(self._next, policy.warn_after) - (time.monotonic() - self._started)


class _Source:
    """Copies a list of byte views, in order, into successive destination views."""

    __slots__ = ("_i", "_parts", "_pos")

    def __init__(self, parts: list[memoryview]) -> None:
        self._parts = parts
        self._i = 0
        self._pos = 0

    def copy_into(self, dest: memoryview, checksum: bool = False) -> int:
        """Fill ``dest`` with the next bytes; with ``checksum``, return their CRC-32C (of the
        source bytes, not of what landed in ``dest``), else 0."""
        filled, want, crc = 0, len(dest), 0
        while filled < want:
            part = self._parts[self._i]
            take = min(len(part) - self._pos, want - filled)
            piece = part[self._pos : self._pos + take]
            dest[filled : filled + take] = piece
            if checksum:
                crc = crc32c(piece, crc)
            filled += take
            self._pos += take
            if self._pos == len(part):
                self._i += 1
                self._pos = 0
        return crc


class _Partial:
    """A streamed message being assembled by a reader (kept across a get() timeout).

    Its progress is not stored: the bytes copied so far are ``(cursor.pos - first) *
    slot_size`` (every slot of a streamed message but its last is full), so a call interrupted
    between a copy and the release that follows it leaves nothing inconsistent; ``data`` is cut
    back to that length before each copy.  Until it is complete and delivered, the reader's
    fast path stays off (the slots after it belong to later messages).  ``data`` grows with
    the slots as they arrive, so memory follows what the writer actually sent, never the length
    its first slot claims.
    """

    __slots__ = ("data", "delivered_unless", "first", "kind", "msg_no", "total")

    def __init__(self, msg_no: int, kind: int, total: int, first: int) -> None:
        self.msg_no = msg_no
        self.kind = kind
        self.total = total
        self.first = first
        self.data = bytearray()
        #: Once complete: the reader's message count then.  The message stays here until the
        #: count moves (the caller's finish counts it as delivered), so that a call
        #: interrupted between the last copy and that finish delivers it on the next call.
        self.delivered_unless: int | None = None


class RingReader:
    """A reader's side of one ring: wait for published slots, read them, release them."""

    def __init__(
        self, seg: Segment, ring: L.RingLayout, index: int, policy: WaitPolicy, *,
        header: L.Header,
    ) -> None:  # fmt: skip
        self._a = seg.atomics
        self._buf = seg.buf
        self._ring = ring
        self._n = ring.n_slots
        self._slot = ring.slot_size
        self.index = index
        self._line = ring.reader_line(index)
        self.nonce = self._nonce = header.nonce
        self._seq_off = self._line + L.SEQ
        self._wseq_off = ring.writer + L.SEQ
        self._wstate_off = ring.writer + L.STATE
        self.policy = policy
        # The position and the per-message fast path.  cursor.pos: slots consumed (released,
        # or held back); cursor.stored: the value last stored in read_seq; cursor.msgs:
        # messages delivered; cursor.bound: write_seq as last seen (never ahead of it, I2).
        self.cursor = c = Cursor(
            self._a, ring.n_slots, ring.slot_size, ring.data_off, ring.desc_off,
            self._seq_off, self._line + L.MSGS, self._wseq_off,
            ring.writer + L.SLEEPING, ring.space_futex, 1,
            key=header.nonce, checksum=header.checksum,
        )  # fmt: skip
        c.bound = c.pos
        self._target = 0
        self._partial: _Partial | None = None
        self.waits = 0
        self.label = "queue"  # how log messages name this endpoint
        #: Level of the long-wait log message: waiting for data is normal for an idle
        #: broadcast reader (INFO), not for a gather reader awaiting replies (WARNING).
        self.warn_level = logging.INFO
        self.closing = False  # set by detach() from another thread: blocked calls return
        self.writer_name = "writer"  # how errors and logs name this ring's writer
        self._slow = SlowWait()
        self._spin = SpinSlots(self._a)
        self.begin_spin = self._spin.begin
        self.end_spin = self._spin.end
        self.count_spin = self._spin.count
        self.spinning = self._spin.spinning

    # -- attach / detach (P5) -----------------------------------------------------------------

    def rejoin(self) -> None:
        """Start reading at the writer's current position (for a reader index that was
        detached or dropped).  Our sequence becomes gating only at a position the writer cannot
        have lapped: store it, go gating (a full fence), re-read, store again."""
        a = self._a
        a.store64(self._seq_off, a.load64(self._wseq_off))
        a.exchange32(self._line + L.STATE, L.ATTACHED)
        c = self.cursor
        c.pos = c.stored = c.bound = a.load64(self._wseq_off)
        a.store64(self._seq_off, c.pos)

    def detach(self) -> None:
        """Leave: the writer stops waiting for this index, which may be taken again.  A get
        of ours blocked in another thread returns (QueueClosed)."""
        a = self._a
        self.closing = True
        a.store32(self._line + L.STATE, L.DETACHED)
        # A get_async of ours asleep on its socket: the signal is sent to the pid in the line.
        signal_sockets(a, self._ring, self._nonce)
        a.store64(self._line + L.PID, 0)
        announce(a, self._ring.space_futex)
        announce(a, L.ATTACH_FUTEX_OFF)
        announce(a, self._ring.data_futex)

    # -- the Waiter protocol, for data (P3) -----------------------------------------------------

    def has_data(self) -> bool:
        """True when the slot at our sequence is published.  (Acquire load, P1; checked.)"""
        return self.cursor.observe() > self.cursor.pos

    def _writer_state(self) -> int:
        state = self._a.load32(self._wstate_off)
        if state not in L.STATE_NAMES:
            raise SegmentError(f"corrupted queue: the {self.writer_name} has an unknown state")
        return state

    def ready(self) -> bool:
        state = self._writer_state()  # P6: state before sequence
        if self.cursor.observe() >= self._target:
            return True
        return bool(state & (L.DETACHED | L.DROPPED)) or self.closing

    def sleep(self, timeout: float) -> bool:
        seen = self.futex_arm()  # steps 1-3
        if seen is None:
            return True
        try:
            self._a.wait32(self._ring.data_futex, seen, timeout)  # step 4
            return False
        finally:
            self.futex_disarm()

    def futex_arm(self) -> int | None:
        """Steps 1-3 of a P3 sleep on the data futex: None if the re-check found the
        condition (the announcement undone), else the futex word's value for step 4 (the
        caller waits, on the futex or through shmcast._loopwake, then calls
        :meth:`futex_disarm`)."""
        a, ring = self._a, self._ring
        # P3.  The futex word comes first: a writer that counted our announcement before its
        # last wake has bumped the word after that count, so either `seen` is older than that
        # bump (the wait returns at once) or the re-check sees what it published.
        seen = a.load32(ring.data_futex)  # step 1
        a.add64(ring.announced, 1)  # step 2: announce (seq_cst: a full fence) ...
        a.add32(ring.sleepers, 1)  # ... in both words the writer looks at
        a.store32(self._line + L.SLEEPING, 1)
        try:
            ready = self.ready()  # step 3: re-check
        except BaseException:
            self.futex_disarm()
            raise
        if ready:
            self.futex_disarm()
            return None
        return seen

    def futex_disarm(self) -> None:
        """Undo :meth:`futex_arm` (after the wait)."""
        self._a.store32(self._line + L.SLEEPING, 0)
        self._a.add32(self._ring.sleepers, _DEC)

    @property
    def futex_atomics(self) -> Any:
        """The segment's Atomics, and the data futex's offset in it (for a FutexRing)."""
        return self._a

    @property
    def futex_off(self) -> int:
        return self._ring.data_futex

    def sock_arm(self) -> bool:
        """P3 for a reader whose event loop sleeps on its socket (shmcast._sockwake): mark the
        line, count the sleep, announce, re-check.  The caller drained the socket first (step
        1, in place of the futex word's load).  True if the re-check found the condition (the
        marks are undone); else the caller awaits a datagram for at most a slice, then calls
        :meth:`sock_disarm`.  Every step is a seq_cst read-modify-write (a full fence): the
        writer's wake that misses the re-check sees the announcement, hence the mark before
        it, and sends a datagram after the drain (docs/protocol.md P3)."""
        a, ring = self._a, self._ring
        a.exchange32(self._line + L.SLEEPING, L.SLEEP_SOCKET)  # step 2: mark ...
        a.add32(L.SOCK_SLEEPERS_OFF, 1)  # ... and count, before the announcement
        a.add64(ring.announced, 1)  # step 3: announce, as on the futex
        a.add32(ring.sleepers, 1)
        if self.ready():  # step 4: re-check
            self.sock_disarm()
            return True
        return False

    def sock_disarm(self) -> None:
        """Undo :meth:`sock_arm` (after the await, or after a re-check that found data)."""
        a = self._a
        a.store32(self._line + L.SLEEPING, 0)
        a.add32(L.SOCK_SLEEPERS_OFF, _DEC)
        a.add32(self._ring.sleepers, _DEC)

    def tick(self) -> None:
        """A dead writer: once everything it published is read, raise QueueBroken.
        After a long wait, log whom we wait for."""
        # Death first, sequence second: a writer that publishes and then dies between our two
        # looks must not be declared drained (its last message is still to be read).
        p = read_participant(self._a, self._ring.writer, f"the {self.writer_name}")
        dead = p.state == L.ATTACHED and not p.alive()
        if self.cursor.observe() >= self._target:
            return
        if dead:
            raise self.broken()
        waited = self._slow.due(self.policy)
        if waited is not None:
            who = "not attached yet" if p.state == L.EXPECTED else f"pid {p.pid}, alive"
            log.log(
                self.warn_level,
                "get on %s has waited %.1f s for %s (%s); nothing new since sequence %d",
                self.label, waited, self.writer_name, who, self.cursor.pos,
            )  # fmt: skip

    def log_due_in(self) -> float:
        """Seconds until :meth:`tick` logs the wait (infinity: never)."""
        return self._slow.due_in(self.policy)

    def writer_exit_fd(self) -> int | None:
        """A new descriptor (the caller closes it) that becomes readable when the attached
        writer ends, or None (not attached, gone, or no pidfds: see shmcast._liveness)."""
        p = read_participant(self._a, self._ring.writer, f"the {self.writer_name}")
        return exit_fd(p.pid, p.start) if p.state == L.ATTACHED else None

    def writer_pid(self) -> int:
        """The pid in this ring's writer line (checked: SegmentError for garbage)."""
        return read_participant(self._a, self._ring.writer, f"the {self.writer_name}").pid

    def broken(self) -> QueueBroken:
        pid = self.writer_pid()
        return QueueBroken(
            f"{self.writer_name} (pid {pid}) died; everything it published has been read",
            peer=self.writer_name,
            pid=pid,
        )

    # -- slots --------------------------------------------------------------------------------

    def wait_published(self, count: int, deadline: float | None, timeout: float | None) -> None:
        """Block until slots ``[r, r+count)`` are published (I2).
        QueueTimeout, QueueClosed (writer closed, all read), QueueBroken (writer died),
        SegmentError (the writer's sequence is impossible)."""
        c = self.cursor
        target = c.pos + count
        if target <= c.bound:
            return
        self._target = target
        if self.ready() and c.bound >= target:
            return
        self.flush()  # the writer may be waiting for the slots we hold back
        self.waits += 1
        self._slow.start()
        if not self.policy.wait(self, deadline):
            raise timeout_error("get", timeout)
        if self.closing:
            raise QueueClosed("the queue was closed while get was waiting")
        if c.bound < target and c.observe() < target:  # re-read after seeing closed (P6)
            raise QueueClosed("the writer closed the queue and everything it sent was read")

    def flush(self) -> None:
        """Release the slots that :meth:`finish_message` held back (``defer=True``)."""
        self.cursor.flush()

    def finish_message(self, k: int, defer: bool = False) -> None:
        """Count a delivered message and release its ``k`` slots; with ``defer=True`` hold the
        release back until :meth:`flush` (to batch; only for messages already copied out).
        SegmentError, nothing released, if the slots were reused while they were read."""
        self.cursor.finish(k, defer)

    def check_copy(self, copy: bytes | bytearray) -> None:
        """With checksums: SegmentError unless ``copy``, a private copy of the contiguous
        message at our position, matches its CRC-32C.  Whoever hands out a message's bytes
        copies them first, then checks the copy: what was checked is what is handed out,
        whatever another process writes into the ring meanwhile."""
        c = self.cursor
        if c.checksum and crc32c(copy) != c.read_desc(c.pos)[3]:
            raise SegmentError(
                f"corrupted message at sequence {c.pos}: its {len(copy)} bytes fail their "
                "checksum (another process wrote into the ring)"
            )

    def _corrupt(self, why: str) -> SegmentError:
        return SegmentError(f"corrupted slot at sequence {self.cursor.pos}: {why}")

    def _kind_of(self, flags: int) -> int:
        kind = (flags & L.KIND_MASK) >> L.KIND_SHIFT
        if kind not in _KINDS or flags & ~(_FLAG_BITS | L.KIND_MASK):
            raise self._corrupt(f"flags {flags:#x}")
        return kind

    def next_message(
        self, deadline: float | None, timeout: float | None, want_kind: int | None = None
    ) -> tuple[int, memoryview, int]:
        """Wait for the next message; return ``(kind, data, slots)``.

        For a contiguous message ``data`` lies in the ring and the caller must call
        ``finish_message(slots)`` once done with it; for a streamed one ``data`` is private and
        ``slots`` is 0.  With ``want_kind`` given, a message of another kind raises
        MessageKindError and stays in the queue.  A pass that skipped slots without finding a
        message looks at the deadline: a writer that keeps publishing slots to skip cannot hold
        the call past its timeout.
        """
        buf, c = self._buf, self.cursor
        while True:
            if self._partial is not None:
                if want_kind is not None and self._partial.kind != want_kind:
                    raise MessageKindError(_kind_mismatch(self._partial.kind))
                done = self._stream(deadline, timeout)
                if done is not None:
                    return done
                continue
            # The fast path: a contiguous message is published at our position (one native
            # call: the acquire load of write_seq, P1, and the checked descriptor).
            fast = c.next()
            if fast is not None:
                kind, off, total, k = fast
                if want_kind is not None and kind != want_kind:
                    raise MessageKindError(_kind_mismatch(kind))
                return kind, buf[off : off + total], k
            if c.pos >= c.bound:  # next() found nothing published: wait, then look again
                self.wait_published(1, deadline, timeout)
                continue
            # Published, but declined by next(): padding or a streamed message.
            head = self._head()
            if head is None:
                if deadline is not None and time.monotonic() >= deadline:
                    raise timeout_error("get", timeout)
                continue
            if head[1] & L.FLAG_CONTIG:
                continue  # a contiguous message after padding: next() takes it
            total, flags, msg_no = head
            kind = self._kind_of(flags)
            if want_kind is not None and kind != want_kind:
                raise MessageKindError(_kind_mismatch(kind))
            if total <= self._n * self._slot:
                raise self._corrupt(f"a streamed message of {total} bytes fits the ring")
            self._partial = _Partial(msg_no, kind, total, c.pos)

    def _head(self) -> tuple[int, int, int] | None:
        """Skip published padding and orphaned continuation slots; return ``(total, flags,
        msg_no)`` of the message starting at our sequence, or None if no published slot is
        left (or a ring's worth was skipped: the caller looks at its deadline, then again).
        Never blocks."""
        n, c = self._n, self.cursor
        for _ in range(n + 1):
            if c.pos >= c.bound and c.observe() <= c.pos:
                return None
            total, flags, msg_no, _crc = c.read_desc(c.pos)
            bits = flags & _FLAG_BITS
            if bits == L.FLAG_PAD:
                if not 0 < total <= n - c.pos % n:
                    raise self._corrupt(f"padding run of {total} slots")
                if c.pos + total > c.bound and c.pos + total > c.observe():
                    raise self._corrupt("padding run published in part")  # one store (P1)
                c.release(total)
            elif bits == L.FLAG_CONT:
                self._kind_of(flags)
                c.release(1)  # the tail of a message we joined late or that was abandoned
            elif bits in (L.FLAG_FIRST, L.FLAG_FIRST | L.FLAG_CONTIG):
                return total, flags, msg_no
            else:
                raise self._corrupt(f"flags {flags:#x}")
        return None

    @property
    def streaming(self) -> bool:
        """A streamed message is in progress (or complete and not yet delivered): the next
        message comes from :meth:`next_message`, not from the cursor's fast path."""
        return self._partial is not None

    def poll(self) -> bool:
        """True when a message can be started now without blocking (its first slot, or the
        next slot of a message in progress, is published).  Never blocks."""
        p = self._partial
        if p is not None and p.delivered_unless is not None:
            if self.cursor.msgs == p.delivered_unless:
                return True  # complete, still to be delivered
            self._partial = p = None  # delivered: the stream goes on after it
        if p is not None:
            return self.cursor.pos < self.cursor.bound or self.has_data()
        return self.cursor.next() is not None or self._head() is not None

    def _stream(self, deadline: float | None, timeout: float | None):
        """Copy published slots of the partial message out, releasing them as we go.  Returns
        ``(kind, data, 0)`` once complete, None if the writer abandoned the message."""
        p = self._partial
        assert p is not None
        n, slot, buf, ring, c = self._n, self._slot, self._buf, self._ring, self.cursor
        total = p.total
        if p.delivered_unless is not None:  # complete: delivered by now, or still to deliver
            if c.msgs != p.delivered_unless:
                self._partial = None
                return None
            return p.kind, memoryview(p.data), 0
        cont = L.FLAG_CONT | (p.kind << L.KIND_SHIFT)
        while True:
            filled = (c.pos - p.first) * slot
            if filled >= total:
                break
            del p.data[filled:]  # what a call interrupted after a copy added
            self.wait_published(1, deadline, timeout)
            idx = c.pos % n
            # Look at the published slots up to the ring's end and the message's last slot.
            avail = min(c.bound - c.pos, n - idx, -(-(total - filled) // slot))
            run = 0
            crcs = []
            for j in range(avail):
                seq = c.pos + j
                t, flags, msg_no, crc = c.read_desc(seq)
                want = L.FLAG_FIRST | (p.kind << L.KIND_SHIFT) if seq == p.first else cont
                if flags == want and msg_no == p.msg_no and t == total:
                    run += 1
                    crcs.append(crc)
                elif seq != p.first and flags & (L.FLAG_FIRST | L.FLAG_PAD):
                    break  # the writer abandoned this message; the next one starts here
                else:
                    raise SegmentError(
                        f"corrupted slot at sequence {seq}: not the next slot of message "
                        f"{p.msg_no} ({total} bytes)"
                    )
            if run:
                off = ring.data_at(idx)
                p.data += buf[off : off + min(run * slot, total - filled)]
                if c.checksum:
                    self._check_payloads(p.data, filled, c.pos, crcs)
                c.release(run)  # checked again, then handed back (P2)
            if run < avail:
                self._partial = None
                return None
            if (
                deadline is not None
                and time.monotonic() >= deadline
                and c.pos < p.first + (-(-total // slot))
            ):
                raise timeout_error("get", timeout)  # the part copied so far is kept
        p.delivered_unless = c.msgs  # kept until the caller's finish counts it
        return p.kind, memoryview(p.data), 0

    def _check_payloads(self, data: bytearray, start: int, seq: int, crcs: list[int]) -> None:
        """The slots copied into ``data`` from ``start`` on, one CRC-32C each (checksums)."""
        slot = self._slot
        with memoryview(data) as view:
            for j, crc in enumerate(crcs):
                piece = view[start + j * slot : start + (j + 1) * slot]
                if crc32c(piece) != crc:
                    raise SegmentError(
                        f"corrupted message at sequence {seq + j}: its {len(piece)} bytes fail "
                        "their checksum (another process wrote into the ring)"
                    )

    @property
    def read_seq(self) -> int:
        return self.cursor.pos

    @property
    def messages(self) -> int:
        return self.cursor.msgs


def _kind_mismatch(kind: int) -> str:
    if kind == L.MSG_OBJECT:
        return "the next message is an object sent with put(); read it with get() or view()"
    return "the next message is raw bytes sent with put_bytes(); read it with get_bytes()"
