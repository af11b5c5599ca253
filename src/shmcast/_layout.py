"""The byte layout of a shmcast segment: the one place that defines where every word lives.

A segment is one POSIX shared-memory object holding one or more *rings*.  A broadcast queue has
one ring (one writer, ``n_peers`` readers); a gather queue has one ring per writer (``n_peers``
writers, each with the one reader).  Layout::

    offset            size                    contents
    0                 128                     header (below), written once by the creator
    128               128                     broadcast: the writer's line      (gather: unused)
    256               128                     sleepers      (u32 at +0): readers asleep on data
                                              announced     (u64 at +8): sleeps announced, ever
                                              sock_sleepers (u32 at +16): readers asleep on a
                                              socket (P3, an event loop's reader)
    384               128                     data_futex    (u32 at +0): readers sleep here
    512               128                     broadcast: space_futex (u32)      (gather: unused)
    640               128                     attach_futex  (u32 at +0): attach/detach events
    768               128                     spinners      (u32 at +0): processes spinning eagerly
                                              spinning      (u32 at +4): processes spinning now
    896               ...                     broadcast: one reader line per reader
                                              gather: per writer j, three lines: its writer
                                              line, the reader's line for ring j, and ring j's
                                              space_futex
    desc_off          64 * n_slots * rings    slot descriptors, ring after ring (128-aligned)
    data_off          ring_bytes * rings      slot data (4096-aligned; each ring page-aligned)

Header (little-endian)::

    +0   8s   magic            b"SHMCAST\\0"
    +8   u32  version          LAYOUT_VERSION
    +12  u32  kind             KIND_BROADCAST or KIND_GATHER
    +16  u64  nonce            random; ties a handle to this very segment
    +24  u64  total_size       bytes mapped
    +32  u32  n_peers          readers (broadcast) or writers (gather)
    +36  u32  n_slots          slots per ring
    +40  u64  slot_size        bytes per slot, a multiple of 64
    +48  u64  creator_pid
    +56  u64  creator_start    process start time (clock ticks since boot)
    +64  u64  created_ns       wall clock at creation
    +72  u64  desc_off
    +80  u64  data_off
    +88  u32  options          OPT_* bits: how the creator set the queue up
    +92  u32  reserved         zero

Participant line (the same shape for writers and readers)::

    +0   u64  seq              writer: slots published (docs/protocol.md P1)
                               reader: slots consumed (P2)
    +8   u32  sleeping         writer: 1 while it sleeps for space (P4, read by readers)
                               reader: 1 while it sleeps for data on the futex
                               (informational), SLEEP_SOCKET while it sleeps on its
                               socket (read by the writer's wake, P3)
    +12  u32  state            EXPECTED, ATTACHED, DETACHED or DROPPED
    +16  u64  pid
    +24  u64  start_time
    +32  u64  msg_count        messages published / consumed (statistics)

Each 128-byte line (two 64-byte lines, so that the adjacent-line prefetcher does not couple
neighbours) is written on the fast path by one process only.  Sequences are 64-bit and never wrap.

Slot descriptor (slot *j* of a ring at ``desc_off + 64 * j``: one cache line each, so that
the writer filling one slot's descriptor never shares a line with a reader of the previous)::

    +0   u64  total            message length (FIRST, CONT), or slots in the run (PAD)
    +8   u32  check            a hash of the other fields keyed by the nonce
    +12  u32  flags            FLAG_* bits, and the message kind in bits 8..15
    +16  u64  msg_no           message number, the same in every slot of a message
    +24  u64  seq              the sequence of the slot it describes (not its index)
    +32  u32  crc              with OPT_CHECKSUM: CRC-32C of the payload it describes; else 0
    +36  28   unused           zero

A slot carries ``min(slot_size, bytes left)`` of its message: all of it for a contiguous message
(the first slot's descriptor covers the run), ``slot_size`` for every slot of a streamed message
but its last.  ``seq`` and ``check`` let a reader refuse a descriptor left from an earlier lap,
moved there by a stray process or copied from another queue, ``crc`` a payload another process
wrote into (docs/protocol.md, "Trust").  ``crc`` covers the whole message for a contiguous one,
the slot's own bytes for each slot of a streamed one.
Only the first slot of a contiguous message or of a padding run has a descriptor of its own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._errors import SegmentError

MAGIC = b"SHMCAST\x00"
LAYOUT_VERSION = 4
KIND_BROADCAST = 1
KIND_GATHER = 2
KIND_NAMES = {KIND_BROADCAST: "broadcast", KIND_GATHER: "gather"}

LINE = 128
PAGE = 4096
SLOT_ALIGN = 64
DESC_SIZE = 64

HEADER = struct.Struct("<8sIIQQIIQQQQQQII")
OPT_CHECKSUM = 1 << 0  #: payloads carry a CRC-32C, which readers check
OPTIONS = OPT_CHECKSUM  #: every option this version knows

# Fixed lines.
BCAST_WRITER_OFF = 1 * LINE
SLEEPERS_OFF = 2 * LINE
ANNOUNCED_OFF = SLEEPERS_OFF + 8  # counts up by one for every sleep a reader announces (P3)
SOCK_SLEEPERS_OFF = SLEEPERS_OFF + 16  # readers asleep on their socket now (P3)
DATA_FUTEX_OFF = 3 * LINE
BCAST_SPACE_FUTEX_OFF = 4 * LINE
ATTACH_FUTEX_OFF = 5 * LINE
SPINNERS_OFF = 6 * LINE
SPINNING_OFF = SPINNERS_OFF + 4  # every process spinning now, eager or polite (a hint)
PEERS_OFF = 7 * LINE
GATHER_BLOCK = 3 * LINE  # per writer: writer line, reader line, space futex

# Participant line fields (relative to the line).
SEQ = 0
SLEEPING = 8
STATE = 12
PID = 16
START = 24
MSGS = 32

#: A reader's ``sleeping`` word while it sleeps on its socket (P3): wakes send it a datagram.
SLEEP_SOCKET = 2

# Participant states (bits, so that a mask selects several).
EXPECTED = 1  # not attached yet; a writer waits for such a reader (gating)
ATTACHED = 2
DETACHED = 4  # left cleanly (a writer: closed); the index may be taken again
DROPPED = 8  # found dead and dropped by its peer
GATING = EXPECTED | ATTACHED
STATES = EXPECTED | ATTACHED | DETACHED | DROPPED  #: a state word holds exactly one of these
STATE_NAMES = {EXPECTED: "expected", ATTACHED: "attached", DETACHED: "detached", DROPPED: "dropped"}

# Descriptor flags.
FLAG_FIRST = 1 << 0  # first slot of a message
FLAG_CONT = 1 << 1  # continuation slot of a streamed message
FLAG_PAD = 1 << 2  # padding run up to the end of the ring; skip `total` slots
FLAG_CONTIG = 1 << 3  # the whole message is in consecutive slots, published at once
KIND_SHIFT = 8
KIND_MASK = 0xFF << KIND_SHIFT
MSG_RAW = 1  # bytes from put_bytes / reserve
MSG_OBJECT = 2  # an object encoded by the queue's serializer


MAX_PEERS = 1024
MAX_SLOTS = 1 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class RingLayout:
    """Where the words of one ring live: absolute offsets into the segment."""

    writer: int  #: the writer's participant line
    readers: int  #: the first reader's participant line
    n_readers: int
    sleepers: int  #: u32 count of readers asleep on data_futex
    data_futex: int
    space_futex: int
    desc_off: int
    data_off: int
    n_slots: int
    slot_size: int

    @property
    def announced(self) -> int:
        """u64 count of the sleeps readers announced on data_futex (queue-wide, as sleepers)."""
        return ANNOUNCED_OFF

    def reader_line(self, index: int) -> int:
        return self.readers + LINE * index

    def desc_at(self, slot_index: int) -> int:
        return self.desc_off + DESC_SIZE * slot_index

    def data_at(self, slot_index: int) -> int:
        return self.data_off + self.slot_size * slot_index


@dataclass(frozen=True)
class Geometry:
    """The sizes and offsets of one segment, derived from its kind and three parameters."""

    kind: int
    n_peers: int
    n_slots: int
    slot_size: int

    @property
    def n_rings(self) -> int:
        return 1 if self.kind == KIND_BROADCAST else self.n_peers

    @property
    def desc_off(self) -> int:
        per_peer = LINE if self.kind == KIND_BROADCAST else GATHER_BLOCK
        return _round_up(PEERS_OFF + per_peer * self.n_peers, LINE)

    @property
    def ring_bytes(self) -> int:
        return _round_up(self.slot_size * self.n_slots, PAGE)

    @property
    def data_off(self) -> int:
        return _round_up(self.desc_off + DESC_SIZE * self.n_slots * self.n_rings, PAGE)

    @property
    def total_size(self) -> int:
        return self.data_off + self.ring_bytes * self.n_rings

    @property
    def capacity(self) -> int:
        """The largest message that travels contiguously (and can be viewed in place)."""
        return self.slot_size * self.n_slots

    def ring(self, r: int = 0) -> RingLayout:
        """The layout of ring ``r`` (broadcast: the only ring; gather: writer ``r``'s)."""
        desc = self.desc_off + DESC_SIZE * self.n_slots * r
        data = self.data_off + self.ring_bytes * r
        if self.kind == KIND_BROADCAST:
            return RingLayout(
                BCAST_WRITER_OFF, PEERS_OFF, self.n_peers, SLEEPERS_OFF, DATA_FUTEX_OFF,
                BCAST_SPACE_FUTEX_OFF, desc, data, self.n_slots, self.slot_size,
            )  # fmt: skip
        block = PEERS_OFF + GATHER_BLOCK * r
        return RingLayout(
            block, block + LINE, 1, SLEEPERS_OFF, DATA_FUTEX_OFF, block + 2 * LINE,
            desc, data, self.n_slots, self.slot_size,
        )  # fmt: skip

    def peer_line(self, index: int) -> int:
        """The line of peer ``index``: a reader (broadcast) or a writer (gather)."""
        if self.kind == KIND_BROADCAST:
            return PEERS_OFF + LINE * index
        return PEERS_OFF + GATHER_BLOCK * index

    @classmethod
    def checked(cls, kind: int, n_peers: int, n_slots: int, slot_size: int) -> Geometry:
        """Validate user-supplied parameters; raise TypeError/ValueError with the reason."""
        peers = "n_readers" if kind == KIND_BROADCAST else "n_writers"
        for label, value in ((peers, n_peers), ("n_slots", n_slots), ("slot_size", slot_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be an int, not {type(value).__name__}")
        if not 1 <= n_peers <= MAX_PEERS:
            raise ValueError(f"{peers} must be between 1 and {MAX_PEERS}, got {n_peers}")
        if not 2 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots must be between 2 and {MAX_SLOTS}, got {n_slots}")
        if slot_size < SLOT_ALIGN or slot_size % SLOT_ALIGN or slot_size > 1 << 31:
            raise ValueError(
                f"slot_size must be a multiple of {SLOT_ALIGN} between {SLOT_ALIGN} and 2 GiB, "
                f"got {slot_size}"
            )
        return cls(kind, n_peers, n_slots, slot_size)


@dataclass(frozen=True)
class Header:
    """The creator's header, as read back from a segment."""

    version: int
    nonce: int
    geometry: Geometry
    creator_pid: int
    creator_start: int
    created_ns: int
    options: int = 0  #: OPT_* bits

    @property
    def checksum(self) -> bool:
        """Payloads carry a CRC-32C."""
        return bool(self.options & OPT_CHECKSUM)

    def pack_into(self, buf: memoryview) -> None:
        """Write everything but the magic (the creator writes the magic last)."""
        g = self.geometry
        HEADER.pack_into(
            buf, 0, b"\0" * 8, self.version, g.kind, self.nonce, g.total_size, g.n_peers,
            g.n_slots, g.slot_size, self.creator_pid, self.creator_start, self.created_ns,
            g.desc_off, g.data_off, self.options, 0,
        )  # fmt: skip

    @classmethod
    def read(cls, buf: memoryview | bytes, name: str, size: int | None = None) -> Header:
        """Parse and validate a header; SegmentError says what is wrong with it.  ``size`` is
        the segment's size (default: ``len(buf)``, for a mapping of all of it)."""
        size = len(buf) if size is None else size
        if len(buf) < HEADER.size:
            raise SegmentError(f"segment {name!r} is too small to be a shmcast queue")
        (magic, version, kind, nonce, total, n_peers, n_slots, slot_size, pid, start, created,
         desc_off, data_off, options, _reserved) = HEADER.unpack_from(buf, 0)  # fmt: skip
        if magic != MAGIC:
            raise SegmentError(f"segment {name!r} is not a shmcast queue (bad magic {magic!r})")
        if version != LAYOUT_VERSION:
            raise SegmentError(
                f"segment {name!r} has layout version {version}; this shmcast reads version "
                f"{LAYOUT_VERSION} (all processes must run the same shmcast version)"
            )
        if kind not in KIND_NAMES:
            raise SegmentError(f"segment {name!r} has a corrupted header (unknown kind {kind})")
        try:
            geometry = Geometry.checked(kind, n_peers, n_slots, slot_size)
        except (TypeError, ValueError) as exc:
            raise SegmentError(f"segment {name!r} has a corrupted header: {exc}") from None
        expected = (geometry.desc_off, geometry.data_off, geometry.total_size)
        if expected != (desc_off, data_off, total):
            raise SegmentError(f"segment {name!r} has a corrupted header (inconsistent offsets)")
        if total > size:
            raise SegmentError(
                f"segment {name!r} is truncated: its header says {total} bytes, found {size}"
            )
        if options & ~OPTIONS:
            raise SegmentError(f"segment {name!r} has a corrupted header (options {options:#x})")
        return cls(version, nonce, geometry, pid, start, created, options)
