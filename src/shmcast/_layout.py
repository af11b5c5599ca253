"""The byte layout of a broadcast segment: the one place that defines where every word lives.

A segment is one POSIX shared-memory object, laid out as::

    offset                      size                    contents
    0                           128                     header (below), written once by the creator
    128                         128                     writer line
    256                         128                     sleepers          (u32 at +0)
    384                         128                     data_futex        (u32 at +0)
    512                         128                     space_futex       (u32 at +0)
    640                         128                     attach_futex      (u32 at +0)
    768                         128 * n_readers         reader lines, one per reader index
    desc_off (128-aligned)      32 * n_slots            slot descriptors
    data_off (4096-aligned)     slot_size * n_slots     slot data, adjacent

Header (all little-endian, native alignment)::

    +0   8s   magic            b"SHMCAST\\0"
    +8   u32  version          LAYOUT_VERSION
    +12  u32  kind             KIND_BROADCAST
    +16  u64  nonce            random; ties a handle to this very segment
    +24  u64  total_size       bytes mapped
    +32  u32  n_readers
    +36  u32  n_slots
    +40  u64  slot_size        a multiple of 64
    +48  u64  creator_pid
    +56  u64  creator_start    process start time (clock ticks since boot)
    +64  u64  created_ns       wall clock at creation
    +72  u64  desc_off
    +80  u64  data_off

Writer line::

    +0   u64  write_seq        slots published (docs/protocol.md P1)
    +8   u32  writer_sleeping  1 while the writer sleeps for space (P4)
    +12  u32  writer_state     WRITER_OPEN or WRITER_CLOSED (P6)
    +16  u64  pid
    +24  u64  start_time
    +32  u64  msg_count        messages published (statistics)

Reader line (reader *i* at ``READERS_OFF + 128 * i``)::

    +0   u64  read_seq         slots consumed (P2)
    +8   u32  state            a READER_* bit
    +12  u32  sleeping         1 while this reader sleeps (informational, for inspection)
    +16  u64  pid
    +24  u64  start_time
    +32  u64  msg_count        messages consumed (statistics)

Each 128-byte line is written by one party only on the fast path (two 64-byte lines, so that the
adjacent-line prefetcher does not couple neighbours).  Sequences are 64-bit and never wrap.

Slot descriptor (slot *j* at ``desc_off + 32 * j``)::

    +0   u64  total            message length (FIRST), or slots in the run (PAD)
    +8   u32  nbytes           payload bytes in this slot
    +12  u32  flags            FLAG_* bits
    +16  u64  msg_no           message number, the same in every slot of a message
    +24  u64  reserved
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._errors import SegmentError

MAGIC = b"SHMCAST\x00"
LAYOUT_VERSION = 1
KIND_BROADCAST = 1

LINE = 128
PAGE = 4096
SLOT_ALIGN = 64
DESC_SIZE = 32

HEADER = struct.Struct("<8sIIQQIIQQQQQQ")
assert HEADER.size == 88

# Fixed lines.
WRITER_OFF = 1 * LINE
SLEEPERS_OFF = 2 * LINE
DATA_FUTEX_OFF = 3 * LINE
SPACE_FUTEX_OFF = 4 * LINE
ATTACH_FUTEX_OFF = 5 * LINE
READERS_OFF = 6 * LINE

# Writer line fields (absolute).
WRITE_SEQ = WRITER_OFF + 0
WRITER_SLEEPING = WRITER_OFF + 8
WRITER_STATE = WRITER_OFF + 12
WRITER_PID = WRITER_OFF + 16
WRITER_START = WRITER_OFF + 24
WRITER_MSGS = WRITER_OFF + 32

# Reader line fields (relative to the reader's line).
R_SEQ = 0
R_STATE = 8
R_SLEEPING = 12
R_PID = 16
R_START = 24
R_MSGS = 32

WRITER_INIT = 0
WRITER_OPEN = 1
WRITER_CLOSED = 2

READER_EXPECTED = 1  # not attached yet; the writer waits for it (gating)
READER_ATTACHED = 2  # attached (gating)
READER_DETACHED = 4  # left cleanly; its index may be taken again
READER_DROPPED = 8  # found dead and dropped by the writer
READER_GATING = READER_EXPECTED | READER_ATTACHED
READER_STATE_NAMES = {
    READER_EXPECTED: "expected",
    READER_ATTACHED: "attached",
    READER_DETACHED: "detached",
    READER_DROPPED: "dropped",
}

# Descriptor flags.
FLAG_FIRST = 1 << 0  # first slot of a message
FLAG_CONT = 1 << 1  # continuation slot of a streamed message
FLAG_PAD = 1 << 2  # padding run up to the end of the ring; skip `total` slots
FLAG_CONTIG = 1 << 3  # the whole message is in consecutive slots, published at once
KIND_SHIFT = 8
KIND_MASK = 0xFF << KIND_SHIFT
MSG_RAW = 1  # bytes from put_bytes / reserve
MSG_OBJECT = 2  # an object encoded by the queue's serializer

DESC = struct.Struct("<QIIQQ")
assert DESC.size == DESC_SIZE

MAX_READERS = 1024
MAX_SLOTS = 1 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """The sizes and offsets of one segment, derived from its three parameters."""

    n_readers: int
    n_slots: int
    slot_size: int

    @property
    def desc_off(self) -> int:
        return _round_up(READERS_OFF + LINE * self.n_readers, LINE)

    @property
    def data_off(self) -> int:
        return _round_up(self.desc_off + DESC_SIZE * self.n_slots, PAGE)

    @property
    def total_size(self) -> int:
        return _round_up(self.data_off + self.slot_size * self.n_slots, PAGE)

    @property
    def capacity(self) -> int:
        """The largest message that travels contiguously (and can be viewed in place)."""
        return self.slot_size * self.n_slots

    def reader_off(self, index: int) -> int:
        return READERS_OFF + LINE * index

    def desc_at(self, slot_index: int) -> int:
        return self.desc_off + DESC_SIZE * slot_index

    def data_at(self, slot_index: int) -> int:
        return self.data_off + self.slot_size * slot_index

    @classmethod
    def checked(cls, n_readers: int, n_slots: int, slot_size: int) -> Geometry:
        """Validate user-supplied parameters; raise ValueError with the reason."""
        for label, value in (
            ("n_readers", n_readers),
            ("n_slots", n_slots),
            ("slot_size", slot_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be an int, not {type(value).__name__}")
        if not 1 <= n_readers <= MAX_READERS:
            raise ValueError(f"n_readers must be between 1 and {MAX_READERS}, got {n_readers}")
        if not 2 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots must be between 2 and {MAX_SLOTS}, got {n_slots}")
        if slot_size < SLOT_ALIGN or slot_size % SLOT_ALIGN or slot_size > 1 << 31:
            raise ValueError(
                f"slot_size must be a multiple of {SLOT_ALIGN} between {SLOT_ALIGN} and 2 GiB, "
                f"got {slot_size}"
            )
        return cls(n_readers, n_slots, slot_size)


@dataclass(frozen=True)
class Header:
    """The creator's header, as read back from a segment."""

    version: int
    kind: int
    nonce: int
    total_size: int
    geometry: Geometry
    creator_pid: int
    creator_start: int
    created_ns: int

    def pack_into(self, buf: memoryview) -> None:
        """Write everything but the magic (the creator writes the magic last)."""
        g = self.geometry
        HEADER.pack_into(
            buf,
            0,
            b"\0" * 8,
            self.version,
            self.kind,
            self.nonce,
            self.total_size,
            g.n_readers,
            g.n_slots,
            g.slot_size,
            self.creator_pid,
            self.creator_start,
            self.created_ns,
            g.desc_off,
            g.data_off,
        )

    @classmethod
    def read(cls, buf: memoryview, name: str) -> Header:
        """Parse and validate a header; SegmentError says what is wrong with it."""
        if len(buf) < HEADER.size:
            raise SegmentError(
                f"segment {name!r} is too small ({len(buf)} bytes) to be a shmcast queue"
            )
        (
            magic,
            version,
            kind,
            nonce,
            total,
            n_readers,
            n_slots,
            slot_size,
            pid,
            start,
            created,
            desc_off,
            data_off,
        ) = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise SegmentError(f"segment {name!r} is not a shmcast queue (bad magic {magic!r})")
        if version != LAYOUT_VERSION:
            raise SegmentError(
                f"segment {name!r} has layout version {version}; this shmcast reads version "
                f"{LAYOUT_VERSION} (writer and readers must run the same shmcast version)"
            )
        if kind != KIND_BROADCAST:
            raise SegmentError(f"segment {name!r} holds a queue of another kind ({kind})")
        try:
            geometry = Geometry.checked(n_readers, n_slots, slot_size)
        except ValueError as exc:
            raise SegmentError(f"segment {name!r} has a corrupted header: {exc}") from None
        if (geometry.desc_off, geometry.data_off, geometry.total_size) != (
            desc_off,
            data_off,
            total,
        ):
            raise SegmentError(f"segment {name!r} has a corrupted header (inconsistent offsets)")
        if total > len(buf):
            raise SegmentError(
                f"segment {name!r} is truncated: header says {total} bytes, mapped {len(buf)}"
            )
        return cls(version, kind, nonce, total, geometry, pid, start, created)
