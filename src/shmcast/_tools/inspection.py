"""Look inside shmcast segments without touching them: ``inspect``, ``ls`` and ``cleanup``.

Three library functions and the three subcommands of the ``shmcast`` command line built on them:

- :func:`inspect_queue` reads one queue's segment and returns a :class:`QueueState`: its
  geometry, its creator, and for every ring the writer's published sequence and each reader's
  consumed sequence, lag, state, pid, liveness and whether it sleeps;
- :func:`list_segments` describes every shmcast segment it can find (:class:`SegmentInfo`): the
  live ones, which have no name in /dev/shm (see ``_segment``) and are found through the
  descriptors their processes hold (``/proc/*/fd``, where they show as ``/dev/shm/NAME
  (deleted)``), and every ``shmcast-*`` entry still named in /dev/shm, including the ones that
  are not shmcast queues, of another layout version, or unreadable;
- :func:`cleanup` removes the names of *orphaned* segments, which is what a creator killed
  inside the queue's constructor leaves: named shmcast queues whose creator and every recorded
  participant are dead, and names of shmcast's own form that are empty or hold no header yet
  and that no process holds open (*abandoned*).  A segment with any live process, an unnamed
  one, and any other entry that is not a valid shmcast queue of this layout version, is left
  alone.

Reading is strictly passive and cannot fault: the segment is opened ``O_RDONLY`` and read with
``pread`` (never mapped), so a segment that another process truncates or removes while it is
read gives a short read, reported as such, and never a SIGBUS; no participant line is claimed
and no word is written, so inspecting a queue cannot disturb it.  Only processes of the same
user (or all, for root) can be looked at.

Consistency: a live queue changes while it is read; the values of different words come from
slightly different instants.  The control region is read twice, and each ring's readers are
taken from the first read and its writer from the second, so that a lag (``write_seq -
read_seq``) is never negative for a queue that is not corrupted.  Values read from a corrupted
segment are shown as they are, never trusted (a pid that cannot be a process is not alive).

Subcommands (for the ``shmcast`` command line; see :data:`COMMANDS`): each has an
``add_*_arguments(parser)`` that declares its options and a ``run_*(args) -> int`` that prints
and returns the exit status (0 success, 1 failure).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import _layout as L
from .._errors import SegmentError
from .._liveness import is_alive
from .._region import MAGIC as REGION_MAGIC
from .._segment import PREFIX, SHM_DIR, check_name

log = logging.getLogger("shmcast")

# SegmentInfo.status values.
STATUS_OK = "ok"  #: a valid shmcast queue of this layout version
STATUS_NOT_SHMCAST = "not-shmcast"  #: empty, too small, no magic, or not a regular file
STATUS_OTHER_VERSION = "other-version"  #: a shmcast segment of another layout version
STATUS_CORRUPT = "corrupt"  #: shmcast magic and version, but an inconsistent header
STATUS_UNREADABLE = "unreadable"  #: cannot be opened or mapped (permissions, ...)
#: A name of shmcast's own form that is empty or holds no header yet, and that no process
#: holds open: its creator died inside the constructor before it wrote the header (a creator
#: holds its descriptor from shm_open on, so one that is still creating it would be seen).
STATUS_ABANDONED = "abandoned"
_STATUS_MISSING = "missing"  # the name does not exist (never listed: only raised)


_STATUS_PHRASES = {
    STATUS_NOT_SHMCAST: "not a shmcast queue",
    STATUS_OTHER_VERSION: "of another shmcast layout version (all processes must run the same "
    "shmcast version)",
    STATUS_CORRUPT: "corrupted",
    STATUS_UNREADABLE: "unreadable",
    STATUS_ABANDONED: "abandoned by its creator",
}


class _Unusable(SegmentError):
    """A segment that cannot be inspected: ``status`` (a STATUS_* value) and a short
    ``reason``; the message names the segment and says both."""

    def __init__(self, status: str, name: str, reason: str, *, blank: bool = False) -> None:
        if status == _STATUS_MISSING:
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
    """A snapshot of one queue, from :func:`inspect_queue`."""

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
        data["created"] = _format_time(self.created_ns)
        data["live_pids"] = list(self.live_pids)
        data["orphan"] = self.orphan
        return data


@dataclass(frozen=True)
class SegmentInfo:
    """One shmcast segment, from :func:`list_segments`: a live queue (unnamed, found through
    the descriptors its processes hold) or a ``shmcast-*`` entry of /dev/shm.

    For an entry whose ``status`` is not ``"ok"``, ``detail`` says what is wrong and the queue
    fields are None; such an entry is never an orphan (cleanup leaves it alone).
    """

    name: str
    size: int  #: bytes of the file
    status: str  #: one of the STATUS_* values
    detail: str  #: why the status is not "ok" ("" when it is)
    kind: str | None = None
    version: int | None = None
    creator_pid: int | None = None
    creator_alive: bool | None = None
    participants_alive: int | None = None  #: distinct live processes, the creator included
    live_pids: tuple[int, ...] = ()
    orphan: bool = False
    created_ns: int | None = None
    where: str = "named"  #: "named" (an entry of /dev/shm) or "unnamed" (a live queue)
    holders: tuple[int, ...] = ()  #: processes that hold the segment open

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["live_pids"] = list(self.live_pids)
        data["holders"] = list(self.holders)
        data["created"] = None if self.created_ns is None else _format_time(self.created_ns)
        return data


# -- reading a segment --------------------------------------------------------------------------


def _normalize_name(name: str) -> str:
    """Accept ``shmcast-x``, ``/shmcast-x`` (shm_open's spelling) or ``/dev/shm/shmcast-x``."""
    if not isinstance(name, str):
        raise TypeError(f"a segment name must be a str, not {type(name).__name__}")
    for prefix in (SHM_DIR + "/", "/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return check_name(name, own=False)


@dataclass(frozen=True)
class _Location:
    """Where a segment can be opened: by its name in /dev/shm, or else through a descriptor
    that a live process holds (``holders``: every pid seen holding one)."""

    name: str
    named: bool
    holders: tuple[int, ...] = ()
    path: str = ""  #: the path to open: /dev/shm/NAME or /proc/PID/fd/FD

    @property
    def where(self) -> str:
        return "named" if self.named else "unnamed"


_DELETED = " (deleted)"


def _held_segments() -> dict[str, list[tuple[int, int]]]:
    """``name -> [(pid, fd), ...]`` for every shmcast segment a visible process holds open,
    named or not (read from /proc/*/fd; processes of other users are skipped)."""
    held: dict[str, list[tuple[int, int]]] = {}
    prefix = f"{SHM_DIR}/{PREFIX}"
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return held
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                name = target[len(SHM_DIR) + 1 :].removesuffix(_DELETED)
                held.setdefault(name, []).append((pid, int(fd)))
    return held


def _named_segments() -> list[str]:
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if e.startswith(PREFIX))


def _locations(only: str | None = None) -> dict[str, _Location]:
    """Every segment that can be found (or only the one called ``only``), by name."""
    named = set(_named_segments())
    held = _held_segments()
    names = (named | set(held)) if only is None else {only} & (named | set(held))
    out = {}
    for name in sorted(names):
        holders = tuple(sorted({pid for pid, _fd in held.get(name, ())}))
        if name in named:
            out[name] = _Location(name, True, holders, os.path.join(SHM_DIR, name))
        else:
            pid, fd = held[name][0]
            out[name] = _Location(name, False, holders, f"/proc/{pid}/fd/{fd}")
    return out


class _Snapshot:
    """The bytes of a segment's control region, read with pread, as native-order words."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self._data, off)[0]

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self._data, off)[0]


def _pread(fd: int, size: int, name: str) -> bytes:
    """``size`` bytes from offset 0; _Unusable if the file is shorter now (truncated)."""
    try:
        data = os.pread(fd, size, 0)
    except OSError as exc:
        raise _Unusable(STATUS_UNREADABLE, name, f"cannot read: {exc.strerror}") from None
    if len(data) < size:
        raise _Unusable(STATUS_CORRUPT, name, f"truncated while being read ({len(data)} bytes)")
    return data


@contextlib.contextmanager
def _opened_read_only(loc: _Location) -> Iterator[tuple[int, int]]:
    """Open the segment read-only; yield ``(fd, size)``.  Raises _Unusable (missing,
    unreadable, not a file, empty)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # a FIFO must not block
    if loc.named:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(loc.path, flags)
    except FileNotFoundError:
        raise _Unusable(_STATUS_MISSING, loc.name, "no such segment") from None
    except OSError as exc:
        raise _Unusable(STATUS_UNREADABLE, loc.name, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not loc.named and os.readlink(f"/proc/self/fd/{fd}").removesuffix(_DELETED) != (
            f"{SHM_DIR}/{loc.name}"
        ):
            raise _Unusable(_STATUS_MISSING, loc.name, "its last holder let it go")
        if not stat.S_ISREG(st.st_mode):
            raise _Unusable(STATUS_NOT_SHMCAST, loc.name, "not a regular file")
        if st.st_size == 0:
            raise _Unusable(STATUS_NOT_SHMCAST, loc.name, "empty (or still being created)",
                            blank=True)  # fmt: skip
        yield fd, st.st_size
    finally:
        os.close(fd)


def _read_header(data: bytes, size: int, name: str) -> L.Header:
    """Validate the header, classifying what is wrong (raises _Unusable).  ``data`` holds at
    least the header's bytes when the file (of ``size`` bytes) has that many."""
    if size < L.HEADER.size or len(data) < L.HEADER.size:
        raise _Unusable(STATUS_NOT_SHMCAST, name, f"too small ({size} bytes)")
    magic, version = data[0:8], L.HEADER.unpack_from(data, 0)[1]
    if magic != L.MAGIC:
        blank = magic == bytes(8)
        if blank:
            why = "no header (still being created?)"
        elif magic == REGION_MAGIC:
            why = "the shared region of a queue (SharedBuffers)"
        else:
            why = f"bad magic {magic!r}"
        raise _Unusable(STATUS_NOT_SHMCAST, name, why, blank=blank)
    if version != L.LAYOUT_VERSION:
        raise _Unusable(
            STATUS_OTHER_VERSION,
            name,
            f"layout version {version} (this shmcast reads version {L.LAYOUT_VERSION})",
        )
    try:
        return L.Header.read(data, name, size)
    except SegmentError as exc:
        reason = str(exc).removeprefix(f"segment {name!r} ").removeprefix("has a ")
        raise _Unusable(STATUS_CORRUPT, name, reason) from None


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


def _snapshot(fd: int, size: int, name: str) -> tuple[QueueState, int]:
    """Read an open segment; return its state and its nonce."""
    head = _pread(fd, min(size, L.HEADER.size), name)
    header = _read_header(head, size, name)
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


def _inspect(loc: _Location) -> tuple[QueueState, int]:
    with _opened_read_only(loc) as (fd, size):
        return _snapshot(fd, size, loc.name)


def inspect_queue(name: str) -> QueueState:
    """Read the queue in segment ``name`` (``shmcast-...``, also accepted with a leading ``/``
    or ``/dev/shm/``) without attaching to it or changing any word.

    The segment is found by its name in /dev/shm or, for a live queue (which has none),
    through a descriptor one of its processes holds.  Any process of the segment's user may
    call it, at any time; it never blocks.  Raises SegmentError when there is no such segment,
    it cannot be read, it is not a shmcast queue, it has another layout version, or its header
    is corrupted (the message says which); TypeError for a name that is not a str.
    """
    name = _normalize_name(name)
    loc = _locations(only=name).get(name)
    if loc is None:
        raise _Unusable(_STATUS_MISSING, name, "no such segment")
    return _inspect(loc)[0]


def inspect_open_segment(fd: int, name: str) -> QueueState:
    """Read the queue of a segment the caller holds open (``fd``, named ``name`` in messages),
    as :func:`inspect_queue` does, without looking for it: for an endpoint that wants a look at
    its own queue.  Raises as :func:`inspect_queue` does."""
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise _Unusable(_STATUS_MISSING, name, f"cannot read it: {exc}") from None
    return _snapshot(fd, size, name)[0]


def _file_size(loc: _Location) -> int:
    try:
        return os.stat(loc.path).st_size
    except OSError:
        return 0


def _is_own_name(name: str) -> bool:
    """Whether ``name`` has the form of the names this library makes (``shmcast-`` and 16 hex
    digits): another program's ``shmcast-*`` file is never taken for an abandoned one."""
    try:
        check_name(name, own=True)
    except SegmentError:
        return False
    return True


def _probe(loc: _Location) -> tuple[SegmentInfo, int | None] | None:
    """Describe one segment (None if it vanished meanwhile); also its nonce when valid."""
    try:
        state, nonce = _inspect(loc)
    except _Unusable as exc:
        if exc.status == _STATUS_MISSING:
            return None
        if exc.blank and loc.named and not loc.holders and _is_own_name(loc.name):
            info = SegmentInfo(loc.name, _file_size(loc), STATUS_ABANDONED,
                               f"{exc.reason.split(' (')[0]}, and no process holds it open: its "
                               "creator died while creating it", orphan=True)  # fmt: skip
        else:
            info = SegmentInfo(loc.name, _file_size(loc), exc.status, exc.reason)
        return dataclasses.replace(info, where=loc.where, holders=loc.holders), None
    live = state.live_pids
    info = SegmentInfo(
        name=loc.name,
        size=state.size,
        status=STATUS_OK,
        detail="",
        kind=state.kind,
        version=state.version,
        creator_pid=state.creator_pid,
        creator_alive=state.creator_alive,
        participants_alive=len(live),
        live_pids=live,
        orphan=loc.named and not live and not loc.holders,
        created_ns=state.created_ns,
        where=loc.where,
        holders=loc.holders,
    )
    return info, nonce


def list_segments() -> list[SegmentInfo]:
    """Every shmcast segment that can be found, sorted by name, read-only: the live ones
    (unnamed, held open by their processes) and every ``shmcast-*`` entry still named in
    /dev/shm.

    Entries that are not shmcast queues of this layout version are included with their status
    (and never marked orphan).  Never blocks; a segment gone while being listed is skipped.
    """
    infos = []
    for loc in _locations().values():
        probed = _probe(loc)
        if probed is not None:
            infos.append(probed[0])
    return infos


# -- cleanup ------------------------------------------------------------------------------------


@dataclass
class CleanupReport:
    """What :func:`plan_and_cleanup` found and did."""

    dry_run: bool
    orphans: list[SegmentInfo]  #: removed (or, in a dry run, to be removed)
    live: list[SegmentInfo]  #: valid queues with a live process: kept
    left_alone: list[SegmentInfo]  #: not valid shmcast queues of this version: never touched
    not_found: list[str]  #: names asked for that are not shmcast-* entries of /dev/shm
    failed: list[tuple[str, str]]  #: (name, error) for orphans that could not be removed


def orphan_reason(info: SegmentInfo) -> str:
    """Why ``info`` (an orphan) may be removed, in words."""
    if info.status == STATUS_ABANDONED:
        return info.detail
    return f"creator pid {info.creator_pid} is dead and no process recorded in it is alive"


def _remove_if_still_orphan(info: SegmentInfo, nonce: int | None) -> str | None:
    """Re-read the segment just before removing its name: it must still hold the same queue
    (or still be abandoned, ``nonce`` None) and still be an orphan.  Returns None if removed,
    else why not."""
    loc = _locations(only=info.name).get(info.name)
    probed = None if loc is None or not loc.named else _probe(loc)
    if probed is None:
        return "already gone"
    again, again_nonce = probed
    if again.status != info.status or again_nonce != nonce:
        return "the name now holds something else"
    if not again.orphan:
        return f"a process came back to it (pids {', '.join(map(str, again.live_pids))})"
    try:
        os.unlink(os.path.join(SHM_DIR, info.name))
    except FileNotFoundError:
        return "already gone"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def plan_and_cleanup(dry_run: bool = True, names: Iterable[str] | None = None) -> CleanupReport:
    """:func:`cleanup` with the whole story: what was kept and left alone, and why.

    ``names`` restricts the work to those segments (default: every ``shmcast-*`` entry of
    /dev/shm; a live queue, which has no name there, is kept if it is named explicitly).
    """
    located = _locations()
    if names is None:
        wanted = [name for name, loc in located.items() if loc.named]
        not_found: list[str] = []
    else:
        normalized = [_normalize_name(n) for n in names]
        wanted = [n for n in normalized if n in located]
        not_found = [n for n in normalized if n not in located]
    report = CleanupReport(dry_run, [], [], [], not_found, [])
    for name in wanted:
        probed = _probe(located[name])
        if probed is None:
            report.not_found.append(name)
            continue
        info, nonce = probed
        if info.status not in (STATUS_OK, STATUS_ABANDONED):
            report.left_alone.append(info)
        elif not info.orphan:
            report.live.append(info)
        elif dry_run:
            report.orphans.append(info)
        else:
            why_not = _remove_if_still_orphan(info, nonce)
            if why_not is None:
                report.orphans.append(info)
            else:
                report.failed.append((name, why_not))
    return report


def cleanup(dry_run: bool = True, *, names: Iterable[str] | None = None) -> list[str]:
    """Remove the names of orphaned shmcast segments; return the names removed (in a dry run,
    the default, the names that would be removed; nothing is changed).

    An orphan is a valid shmcast segment of this layout version whose creator and every
    process recorded in a participant line are dead (pid and start time checked, so a recycled
    pid does not keep a segment alive nor a live one die), or an *abandoned* one: a name of
    shmcast's own form (``shmcast-`` and 16 hex digits) that is empty or holds zeros where the
    header goes, and that no process holds open (a creator holds its descriptor from the
    moment it makes the name, so one still creating it keeps it).  A segment with any live
    process is never removed, and other entries that are not valid shmcast queues (foreign,
    corrupted, other layout version, unreadable) are never touched.  Just before removing a
    name, the segment is read again and must still hold the same queue (or still be
    abandoned), still orphaned.

    Processes in another pid namespace sharing this /dev/shm cannot be seen: run cleanup where
    the queues' processes run.  Names that could not be removed are logged on the ``shmcast``
    logger and left out of the result.  ``names`` restricts the work to those entries.
    """
    report = plan_and_cleanup(dry_run, names)
    for name, why in report.failed:
        log.warning("shmcast cleanup: could not remove %s: %s", name, why)
    return [info.name for info in report.orphans]


# -- formatting ---------------------------------------------------------------------------------


def _format_time(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))
    except (OverflowError, OSError, ValueError):
        return f"? ({ns} ns)"


def _format_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _table(headers: list[str], rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _pid_cells(pid: int, alive: bool) -> list[str]:
    return ["-", "-"] if pid == 0 else [str(pid), _yes_no(alive)]


def _writer_note(w: WriterState) -> str:
    notes = []
    if w.pid and not w.alive and w.state == "attached":
        notes.append("DEAD")
    if w.state == "expected":
        notes.append("never attached")
    if w.sleeping:
        notes.append("waits for space")
    return ", ".join(notes)


def _reader_note(rd: ReaderState, n_slots: int) -> str:
    notes = []
    if rd.pid and not rd.alive and rd.state == "attached":
        notes.append("DEAD")
    if rd.state == "expected":
        notes.append("never attached")
    if rd.gating and rd.lag >= n_slots:
        notes.append("ring full: the next put waits")
    return ", ".join(notes)


def format_queue_state(q: QueueState) -> str:
    """The human-readable report printed by ``shmcast inspect``."""
    age = max(0.0, time.time() - q.created_ns / 1e9)
    peers = ("reader" if q.kind == "broadcast" else "writer") + ("" if q.n_peers == 1 else "s")
    out = [
        f"queue {q.name}: {q.kind}, layout version {q.version}",
        f"  geometry: {q.n_peers} {peers}, {q.n_slots} slots x {_format_size(q.slot_size)} per "
        f"ring (capacity {_format_size(q.capacity)}), segment {_format_size(q.size)}",
        f"  creator:  pid {q.creator_pid} ({'alive' if q.creator_alive else 'DEAD'}), "
        f"created {_format_time(q.created_ns)} ({age:.0f} s ago)",
        f"  sleepers: {q.sleepers} (readers asleep waiting for data)",
    ]
    if q.orphan:
        out.append("  ORPHAN: no process recorded in this segment is alive ('shmcast cleanup')")
    if q.kind == "broadcast":
        ring = q.rings[0]
        w = ring.writer
        out.append("")
        out.append(
            f"writer: pid {w.pid} ({'alive' if w.alive else 'DEAD'}), {w.state}, "
            f"published sequence {w.seq} ({w.messages} messages), "
            f"{'SLEEPING (waits for space)' if w.sleeping else 'not sleeping'}"
        )
        headers = ["READER", "STATE", "PID", "ALIVE", "SEQ", "LAG", "SLEEPING", "MESSAGES", "NOTE"]
        rows = [
            [str(rd.index), rd.state, *_pid_cells(rd.pid, rd.alive), str(rd.seq), str(rd.lag),
             _yes_no(rd.sleeping), str(rd.messages), _reader_note(rd, q.n_slots)]
            for rd in ring.readers
        ]  # fmt: skip
        out.append(_table(headers, rows, "  "))
    else:
        rd0 = q.rings[0].readers[0]
        out.append("")
        out.append(
            f"reader: pid {rd0.pid} ({'alive' if rd0.alive else 'DEAD'}), {rd0.state}; "
            "one ring per writer:"
        )
        headers = ["WRITER", "STATE", "PID", "ALIVE", "PUBLISHED", "SLEEPING", "SENT",
                   "CONSUMED", "LAG", "READER SLEEPING", "RECEIVED", "NOTE"]  # fmt: skip
        rows = []
        for ring in q.rings:
            w, rd = ring.writer, ring.readers[0]
            note = ", ".join(n for n in (_writer_note(w), _reader_note(rd, q.n_slots)) if n)
            rows.append(
                [str(w.index), w.state, *_pid_cells(w.pid, w.alive), str(w.seq),
                 _yes_no(w.sleeping), str(w.messages), str(rd.seq), str(rd.lag),
                 _yes_no(rd.sleeping), str(rd.messages), note]
            )  # fmt: skip
        out.append(_table(headers, rows, "  "))
    return "\n".join(out)


def format_segment_list(infos: list[SegmentInfo]) -> str:
    """The table printed by ``shmcast ls``."""
    if not infos:
        return f"no shmcast segments (none held by a process, no {PREFIX}* entry in {SHM_DIR})"
    headers = ["NAME", "KIND", "SIZE", "WHERE", "CREATOR", "ALIVE", "LIVE", "ORPHAN", "STATUS"]
    rows = []
    for s in infos:
        if s.status == STATUS_OK:
            rows.append(
                [s.name, s.kind or "?", _format_size(s.size), s.where, str(s.creator_pid),
                 _yes_no(bool(s.creator_alive)), str(s.participants_alive),
                 _yes_no(s.orphan), "ok"]
            )  # fmt: skip
        else:
            status = f"{s.status}: {s.detail}"
            rows.append([s.name, "-", _format_size(s.size), s.where, "-", "-", "-",
                         _yes_no(s.orphan) if s.orphan else "-", status])  # fmt: skip
    return _table(headers, rows)


# -- subcommands --------------------------------------------------------------------------------


def _error(command: str, message: str) -> int:
    print(f"shmcast {command}: error: {message}", file=sys.stderr)
    return 1


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shmcast inspect``."""
    parser.add_argument("name", metavar="NAME", help="the segment: shmcast-... (see 'shmcast ls')")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_inspect(args: argparse.Namespace) -> int:
    """Show one queue's sequences, lags, sleepers and peers, read-only.

    Exit status 1, with a message on stderr, when the segment is missing or is not a readable
    shmcast queue of this layout version.
    """
    try:
        state = inspect_queue(args.name)
    except SegmentError as exc:
        return _error("inspect", str(exc))
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
    else:
        print(format_queue_state(state))
    return 0


def add_ls_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shmcast ls``."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_ls(args: argparse.Namespace) -> int:
    """List the shmcast segments (live queues and names left in /dev/shm) with their creator
    and live processes."""
    infos = list_segments()
    if args.json:
        print(json.dumps([s.to_json() for s in infos], indent=2))
    else:
        print(format_segment_list(infos))
    return 0


def add_cleanup_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shmcast cleanup``."""
    parser.add_argument(
        "names",
        metavar="NAME",
        nargs="*",
        help="only consider these segments (default: every shmcast-* segment)",
    )
    parser.add_argument(
        "--yes", action="store_true", help="remove the orphans (default: only list them)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_cleanup(args: argparse.Namespace) -> int:
    """Remove segments whose every process is dead (a dry run unless --yes).

    Exit status 1 if an orphan could not be removed or a NAME given does not exist.
    """
    try:
        report = plan_and_cleanup(dry_run=not args.yes, names=args.names or None)
    except SegmentError as exc:  # an invalid NAME
        return _error("cleanup", str(exc))
    status = 1 if report.failed or report.not_found else 0
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": report.dry_run,
                    "removed": [] if report.dry_run else [s.name for s in report.orphans],
                    "would_remove": [s.name for s in report.orphans] if report.dry_run else [],
                    "kept_live": [s.name for s in report.live],
                    "left_alone": [s.to_json() for s in report.left_alone],
                    "not_found": report.not_found,
                    "failed": [{"name": n, "error": e} for n, e in report.failed],
                },
                indent=2,
            )
        )
        return status
    verb = "would remove" if report.dry_run else "removed"
    for s in report.orphans:
        what = _format_size(s.size) if s.kind is None else f"{s.kind}, {_format_size(s.size)}"
        print(f"{verb} {s.name} ({what}): {orphan_reason(s)}")
    for name, why in report.failed:
        print(f"could not remove {name}: {why}")
    for s in report.live:
        pids = ", ".join(map(str, s.live_pids))
        print(f"kept {s.name}: live process(es) {pids}")
    for s in report.left_alone:
        print(f"left alone {s.name}: {s.status}: {s.detail}")
    for name in report.not_found:
        print(f"not found: {name} (no such {PREFIX}* entry in {SHM_DIR})")
    if not report.orphans and not report.failed:
        print("no orphaned segments")
    if report.dry_run and report.orphans:
        print("dry run: nothing removed; run 'shmcast cleanup --yes' to remove them")
    return status


#: Subcommand name -> (add_arguments(parser), run(args) -> exit status), for the command line.
COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "inspect": (add_inspect_arguments, run_inspect),
    "ls": (add_ls_arguments, run_ls),
    "cleanup": (add_cleanup_arguments, run_cleanup),
}

#: Subcommand name -> one-line help.
SUMMARIES: dict[str, str] = {
    "inspect": "Show one queue's sequences, lags, sleepers and peers (read-only)",
    "ls": "List the shmcast segments: live queues, and names left in /dev/shm",
    "cleanup": "Remove segments whose every process is dead (dry run unless --yes)",
}

__all__ = [
    "COMMANDS",
    "SUMMARIES",
    "CleanupReport",
    "QueueState",
    "ReaderState",
    "RingState",
    "SegmentInfo",
    "WriterState",
    "cleanup",
    "inspect_queue",
    "list_segments",
    "plan_and_cleanup",
]
