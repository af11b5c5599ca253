"""Fault injection: checkable messages, victim processes that say where they are, a killer.

Everything a fault test needs beyond starting processes (which is ``_procs``'s job):

- :func:`make_message` / :func:`message_error`: a message carries its source, its sequence
  number, its length and a CRC-32 of its body, so that a reader checks every message it gets
  (order, gaps, truncation, corruption) without being told what was sent;
- :func:`send_message` / :func:`receive_message`: one message through a randomly chosen call
  (``put``, ``put_bytes``, ``reserve``; ``get``, ``view``);
- :func:`read_until_end`: a reader that checks everything it receives and stops at the first
  shmcast error (QueueClosed, QueueBroken, QueueTimeout), reporting a :class:`ReadReport`;
- victim targets (:func:`writer_victim`, :func:`reader_victim`) that announce, through a pipe,
  "I am about to do X" just before the operation the test wants to interrupt, and then do it;
- :class:`DelayedKill`: a thread that waits for that announcement, sleeps a chosen delay and
  SIGKILLs the victim.

Child targets are module-level functions so that ``spawn`` children can import them.  Every
blocking call here has a timeout: a fault that makes something hang shows up as a QueueTimeout
or a failed poll, never as a stuck test.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from _procs import segment_users

import shmcast
from shmcast import (
    BackoffWait,
    BroadcastQueue,
    FutexWait,
    IdleWait,
    QueueTimeout,
    SerializationError,
    ShmcastError,
    SpinWait,
    WaitPolicy,
)
from shmcast._segment import SHM_DIR

#: source (writer index, 0 for a broadcast writer), sequence number, total length, CRC-32 of
#: the body.  A message is this header followed by its body.
HEADER = struct.Struct("<IQQI")
MIN_SIZE = HEADER.size

OP_TIMEOUT = 10.0  # seconds any single put or get may block before the test calls it a hang
VICTIM_LIFETIME = 20.0  # a victim that was never killed gives up after this long
HOLD = 30.0  # how long a victim holds its position (it is killed long before)


# -- messages ---------------------------------------------------------------------------------


def make_message(source: int, seq: int, size: int, rng: random.Random) -> bytes:
    """Message ``seq`` of ``source``: ``size`` bytes (at least :data:`MIN_SIZE`), random body."""
    size = max(size, MIN_SIZE)
    body = rng.randbytes(size - MIN_SIZE)
    return HEADER.pack(source, seq, size, zlib.crc32(body)) + body


def message_error(data: Any, source: int, seq: int) -> str | None:
    """None if ``data`` is message ``seq`` of ``source``, intact; else what is wrong with it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return f"expected message {seq}: got a {type(data).__name__}"
    data = bytes(data)
    if len(data) < MIN_SIZE:
        return f"expected message {seq}: got {len(data)} bytes, shorter than a header"
    got_source, got_seq, size, crc = HEADER.unpack_from(data)
    if (got_source, got_seq) != (source, seq):
        return f"expected message {seq} of {source}: got message {got_seq} of {got_source}"
    if size != len(data):
        return f"message {seq} of {source}: {len(data)} bytes, its header says {size}"
    if zlib.crc32(data[MIN_SIZE:]) != crc:
        return f"message {seq} of {source} ({size} bytes): body corrupted (CRC mismatch)"
    return None


def message_source_and_seq(data: Any) -> tuple[int, int]:
    """(source, sequence number) from a message's header (no check)."""
    source, seq, _size, _crc = HEADER.unpack_from(bytes(data[:MIN_SIZE]))
    return source, seq


def random_size(rng: random.Random, slot_size: int, capacity: int) -> int:
    """A message size: one slot, several slots, up to the capacity, or streamed (larger)."""
    roll = rng.random()
    if roll < 0.35:
        return rng.randint(MIN_SIZE, slot_size)
    if roll < 0.65:
        return rng.randint(slot_size + 1, min(4 * slot_size, capacity))
    if roll < 0.85:
        return rng.randint(capacity // 2, capacity)
    return rng.randint(capacity + 1, 3 * capacity)


def send_message(queue: Any, message: bytes, rng: random.Random, timeout: float) -> None:
    """Send ``message`` through ``reserve`` (if it fits), ``put`` or ``put_bytes``, at random.
    Blocks and raises as those do."""
    roll = rng.random()
    if roll < 0.2 and len(message) <= queue.capacity:
        with queue.reserve(len(message), timeout=timeout) as region:
            region[:] = message
    elif roll < 0.55:
        queue.put(message, timeout=timeout)
    else:
        queue.put_bytes(message, timeout=timeout)


def receive_message(queue: Any, rng: random.Random, timeout: float, **where: Any) -> bytes:
    """Receive one message through ``get`` or ``view`` (copied out), at random.  ``where`` is
    passed on (``writer=`` for a gather queue)."""
    if rng.random() < 0.3:
        with queue.view(timeout=timeout, **where) as value:
            return bytes(value)
    return queue.get(timeout=timeout, **where)


def policy_named(name: str, slice_: float) -> WaitPolicy:
    """A wait policy by name, with a short slice (a dead peer is noticed within a slice)."""
    if name == "futex":
        return FutexWait(slice=slice_)
    if name == "spin":
        return SpinWait(slice=slice_)
    if name == "backoff":
        return BackoffWait(slice=slice_)
    if name == "idle":
        return IdleWait(busy_period=0.05, sleep=0.005, slice=slice_)
    raise ValueError(name)


def segment_left(name: str) -> str | None:
    """What is left of the segment ``name`` once every process of its queue has ended: None
    if nothing (no name in /dev/shm, and no process maps it or holds it open, so the kernel
    has freed it), else what is left (a name found is removed)."""
    try:
        shmcast._native.shm_unlink("/" + name)
    except FileNotFoundError:
        pass
    else:
        return f"its name was left in {SHM_DIR}"
    users = segment_users(name)
    return f"processes {sorted(users)} still use it" if users else None


# -- a checking reader ------------------------------------------------------------------------


@dataclass
class ReadReport:
    """What a reader got: how many messages, what was wrong, and what stopped it."""

    index: int
    count: int = 0  #: messages received
    errors: list[str] = field(default_factory=list)  #: wrong messages (first few)
    end: str = ""  #: class name of the shmcast error that ended the reading
    peer: str = ""  #: ``QueueBroken.peer`` if it ended so
    pid: int = 0  #: ``QueueBroken.pid`` if it ended so
    detail: str = ""  #: the ending error's text
    ended_at: float = 0.0  #: time.monotonic() when the ending error was raised
    first: int = -1  #: sequence number of the first message received

    def describe(self) -> str:
        return (
            f"reader {self.index}: {self.count} messages, ended by {self.end} ({self.detail!r}), "
            f"errors {self.errors}"
        )


def read_until_end(
    queue: Any,
    index: int,
    seed: int,
    *,
    source: int = 0,
    first: int | None = 0,
    timeout: float = OP_TIMEOUT,
    stall_at: int | None = None,
    stall: Callable[[], None] | None = None,
) -> ReadReport:
    """Receive and check messages ``first, first + 1, ...`` of ``source`` until a shmcast
    error ends it (``first=None``: whatever the first message is, then the ones after it).

    After ``stall_at`` messages, ``stall()`` is called once (a reader that stops reading for a
    while).  A wrong message is recorded and reading goes on (expecting the one after it), so
    that a bad reader never blocks its writer.  Never raises shmcast errors: they end the
    report.
    """
    rng = random.Random(seed)
    report = ReadReport(index)
    expected = first
    while True:
        if stall is not None and report.count == stall_at:
            stall()
            stall = None
        try:
            data = receive_message(queue, rng, timeout)
        except ShmcastError as exc:
            report.ended_at = time.monotonic()
            report.end = type(exc).__name__
            report.detail = str(exc)
            report.peer = getattr(exc, "peer", "")
            report.pid = getattr(exc, "pid", 0)
            return report
        report.count += 1
        if expected is None:
            with contextlib.suppress(Exception):
                expected = message_source_and_seq(data)[1]
            expected = -1 if expected is None else expected
        if report.count == 1:
            report.first = expected
        problem = message_error(data, source, expected)
        if problem is not None:
            if len(report.errors) < 10:
                report.errors.append(problem)
            with contextlib.suppress(Exception):
                expected = message_source_and_seq(data)[1]
        expected += 1


# -- child targets ----------------------------------------------------------------------------


def reader_survivor(
    handle: Any,
    index: int,
    wait: WaitPolicy | None,
    seed: int,
    pause_at: int | None = None,
    paused_out: Connection | None = None,
    resume_in: Connection | None = None,
) -> ReadReport:
    """Attach as reader ``index`` and :func:`read_until_end`; close; return the report.

    With ``pause_at``, after that many messages it sends ``"paused"`` on ``paused_out`` and
    waits for anything on ``resume_in`` before it goes on.
    """

    def pause() -> None:
        assert paused_out is not None and resume_in is not None
        paused_out.send("paused")
        if not resume_in.poll(OP_TIMEOUT):
            raise AssertionError("reader_survivor: never told to resume")

    with BroadcastQueue.attach(handle, index, wait=wait) as queue:
        return read_until_end(queue, index, seed, stall_at=pause_at, stall=pause)


def reader_attaches_on_command(
    handle: Any, index: int, seed: int, command_in: Connection, attached_out: Connection
) -> ReadReport:
    """Wait for anything on ``command_in``, attach as reader ``index``, send ``"attached"``
    on ``attached_out``, then read (from whatever message comes first) until the end."""
    if not command_in.poll(OP_TIMEOUT):
        raise AssertionError("reader_attaches_on_command: no command")
    with BroadcastQueue.attach(handle, index) as queue:
        attached_out.send("attached")
        return read_until_end(queue, index, seed, first=None)


def reader_closes_after(
    handle: Any, index: int, read: int, delay: float, where_out: Connection
) -> float:
    """Attach as reader ``index``, read ``read`` messages, send ``"holding"`` on
    ``where_out``, sleep ``delay`` s, close cleanly; return the monotonic time of the close."""
    queue = BroadcastQueue.attach(handle, index)
    for _ in range(read):
        queue.get(timeout=OP_TIMEOUT)
    where_out.send("holding")
    time.sleep(delay)
    closed_at = time.monotonic()
    queue.close()
    return closed_at


def writer_sends_then_holds(
    handle_out: Connection,
    where_out: Connection,
    n_readers: int,
    n_slots: int,
    slot_size: int,
    sizes: list[int],
    seed: int,
) -> None:
    """Create a broadcast queue, send its handle, wait for every reader, put one checkable
    message per entry of ``sizes``, send ``"sent"`` on ``where_out`` and sleep (to be killed)."""
    rng = random.Random(seed)
    queue = BroadcastQueue(n_readers, n_slots=n_slots, slot_size=slot_size)
    handle_out.send(queue.handle)
    queue.wait_until_ready(timeout=OP_TIMEOUT)
    for seq, size in enumerate(sizes):
        queue.put_bytes(make_message(0, seq, size, rng), timeout=OP_TIMEOUT)
    where_out.send("sent")
    time.sleep(HOLD)
    queue.close()


def gather_writer_sends_then_holds(
    handle: Any, index: int, sizes: list[int], seed: int, where_out: Connection
) -> None:
    """Attach as writer ``index`` of a gather queue, put one checkable message (source
    ``index``) per entry of ``sizes``, send ``"sent"`` on ``where_out`` and sleep (to be killed,
    or stopped by the test)."""
    rng = random.Random(seed)
    queue = shmcast.GatherQueue.attach(handle, writer=index)
    for seq, size in enumerate(sizes):
        send_message(queue, make_message(index, seq, size, rng), rng, OP_TIMEOUT)
    where_out.send("sent")
    time.sleep(HOLD)
    queue.close()


def gather_reader_holds(
    handle_out: Connection, where_out: Connection, n_writers: int, n_slots: int, slot_size: int
) -> None:
    """Create a gather queue, send its handle, wait for every writer, send ``"idle"`` on
    ``where_out`` and sleep without reading (to be killed)."""
    queue = shmcast.GatherQueue(n_writers, n_slots=n_slots, slot_size=slot_size)
    handle_out.send(queue.handle)
    queue.wait_until_ready(timeout=OP_TIMEOUT)
    where_out.send("idle")
    time.sleep(HOLD)
    queue.close()


def writer_victim(
    handle_out: Connection,
    where_out: Connection,
    progress: Any,
    n_readers: int,
    n_slots: int,
    slot_size: int,
    wait: WaitPolicy,
    seed: int,
    mode: str,
    announce_at: int,
) -> str:
    """Create a broadcast queue, send its handle on ``handle_out``, and put checkable messages
    ``0, 1, ...`` of random sizes until killed; ``progress.value`` is the number of puts that
    completed.  Before message ``announce_at`` it sends ``mode`` on ``where_out`` and then:

    - ``"put"``, ``"blocked_put"``: goes on putting (the test kills it inside a put, or while
      a put waits for a reader the test stalls);
    - ``"reserve"``: enters ``reserve``, fills half of it, and stays inside the block;
    - ``"blocked_get"``: stops putting and sleeps (its readers sleep in ``get``).

    Returns only if nobody killed it within :data:`VICTIM_LIFETIME` (the test then fails).
    """
    rng = random.Random(seed)
    give_up = time.monotonic() + VICTIM_LIFETIME
    queue = BroadcastQueue(n_readers, n_slots=n_slots, slot_size=slot_size, wait=wait)
    handle_out.send(queue.handle)
    queue.wait_until_ready(timeout=OP_TIMEOUT)
    seq = 0
    while time.monotonic() < give_up:
        size = random_size(rng, slot_size, queue.capacity)
        if seq == announce_at:
            if mode == "reserve":
                size = min(size, queue.capacity)
                message = make_message(0, seq, size, rng)
                with queue.reserve(size, timeout=OP_TIMEOUT) as region:
                    region[: size // 2] = message[: size // 2]
                    where_out.send(mode)
                    time.sleep(HOLD)
                    region[size // 2 :] = message[size // 2 :]
                seq += 1
                progress.value = seq
                continue
            elif mode == "blocked_get":
                where_out.send(mode)
                time.sleep(HOLD)
            else:
                where_out.send(mode)
        send_message(queue, make_message(0, seq, size, rng), rng, OP_TIMEOUT)
        seq += 1
        progress.value = seq
    queue.close()
    return "not killed"


def reader_victim(
    handle: Any, index: int, wait: WaitPolicy, where_out: Connection, mode: str, announce_at: int
) -> str:
    """Attach as reader ``index`` and read (and check nothing) until killed.  After
    ``announce_at`` messages it sends ``mode`` on ``where_out`` and then:

    - ``"get"``: goes on reading (the test kills it inside a get, or between two);
    - ``"view"``: enters ``view`` for the next message and stays inside the block;
    - ``"blocked_get"``: calls ``get`` on a queue the writer keeps empty (asleep in get);
    - ``"stall"``: stops reading and sleeps (its writer fills the ring and sleeps in put).
    """
    rng = random.Random(index)
    give_up = time.monotonic() + VICTIM_LIFETIME
    with BroadcastQueue.attach(handle, index, wait=wait) as queue:
        count = 0
        while time.monotonic() < give_up:
            if count == announce_at:
                if mode == "view":
                    with queue.view(timeout=OP_TIMEOUT):
                        where_out.send(mode)
                        time.sleep(HOLD)
                elif mode == "stall":
                    where_out.send(mode)
                    time.sleep(HOLD)
                else:
                    where_out.send(mode)
            receive_message(queue, rng, OP_TIMEOUT)
            count += 1
    return "not killed"


# -- the killer -------------------------------------------------------------------------------


class DelayedKill:
    """A thread that waits until a victim announces where it is, waits ``delay`` seconds more,
    and SIGKILLs it (it does not reap it: the test joins the process).

    ``on_kill`` runs in the thread right after the signal was sent.  After :meth:`join`,
    ``announced`` holds what the victim sent (None if it sent nothing within ``timeout``: the
    victim is then killed anyway, and the test should fail), ``killed_at`` the monotonic time
    taken just before the signal was sent (so that nothing the victim's death causes can be
    timed before it).  :attr:`killed` is set once the signal was sent.
    """

    def __init__(
        self,
        pid: int,
        where_in: Connection,
        delay: float,
        *,
        timeout: float = OP_TIMEOUT,
        on_kill: Callable[[], None] | None = None,
    ) -> None:
        self.pid = pid
        self.delay = delay
        self.announced: str | None = None
        self.killed_at = 0.0
        self.killed = threading.Event()
        self._where_in = where_in
        self._timeout = timeout
        self._on_kill = on_kill
        self._thread = threading.Thread(target=self._run, name=f"kill-{pid}", daemon=True)

    def start(self) -> DelayedKill:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            if self._where_in.poll(self._timeout):
                with contextlib.suppress(EOFError, OSError):
                    self.announced = self._where_in.recv()
            if self.delay > 0:
                time.sleep(self.delay)
        finally:
            self.killed_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if self._on_kill is not None:
                self._on_kill()
            self.killed.set()

    def wait(self, timeout: float = OP_TIMEOUT) -> None:
        """Block until the kill was sent (AssertionError after ``timeout``)."""
        if not self.killed.wait(timeout):
            raise AssertionError(f"the victim (pid {self.pid}) was not killed in {timeout} s")

    def join(self, timeout: float = OP_TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the killer thread did not finish")
        self._where_in.close()


def writer_publishes_on_command_then_dies(
    handle_out: Connection, go_in: Connection, gather: bool
) -> None:
    """Broadcast (``gather=False``): create a one-reader queue and send its handle; gather:
    receive a gather queue's handle on ``go_in`` and attach as writer 0.  Then wait for
    anything on ``go_in``, put ``"last words"``, and SIGKILL itself at once (a writer that dies
    right after publishing)."""
    if gather:
        if not go_in.poll(OP_TIMEOUT):
            raise AssertionError("no handle")
        queue: Any = shmcast.GatherQueue.attach(go_in.recv(), writer=0)
        handle_out.send("attached")
    else:
        queue = BroadcastQueue(1, n_slots=4, slot_size=256)
        handle_out.send(queue.handle)
    if not go_in.poll(OP_TIMEOUT):
        raise AssertionError("no command")
    go_in.recv()
    queue.put("last words", timeout=OP_TIMEOUT)
    os.kill(os.getpid(), signal.SIGKILL)


def gather_writer_publishes_on_command_then_closes(
    handle: Any, index: int, go_in: Connection, done_out: Connection
) -> None:
    """Attach as writer ``index``; on anything on ``go_in``, put ``"last words"``, close
    cleanly and send ``"done"`` on ``done_out``."""
    queue = shmcast.GatherQueue.attach(handle, writer=index)
    if not go_in.poll(OP_TIMEOUT):
        raise AssertionError("no command")
    queue.put("last words", timeout=OP_TIMEOUT)
    queue.close()
    done_out.send("done")


# -- corruption: random bytes written into a live queue from another process -------------------

#: Regions of a segment the fuzzer writes into (offsets from ``regions``).
REGIONS = ("header", "writer", "control", "lines", "descriptors", "data")


def regions(geometry: Any) -> dict[str, tuple[int, int]]:
    """``region -> (start, end)`` byte ranges of a segment of ``geometry`` (a
    ``_layout.Geometry``): the header, the broadcast writer's line (a gather queue's first
    writer line), the queue-wide control lines (sleepers, futex words, spinners), the
    participant lines, the slot descriptors, the slot data."""
    from shmcast import _layout as L

    writer = (L.BCAST_WRITER_OFF, L.BCAST_WRITER_OFF + L.LINE)
    if geometry.kind == L.KIND_GATHER:
        writer = (L.PEERS_OFF, L.PEERS_OFF + L.LINE)
    return {
        "header": (0, L.LINE),
        "writer": writer,
        "control": (L.SLEEPERS_OFF, L.PEERS_OFF),
        "lines": (L.PEERS_OFF, geometry.desc_off),
        "descriptors": (
            geometry.desc_off,
            geometry.desc_off + L.DESC_SIZE * geometry.n_slots * geometry.n_rings,
        ),
        "data": (geometry.data_off, geometry.total_size),
    }


def scribble(rng: random.Random, start: int, end: int) -> list[tuple[int, bytes]]:
    """What a stray process might write into ``[start, end)``: a few random bytes, a random
    or extreme aligned word, or the whole region at random."""
    roll = rng.random()
    if roll < 0.35:
        n = rng.randint(1, 8)
        at = rng.randrange(start, max(start + 1, end - n))
        return [(at, rng.randbytes(n))]
    if roll < 0.8:
        at = rng.randrange(start, end - 7) & ~7
        value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(64),
                            rng.getrandbits(20), rng.getrandbits(8)])  # fmt: skip
        return [(at, value.to_bytes(8, "little"))]
    return [(start, rng.randbytes(end - start))]


def corrupter(requests: Connection, replies: Connection) -> int:
    """Child target: for each ``(path, writes)`` received, map the segment at ``path`` (a
    queue's handle path) and store each ``(offset, bytes)``; reply ``"done"`` (or the
    error).  Ends on ``None``; returns how many requests it served."""
    import mmap as _mmap

    served = 0
    while True:
        request = requests.recv()
        if request is None:
            return served
        path, writes = request
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                mapping = _mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            for at, data in writes:
                mapping[at : at + len(data)] = data
            mapping.close()
            replies.send("done")
        except OSError as exc:
            replies.send(f"failed: {exc}")
        served += 1


@dataclass
class FuzzReport:
    """What one corruption iteration saw."""

    seed: int
    region: str
    kind: str
    checksum: bool
    calls: int = 0  #: puts and gets after the corruption
    late: list[str] = field(default_factory=list)  #: calls that outlived their timeout
    escaped: list[str] = field(default_factory=list)  #: exceptions outside ShmcastError
    wrong: list[str] = field(default_factory=list)  #: messages delivered wrong, no error
    duplicates: list[str] = field(default_factory=list)  #: messages delivered twice
    #: wrong messages where nothing can tell: bytes written into the data region of a queue
    #: without checksums
    payload_changed: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  #: documented errors, by class
    hang: str = ""  #: a thread that did not end


def _timed(report: FuzzReport, what: str, timeout: float, call: Callable[[], Any]) -> Any:
    """Run one queue call of the fuzzer: record its error class, a late return, an escaped
    exception.  Returns the call's value, or the exception it raised."""
    report.calls += 1
    started = time.monotonic()
    try:
        return call()
    except ShmcastError as exc:
        report.errors[type(exc).__name__] = report.errors.get(type(exc).__name__, 0) + 1
        return exc
    except Exception as exc:  # the fuzzer's finding: an undocumented exception escaped
        report.escaped.append(f"{what}: {type(exc).__name__}: {exc}")
        return exc
    finally:
        took = time.monotonic() - started
        if took > timeout + FUZZ_SLACK:
            report.late.append(f"{what} took {took:.2f} s (timeout {timeout} s)")


FUZZ_SLACK = 1.0  # seconds a call may overrun its timeout before it counts as a hang
FUZZ_MESSAGES = 24  # messages per source and iteration


class _Expect:
    """Checks the messages of one source as they arrive: each intact, never twice, never
    out of order, and a gap only right after a documented error (a message consumed by a
    SerializationError)."""

    def __init__(self, report: FuzzReport, source: int) -> None:
        self.report, self.source = report, source
        self.next = 0
        self.gap_allowed = False

    def error(self) -> None:
        self.gap_allowed = True

    def wrong(self, problem: str) -> None:
        """Record a wrong delivery (apart, where nothing could have told)."""
        r = self.report
        undetectable = r.region == "data" and not r.checksum
        (r.payload_changed if undetectable else r.wrong).append(problem)

    def deliver(self, data: Any) -> None:
        where = f"{self.report.kind} source {self.source}"
        try:
            got_source, got_seq = message_source_and_seq(data)
        except Exception:
            self.wrong(f"{where}: not a message ({type(data).__name__})")
            return
        if got_source != self.source or got_seq > FUZZ_MESSAGES:
            self.wrong(f"{where}: got message {got_seq} of {got_source}")
            return
        if got_seq < self.next:
            if self.report.region == "data" and not self.report.checksum:
                self.wrong(f"{where}: message {got_seq} again (its header bytes changed?)")
            else:
                self.report.duplicates.append(f"{where}: message {got_seq} again")
            return
        if got_seq > self.next and not self.gap_allowed:
            self.wrong(f"{where}: expected {self.next}, got {got_seq}")
        problem = message_error(data, self.source, got_seq)
        if problem is not None:
            self.wrong(problem)
        self.next, self.gap_allowed = got_seq + 1, False


def _fuzz_sender(queue: Any, source: int, seed: int, timeout: float, report: FuzzReport,
                 capacity: int) -> None:  # fmt: skip
    rng = random.Random(seed)
    for seq in range(FUZZ_MESSAGES):
        size = random_size(rng, queue.slot_size, capacity)
        message = make_message(source, seq, size, rng)
        if isinstance(_timed(report, "put", timeout, lambda m=message: send_message(
                queue, m, rng, timeout)), BaseException):  # fmt: skip
            return


def _fuzz_reader(reader: Any, expects: list[_Expect], seed: int, timeout: float,
                 report: FuzzReport, total: int, progress: list[int], r: int,
                 corrupted: threading.Event) -> None:  # fmt: skip
    """Receive until ``total`` messages arrived, or an error that ends the stream, or two
    timeouts in a row after the corruption; check each message."""
    rng = random.Random(seed)
    idle = 0
    while progress[r] < total:
        result = _timed(report, "get", timeout, lambda: receive_message(reader, rng, timeout))
        if isinstance(result, BaseException):
            for expect in expects:
                expect.error()
            idle = idle + 1 if isinstance(result, QueueTimeout) else 0
            if not isinstance(result, (QueueTimeout, SerializationError)):
                return  # broken, closed or corrupted: every later call says so again
            if idle > (1 if corrupted.is_set() else 10):
                return  # nothing more comes
            continue
        idle = 0
        progress[r] += 1
        source = _source_of(result) if len(expects) > 1 else 0
        if source not in range(len(expects)):
            expects[0].wrong(f"{report.kind}: a message of source {source}")
            continue
        expects[source].deliver(result)


def fuzz_iteration(seed: int, region: str, requests: Connection, replies: Connection,
                   timeout: float) -> FuzzReport:  # fmt: skip
    """One iteration: a small queue in this process (a writer thread per source, a reader
    thread per reader), messages flowing; at a random point another process
    (:func:`corrupter`) writes random bytes into ``region``; then every call must return
    within its timeout with a documented error or a correct message."""
    from _procs import handle_path

    from shmcast import GatherQueue, _layout

    rng = random.Random(seed)
    kind = rng.choice(["broadcast", "gather"])
    checksum = rng.random() < 0.5
    report = FuzzReport(seed, region, kind, checksum)
    n_slots, slot = rng.choice([4, 8, 16]), rng.choice([64, 128, 256])
    wait = FutexWait(slice=0.05)
    opened: list[Any] = []
    threads: list[threading.Thread] = []
    corrupted = threading.Event()
    try:
        if kind == "broadcast":
            queue = BroadcastQueue(2, n_slots=n_slots, slot_size=slot, wait=wait,
                                   checksum=checksum)  # fmt: skip
            opened.append(queue)
            readers = [BroadcastQueue.attach(queue.handle, i, wait=wait) for i in range(2)]
            opened += readers
            senders = [(queue, 0)]
            handle, geometry_kind = queue.handle, _layout.KIND_BROADCAST
            expects = [[_Expect(report, 0)], [_Expect(report, 0)]]
        else:
            gather = GatherQueue(2, n_slots=n_slots, slot_size=slot, wait=wait, checksum=checksum)
            opened.append(gather)
            writers = [GatherQueue.attach(gather.handle, j, wait=wait) for j in range(2)]
            opened += writers
            readers = [gather]
            senders = [(w, j) for j, w in enumerate(writers)]
            handle, geometry_kind = gather.handle, _layout.KIND_GATHER
            expects = [[_Expect(report, 0), _Expect(report, 1)]]
        geometry = _layout.Geometry(geometry_kind, 2, n_slots, slot)
        total = FUZZ_MESSAGES * len(senders)
        progress = [0] * len(readers)
        for queue_, source in senders:
            threads.append(threading.Thread(
                target=_fuzz_sender,
                args=(queue_, source, seed + source, timeout, report, geometry.capacity),
                daemon=True,
            ))  # fmt: skip
        for r, reader in enumerate(readers):
            threads.append(threading.Thread(
                target=_fuzz_reader,
                args=(reader, expects[r], seed + 10 + r, timeout, report, total, progress, r,
                      corrupted),
                daemon=True,
            ))  # fmt: skip
        for t in threads:
            t.start()
        start, end = regions(geometry)[region]
        corrupt_after = rng.randint(0, total // 2)
        give_up = time.monotonic() + 5
        while min(progress) < corrupt_after and time.monotonic() < give_up:
            time.sleep(0.0005)
        requests.send((handle_path(handle), scribble(rng, start, end)))
        reply = replies.recv()
        assert reply == "done", reply
        corrupted.set()
        for t in threads[len(senders) :]:  # the readers end by themselves
            t.join(total * (timeout + FUZZ_SLACK))
    finally:
        for queue_ in opened:  # closing frees a put blocked by a reader that stopped
            _timed(report, "close", timeout, queue_.close)
        for t in threads:
            t.join(timeout + FUZZ_SLACK)
            if t.is_alive():
                report.hang = f"a thread of seed {seed} did not end"
    return report


def _source_of(data: Any) -> int:
    try:
        return message_source_and_seq(data)[0]
    except Exception:
        return -1


def fuzz_victim(seeds: list[int], requests: Connection, replies: Connection,
                timeout: float) -> list[FuzzReport]:  # fmt: skip
    """Child target: run :func:`fuzz_iteration` for every seed, each in its region (seed
    modulo the regions), and return the reports."""
    return [
        fuzz_iteration(seed, REGIONS[seed % len(REGIONS)], requests, replies, timeout)
        for seed in seeds
    ]


# -- interrupts: a signal handler that raises inside a queue's call -------------------------


class Interrupter:
    """SIGALRM at random intervals (a one-shot real-time timer, re-armed by the handler); the
    handler raises KeyboardInterrupt while ``armed``.

    The loops below arm it around one call of the queue, and disarm it with a plain attribute
    store (no call) as soon as the call returns or raises, so that an interrupt lands inside
    the queue's call and never in the test's own bookkeeping.  The tests that use it run
    pytest-timeout's thread method, which leaves SIGALRM alone.
    """

    def __init__(self, seed: int, low_us: int = 10, high_us: int = 200) -> None:
        self.rng = random.Random(seed)
        self.low, self.high = low_us, high_us
        self.armed = False
        self.raised = 0
        self._running = False

    def _arm_timer(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, self.rng.randint(self.low, self.high) / 1e6)

    def _handler(self, signum: int, frame: Any) -> None:
        if not self._running:
            return  # a signal delivered just before the timer was stopped: re-arm nothing
        self._arm_timer()
        if self.armed:
            self.armed = False
            self.raised += 1
            raise KeyboardInterrupt

    @contextmanager
    def running(self) -> Iterator[Interrupter]:
        previous = signal.signal(signal.SIGALRM, self._handler)
        self._running = True
        self._arm_timer()
        try:
            yield self
        finally:
            self.armed = self._running = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def broadcast_sender(writer: BroadcastQueue, count: int, seed: int, errors: list) -> None:
    rng = random.Random(seed)
    try:
        for seq in range(count):
            size = rng.choice([16, 100, 300, writer.capacity, 3 * writer.capacity])
            writer.put_bytes(make_message(0, seq, size, rng), timeout=30)
    except BaseException as exc:  # reported by the test
        errors.append(exc)


RECEIVES = ("get", "get_bytes", "get_many", "view")


def interrupted_receive(
    queue: Any, how: str, interrupter: Interrupter, timeout: float
) -> list[bytes]:
    """One receive call; a view's block disarms the interrupter first (from there on the
    message is the block's, delivered: what the block does with it is the test's)."""
    if how == "get":
        return [queue.get(timeout=timeout)]
    if how == "get_bytes":
        return [queue.get_bytes(timeout=timeout)]
    if how == "get_many":
        return queue.get_many(3, timeout=timeout)
    with queue.view(timeout=timeout) as view:
        interrupter.armed = False
        return [bytes(view)]
