"""The diagnostics: inspect_queue(), list_segments(), cleanup() and their subcommands.

Queues are created in this process and in child processes; children are started with
subprocess (a fresh interpreter that reaches the queue through its handle), talk back on
stdout, wait on stdin, and are killed at the end of every test.  A live queue has no name in
/dev/shm: the tools find it through the descriptors its processes hold.  Names in /dev/shm are
made on purpose (what a creator killed inside the constructor leaves, foreign files), and
every test checks that it leaves none of its own.  Segments of other processes that happen to
exist are never touched: cleanup() runs with an explicit list of names whenever it may remove.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest
from _procs import killed_while_creating, plant, segment_users, unplant

from shmcast import BroadcastQueue, GatherQueue, Handle, SegmentError
from shmcast import _layout as L
from shmcast._liveness import identity
from shmcast._segment import Segment
from shmcast._tools import inspection as I

SHM = "/dev/shm"
STEP_TIMEOUT = 10.0  # seconds any single wait in these tests may take

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------------------

READER_CHILD = textwrap.dedent(
    """
    import sys
    from shmcast import BroadcastQueue, Handle
    name, nonce, pid, fd, index, count = sys.argv[1], *map(int, sys.argv[2:7])
    q = BroadcastQueue.attach(Handle(name, nonce, pid, fd), reader=index)
    for _ in range(count):
        q.get_bytes(timeout=10)
    print("read", count, flush=True)
    if len(sys.argv) > 7:  # then block in get(), asleep, until killed
        q.get_bytes(timeout=30)
    sys.stdin.readline()
    """
)

GATHER_WRITER_CHILD = textwrap.dedent(
    """
    import sys
    from shmcast import GatherQueue, Handle
    name, nonce, pid, fd, index, count = sys.argv[1], *map(int, sys.argv[2:7])
    q = GatherQueue.attach(Handle(name, nonce, pid, fd), writer=index)
    for i in range(count):
        q.put_bytes(b"w%d" % i, timeout=10)
    print("sent", count, flush=True)
    sys.stdin.readline()
    """
)


def handle_args(handle: Handle) -> tuple[object, ...]:
    """A handle as command-line arguments of the child scripts."""
    return handle.name, handle.nonce, handle.pid, handle.fd


class Children:
    """Child processes of one test: started with a script, killed (SIGKILL) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, script: str, *args: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def readline(proc: subprocess.Popen[str], timeout: float = STEP_TIMEOUT) -> str:
        """The child's next stdout line; fails the test if none comes in time."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"child {proc.pid} said nothing within {timeout} s"
        line = proc.stdout.readline()
        assert line, f"child {proc.pid} exited with status {proc.wait(timeout)}"
        return line.strip()

    @staticmethod
    def kill(proc: subprocess.Popen[str]) -> None:
        """SIGKILL and reap (a reaped process is gone from /proc)."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(STEP_TIMEOUT)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.kill_all()


class OwnNames(list):
    """Names of segments a test makes, each declared with ``_procs.plant`` as it is added
    (before the test makes it), so that another test run's leak check leaves it alone."""

    def append(self, name: str) -> None:
        plant(name)
        super().append(name)

    def extend(self, names: Iterable[str]) -> None:
        for name in names:
            self.append(name)


@pytest.fixture
def own_segments(children: Children) -> Iterator[list[str]]:
    """Names of segments this test made; at the end (its children killed) none may be left in
    /dev/shm (any that is, is removed, and the test fails) and no process may use one."""
    names = OwnNames()
    yield names
    try:
        children.kill_all()
        left = [n for n in names if os.path.exists(os.path.join(SHM, n))]
        for n in left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM, n))
        assert not left, f"segments left in {SHM}: {left}"
        used = {n: segment_users(n) for n in names if segment_users(n)}
        assert not used, f"segments still in use: {used}"
    finally:
        for name in names:
            unplant(name)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def segment_info(name: str) -> I.SegmentInfo:
    found = [s for s in I.list_segments() if s.name == name]
    assert len(found) == 1, f"{name} listed {len(found)} times"
    return found[0]


def run_command(command: str, argv: list[str]) -> int:
    """Parse ``argv`` with the subcommand's own options and run it, as the CLI does."""
    add_arguments, run = I.COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"shmcast {command}")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM, name))


def write_line(name: str, offset: int, pid: int, start: int) -> None:
    """Record ``pid`` (and its start time) in the participant line at ``offset`` of the named
    segment ``name``, as a participant attaching there would."""
    seg = Segment.open(name)
    try:
        seg.atomics.store64(offset + L.PID, pid)
        seg.atomics.store64(offset + L.START, start)
    finally:
        seg.close()


# -- inspect_queue: broadcast -------------------------------------------------------------------


def test_broadcast_sequences_lags_pids_and_a_killed_reader(children, own_segments):
    q = BroadcastQueue(3, n_slots=8, slot_size=64)
    own_segments.append(q.name)
    try:
        child = children.start(READER_CHILD, *handle_args(q.handle), 0, 5)
        local = BroadcastQueue.attach(q.handle, reader=1)
        for i in range(6):  # one slot each; reader 2 is never attached, so 8 slots are the limit
            q.put_bytes(b"m%d" % i, timeout=STEP_TIMEOUT)
        for _ in range(2):
            local.get_bytes(timeout=STEP_TIMEOUT)
        assert children.readline(child) == "read 5"

        state = I.inspect_queue(q.name)
        assert (state.name, state.kind, state.version) == (q.name, "broadcast", L.LAYOUT_VERSION)
        assert (state.n_peers, state.n_slots, state.slot_size) == (3, 8, 64)
        assert state.capacity == 8 * 64
        assert state.size == os.fstat(q.handle.fd).st_size
        assert (state.creator_pid, state.creator_alive) == (os.getpid(), True)
        assert abs(state.created_ns / 1e9 - time.time()) < 60
        assert len(state.rings) == 1
        ring = state.rings[0]
        w = ring.writer
        assert (w.state, w.pid, w.alive, w.seq, w.messages, w.sleeping) == (
            "attached", os.getpid(), True, 6, 6, False,
        )  # fmt: skip
        r0, r1, r2 = ring.readers
        assert (r0.index, r0.state, r0.pid, r0.alive) == (0, "attached", child.pid, True)
        assert (r0.seq, r0.lag, r0.messages, r0.gating) == (5, 1, 5, True)
        assert (r1.index, r1.state, r1.pid, r1.alive) == (1, "attached", os.getpid(), True)
        assert (r1.seq, r1.lag, r1.messages) == (2, 4, 2)
        assert (r2.index, r2.state, r2.pid, r2.alive) == (2, "expected", 0, False)
        assert (r2.seq, r2.lag, r2.messages, r2.gating) == (0, 6, 0, True)
        assert not state.orphan
        assert set(state.live_pids) == {os.getpid(), child.pid}

        children.kill(child)
        state = I.inspect_queue(q.name)
        r0 = state.rings[0].readers[0]
        assert (r0.state, r0.pid, r0.alive, r0.seq, r0.lag) == ("attached", child.pid, False, 5, 1)
        assert state.live_pids == (os.getpid(),)
        assert "DEAD" in I.format_queue_state(state)

        local.close()  # a clean detach frees the line: state detached, pid 0, not gating
        r1 = I.inspect_queue(q.name).rings[0].readers[1]
        assert (r1.state, r1.pid, r1.alive, r1.gating) == ("detached", 0, False, False)
    finally:
        q.close()
    assert not shm_exists(q.name) and not segment_users(q.name)


def test_reader_asleep_in_get_is_shown_sleeping(own_segments):
    q = BroadcastQueue(1, n_slots=4, slot_size=64)
    own_segments.append(q.name)
    reader = BroadcastQueue.attach(q.handle, reader=0)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(reader.get_bytes(timeout=STEP_TIMEOUT)))
    try:
        assert I.inspect_queue(q.name).rings[0].readers[0].sleeping is False
        thread.start()

        def asleep() -> bool:
            s = I.inspect_queue(q.name)
            return s.rings[0].readers[0].sleeping and s.sleepers == 1

        wait_until(asleep, "the reader to sleep in get()")
        q.put_bytes(b"wake up", timeout=STEP_TIMEOUT)
        thread.join(STEP_TIMEOUT)
        assert got == [b"wake up"]
        state = I.inspect_queue(q.name)
        rd = state.rings[0].readers[0]
        assert (rd.sleeping, rd.seq, rd.lag, rd.messages, state.sleepers) == (False, 1, 0, 1, 0)
    finally:
        if thread.is_alive():  # its get() times out by itself
            thread.join(2 * STEP_TIMEOUT)
        reader.close()
        q.close()
    assert not thread.is_alive()


def test_reader_asleep_in_another_process(children, own_segments):
    q = BroadcastQueue(1, n_slots=4, slot_size=64)
    own_segments.append(q.name)
    try:
        q.put_bytes(b"first", timeout=STEP_TIMEOUT)
        child = children.start(READER_CHILD, *handle_args(q.handle), 0, 1, "then-sleep")
        assert children.readline(child) == "read 1"
        wait_until(
            lambda: I.inspect_queue(q.name).rings[0].readers[0].sleeping,
            "the child reader to sleep in get()",
        )
        rd = I.inspect_queue(q.name).rings[0].readers[0]
        assert (rd.pid, rd.alive, rd.seq, rd.lag) == (child.pid, True, 1, 0)
        children.kill(child)
        # Killed in its sleep: the flag stays set in the segment, but the pid is dead.
        rd = I.inspect_queue(q.name).rings[0].readers[0]
        assert (rd.pid, rd.alive, rd.state) == (child.pid, False, "attached")
    finally:
        q.close()


def test_writer_blocked_by_a_full_ring_is_shown_sleeping(own_segments):
    q = BroadcastQueue(1, n_slots=4, slot_size=64)
    own_segments.append(q.name)
    reader = BroadcastQueue.attach(q.handle, reader=0)
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            for i in range(5):  # the fifth needs a slot the reader still holds
                q.put_bytes(b"p%d" % i, timeout=STEP_TIMEOUT)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=fill)
    try:
        thread.start()
        wait_until(
            lambda: I.inspect_queue(q.name).rings[0].writer.sleeping, "the writer to sleep in put()"
        )
        state = I.inspect_queue(q.name)
        rd = state.rings[0].readers[0]
        assert (state.rings[0].writer.seq, rd.seq, rd.lag) == (4, 0, 4)
        text = I.format_queue_state(state)
        assert "ring full" in text and "SLEEPING (waits for space)" in text
        reader.get_bytes(timeout=STEP_TIMEOUT)
        thread.join(STEP_TIMEOUT)
        assert not thread.is_alive() and not errors
        state = I.inspect_queue(q.name)
        assert state.rings[0].writer.sleeping is False
        assert (state.rings[0].writer.seq, state.rings[0].readers[0].lag) == (5, 4)
    finally:
        reader.close()  # detaching releases the writer if it still waits
        thread.join(STEP_TIMEOUT)
        q.close()
    assert not thread.is_alive()


# -- inspect_queue: gather ----------------------------------------------------------------------


def test_gather_rings_writers_and_reader(children, own_segments):
    g = GatherQueue(2, n_slots=4, slot_size=64)
    own_segments.append(g.name)
    waiter: threading.Thread | None = None
    try:
        child = children.start(GATHER_WRITER_CHILD, *handle_args(g.handle), 0, 3)
        assert children.readline(child) == "sent 3"
        assert g.get_bytes(writer=0, timeout=STEP_TIMEOUT) == b"w0"

        state = I.inspect_queue(g.name)
        assert (state.kind, state.n_peers, state.n_slots, state.slot_size) == ("gather", 2, 4, 64)
        assert (state.creator_pid, state.creator_alive) == (os.getpid(), True)
        assert [r.index for r in state.rings] == [0, 1]
        ring0, ring1 = state.rings
        w0, rd0 = ring0.writer, ring0.readers[0]
        assert (w0.index, w0.state, w0.pid, w0.alive) == (0, "attached", child.pid, True)
        assert (w0.seq, w0.messages, w0.sleeping) == (3, 3, False)
        assert (rd0.index, rd0.pid, rd0.alive, rd0.state) == (0, os.getpid(), True, "attached")
        assert (rd0.seq, rd0.lag, rd0.messages, rd0.sleeping) == (1, 2, 1, False)
        w1, rd1 = ring1.writer, ring1.readers[0]
        assert (w1.index, w1.state, w1.pid, w1.alive, w1.seq) == (1, "expected", 0, False, 0)
        assert (rd1.pid, rd1.seq, rd1.lag) == (os.getpid(), 0, 0)

        # The reader asleep waiting for writer 1 only: ring 1's reader sleeps, ring 0's not.
        waiter = threading.Thread(target=lambda: g.get_bytes(writer=1, timeout=STEP_TIMEOUT))
        waiter.start()

        def asleep_on_ring1() -> bool:
            s = I.inspect_queue(g.name)
            return s.rings[1].readers[0].sleeping and s.sleepers == 1

        wait_until(asleep_on_ring1, "the gather reader to sleep on writer 1")
        assert I.inspect_queue(g.name).rings[0].readers[0].sleeping is False
        local_writer = GatherQueue.attach(g.handle, writer=1)
        local_writer.put_bytes(b"from 1", timeout=STEP_TIMEOUT)
        waiter.join(STEP_TIMEOUT)
        assert not waiter.is_alive()
        local_writer.close()

        children.kill(child)
        state = I.inspect_queue(g.name)
        w0 = state.rings[0].writer
        assert (w0.pid, w0.alive, w0.state) == (child.pid, False, "attached")
        w1 = state.rings[1].writer
        assert (w1.state, w1.seq, w1.messages) == ("detached", 1, 1)
        assert (state.rings[1].readers[0].seq, state.rings[1].readers[0].lag) == (1, 0)
        assert "DEAD" in I.format_queue_state(state)
    finally:
        if waiter is not None:  # its get() times out by itself
            waiter.join(2 * STEP_TIMEOUT)
        g.close()


def test_gather_reader_waiting_for_any_writer_sleeps_on_every_ring(own_segments):
    g = GatherQueue(2, n_slots=4, slot_size=64)
    own_segments.append(g.name)
    writer = GatherQueue.attach(g.handle, writer=0)
    waiter = threading.Thread(target=lambda: g.get_bytes(timeout=STEP_TIMEOUT))
    try:
        waiter.start()
        wait_until(
            lambda: all(r.readers[0].sleeping for r in I.inspect_queue(g.name).rings),
            "the gather reader to sleep waiting for any writer",
        )
        writer.put_bytes(b"any", timeout=STEP_TIMEOUT)
        waiter.join(STEP_TIMEOUT)
        assert not waiter.is_alive()
        state = I.inspect_queue(g.name)
        assert not any(r.readers[0].sleeping for r in state.rings)
        assert state.sleepers == 0
    finally:
        if waiter.is_alive():  # its get() times out by itself
            waiter.join(2 * STEP_TIMEOUT)
        writer.close()
        g.close()


# -- list_segments and cleanup ------------------------------------------------------------------


def test_list_segments_and_dry_run_cleanup_remove_nothing(children, own_segments):
    b = BroadcastQueue(2, n_slots=4, slot_size=64)
    g = GatherQueue(3, n_slots=4, slot_size=128)
    own_segments += [b.name, g.name]
    try:
        child = children.start(READER_CHILD, *handle_args(b.handle), 1, 0)
        assert children.readline(child) == "read 0"
        sb, sg = segment_info(b.name), segment_info(g.name)
        assert (sb.status, sb.kind, sb.version, sb.detail, sb.where) == (
            "ok",
            "broadcast",
            L.LAYOUT_VERSION,
            "",
            "unnamed",  # a live queue: found through its processes' descriptors
        )
        assert set(sb.holders) == {os.getpid(), child.pid}
        assert sb.size == L.Geometry(L.KIND_BROADCAST, 2, 4, 64).total_size
        assert (sb.creator_pid, sb.creator_alive, sb.orphan) == (os.getpid(), True, False)
        assert (sb.participants_alive, set(sb.live_pids)) == (2, {os.getpid(), child.pid})
        assert (sg.status, sg.kind, sg.participants_alive, sg.orphan) == ("ok", "gather", 1, False)
        assert sg.size == L.Geometry(L.KIND_GATHER, 3, 4, 128).total_size

        would = I.cleanup(dry_run=True)  # may list other processes' orphans; removes nothing
        assert b.name not in would and g.name not in would
        assert I.cleanup(dry_run=False, names=[b.name, g.name]) == []  # no names to remove
        b.put("still works", timeout=STEP_TIMEOUT)
    finally:
        b.close()
        g.close()
    children.kill_all()
    assert all(s.name not in (b.name, g.name) for s in I.list_segments())


@pytest.mark.parametrize("kind", ["broadcast", "gather"])
def test_orphan_is_listed_and_removed_but_live_queue_is_kept(kind, own_segments):
    live = BroadcastQueue(1, n_slots=4, slot_size=64)
    own_segments.append(live.name)
    name, creator = killed_while_creating(kind)  # the one way a name is left behind
    own_segments.append(name)
    try:
        assert shm_exists(name)
        orphan = segment_info(name)
        assert (orphan.status, orphan.kind, orphan.creator_pid) == ("ok", kind, creator)
        assert (orphan.creator_alive, orphan.participants_alive, orphan.orphan) == (False, 0, True)
        assert (orphan.where, orphan.holders) == ("named", ())
        state = I.inspect_queue(name)
        assert state.orphan and state.creator_alive is False
        assert "ORPHAN" in I.format_queue_state(state)
        if kind == "broadcast":
            assert (state.rings[0].writer.seq, state.rings[0].readers[0].lag) == (0, 0)

        assert name in I.cleanup(dry_run=True)
        assert live.name not in I.cleanup(dry_run=True)
        assert shm_exists(name), "a dry run removed a segment"

        removed = I.cleanup(dry_run=False, names=[name, live.name])
        assert removed == [name]
        assert not shm_exists(name)
        assert (segment_info(live.name).orphan, segment_info(live.name).creator_alive) == (
            False,
            True,
        )
        live.put("still works", timeout=STEP_TIMEOUT)
    finally:
        live.close()


@pytest.mark.parametrize("size", [0, 4096], ids=["empty", "no-header"])
def test_a_name_abandoned_before_its_header_is_removed_unless_held(size, children, own_segments):
    """What a creator killed before it wrote the header leaves (a name of shmcast's own form,
    empty or all zeros, held by no process) is listed as abandoned and removed; the same file
    held open by a live process (a creator still at work) is kept, and a file of another form
    is left alone."""
    from shmcast import _native
    from shmcast._segment import new_name

    abandoned, held = new_name(), new_name()
    foreign = "shmcast-not-ours-" + os.urandom(4).hex()
    own_segments.extend([abandoned, held, foreign])
    for name in (abandoned, held, foreign):
        fd = _native.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
    holder = children.start(
        "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); print('held', flush=True); "
        "sys.stdin.readline()", os.path.join(SHM, held),
    )  # fmt: skip
    assert children.readline(holder) == "held"
    infos = {s.name: s for s in I.list_segments()}
    assert (infos[abandoned].status, infos[abandoned].orphan) == ("abandoned", True)
    assert (infos[held].status, infos[held].orphan) == ("not-shmcast", False)
    assert infos[held].holders == (holder.pid,)
    assert (infos[foreign].status, infos[foreign].orphan) == ("not-shmcast", False)
    planned = I.cleanup(dry_run=True)
    assert abandoned in planned and held not in planned and foreign not in planned
    assert shm_exists(abandoned)
    assert I.cleanup(dry_run=False, names=[abandoned, held, foreign]) == [abandoned]
    assert not shm_exists(abandoned)
    assert shm_exists(held) and shm_exists(foreign)
    children.kill(holder)  # its creator is gone now: abandoned too
    assert I.cleanup(dry_run=False, names=[held, foreign]) == [held]
    os.unlink(os.path.join(SHM, foreign))


def test_named_segment_with_a_live_user_is_never_removed(own_segments):
    name, _creator = killed_while_creating("broadcast")
    own_segments.append(name)
    reader_line = L.Geometry(L.KIND_BROADCAST, 1, 4, 64).peer_line(0)
    # A process that holds it open keeps it ...
    held = Segment.open(name)
    try:
        info = segment_info(name)
        assert (info.holders, info.orphan) == ((os.getpid(),), False)
        assert I.cleanup(dry_run=False, names=[name]) == []
    finally:
        held.close()
    # ... and so does a live process recorded in a participant line ...
    pid, start = identity()
    write_line(name, reader_line, pid, start)
    info = segment_info(name)
    assert (info.creator_alive, info.participants_alive, info.live_pids) == (
        False, 1, (os.getpid(),),
    )  # fmt: skip
    assert info.orphan is False
    assert I.cleanup(dry_run=False, names=[name]) == []
    assert shm_exists(name)
    # ... but a recycled pid does not (same pid, another start time).
    write_line(name, reader_line, pid, start + 1)
    assert segment_info(name).orphan is True
    assert I.cleanup(dry_run=False, names=[name]) == [name]
    assert not shm_exists(name)


def test_foreign_and_other_version_files_are_reported_and_left_alone(own_segments):
    foreign = f"shmcast-foreign-xyz-{os.getpid()}"
    other = f"shmcast-otherversion-{os.getpid()}"
    empty = f"shmcast-empty-{os.getpid()}"
    truncated = f"shmcast-truncated-{os.getpid()}"
    own_segments += [foreign, other, empty, truncated]
    header = bytearray(L.HEADER.size)
    L.HEADER.pack_into(header, 0, L.MAGIC, 99, L.KIND_BROADCAST, *[0] * 12)
    geometry = L.Geometry(L.KIND_BROADCAST, 1, 4, 64)
    good = bytearray(L.HEADER.size)
    L.HEADER.pack_into(
        good, 0, L.MAGIC, L.LAYOUT_VERSION, L.KIND_BROADCAST, 1, geometry.total_size, 1, 4, 64,
        1, 1, 1, geometry.desc_off, geometry.data_off, 0, 0,
    )  # fmt: skip
    contents = {
        foreign: os.urandom(3000),
        other: bytes(header) + bytes(4096),
        empty: b"",
        truncated: bytes(good) + bytes(100),  # header says 12 KiB
    }
    try:
        for name, data in contents.items():
            with open(os.path.join(SHM, name), "wb") as f:
                f.write(data)
        infos = {s.name: s for s in I.list_segments() if s.name in contents}
        assert set(infos) == set(contents)
        assert (infos[foreign].status, infos[foreign].size) == (I.STATUS_NOT_SHMCAST, 3000)
        assert infos[other].status == I.STATUS_OTHER_VERSION and "99" in infos[other].detail
        assert infos[empty].status == I.STATUS_NOT_SHMCAST and "empty" in infos[empty].detail
        assert infos[truncated].status == I.STATUS_CORRUPT
        assert "truncated" in infos[truncated].detail
        for info in infos.values():
            assert info.orphan is False and info.kind is None and info.creator_pid is None

        assert not set(contents) & set(I.cleanup(dry_run=True))
        report = I.plan_and_cleanup(dry_run=False, names=list(contents))
        assert report.orphans == [] and report.failed == []
        assert {s.name for s in report.left_alone} == set(contents)
        for name, data in contents.items():
            with open(os.path.join(SHM, name), "rb") as f:
                assert f.read() == data, f"{name} was changed"

        for name in contents:
            with pytest.raises(SegmentError):
                I.inspect_queue(name)
        table = I.format_segment_list(list(infos.values()))
        assert "not-shmcast: bad magic" in table and "other-version: layout version 99" in table
    finally:
        for name in contents:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM, name))


def test_inspect_accepts_the_other_spellings_of_a_name(own_segments):
    q = BroadcastQueue(1, n_slots=4, slot_size=64)
    own_segments.append(q.name)
    try:
        for spelling in (q.name, "/" + q.name, f"{SHM}/{q.name}"):
            assert I.inspect_queue(spelling).name == q.name
        for bad in ("", "a/b", "..", "/"):
            with pytest.raises(SegmentError):
                I.inspect_queue(bad)
        with pytest.raises(TypeError):
            I.inspect_queue(42)  # type: ignore[arg-type]
    finally:
        q.close()


# -- the subcommands ----------------------------------------------------------------------------


def test_commands_print_parseable_json(capsys, children, own_segments):
    q = BroadcastQueue(2, n_slots=4, slot_size=64)
    own_segments.append(q.name)
    try:
        child = children.start(READER_CHILD, *handle_args(q.handle), 0, 1)
        q.put_bytes(b"one", timeout=STEP_TIMEOUT)
        q.put_bytes(b"two", timeout=STEP_TIMEOUT)
        assert children.readline(child) == "read 1"

        assert run_command("inspect", [q.name, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert (data["name"], data["kind"], data["creator_pid"]) == (
            q.name,
            "broadcast",
            os.getpid(),
        )
        assert data["orphan"] is False and data["rings"][0]["writer"]["seq"] == 2
        readers = data["rings"][0]["readers"]
        assert [(r["pid"], r["seq"], r["lag"], r["alive"]) for r in readers] == [
            (child.pid, 1, 1, True), (0, 0, 2, False),
        ]  # fmt: skip

        assert run_command("ls", ["--json"]) == 0
        listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
        assert listed[q.name]["participants_alive"] == 2 and listed[q.name]["orphan"] is False

        assert run_command("cleanup", ["--json", q.name]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["dry_run"] is True and report["kept_live"] == [q.name]
        assert report["would_remove"] == [] and report["removed"] == []

        assert run_command("inspect", [q.name]) == 0
        text = capsys.readouterr().out
        assert f"queue {q.name}: broadcast" in text and "LAG" in text and str(child.pid) in text
        assert run_command("ls", []) == 0
        assert q.name in capsys.readouterr().out
    finally:
        q.close()


def test_inspect_command_fails_clearly_for_missing_and_foreign_segments(capsys, own_segments):
    missing = f"shmcast-missing-{os.getpid()}"
    assert run_command("inspect", [missing]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no shared-memory segment named" in captured.err
    assert "missing" in captured.err
    assert run_command("inspect", ["--json", missing]) == 1

    foreign = f"shmcast-foreign-xyz-{os.getpid()}"
    own_segments.append(foreign)
    path = os.path.join(SHM, foreign)
    try:
        with open(path, "wb") as f:
            f.write(b"garbage" * 100)
        assert run_command("inspect", [foreign]) == 1
        assert "is not a shmcast queue" in capsys.readouterr().err
        assert run_command("cleanup", ["--yes", foreign]) == 0
        out = capsys.readouterr().out
        assert f"left alone {foreign}" in out and os.path.exists(path)
        assert run_command("cleanup", [missing]) == 1
        assert "not found" in capsys.readouterr().out
    finally:
        os.unlink(path)


def test_cleanup_command_dry_run_then_yes(capsys, own_segments):
    name, _creator = killed_while_creating("gather")
    own_segments.append(name)
    assert run_command("cleanup", [name]) == 0
    out = capsys.readouterr().out
    assert f"would remove {name}" in out and "dry run: nothing removed" in out
    assert shm_exists(name)
    assert run_command("cleanup", ["--yes", name]) == 0
    assert f"removed {name}" in capsys.readouterr().out
    assert not shm_exists(name)


TRUNCATING_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from shmcast import BroadcastQueue
    q = BroadcastQueue(2, n_slots=8, slot_size=4096)
    fd, size = q.handle.fd, os.fstat(q.handle.fd).st_size
    print(q.handle.name, flush=True)
    deadline = time.monotonic() + 30  # bounded; killed long before
    sizes = [0, 64, 4096, size // 2, size]
    i = 0
    while time.monotonic() < deadline:  # never touches the memory while it is short
        os.ftruncate(fd, sizes[i % len(sizes)])
        i += 1
        time.sleep(0.0005)
    """
)


def test_ls_and_inspect_survive_a_segment_truncated_and_removed_under_them(children, own_segments):
    """Another process shrinks and regrows its segment while ``shmcast ls`` and ``inspect``
    read it, then dies (the segment goes): each command ends normally (no signal, no
    traceback), with a clear message where it could not read the queue."""
    child = children.start(TRUNCATING_CHILD)
    name = children.readline(child)
    own_segments.append(name)
    commands = [["ls"], ["ls", "--json"], ["inspect", name], ["inspect", name, "--json"]]
    outcomes = []
    for round_ in range(3):
        if round_ == 2:
            children.kill(child)  # the last round: the segment is gone
        for argv in commands:
            proc = subprocess.run([sys.executable, "-m", "shmcast", *argv], capture_output=True,
                                  text=True, timeout=STEP_TIMEOUT)  # fmt: skip
            assert proc.returncode in (0, 1), (argv, proc.returncode, proc.stderr)
            assert "Traceback" not in proc.stderr, (argv, proc.stderr)
            if proc.returncode == 1:
                assert proc.stderr.strip(), f"{argv} failed without saying why"
            outcomes.append((argv[0], proc.returncode))
    assert ("inspect", 1) in outcomes  # once gone, inspect says so
