"""Shared buffers: large out-of-band buffers received without a second copy.

A broadcast queue created with ``shared=SharedBuffers(...)`` has, beside its ring, a *region*:
a second shared-memory segment of ``slabs`` pieces of ``slab_size`` bytes.  When the writer
sends an object whose pickle has an out-of-band buffer of at least ``min_size`` bytes (a numpy
array), the buffer is copied into a free slab instead of the ring, and the ring message
carries a reference to it.  A reader's :meth:`~shmcast.BroadcastQueue.get_shared` builds the
object on a read-only :class:`~shmcast._native.Lease` of the slab: no copy, and the reader
keeps it as long as it likes, while the ring goes on (the slab is not a ring slot: nothing
gates the writer on it).  ``get`` copies the buffer out and hands the slab back at once, so
it keeps returning objects the caller owns.

**Marks.**  Each slab has one 32-bit *mark* per reader index, written as follows:

- the writer, which owns a slab whose marks are all 0, fills it (plain stores), then stores
  ``PENDING`` in every reader's mark, then sends the ring message (P1: the release store of
  ``write_seq`` publishes the slab's bytes and marks with the message);
- reader *i*, reading the message, finds its mark ``PENDING`` (anything else is corruption:
  SegmentError).  ``get`` copies the bytes out, then stores 0 (release);
  ``get_shared`` compare-exchanges ``PENDING`` to its pid and builds a lease; when the last
  view of the lease is gone the lease compare-exchanges its pid back to 0 (release, in C);
  both happen before the reader releases the message's ring slots (P2);
- the writer reuses a slab only when it loads every mark as 0 (acquire), so every load a
  reader made from the slab happened before (the release store that cleared its mark).

**Reclaim.**  A mark that nobody will clear is cleared by the writer, when it looks for a free
slab:

- ``PENDING`` of a reader whose ``read_seq`` has passed the message (it joined after it, or
  it is corrupted): a reader resolves its mark before it releases the message, so one past it
  with the mark still pending never read it;
- ``PENDING`` of a reader line that is *detached* or *dropped*, or *attached* by a dead
  process.  A process that takes such a line over joins at the writer's position
  (docs/protocol.md, "Joining late"): its state exchange and its re-read of ``write_seq`` on
  one side, the writer's publish (a full fence follows it, P3) and its later load of the line
  on the other, are the store-buffering pattern, so either the writer sees the new owner, or
  the new owner starts after the message and never reads it;
- a pid of a process that is gone (killed while it held a lease).  A pid reused by another
  process keeps the slab until that process ends: a slab held too long, never one reused early.

A *expected* reader (not attached yet) keeps its ``PENDING``: it will read from the start.

**Full region.**  When no slab is free but some slab waits only for readers that have not read
its message yet (marks pending, no lease), the writer waits for it, as it waits for ring slots
(backpressure), until the put's deadline.  When every slab is leased, or the buffer is larger
than a slab, the buffer travels in the ring as before (readers copy it): a reader that keeps
leases forever costs the others nothing but the zero-copy path.

**Trust.**  Everything read from the region is checked before use: its header (magic, version,
the queue's nonce, the geometry against the segment's size), and for every reference the slab
index, the tag the writer gave that filling, the length against the slab, and the mark.

Region layout (little-endian)::

    +0   8s   magic      b"SHMCRGN\\0"
    +8   u32  version    1
    +12  u32  n_slabs
    +16  u64  nonce      the queue's
    +24  u64  slab_size  a multiple of 4096
    +32  u32  n_readers
    +36  u32  reserved   zero
    +40  u64  data_off   page-aligned
    128  one row per slab (a multiple of 64 bytes): u64 tag, u64 length, 16 reserved bytes,
         then n_readers u32 marks
    data_off  n_slabs x slab_size bytes of slab data

Frame of a message sent through a region queue (the pickle frame of shmcast._serialize, with a
marker and a place per buffer)::

    u32 n_buffers | u32 REGION_FRAME | u64 pickle_len | n x u64 length | n x u64 where
    pickle stream, then each in-ring buffer, each at the next multiple of 64; where = 0: the
    buffer is in the ring (length bytes); where = k + 1: it is in slab k, and its place in the
    ring holds u64 tag, u64 length (16 bytes)

Who may call: a :class:`RegionWriter` belongs to the queue's writer, a :class:`RegionReader` to
one reader; the queue serializes calls.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import time
from dataclasses import dataclass
from typing import Any

from . import _layout as L
from ._errors import SegmentError, SerializationError
from ._liveness import is_alive
from ._native import Lease
from ._participants import read_participant
from ._segment import Segment

MAGIC = b"SHMCRGN\0"
VERSION = 1
PENDING = 0xFFFFFFFF
REGION_FRAME = 0x4E475231  # "1RGN"
_HEADER = struct.Struct("<8sIIQQII Q")
_TABLE_OFF = 128
_HEAD = struct.Struct("<IIQ")
_REF = struct.Struct("<QQ")
_ALIGN = 64
_ZEROS = bytes(_ALIGN)
_PAGE = 4096
_MAX_SLABS = 1024
_NAP = 0.005  # seconds between looks while waiting for a pending slab


@dataclass(frozen=True)
class SharedBuffers:
    """A broadcast queue's shared region for large buffers (``BroadcastQueue(shared=...)``).

    ``slabs`` pieces of ``slab_size`` bytes (rounded up to 4096); an out-of-band buffer of
    ``min_size`` bytes or more, up to ``slab_size``, goes to a free slab.  Memory: ``slabs *
    slab_size`` bytes of /dev/shm, reserved at creation.
    """

    slabs: int = 4
    slab_size: int = 16 << 20
    min_size: int = 256 << 10

    def checked(self) -> SharedBuffers:
        for name in ("slabs", "slab_size", "min_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"SharedBuffers.{name} must be an int, not {type(v).__name__}")
        if not 1 <= self.slabs <= _MAX_SLABS:
            raise ValueError(f"SharedBuffers.slabs must be 1..{_MAX_SLABS}, not {self.slabs}")
        if not 0 < self.slab_size <= 1 << 40:
            raise ValueError(f"SharedBuffers.slab_size must be 1..2**40, not {self.slab_size}")
        if self.min_size < 1:
            raise ValueError(f"SharedBuffers.min_size must be at least 1, not {self.min_size}")
        return self


@dataclass(frozen=True)
class RegionInfo:
    """How a reader reaches the region (part of the queue's handle)."""

    name: str
    fd: int
    min_size: int


def _row_size(n_readers: int) -> int:
    return -(-(32 + 4 * n_readers) // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Geometry:
    n_slabs: int
    slab_size: int
    n_readers: int
    data_off: int

    @classmethod
    def of(cls, n_slabs: int, slab_size: int, n_readers: int) -> _Geometry:
        table_end = _TABLE_OFF + n_slabs * _row_size(n_readers)
        return cls(n_slabs, slab_size, n_readers, -(-table_end // _PAGE) * _PAGE)

    @property
    def size(self) -> int:
        return self.data_off + self.n_slabs * self.slab_size

    def row(self, k: int) -> int:
        return _TABLE_OFF + k * _row_size(self.n_readers)

    def mark(self, k: int, i: int) -> int:
        return self.row(k) + 32 + 4 * i

    def slab(self, k: int) -> int:
        return self.data_off + k * self.slab_size


def create_region(spec: SharedBuffers, n_readers: int, nonce: int) -> tuple[Segment, RegionInfo]:
    """A fresh region for a queue of ``n_readers`` (the writer's constructor); unnamed at once."""
    spec = spec.checked()
    slab = -(-spec.slab_size // _PAGE) * _PAGE
    g = _Geometry.of(spec.slabs, slab, n_readers)
    seg = Segment.create(g.size)
    try:
        seg.buf[: _HEADER.size] = _HEADER.pack(
            MAGIC, VERSION, g.n_slabs, nonce, g.slab_size, n_readers, 0, g.data_off
        )
    finally:
        seg.unlink()
    return seg, RegionInfo(seg.name, seg.fd, spec.min_size)


def _read_geometry(seg: Segment, nonce: int, n_readers: int) -> _Geometry:
    if seg.size < _TABLE_OFF:
        raise SegmentError(f"corrupted shared region {seg.name!r}: {seg.size} bytes")
    magic, version, n, got_nonce, slab, readers, _r, data_off = _HEADER.unpack_from(seg.buf, 0)
    if magic != MAGIC:
        raise SegmentError(f"{seg.name!r} is not a shmcast shared region")
    if version != VERSION:
        raise SegmentError(f"shared region {seg.name!r} has layout version {version}")
    if got_nonce != nonce:
        raise SegmentError(f"stale handle: region {seg.name!r} belongs to another queue")
    if readers != n_readers or not 1 <= n <= _MAX_SLABS or not slab or slab % _PAGE:
        raise SegmentError(f"corrupted shared region {seg.name!r}: geometry")
    g = _Geometry.of(n, slab, readers)
    if data_off != g.data_off or g.size > seg.size:
        raise SegmentError(f"corrupted shared region {seg.name!r}: geometry")
    return g


def attach_region(info: Any, pid: int, nonce: int, n_readers: int) -> tuple[Segment, int]:
    """Map the region of a queue whose handle carries ``info`` (a reader's attach); returns the
    segment and the minimum size.  SegmentError if it is gone or not the queue's."""
    if not isinstance(info, RegionInfo) or not isinstance(info.min_size, int):
        raise SegmentError(f"invalid handle: region {info!r}")
    seg = Segment.attach(info.name, pid, info.fd)
    try:
        _read_geometry(seg, nonce, n_readers)
    except BaseException:
        seg.close()
        raise
    return seg, info.min_size


def _pad(n: int) -> int:
    return -n % _ALIGN


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14


def populate(seg: Segment, write: bool) -> None:
    """Map every page of the region into this process now, so that the first use of a slab
    does not take a page fault per 4 KiB (measured: 8 ms for the writer's first 16 MiB copy
    into a slab against 1.5 ms later).  The memory is reserved already; where the kernel has
    no MADV_POPULATE_*, this does nothing."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        seg._mmap.madvise(_MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ)


class RegionWriter:
    """The writer's side: put large buffers in free slabs, mark them, reclaim them."""

    def __init__(
        self, seg: Segment, nonce: int, min_size: int, queue: Segment, ring: L.RingLayout
    ) -> None:
        self._seg = seg
        self._a = seg.atomics
        self._qa = queue.atomics  # the queue's segment: the reader lines
        self._g = _read_geometry(seg, nonce, ring.n_readers)
        self._ring = ring
        self._min = min_size
        self._tags = 0
        #: Per slab: None (free) or the write position after the message that carries it
        #: (0 until the message is sent).
        self._after: list[int | None] = [None] * self._g.n_slabs
        self._order = list(range(self._g.n_slabs))  # most recently used first (warm in cache)
        self._open: list[int] = []  # slabs of the message being sent
        self._pending_only = False
        self.used = self.fallbacks = self.waits = 0  # statistics
        #: Set by the queue before each encode: the put's deadline, and its ring's flush
        #: (called before a wait, so that the readers can see what they must resolve).
        self.deadline: float | None = None
        self.flush: Any = None
        populate(seg, write=True)

    def encode(self, obj: Any) -> list[Any]:
        """The frame parts of ``obj``; its large buffers are copied into slabs now.  Then
        :meth:`sent` or :meth:`abandon` must follow."""
        buffers: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        try:
            raws = [b.raw() for b in buffers]
        except BufferError:  # a non-contiguous buffer: everything in-band
            stream, raws = pickle.dumps(obj, protocol=5), []
        n = len(raws)
        lengths, wheres, inband = [], [], []
        g, buf = self._g, self._seg.buf
        for raw in raws:
            size = raw.nbytes
            k = self._slab_for() if self._min <= size <= g.slab_size else None
            if k is None:
                if size >= self._min:
                    self.fallbacks += 1
                lengths.append(size)
                wheres.append(0)
                inband.append(raw)
                continue
            self._open.append(k)
            self._after[k] = 0
            self._tags += 1
            tag = self._tags
            off = g.slab(k)
            buf[off : off + size] = raw  # plain stores, published by the ring message (P1)
            row = g.row(k)
            buf[row : row + 16] = _REF.pack(tag, size)
            for i in range(g.n_readers):
                self._a.store32(g.mark(k, i), PENDING)
            lengths.append(size)
            wheres.append(k + 1)
            inband.append(_REF.pack(tag, size))
            self.used += 1
        head = _HEAD.pack(n, REGION_FRAME, len(stream)) + struct.pack(
            f"<{2 * n}Q", *lengths, *wheres
        )
        parts: list[Any] = [head, _ZEROS[: _pad(len(head))], stream]
        pos = len(head) + _pad(len(head)) + len(stream)
        for part in inband:
            size = part.nbytes if isinstance(part, memoryview) else len(part)
            parts.append(_ZEROS[: _pad(pos)])
            pos += _pad(pos)
            parts.append(part)
            pos += size
        return parts

    def sent(self, position: int) -> None:
        """The message is sent: its slabs' readers are past it once at ``position``."""
        for k in self._open:
            self._after[k] = position
        self._open.clear()

    def abandon(self) -> None:
        """The message was not sent: its slabs are free again."""
        for k in self._open:
            for i in range(self._g.n_readers):
                self._a.store32(self._g.mark(k, i), 0)
            self._after[k] = None
        self._open.clear()

    def _slab_for(self) -> int | None:
        """A free slab; or, while some slab waits only for readers to read the message that
        holds it (marks pending, no lease), wait for it (backpressure, as for ring slots) until
        the put's deadline; None (the buffer goes in the ring) when every slab is leased.

        The wait is the writer's sleep of docs/protocol.md P4, on ``space_futex``: a reader
        clears its mark before it releases the message's slots (P2), then looks at
        ``writer_sleeping``, so it wakes the writer; the writer announces, loads the futex word,
        then looks at the marks.  A lease dropped meanwhile wakes nobody: the sleep lasts at
        most ``_NAP`` and the writer looks again.
        """
        k = self._free()
        if k is not None or not self._pending_only:
            return k
        if self.flush is not None:
            self.flush()
        a, ring = self._qa, self._ring
        self.waits += 1
        while True:
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                return None
            nap = _NAP if self.deadline is None else min(_NAP, self.deadline - now)
            a.exchange32(ring.writer + L.SLEEPING, 1)  # announce (a full fence) ...
            try:
                seen = a.load32(ring.space_futex)
                k = self._free()  # ... look again ...
                if k is not None or not self._pending_only:
                    return k
                a.wait32(ring.space_futex, seen, nap)  # ... and sleep only if still none
            finally:
                a.store32(ring.writer + L.SLEEPING, 0)

    def _free(self) -> int | None:
        """A free slab (most recently used first), reclaiming what can be; None if none
        (then ``_pending_only`` says whether some slab waits only for readers to read).

        Two passes: the first clears only marks its loads alone show resolved (a reader past
        the message, or gone from its line); only if that frees nothing does the second also
        ask whether holders are alive (a look at ``/proc`` per mark: tens of microseconds)."""
        for dead_too in (False, True):
            self._pending_only = False
            for k in self._order:
                if k in self._open:
                    continue
                if self._after[k] is None or self._reclaim(k, dead_too):
                    self._after[k] = None
                    self._order.remove(k)
                    self._order.insert(0, k)
                    return k
        return None

    def _reclaim(self, k: int, dead_too: bool) -> bool:
        """True if every mark of slab ``k`` is clear, after clearing those nobody will clear
        (with ``dead_too``, also those of processes that are gone)."""
        a, g, after = self._a, self._g, self._after[k]
        free, leased = True, False
        for i in range(g.n_readers):
            off = g.mark(k, i)
            mark = a.load32(off)  # acquire: the reader's loads of the slab came before
            if mark == 0:
                continue
            if mark == PENDING:
                if after and self._passed(i, after, dead_too):
                    a.cas32(off, PENDING, 0)
                    continue
            elif dead_too and not is_alive(mark, 0):
                a.cas32(off, mark, 0)  # a holder that is gone
                continue
            else:
                leased = True
            free = False
        if not free and not leased and after:
            self._pending_only = True
        return free

    def _passed(self, i: int, after: int, dead_too: bool) -> bool:
        """Reader ``i`` will never resolve a mark of a message that ends before ``after``: it
        is past it, or its line is left (or, ``dead_too``, held by a dead process)."""
        line = self._ring.reader_line(i)
        if self._qa.load64(line + L.SEQ) >= after:
            return True
        p = read_participant(self._qa, line, f"reader {i}")
        if p.state in (L.DETACHED, L.DROPPED):
            return True
        return dead_too and p.state == L.ATTACHED and not p.alive()


class RegionReader:
    """A reader's side: resolve the references of a region frame, as copies or leases."""

    def __init__(self, seg: Segment, nonce: int, n_readers: int, index: int) -> None:
        self._seg = seg
        self._a = seg.atomics
        self._g = _read_geometry(seg, nonce, n_readers)
        self._i = index
        populate(seg, write=False)

    def loads(self, data: memoryview, copy: bool, share: bool) -> Any:
        """Decode a region frame.  ``copy``: in-ring buffers are copied (else views of
        ``data``); ``share``: slab buffers become read-only leases (else copies, and the slab
        is handed back at once).  SerializationError for a malformed frame, SegmentError for a
        reference the region does not back."""
        size = len(data)
        if size < _HEAD.size:
            raise SerializationError(f"message of {size} bytes is too short for a frame")
        n, marker, stream_len = _HEAD.unpack_from(data, 0)
        if marker != REGION_FRAME:
            raise SerializationError("not a shared-buffer frame")
        end = _HEAD.size + 16 * n
        if end > size:
            raise SerializationError("corrupted frame: buffer table runs past the message")
        table = struct.unpack_from(f"<{2 * n}Q", data, _HEAD.size)
        lengths, wheres = table[:n], table[n:]
        pos = end + _pad(end)
        if pos + stream_len > size:
            raise SerializationError("corrupted frame: stream runs past the message")
        stream = data[pos : pos + stream_len]
        pos += stream_len
        buffers: list[Any] = []
        for length, where in zip(lengths, wheres, strict=True):
            pos += _pad(pos)
            inline = _REF.size if where else length
            if pos + inline > size:
                raise SerializationError("corrupted frame: a buffer runs past the message")
            piece = data[pos : pos + inline]
            pos += inline
            if not where:
                buffers.append(bytearray(piece) if copy else piece)
                continue
            buffers.append(self._slab(where - 1, piece, length, share))
        return pickle.loads(stream, buffers=buffers)

    def _slab(self, k: int, ref: memoryview, length: int, share: bool) -> Any:
        g, a = self._g, self._a
        tag, ref_len = _REF.unpack(ref)
        if k >= g.n_slabs:
            raise SegmentError(f"corrupted message: slab {k} of {g.n_slabs}")
        row = g.row(k)
        have_tag, have_len = _REF.unpack_from(self._seg.buf, row)
        if ref_len != length or have_len != length or have_tag != tag or length > g.slab_size:
            raise SegmentError(f"corrupted message: slab {k} does not hold the buffer named")
        mark = g.mark(k, self._i)
        off = g.slab(k)
        if share:
            pid = os.getpid()
            if not a.cas32(mark, PENDING, pid):
                raise SegmentError(f"corrupted shared region: slab {k} is not pending for us")
            return Lease(self._seg._mmap, off, length, mark, pid)
        if a.load32(mark) != PENDING:
            raise SegmentError(f"corrupted shared region: slab {k} is not pending for us")
        copied = bytearray(self._seg.buf[off : off + length])
        a.store32(mark, 0)  # release: the copy's loads before the writer's reuse
        return copied


class RegionSerializer:
    """The serializer of a queue with a shared region: pickle protocol 5, large buffers in
    slabs.  The writer's encodes (``dumps``), a reader's decodes (``loads``; with ``share``
    set, as :meth:`~shmcast.BroadcastQueue.get_shared` does, slab buffers become leases)."""

    trusted_parts = True

    def __init__(self, writer: RegionWriter | None = None, reader: RegionReader | None = None):
        self.writer = writer
        self.reader = reader
        self.share = False

    def __repr__(self) -> str:
        return "RegionSerializer()"

    def dumps(self, obj: Any) -> list[Any]:
        if self.writer is None:
            raise SerializationError("only the writer encodes")
        return self.writer.encode(obj)

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        if self.reader is None:
            raise SerializationError("only a reader decodes")
        return self.reader.loads(data, copy, self.share)
