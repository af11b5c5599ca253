"""Is a process still the one we knew?  pid plus start time, so a recycled pid does not fool us."""

from __future__ import annotations

import os
from collections.abc import Iterator

_SELF: tuple[int, int] | None = None

#: The largest pid Linux can hand out (PID_MAX_LIMIT on 64-bit systems).  A pid word beyond it,
#: read from a segment, is corruption, not a process.
PID_MAX = 1 << 22


def plausible_pid(pid: int) -> bool:
    """True if ``pid`` (any int, e.g. read from shared memory) can be a process id."""
    return 0 < pid <= PID_MAX


def stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/PID/stat (so index 0 is the state letter, field 3), or None when
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rfind(b")") + 2 :].split()


def all_stat_fields() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, stat_fields(pid))`` of every process visible in /proc (gone ones skipped)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                yield int(entry), fields


def process_start_time(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot, or 0 when it cannot be read."""
    fields = stat_fields(pid)
    try:
        return int(fields[19]) if fields else 0  # field 22 of the whole line
    except (IndexError, ValueError):
        return 0


def identity() -> tuple[int, int]:
    """(pid, start time) of the calling process; recomputed after a fork."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF[0] != pid:
        _SELF = (pid, process_start_time(pid))
    return _SELF


def is_alive(pid: int, start_time: int) -> bool:
    """True while the process ``pid`` exists and is the one that started at ``start_time``.

    A zombie (exited, not yet reaped) counts as dead.  A start time of 0 (unknown) checks
    existence only.  Any int is accepted: one that cannot be a pid is not alive.
    """
    if not plausible_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = stat_fields(pid)
    if fields is None:
        return not os.path.isdir("/proc/self")  # no /proc at all: existence is all we know
    if fields[0] in (b"Z", b"X"):
        return False
    if start_time:
        try:
            return int(fields[19]) == start_time
        except (IndexError, ValueError):
            return True
    return True
