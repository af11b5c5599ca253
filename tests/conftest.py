"""Fixtures for the whole suite.

Every test is checked, after it ran, for the leaks shmcast exists to prevent:

- a new ``shmcast-*`` segment left in /dev/shm by the test: one whose header names this
  process or a process the test started as its creator (it is removed), or one without a
  shmcast header that this process or a descendant still maps or holds open;
- a shmcast segment that this process maps or holds open now and did not before the test: a
  queue the test left open (a live queue has no name in /dev/shm; it lasts as long as a
  process maps it, so one left open in the test process would last for the whole session);
- a child process still running (or an exited child nobody reaped): it is killed and reaped.

Either fails the test.  Processes started through ``subprocess.Popen`` or ``multiprocessing``
are recorded (see ``_procs.record_child``), so that a segment left by one of them after it
exited is attributed to the test; segments of other programs (other processes may use shmcast
on the same machine at the same time) are left alone.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.process
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from _procs import (
    LONG_SLICES,
    descendants,
    multiprocessing_helpers,
    planted_by,
    record_child,
    recorded_children,
    segment_users,
)

from shmcast import BroadcastQueue
from shmcast._errors import SegmentError
from shmcast._layout import HEADER, MAGIC
from shmcast._segment import PREFIX, SHM_DIR, check_name

CHILD_GRACE = 3.0  # seconds children get to finish exiting after a test before they are leaks


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-iterations",
        type=int,
        default=240,
        help="seeded iterations of the corruption fuzzer (test_corruption.py; default 240)",
    )


# -- record every child the tests start -------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _record_started_children() -> Iterator[None]:
    """Wrap ``Popen.__init__`` and ``BaseProcess.start`` to record the pids they start."""
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def recording_popen_init(self, *args, **kwargs):
        popen_init(self, *args, **kwargs)
        record_child(self.pid)

    def recording_start(self):
        process_start(self)
        if self.pid is not None:
            record_child(self.pid)

    subprocess.Popen.__init__ = recording_popen_init
    multiprocessing.process.BaseProcess.start = recording_start
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init
        multiprocessing.process.BaseProcess.start = process_start


# -- segments ---------------------------------------------------------------------------------


def shm_segments() -> set[str]:
    """Names of the ``shmcast-*`` entries in /dev/shm."""
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def segment_creator(name: str) -> int | None:
    """The creator pid in a segment's header, or None if it has no shmcast header."""
    try:
        with open(os.path.join(SHM_DIR, name), "rb") as f:
            head = f.read(HEADER.size)
    except OSError:
        return None
    if len(head) < HEADER.size or head[:8] != MAGIC:
        return None
    return HEADER.unpack_from(head)[8]  # the creator's pid


def _held_segments(pid: int) -> set[str]:
    """Names of the shmcast segments process ``pid`` maps or holds open."""
    prefix = os.path.join(SHM_DIR, PREFIX)
    names: set[str] = set()
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                at = line.find(prefix)
                if at >= 0:
                    names.add(line[at + len(SHM_DIR) + 1 :].split()[0])
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(os.path.join(fd_dir, fd))
                if target.startswith(prefix):
                    names.add(target[len(SHM_DIR) + 1 :].split()[0])
    return names


def _uses_segment(pid: int, name: str) -> bool:
    """True if process ``pid`` maps the segment ``name`` or holds it open."""
    path = os.path.join(SHM_DIR, name)
    try:
        with open(f"/proc/{pid}/maps") as f:
            if any(path in line for line in f):
                return True
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(os.path.join(fd_dir, fd)).startswith(path):
                    return True
    except OSError:
        pass  # gone, or not ours to look at
    return False


def _own_form(name: str) -> bool:
    """Whether ``name`` has the form of the names shmcast makes (``shmcast-`` and 16 hex)."""
    try:
        check_name(name, own=True)
    except SegmentError:
        return False
    return True


def _leaked_segments(before: set[str]) -> list[str]:
    """New segments this test is responsible for.  A segment with a shmcast header is ours
    if its creator is this process or one it started (it is unlinked); one without a header
    (a raw segment, or garbage) is ours if this process or a descendant maps it or holds it
    open (it is left alone: whoever made it removes it), and so is one with a name of
    shmcast's own form that no process uses any more: what a creator killed before it wrote
    the header leaves, which ``shmcast cleanup`` calls abandoned (it is unlinked) - unless
    another live process (another test run) declared that it made the name on purpose
    (``_procs.plant``)."""
    own = os.getpid()
    tree = {own} | set(descendants(own))
    ours = tree | set(recorded_children())
    leaked = []
    for name in sorted(shm_segments() - before):
        creator = segment_creator(name)
        if not os.path.lexists(os.path.join(SHM_DIR, name)):
            continue  # gone meanwhile: its maker removed it (a queue removes its name at once)
        if creator is None:
            if any(_uses_segment(pid, name) for pid in tree):
                leaked.append(f"{name} (no shmcast header; still in use by this test)")
            elif (_own_form(name) and not segment_users(name)
                  and planted_by(name) in (None, *ours)):  # fmt: skip
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, name))
                leaked.append(f"{name} (no shmcast header, used by no process: abandoned; "
                              "removed now)")  # fmt: skip
            continue
        if creator not in ours:
            continue  # another program's queue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
        leaked.append(f"{name} (creator pid {creator}; removed now)")
    return leaked


# -- processes --------------------------------------------------------------------------------


def _live_descendants(own: int, helpers: set[int]) -> dict[int, tuple[int, str]]:
    """Descendants that count as leaks: running ones (not multiprocessing's helpers) and
    zombies that are our own children (nobody reaped them)."""
    return {
        pid: (ppid, state)
        for pid, (ppid, state) in descendants(own).items()
        if pid not in helpers and (state not in "ZX" or ppid == own)
    }


def _lingering_children() -> dict[int, tuple[int, str]]:
    """Descendants still there after giving them CHILD_GRACE seconds to finish exiting."""
    own = os.getpid()
    helpers = multiprocessing_helpers()
    deadline = time.monotonic() + CHILD_GRACE
    while True:
        multiprocessing.active_children()  # reaps multiprocessing children that have exited
        leftovers = _live_descendants(own, helpers)
        if not leftovers or time.monotonic() >= deadline:
            return leftovers
        time.sleep(0.05)


def _kill_children(leftovers: dict[int, tuple[int, str]]) -> list[str]:
    """Kill and reap the lingering children; describe each."""
    own = os.getpid()
    report = []
    for process in multiprocessing.active_children():
        report.append(f"multiprocessing child {process.name} (pid {process.pid})")
        process.kill()
        process.join(10)
    for pid, (ppid, state) in sorted(leftovers.items()):
        report.append(f"pid {pid} (parent {ppid}, state {state})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if ppid == own:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return report


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a new ``shmcast-*`` segment or a child process behind."""
    before = shm_segments()
    held_before = _held_segments(os.getpid())
    yield
    gc.collect()  # queues in reference cycles are closed by their finalizers
    lingering = _lingering_children()
    segments = _leaked_segments(before)  # while lingering children can still be asked
    processes = _kill_children(lingering) if lingering else []
    left_open = sorted(_held_segments(os.getpid()) - held_before)
    problems = []
    if processes:
        problems.append("child processes left running (killed now): " + ", ".join(processes))
    if segments:
        problems.append("shared-memory segments left in /dev/shm: " + ", ".join(segments))
    if left_open:
        problems.append("shmcast segments left open by this process: " + ", ".join(left_open))
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def long_slice_pair() -> Iterator[tuple[BroadcastQueue, BroadcastQueue]]:
    """A writer and its one reader, which waits with ``_procs.LONG_SLICES``."""
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=LONG_SLICES) as reader,
    ):
        yield writer, reader
