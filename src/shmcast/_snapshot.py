"""A passive, checked snapshot of one queue's segment: :class:`QueueState` from an open
descriptor (:func:`read_snapshot`, :func:`inspect_open_segment`).

The segment is read with ``pread`` and never mapped, so a segment that another process
truncates or removes while it is read gives a short read, reported as such, and never a
SIGBUS; no participant line is claimed and no word is written, so a snapshot cannot disturb
the queue.  Nothing read is trusted: the header is validated and classified
(:class:`Unusable`, a SegmentError with a ``status``: not a shmcast queue, another layout
version, corrupted, unreadable, missing), and values from a corrupted segment are shown as
they are (a pid that cannot be a process is not alive).

Consistency: a live queue changes while it is read; the values of different words come from
slightly different instants.  The control region is read twice, and each ring's readers are
taken from the first read and its writer from the second, so that a lag (``write_seq -
read_seq``) is never negative for a queue that is not corrupted.

Who uses it: the tools' ``inspect``, ``ls`` and ``cleanup`` (shmcast._tools.inspection, which
also finds segments by name), and an endpoint that wants a look at its own queue (the vLLM
drop-in's ring flags).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

from . import _layout as L
from ._errors import SegmentError
from ._liveness import is_alive
from ._region import MAGIC as REGION_MAGIC

#: What a segment is (the ``status`` of :class:`Unusable`, and of the tools' SegmentInfo).
STATUS_OK = "ok"  #: a valid shmcast queue of this layout version
STATUS_NOT_SHMCAST = "not-shmcast"  #: empty, too small, no magic, or not a regular file
STATUS_OTHER_VERSION = "other-version"  #: a shmcast segment of another layout version
STATUS_CORRUPT = "corrupt"  #: shmcast magic and version, but an inconsistent header
STATUS_UNREADABLE = "unreadable"  #: cannot be opened or mapped (permissions, ...)
#: A name of shmcast's own form that is empty or holds no header yet, and that no process
#: holds open: its creator died inside the constructor before it wrote the header (a creator
#: holds its descriptor from shm_open on, so one that is still creating it would be seen).
STATUS_ABANDONED = "abandoned"
STATUS_MISSING = "missing"  # the name does not exist (never listed: only raised)


_STATUS_PHRASES = {
    STATUS_NOT_SHMCAST: "not a shmcast queue",
    STATUS_OTHER_VERSION: "of another shmcast layout version (all processes must run the same "
    "shmcast version)",
    STATUS_CORRUPT: "corrupted",
    STATUS_UNREADABLE: "unreadable",
    STATUS_ABANDONED: "abandoned by its creator",
}


class Unusable(SegmentError):
    """A segment that cannot be inspected: ``status`` (a STATUS_* value) and a short
    ``reason``; the message names the segment and says both."""

    def __init__(self, status: str, name: str, reason: str, *, blank: bool = False) -> None:
        if status == STATUS_MISSING:
            message = (
                f"no shared-memory segment named {name!r} (no process holds such a queue and "
                "no such name is in /dev/shm: the queue was closed, or every process using it "
                "has ended)"
            )
        else:
            message = f"segment {name!r} is {_STATUS_PHRASES[status]}: {reason}"
        super().__init__(message)
        self.status = status
        self.reason = reason
        #: Empty, or zeros where the header goes: what a creator leaves before the header.
        self.blank = blank


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterState:
    """The writer of one ring, as read from its participant line."""

    index: int  #: broadcast: 0 (the one writer); gather: the writer's index
    state: str  #: "expected", "attached", "detached" (closed), "dropped", or "unknown(N)"
    pid: int  #: 0 if no process ever attached at this index
    alive: bool  #: the process recorded in the line still runs (pid and start time match)
    seq: int  #: slots published (docs/protocol.md P1); counts padding slots too
    sleeping: bool  #: asleep on the futex, waiting for readers to free space (P4)
    messages: int  #: messages published


@dataclass(frozen=True)
class ReaderState:
    """One reader of one ring, as read from its participant line."""

    index: int  #: broadcast: the reader's index; gather: 0 (the queue's one reader)
    state: str  #: "expected", "attached", "detached", "dropped", or "unknown(N)"
    gating: bool  #: the writer waits for this reader (state expected or attached; I1)
    pid: int  #: 0 if the index was never attached, or was detached cleanly
    alive: bool  #: the process recorded in the line still runs (pid and start time match)
    seq: int  #: slots consumed (P2)
    lag: int  #: the writer's published sequence minus ``seq``: slots not consumed yet
    sleeping: bool  #: asleep waiting for data on this ring (P3: on the futex, or on its socket)
    messages: int  #: messages consumed


@dataclass(frozen=True)
class RingState:
    """One ring: a broadcast queue has one (one writer, n readers); a gather queue has one per
    writer (each with the queue's one reader)."""

    index: int
    writer: WriterState
    readers: tuple[ReaderState, ...]


@dataclass(frozen=True)
class QueueState:
    """A snapshot of one queue (:func:`read_snapshot`; the tools' ``inspect_queue``)."""

    name: str
    kind: str  #: "broadcast" or "gather"
    version: int  #: layout version
    n_peers: int  #: readers (broadcast) or writers (gather)
    n_slots: int  #: slots per ring
    slot_size: int  #: bytes per slot
    capacity: int  #: n_slots * slot_size: the largest message that travels contiguously
    size: int  #: bytes of the whole segment
    creator_pid: int  #: the writer (broadcast) or the reader (gather)
    creator_alive: bool
    created_ns: int  #: wall clock at creation, nanoseconds since the epoch
    sleepers: int  #: readers asleep on the data futex right now (queue-wide word)
    rings: tuple[RingState, ...]

    @property
    def live_pids(self) -> tuple[int, ...]:
        """The distinct live processes recorded in the segment (the creator included)."""
        pids = {self.creator_pid} if self.creator_alive else set()
        for ring in self.rings:
            for p in (ring.writer, *ring.readers):
                if p.pid and p.alive:
                    pids.add(p.pid)
        return tuple(sorted(pids))

    @property
    def orphan(self) -> bool:
        """True when no process recorded in the segment is alive: nobody will remove it."""
        return not self.live_pids

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict: every field, plus ``live_pids`` and ``orphan``."""
        data = dataclasses.asdict(self)
        data["created"] = format_time(self.created_ns)
        data["live_pids"] = list(self.live_pids)
        data["orphan"] = self.orphan
        return data


# -- reading a segment --------------------------------------------------------------------------


class _Snapshot:
    """The bytes of a segment's control region, read with pread, as native-order words."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self._data, off)[0]

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self._data, off)[0]


def _pread(fd: int, size: int, name: str) -> bytes:
    """``size`` bytes from offset 0; Unusable if the file is shorter now (truncated)."""
    try:
        data = os.pread(fd, size, 0)
    except OSError as exc:
        raise Unusable(STATUS_UNREADABLE, name, f"cannot read: {exc.strerror}") from None
    if len(data) < size:
        raise Unusable(STATUS_CORRUPT, name, f"truncated while being read ({len(data)} bytes)")
    return data


def read_header(data: bytes, size: int, name: str) -> L.Header:
    """Validate the header, classifying what is wrong (raises Unusable).  ``data`` holds at
    least the header's bytes when the file (of ``size`` bytes) has that many."""
    if size < L.HEADER.size or len(data) < L.HEADER.size:
        raise Unusable(STATUS_NOT_SHMCAST, name, f"too small ({size} bytes)")
    magic, version = data[0:8], L.HEADER.unpack_from(data, 0)[1]
    if magic != L.MAGIC:
        blank = magic == bytes(8)
        if blank:
            why = "no header (still being created?)"
        elif magic == REGION_MAGIC:
            why = "the shared region of a queue (SharedBuffers)"
        else:
            why = f"bad magic {magic!r}"
        raise Unusable(STATUS_NOT_SHMCAST, name, why, blank=blank)
    if version != L.LAYOUT_VERSION:
        raise Unusable(
            STATUS_OTHER_VERSION,
            name,
            f"layout version {version} (this shmcast reads version {L.LAYOUT_VERSION})",
        )
    try:
        return L.Header.read(data, name, size)
    except SegmentError as exc:
        reason = str(exc).removeprefix(f"segment {name!r} ").removeprefix("has a ")
        raise Unusable(STATUS_CORRUPT, name, reason) from None


def _state_name(state: int) -> str:
    return L.STATE_NAMES.get(state, f"unknown({state})")


class _Liveness:
    """is_alive() memoized for one snapshot (a process is looked up once)."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int], bool] = {}

    def __call__(self, pid: int, start: int) -> bool:
        if pid == 0:
            return False
        key = (pid, start)
        if key not in self._known:
            self._known[key] = is_alive(pid, start)
        return self._known[key]


def _read_ring(
    first: _Snapshot, second: _Snapshot, g: L.Geometry, r: int, alive: _Liveness
) -> tuple[RingState, list[int]]:
    """One ring's state, its readers from the ``first`` read and its writer from the
    ``second``; also returns the raw reader ``sleeping`` flags."""
    ring = g.ring(r)
    # Readers first, the writer last: write_seq only grows and read_seq never passes it, so a
    # lag computed from these reads is never negative.
    words = first
    raw_readers = []
    for i in range(ring.n_readers):
        line = ring.reader_line(i)
        raw_readers.append(
            (
                words.u64(line + L.SEQ),
                words.u32(line + L.SLEEPING),
                words.u32(line + L.STATE),
                words.u64(line + L.PID),
                words.u64(line + L.START),
                words.u64(line + L.MSGS),
            )
        )
    w, words = ring.writer, second
    w_pid, w_start = words.u64(w + L.PID), words.u64(w + L.START)
    writer = WriterState(
        index=0 if g.kind == L.KIND_BROADCAST else r,
        state=_state_name(words.u32(w + L.STATE)),
        pid=w_pid,
        alive=alive(w_pid, w_start),
        seq=words.u64(w + L.SEQ),
        sleeping=bool(words.u32(w + L.SLEEPING)),
        messages=words.u64(w + L.MSGS),
    )
    readers = []
    for i, (seq, sleeping, state, pid, start, msgs) in enumerate(raw_readers):
        readers.append(
            ReaderState(
                index=i,
                state=_state_name(state),
                gating=bool(state & L.GATING),
                pid=pid,
                alive=alive(pid, start),
                seq=seq,
                lag=writer.seq - seq,
                sleeping=bool(sleeping),
                messages=msgs,
            )
        )
    return RingState(r, writer, tuple(readers)), [s for _, s, *_ in raw_readers]


def read_snapshot(fd: int, size: int, name: str) -> tuple[QueueState, int]:
    """Read an open segment; return its state and its nonce."""
    head = _pread(fd, min(size, L.HEADER.size), name)
    header = read_header(head, size, name)
    g = header.geometry
    first = _Snapshot(_pread(fd, g.desc_off, name))
    second = _Snapshot(_pread(fd, g.desc_off, name))
    alive = _Liveness()
    sleepers = second.u32(L.SLEEPERS_OFF)
    rings, flags = [], []
    for r in range(g.n_rings):
        ring, ring_flags = _read_ring(first, second, g, r, alive)
        rings.append(ring)
        flags.append(any(ring_flags))
    if g.kind == L.KIND_GATHER and sleepers and not any(flags):
        # The gather reader waiting for *any* writer counts itself in `sleepers` only (it sets
        # no ring's flag): it waits for data on every ring.
        rings = [
            dataclasses.replace(
                ring, readers=tuple(dataclasses.replace(rd, sleeping=True) for rd in ring.readers)
            )
            for ring in rings
        ]
    state = QueueState(
        name=name,
        kind=L.KIND_NAMES[g.kind],
        version=header.version,
        n_peers=g.n_peers,
        n_slots=g.n_slots,
        slot_size=g.slot_size,
        capacity=g.capacity,
        size=size,
        creator_pid=header.creator_pid,
        creator_alive=alive(header.creator_pid, header.creator_start),
        created_ns=header.created_ns,
        sleepers=sleepers,
        rings=tuple(rings),
    )
    return state, header.nonce


def inspect_open_segment(fd: int, name: str) -> QueueState:
    """Read the queue of a segment the caller holds open (``fd``, named ``name`` in messages),
    as the tools' ``inspect_queue`` does by name, without looking for it: for an endpoint that
    wants a look at its own queue.  Raises :class:`Unusable` (a SegmentError) when it cannot
    be read or is not a queue of this layout version."""
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise Unusable(STATUS_MISSING, name, f"cannot read it: {exc}") from None
    return read_snapshot(fd, size, name)[0]


def format_time(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))
    except (OverflowError, OSError, ValueError):
        return f"? ({ns} ns)"


__all__ = [
    "STATUS_ABANDONED",
    "STATUS_CORRUPT",
    "STATUS_MISSING",
    "STATUS_NOT_SHMCAST",
    "STATUS_OK",
    "STATUS_OTHER_VERSION",
    "STATUS_UNREADABLE",
    "QueueState",
    "ReaderState",
    "RingState",
    "Unusable",
    "WriterState",
    "format_time",
    "inspect_open_segment",
    "read_header",
    "read_snapshot",
]
