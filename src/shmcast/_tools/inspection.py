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

Reading a segment is :mod:`shmcast._snapshot`'s (``pread``, never mapped, nothing written,
nothing trusted; its docstring says how a live queue is read consistently); this module finds
the segments (by name in /dev/shm, or through the descriptors their processes hold) and
lists, inspects and cleans them up.  Only processes of the same user (or all, for root) can be
looked at.

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
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .._errors import SegmentError
from .._segment import PREFIX, SHM_DIR, check_name
from .._snapshot import (
    STATUS_ABANDONED,
    STATUS_CORRUPT,
    STATUS_MISSING,
    STATUS_NOT_SHMCAST,
    STATUS_OK,
    STATUS_OTHER_VERSION,
    STATUS_UNREADABLE,
    QueueState,
    ReaderState,
    RingState,
    Unusable,
    WriterState,
    format_time,
    read_snapshot,
)

log = logging.getLogger("shmcast")

# -- results ------------------------------------------------------------------------------------


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
        data["created"] = None if self.created_ns is None else format_time(self.created_ns)
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


@contextlib.contextmanager
def _opened_read_only(loc: _Location) -> Iterator[tuple[int, int]]:
    """Open the segment read-only; yield ``(fd, size)``.  Raises Unusable (missing,
    unreadable, not a file, empty)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # a FIFO must not block
    if loc.named:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(loc.path, flags)
    except FileNotFoundError:
        raise Unusable(STATUS_MISSING, loc.name, "no such segment") from None
    except OSError as exc:
        raise Unusable(STATUS_UNREADABLE, loc.name, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not loc.named and os.readlink(f"/proc/self/fd/{fd}").removesuffix(_DELETED) != (
            f"{SHM_DIR}/{loc.name}"
        ):
            raise Unusable(STATUS_MISSING, loc.name, "its last holder let it go")
        if not stat.S_ISREG(st.st_mode):
            raise Unusable(STATUS_NOT_SHMCAST, loc.name, "not a regular file")
        if st.st_size == 0:
            raise Unusable(STATUS_NOT_SHMCAST, loc.name, "empty (or still being created)",
                            blank=True)  # fmt: skip
        yield fd, st.st_size
    finally:
        os.close(fd)


def _inspect(loc: _Location) -> tuple[QueueState, int]:
    with _opened_read_only(loc) as (fd, size):
        return read_snapshot(fd, size, loc.name)


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
        raise Unusable(STATUS_MISSING, name, "no such segment")
    return _inspect(loc)[0]


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
    except Unusable as exc:
        if exc.status == STATUS_MISSING:
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
        f"created {format_time(q.created_ns)} ({age:.0f} s ago)",
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
    "STATUS_ABANDONED",
    "STATUS_CORRUPT",
    "STATUS_NOT_SHMCAST",
    "STATUS_OK",
    "STATUS_OTHER_VERSION",
    "STATUS_UNREADABLE",
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
