"""Everything the tests need to run code in other processes, in one place.

- :func:`process_group` starts child processes under a given start method (``fork``,
  ``forkserver``, ``spawn``), collects what each returns through its own pipe with a deadline,
  and always stops them (terminate, then kill) and joins them when the block exits.
- Child *targets* are module-level functions of this module, so that ``spawn`` and
  ``forkserver`` children can import them.  A target's return value (or its traceback) is sent
  back to the parent; an exception in a child becomes a :class:`ChildFailed` in the parent.
- :func:`message_payload` and friends define the deterministic messages the tests send, so that
  a reader process can check every message it receives (sequence number and content) without
  being told what was sent.
- :func:`process_table` / :func:`descendants` read ``/proc`` (for the leak check in conftest),
  and :func:`record_child` keeps the pids of every process the tests started, so that a
  segment left behind by one of them can be told apart from another program's.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from shmcast import FutexWait
from shmcast._liveness import all_stat_fields
from shmcast._segment import SHM_DIR

START_METHODS = ("fork", "forkserver", "spawn")
DEFAULT_TIMEOUT = 60.0  # seconds a child may take to report before the test fails
STOP_GRACE = 2.0  # seconds a child gets to exit after terminate() before it is killed

# -- pids of the processes the tests started --------------------------------------------------

_recorded_children: set[int] = set()


def record_child(pid: int) -> None:
    """Remember that this test process started ``pid`` (directly or not)."""
    _recorded_children.add(pid)


def recorded_children() -> frozenset[int]:
    """Every pid passed to :func:`record_child` in this process."""
    return frozenset(_recorded_children)


# -- /proc ------------------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, state letter)`` for every process visible in /proc."""
    return {pid: (int(fields[1]), fields[0].decode()) for pid, fields in all_stat_fields()}


def handle_path(handle: Any) -> str:
    """A path that opens the segment behind a queue's ``handle`` (which has no name in
    /dev/shm): the creator's descriptor, in /proc."""
    return f"/proc/{handle.pid}/fd/{handle.fd}"


def segment_users(name: str) -> set[int]:
    """The pids of every visible process that maps the segment called ``name`` or holds it
    open: while this set is not empty the kernel keeps the segment, once it is, it is gone."""
    path = f"{SHM_DIR}/{name}"
    users = set()
    for pid, _fields in all_stat_fields():
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(path in line for line in f):
                    users.add(pid)
                    continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(path):
                        users.add(pid)
                        break
        except OSError:
            continue  # gone, or not ours to look at
    return users


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, state)`` of every process below ``root`` in the process tree."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, tuple[int, str]] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found[pid] = table[pid]
        todo.extend(children.get(pid, ()))
    return found


def multiprocessing_helpers() -> set[int]:
    """Pids of the long-lived helper processes multiprocessing starts once per session (the
    forkserver and the resource tracker); they are not leaks."""
    pids: set[int] = set()
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver

        pid = forkserver._forkserver._forkserver_pid
        if pid:
            pids.add(pid)
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        pid = resource_tracker._resource_tracker._pid
        if pid:
            pids.add(pid)
    return pids


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``"Z"`` for a zombie), or None if it is gone."""
    entry = process_table().get(pid)
    return None if entry is None else entry[1]


def wait_for_state(pid: int, states: str, timeout: float) -> str | None:
    """Poll until ``pid`` is in one of ``states`` (letters) or gone; return the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = process_state(pid)
        if state is None or state in states or time.monotonic() >= deadline:
            return state
        time.sleep(0.01)


# -- running children -------------------------------------------------------------------------


class ChildFailed(AssertionError):
    """A child process raised, died, or did not report in time."""


@dataclass
class Child:
    """One started child: its process, the parent's end of its result pipe, and a label."""

    process: multiprocessing.process.BaseProcess
    results: multiprocessing.connection.Connection
    label: str
    pid: int
    reported: bool = False
    value: Any = None


def _child_main(results: multiprocessing.connection.Connection, target: Callable, args) -> None:
    """What every child runs: call ``target(*args)`` and send ``("ok", value)`` or
    ``("error", traceback)`` to the parent."""
    try:
        value = target(*args)
    except BaseException:
        payload: tuple[str, Any] = ("error", traceback.format_exc())
    else:
        payload = ("ok", value)
    try:
        results.send(payload)
    except Exception:
        results.send(("error", "the result could not be sent:\n" + traceback.format_exc()))
    finally:
        results.close()


@dataclass
class ProcessGroup:
    """Children started under one start method.  Use through :func:`process_group`, which
    stops every child when its block exits, whatever happens.

    Only the thread that made the group may use it.  Methods that wait (:meth:`result`,
    :meth:`results`, :meth:`join`) raise :class:`ChildFailed` instead of waiting past their
    timeout.
    """

    method: str
    timeout: float = DEFAULT_TIMEOUT
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in START_METHODS:
            raise ValueError(f"unknown start method {self.method!r}")
        self.context = multiprocessing.get_context(self.method)
        self._child_ends: list[multiprocessing.connection.Connection] = []

    def channel(
        self,
    ) -> tuple[multiprocessing.connection.Connection, multiprocessing.connection.Connection]:
        """A one-way pipe ``(parent_end, child_end)`` from parent to child: pass ``child_end``
        to :meth:`start` (the parent's copy is closed then) and ``send`` on ``parent_end``."""
        child_end, parent_end = self.context.Pipe(duplex=False)
        self._child_ends.append(child_end)
        return parent_end, child_end

    def back_channel(
        self,
    ) -> tuple[multiprocessing.connection.Connection, multiprocessing.connection.Connection]:
        """A one-way pipe ``(parent_end, child_end)`` from child to parent: pass ``child_end``
        to :meth:`start` and ``recv`` on ``parent_end``."""
        parent_end, child_end = self.context.Pipe(duplex=False)
        self._child_ends.append(child_end)
        return parent_end, child_end

    def start(self, target: Callable, *args: Any, label: str | None = None) -> Child:
        """Start ``target(*args)`` in a new process (``target`` must be module-level)."""
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_child_main, args=(send, target, args), daemon=True, name=label
        )
        try:
            process.start()
        finally:
            send.close()
        assert process.pid is not None
        record_child(process.pid)
        label = label or f"{target.__name__}#{len(self.children)}"
        child = Child(process, receive, label, process.pid)
        self.children.append(child)
        for arg in args:
            if any(arg is end for end in self._child_ends):
                arg.close()
                self._child_ends = [end for end in self._child_ends if end is not arg]
        return child

    def result(self, child: Child, timeout: float | None = None) -> Any:
        """Wait for ``child``'s result (at most ``timeout`` s, default the group's)."""
        if child.reported:
            return child.value
        wait = self.timeout if timeout is None else timeout
        try:
            ready = child.results.poll(wait)
        except (EOFError, OSError):
            ready = True
        if not ready:
            raise ChildFailed(
                f"{child.label} (pid {child.pid}) did not report within {wait:g} s "
                f"(alive: {child.process.is_alive()})"
            )
        try:
            status, value = child.results.recv()
        except (EOFError, OSError):
            child.process.join(STOP_GRACE)
            raise ChildFailed(
                f"{child.label} (pid {child.pid}) died without reporting "
                f"(exit code {child.process.exitcode})"
            ) from None
        child.reported = True
        if status != "ok":
            raise ChildFailed(f"{child.label} (pid {child.pid}) failed:\n{value}")
        child.value = value
        return value

    def results(self, timeout: float | None = None) -> list[Any]:
        """Every child's result, in start order, within one overall deadline."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [
            self.result(child, max(0.0, deadline - time.monotonic())) for child in self.children
        ]

    def join(self, child: Child, timeout: float | None = None) -> int:
        """Wait until ``child`` exits; return its exit code."""
        wait = self.timeout if timeout is None else timeout
        child.process.join(wait)
        if child.process.exitcode is None:
            raise ChildFailed(f"{child.label} (pid {child.pid}) did not exit within {wait:g} s")
        return child.process.exitcode

    def kill(self, child: Child) -> None:
        """SIGKILL ``child`` and reap it."""
        child.process.kill()
        child.process.join(STOP_GRACE * 5)

    def stop(self) -> None:
        """Stop every child: join briefly, terminate, kill; close every pipe."""
        for child in self.children:
            child.process.join(0.05)
        for child in self.children:
            if child.process.is_alive():
                child.process.terminate()
        for child in self.children:
            child.process.join(STOP_GRACE)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(STOP_GRACE * 5)
        for child in self.children:
            child.results.close()
            with contextlib.suppress(ValueError):
                child.process.close()
        for end in self._child_ends:
            end.close()
        self._child_ends.clear()


@contextmanager
def process_group(method: str = "fork", timeout: float = DEFAULT_TIMEOUT) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` whose children are all stopped and joined on exit."""
    group = ProcessGroup(method, timeout)
    try:
        yield group
    finally:
        group.stop()


# -- the messages the tests send --------------------------------------------------------------

RAW = "raw"
OBJECT = "object"
_HEAD = struct.Struct("<QQ")  # seed, message number


def run_command(
    cmd: Sequence[str],
    timeout: float,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a session of its own, with no stdin; capture its output as text.  If it
    overruns ``timeout``, kill its whole process group and fail the test."""
    import pytest

    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} hung for {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def message_payload(seed: int, number: int, size: int) -> bytes:
    """The ``size`` bytes of message ``number`` of a run: the run's seed and the message number
    (truncated for tiny sizes), then pseudo-random bytes that depend on both."""
    head = _HEAD.pack(seed, number)
    if size <= len(head):
        return head[:size]
    body = random.Random(seed * 1_000_003 + number).randbytes(size - len(head))
    return head + body


def message_object(seed: int, number: int, size: int) -> tuple[str, int, bytes]:
    """The object sent as message ``number`` when it goes through ``put``."""
    return ("msg", number, message_payload(seed, number, size))


def send_plan(queue: Any, seed: int, plan: Sequence[tuple[str, int]], timeout: float) -> None:
    """Writer side: send every message of ``plan`` (``(kind, size)`` pairs) in order."""
    for number, (kind, size) in enumerate(plan):
        send_plan_one(queue, seed, number, kind, size, timeout)


def send_plan_one(queue: Any, seed: int, number: int, kind: str, size: int,
                  timeout: float) -> None:  # fmt: skip
    """Send message ``number`` of a plan (see :func:`send_plan`)."""
    if kind == RAW:
        queue.put_bytes(message_payload(seed, number, size), timeout=timeout)
    else:
        queue.put(message_object(seed, number, size), timeout=timeout)


def _describe(data: Any) -> str:
    if isinstance(data, bytes) and len(data) >= _HEAD.size:
        seed, number = _HEAD.unpack_from(data)
        return f"{len(data)} bytes starting with seed {seed} message {number}"
    if isinstance(data, tuple) and len(data) == 3:
        return f"object for message {data[1]} with {len(data[2])} payload bytes"
    return f"{type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}"


def check_message(reader: Any, seed: int, plan: Sequence[tuple[str, int]], number: int,
                  got: Any, digest: Any) -> None:  # fmt: skip
    """Check that ``got`` is message ``number`` of ``plan`` as :func:`send_plan` sent it
    (AssertionError naming ``reader`` otherwise), and add it to ``digest``."""
    if number >= len(plan):
        raise AssertionError(f"reader {reader}: unexpected extra {_describe(got)}")
    kind, size = plan[number]
    if kind == RAW:
        want: Any = message_payload(seed, number, size)
    else:
        want = message_object(seed, number, size)
    if got != want:
        raise AssertionError(
            f"reader {reader}: message {number} ({kind}, {size} bytes) is wrong: "
            f"got {_describe(got)}"
        )
    digest.update(repr((number, kind, size)).encode())


def check_plan(
    queue: Any, seed: int, plan: Sequence[tuple[str, int]], timeout: float, expect_close: bool
) -> dict[str, Any]:
    """Reader side: receive every message of ``plan`` and check each one, in order, against
    what :func:`send_plan` sent.  Raises AssertionError at the first difference; with
    ``expect_close``, also checks that the next ``get`` raises QueueClosed.  Returns a summary:
    ``{"count", "digest", "stats"}``."""
    from shmcast import QueueClosed

    digest = hashlib.sha256()
    for number in range(len(plan)):
        check_message(queue.reader, seed, plan, number, queue.get(timeout=timeout), digest)
    if expect_close:
        try:
            extra = queue.get(timeout=timeout)
        except QueueClosed:
            pass
        else:
            raise AssertionError(f"reader {queue.reader}: unexpected extra {_describe(extra)}")
    stats = queue.stats()
    return {"count": len(plan), "digest": digest.hexdigest(), "stats": stats}


def plan_digest(plan: Sequence[tuple[str, int]]) -> str:
    """The digest :func:`check_plan` returns for a fully received plan."""
    digest = hashlib.sha256()
    for number, (kind, size) in enumerate(plan):
        digest.update(repr((number, kind, size)).encode())
    return digest.hexdigest()


# -- child targets ----------------------------------------------------------------------------


def reader_check_plan(
    handle: Any,
    reader: int,
    seed: int,
    plan: Sequence[tuple[str, int]],
    wait: Any = None,
    timeout: float = 30.0,
    expect_close: bool = True,
) -> dict[str, Any]:
    """Attach as ``reader``, receive and check every message of ``plan`` (see
    :func:`check_plan`), close."""
    from shmcast import BroadcastQueue

    with BroadcastQueue.attach(handle, reader, wait=wait) as queue:
        return check_plan(queue, seed, plan, timeout, expect_close)


def reader_check_plan_after_go(
    handle: Any,
    reader: int,
    go: multiprocessing.connection.Connection,
    seed: int,
    plan: Sequence[tuple[str, int]],
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Attach, then wait for anything on ``go`` before reading (so that the writer fills the
    ring first), then check ``plan`` as :func:`reader_check_plan` does."""
    from shmcast import BroadcastQueue

    with BroadcastQueue.attach(handle, reader) as queue:
        if not go.poll(timeout):
            raise AssertionError("no go signal")
        go.recv()
        return check_plan(queue, seed, plan, timeout, expect_close=True)


def reader_arrays(handle: Any, reader: int, count: int, zero_copy: bool) -> list[dict[str, Any]]:
    """Receive ``count`` numpy arrays (or tuples of them) and describe each: dtype, shape,
    contiguity, the values, and (for ``view``) whether it lies in the ring."""
    import numpy as np

    from shmcast import BroadcastQueue

    def describe(array: Any, ring: Any) -> dict[str, Any]:
        return {
            "dtype": array.dtype.str,
            "shape": array.shape,
            "c_contiguous": bool(array.flags.c_contiguous),
            "f_contiguous": bool(array.flags.f_contiguous),
            "values": np.array(array, copy=True, order="K"),
            "in_ring": None if ring is None else bool(np.shares_memory(array, ring)),
        }

    out = []
    with BroadcastQueue.attach(handle, reader) as queue:
        ring = np.frombuffer(queue._seg.buf, dtype=np.uint8)
        for _ in range(count):
            if zero_copy:
                with queue.view(timeout=30) as value:
                    items = value if isinstance(value, tuple) else (value,)
                    out.append([describe(a, ring) for a in items])
                    del items, value
            else:
                value = queue.get(timeout=30)
                items = value if isinstance(value, tuple) else (value,)
                out.append([describe(a, ring) for a in items])
        del ring
    return out


def reader_shared_arrays(
    handle: Any, reader: int, count: int, hold: int, report: multiprocessing.connection.Connection
) -> list[tuple[int, float, bool]]:
    """Receive ``count`` arrays with ``get_shared``, keeping the first ``hold`` of them (the
    others are dropped at once); say on ``report`` that the held ones are in hand, then wait
    for the parent's go (``report`` is two-way), check that the held ones still hold what they
    held, and return ``(first value, sum, writeable)`` per message."""
    from shmcast import BroadcastQueue

    out = []
    held = []
    with BroadcastQueue.attach(handle, reader) as queue:
        for n in range(count):
            array = queue.get_shared(timeout=30)["a"]
            out.append((int(array[0]), float(array.sum()), bool(array.flags.writeable)))
            if n < hold:
                held.append(array)
            del array
        report.send("held")
        report.poll(60)
        for n, array in enumerate(held):
            if (int(array[0]), float(array.sum())) != out[n][:2]:
                raise AssertionError(f"held array {n} changed under the reader")
    return out


def reader_hold_shared_and_stall(
    handle: Any, reader: int, count: int, report: multiprocessing.connection.Connection
) -> None:
    """Receive ``count`` messages with ``get_shared`` and keep them all, say so on ``report``,
    then wait (at most two minutes) to be killed."""
    from shmcast import BroadcastQueue

    queue = BroadcastQueue.attach(handle, reader)
    kept = [queue.get_shared(timeout=30) for _ in range(count)]
    report.send(len(kept))
    time.sleep(120)
    queue.close()


def reader_attach_and_hold(
    handle: Any, reader: int, control: multiprocessing.connection.Connection, read: int = 0
) -> None:
    """Attach, read ``read`` messages, then block until the parent sends anything on
    ``control`` (or two minutes pass).  Dead-reader tests kill this process meanwhile; the
    parent learns that it attached through ``wait_until_ready``."""
    from shmcast import BroadcastQueue

    queue = BroadcastQueue.attach(handle, reader)
    for _ in range(read):
        queue.get(timeout=30)
    control.poll(120)
    queue.close()


def writer_then_die(
    report: multiprocessing.connection.Connection,
    n_readers: int,
    messages: Sequence[bytes],
    control: multiprocessing.connection.Connection,
) -> None:
    """Create a queue, report its handle, wait for every reader, put ``messages``, report
    ``"sent"``, then wait for the parent (which kills this process: a writer that dies)."""
    from shmcast import BroadcastQueue

    queue = BroadcastQueue(n_readers, n_slots=8, slot_size=256)
    report.send(queue.handle)
    queue.wait_until_ready(timeout=30)
    for message in messages:
        queue.put_bytes(message, timeout=30)
    report.send("sent")
    control.poll(120)
    os.kill(os.getpid(), signal.SIGKILL)  # die without any cleanup, whatever happens


def futex_waiter(shm_name: str, offset: int, expected: int, timeout: float) -> tuple[bool, float]:
    """Map the shared-memory object ``shm_name`` and ``wait32`` on the word at ``offset``;
    return (what wait32 returned, seconds it took)."""
    import mmap

    from shmcast import _native

    fd = _native.shm_open(shm_name, os.O_RDWR, 0)
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    atomics = _native.Atomics(mapping)
    try:
        started = time.monotonic()
        woken = atomics.wait32(offset, expected, timeout)
        return woken, time.monotonic() - started
    finally:
        atomics.release()
        mapping.close()


def report_identity() -> tuple[int, tuple[int, int], int]:
    """(os.getpid(), shmcast's identity(), the start time read from /proc) of this child."""
    from shmcast._liveness import identity, process_start_time

    return os.getpid(), identity(), process_start_time(os.getpid())


def reader_close_in_ways(handle: Any, reader: int, how: str) -> bool:
    """Attach and leave in one of three ways: ``"close"``, ``"gc"`` (drop the last
    reference), ``"keep"`` (return with the queue still open; the process then exits).
    Returns whether the segment is still reachable through the handle afterwards, as seen
    from this child."""
    from shmcast import BroadcastQueue

    queue = BroadcastQueue.attach(handle, reader)
    if how == "close":
        queue.close()
    elif how == "gc":
        del queue
        gc.collect()
    elif how != "keep":
        raise ValueError(how)
    return os.path.exists(handle_path(handle))


# -- the one way a segment's name can be left in /dev/shm -------------------------------------

_KILLED_WHILE_CREATING = """
import os, secrets, signal, sys, time
from shmcast import _layout as L
from shmcast._liveness import identity
from shmcast._participants import initialize
from shmcast._segment import Segment

# What a queue's constructor does, stopped between creating the name and removing it.
kind = L.KIND_BROADCAST if sys.argv[1] == "broadcast" else L.KIND_GATHER
geometry = L.Geometry.checked(kind, int(sys.argv[2]), 4, 64)
seg = Segment.create(geometry.total_size)
pid, start = identity()
header = L.Header(L.LAYOUT_VERSION, secrets.randbits(63), geometry, pid, start, time.time_ns())
initialize(seg, header)
print(seg.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


#: Where a test that makes an abandoned-looking name on purpose says so: one file per name,
#: holding the pid of the test's process.  Another test run's leak check (conftest) leaves
#: such a name alone while that process lives, instead of taking it for its own leftover.
PLANTED_DIR = os.path.join(tempfile.gettempdir(), "shmcast-tests-planted")


def plant(name: str) -> None:
    """Declare that this process makes the /dev/shm entry ``name`` on purpose (before it
    makes it); :func:`unplant` when it is gone."""
    os.makedirs(PLANTED_DIR, exist_ok=True)
    with open(os.path.join(PLANTED_DIR, name), "w") as f:
        f.write(str(os.getpid()))


def unplant(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(PLANTED_DIR, name))


def planted_by(name: str) -> int | None:
    """The live process that declared ``name`` with :func:`plant`, if any."""
    try:
        with open(os.path.join(PLANTED_DIR, name)) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return None
    return pid if process_state(pid) not in (None, "Z", "X") else None


def killed_while_creating(kind: str = "broadcast", peers: int = 1) -> tuple[str, int]:
    """Make what a creator killed inside the queue's constructor leaves: a named segment with
    a valid header whose creator is dead.  Returns its name and the dead creator's pid; the
    caller removes the name (the leak check of conftest fails the test otherwise)."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_CREATING, kind, str(peers)],
        capture_output=True,
        text=True,
        timeout=DEFAULT_TIMEOUT,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    name = proc.stdout.strip()
    with open(os.path.join(SHM_DIR, name), "rb") as f:
        creator = struct.unpack_from("<Q", f.read(64), 48)[0]
    return name, creator


# -- vLLM's MessageQueue API (tests/compat) ------------------------------------------------------
#
# Targets that speak vLLM's MessageQueue API, with the class chosen by name: "shmcast" is the
# drop-in, "vllm" vLLM's own (where vLLM is installed), so that one test runs both.


def mq_class(impl: str) -> Any:
    """The MessageQueue class of ``impl`` ("shmcast" or "vllm")."""
    if impl == "shmcast":
        from shmcast.compat.vllm import MessageQueue
    elif impl == "vllm":
        from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    else:
        raise ValueError(impl)
    return MessageQueue


def mq_pair(**geometry: Any) -> tuple[Any, Any]:
    """A writer of the drop-in and its one reader, both in this process, ready."""
    queue = mq_class("shmcast")
    writer = queue(1, 1, **geometry)
    reader = queue.create_from_handle(writer.export_handle(), 0)
    writer.wait_until_ready(timeout=5)
    reader.wait_until_ready(timeout=5)
    return writer, reader


def mq_reader(impl: str, handle: Any, rank: int, count: int, timeout: float = 30) -> list[Any]:
    """Join as ``rank``, take part in the collective start, return the next ``count``
    objects."""
    queue = mq_class(impl).create_from_handle(handle, rank)
    queue.wait_until_ready()
    try:
        return [queue.dequeue(timeout=timeout) for _ in range(count)]
    finally:
        queue.shutdown()


def mq_reader_then_hold(impl: str, handle: Any, rank: int, read: int,
                        control: multiprocessing.connection.Connection) -> None:  # fmt: skip
    """Join as ``rank``, read ``read`` objects, then read nothing more until the parent sends
    anything on ``control`` (or two minutes pass).  Dead-reader tests kill it meanwhile."""
    queue = mq_class(impl).create_from_handle(handle, rank)
    queue.wait_until_ready()
    for _ in range(read):
        queue.dequeue(timeout=30)
    control.poll(120)
    queue.shutdown()


def executor_worker(impl: str, handle: Any, rank: int,
                    back: multiprocessing.connection.Connection) -> int:  # fmt: skip
    """A worker of vLLM's multiprocessing executor, in miniature: join the broadcast queue,
    create a response queue of its own and send its handle back, take part in both collective
    starts (in the executor's order), then serve requests ``(method, args, kwargs,
    output_rank)`` until ``method == "shutdown"``, replying ``("SUCCESS", result)`` when
    ``output_rank`` is None or this rank.  Returns how many requests it served."""
    cls = mq_class(impl)
    requests = cls.create_from_handle(handle, rank)
    responses = cls(1, 1)
    back.send(responses.export_handle())
    back.close()
    requests.wait_until_ready()
    responses.wait_until_ready()
    served = 0
    try:
        while True:
            method, args, _kwargs, output_rank = requests.dequeue(indefinite=True)
            if method == "shutdown":
                return served
            served += 1
            if output_rank is not None and output_rank != rank:
                continue
            step, payload = args
            digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
            result = {"rank": rank, "step": step, "nbytes": len(payload), "digest": digest}
            responses.enqueue(("SUCCESS", result))
    finally:
        requests.shutdown()
        responses.shutdown()


class FileGroup:
    """A process group in the shape of vLLM's ``StatelessProcessGroup`` (``rank``,
    ``world_size``, ``broadcast_obj``, ``all_gather_obj``) over files in a directory, for the
    process-group helpers where neither torch nor vLLM is installed.  Each collective call
    waits at most ``timeout`` seconds for the others."""

    def __init__(self, directory: str, rank: int, world_size: int, timeout: float = 30) -> None:
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._calls = 0

    def _put(self, name: str, obj: Any) -> None:
        import pickle

        path = os.path.join(self.directory, name)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(obj, f)
        os.replace(path + ".tmp", path)

    def _get(self, name: str) -> Any:
        import pickle

        path = os.path.join(self.directory, name)
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: nothing at {name} in {self.timeout} s")
            time.sleep(0.002)
        with open(path, "rb") as f:
            return pickle.load(f)

    def broadcast_obj(self, obj: Any, src: int) -> Any:
        self._calls += 1
        name = f"call{self._calls}-from{src}"
        if self.rank == src:
            self._put(name, obj)
            return obj
        return self._get(name)

    def all_gather_obj(self, obj: Any) -> list[Any]:
        self._calls += 1
        self._put(f"call{self._calls}-rank{self.rank}", obj)
        return [self._get(f"call{self._calls}-rank{r}") for r in range(self.world_size)]


def group_member(kind: str, where: str, rank: int, world_size: int, writer_rank: int,
                 objects: Sequence[Any]) -> dict[str, Any]:  # fmt: skip
    """One rank of a process group (``kind``: "files" (:class:`FileGroup` in directory
    ``where``), "torch" (torch.distributed, gloo, file store ``where``) or "stateless"
    (vLLM's StatelessProcessGroup on 127.0.0.1, port ``where``)) builds a MessageQueue with
    ``create_from_process_group``: the writer sends ``objects``, every other rank returns what
    it got.  Then the single-reader helper: every rank sends its rank to rank 0, which
    returns what it read from each queue."""
    from shmcast.compat._vllm_groups import group_of
    from shmcast.compat.vllm import MessageQueue

    if kind == "files":
        group: Any = FileGroup(where, rank, world_size)
    elif kind == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{where}", rank=rank,
                                world_size=world_size)  # fmt: skip
        group = dist.group.WORLD
    elif kind == "stateless":
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create("127.0.0.1", int(where), rank, world_size)
    else:
        raise ValueError(kind)
    queue = MessageQueue.create_from_process_group(group, 64 * 1024, 4, writer_rank)
    got: list[Any] = []
    if rank == writer_rank:
        for obj in objects:
            queue.broadcast_object(obj)
    else:
        got = [queue.broadcast_object() for _ in objects]
    single, handles = MessageQueue.create_from_process_group_single_reader(group, 4096, 4, 0)
    single.enqueue(rank)  # the ring has room: no need to wait for the reader
    replies: list[Any] = []
    if rank == 0:
        readers = [MessageQueue.create_from_handle(h, 0) for h in handles]
        replies = [reader.dequeue(timeout=30) for reader in readers]
        for reader in readers:
            reader.shutdown()
    group_of(group).all_gather(None)  # a barrier: no writer leaves before rank 0 has read
    result = {"rank": rank, "got": got, "is_writer": queue._is_writer, "replies": replies,
              "handles": len(handles)}  # fmt: skip
    queue.shutdown()
    single.shutdown()
    if kind == "stateless":  # rank 0 serves the group's store: it leaves last
        if rank:
            group.store.set(f"shmcast-done-{rank}", "1")
        else:
            group.store.wait([f"shmcast-done-{r}" for r in range(1, world_size)])
    if kind == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


# -- remote readers (tests/remote) ---------------------------------------------------------------


def in_netns(netns: str | None, target: Callable, *args: Any) -> Any:
    """Enter the network namespace ``netns`` (None: stay), then run ``target(*args)``."""
    if netns:
        from _netns import enter_netns

        enter_netns(netns)
    return target(*args)


def remote_reader_plan(
    handle: Any, reader: int, seed: int, plan: Sequence[tuple[str, int]], options: dict[str, Any]
) -> dict[str, Any]:
    """Attach as ``reader`` (``options``: ``attach`` keywords, plus ``slow``: seconds to sleep
    before each get, ``pause``: before the first), check every message of ``plan`` and the
    close after it; return the :func:`check_plan` summary with ``network``: whether the
    network path was taken."""
    from shmcast import BroadcastQueue

    options = dict(options)
    slow = options.pop("slow", 0.0)
    pause = options.pop("pause", 0.0)  # seconds before the first get
    timeout = options.pop("timeout", 30.0)
    with BroadcastQueue.attach(handle, reader, **options) as queue:
        network = bool(getattr(queue, "remote", False))
        time.sleep(pause)
        if slow:
            get = queue.get

            def slow_get(timeout: float | None = None) -> Any:
                time.sleep(slow)
                return get(timeout=timeout)

            queue.get = slow_get  # type: ignore[method-assign]
        summary = check_plan(queue, seed, plan, timeout, expect_close=True)
    return {**summary, "network": network}


def remote_reader_read_and_hold(
    handle: Any, reader: int, read: int, report: multiprocessing.connection.Connection,
    options: dict[str, Any],
) -> None:  # fmt: skip
    """Attach, read ``read`` messages, tell the parent (``"read"`` on ``report``), then hold
    on, reading nothing, until the parent kills or stops this process (two minutes at most):
    a remote reader that dies or goes silent mid-stream."""
    from shmcast import BroadcastQueue

    queue = BroadcastQueue.attach(handle, reader, **options)
    for _ in range(read):
        queue.get(timeout=30)
    report.send("read")
    time.sleep(120)
    queue.close()


def remote_reader_until_broken(handle: Any, reader: int, options: dict[str, Any],
                               report: Any = None, report_at: int = 0) -> dict:  # fmt: skip
    """Attach and read until an error; return the messages and the error, and how long after
    the last message it came.  With ``report``: send ``"got"`` once ``report_at`` came."""
    from shmcast import BroadcastQueue, ShmcastError

    queue = BroadcastQueue.attach(handle, reader, **options)
    got = []
    started = time.monotonic()
    try:
        while True:
            got.append(queue.get_bytes(timeout=30))
            started = time.monotonic()
            if report is not None and len(got) == report_at:
                report.send("got")
    except ShmcastError as exc:
        after = time.monotonic() - started
        return {"got": got, "error": type(exc).__name__, "message": str(exc),
                "peer": getattr(exc, "peer", None), "after": after}  # fmt: skip
    finally:
        queue.close()


def remote_writer(
    report: multiprocessing.connection.Connection,
    control: multiprocessing.connection.Connection,
    n_readers: int,
    remote: dict[str, Any],
    geometry: dict[str, Any],
    seed: int,
    plan: Sequence[tuple[str, int]],
    then: str = "close",
) -> dict[str, Any]:
    """A writer with remote slots (``remote``: RemoteOptions keywords): report the handle,
    wait for every reader, send ``plan``, then ``"close"`` (and return its stats), or report
    ``"sent"`` and wait to be killed (``"die"``: a writer that dies mid-stream)."""
    from shmcast import BroadcastQueue, QueueBroken, RemoteOptions

    queue = BroadcastQueue(n_readers, remote=RemoteOptions(**remote), **geometry)
    report.send(queue.handle)
    queue.wait_until_ready(timeout=30)
    if then == "until-broken":  # send until a reader is found dead; say how long that took
        for number, (_kind, size) in enumerate(plan):
            started = time.monotonic()
            try:
                queue.put_bytes(message_payload(seed, number, size), timeout=30)
            except QueueBroken as exc:
                queue.close()
                return {"sent": number, "peer": exc.peer, "message": str(exc),
                        "blocked_s": time.monotonic() - started}  # fmt: skip
        queue.close()
        return {"sent": len(plan), "peer": None}
    started = time.monotonic()
    most_in_flight = most_bytes = 0
    for number, (kind, size) in enumerate(plan):
        send_plan_one(queue, seed, number, kind, size, timeout=30)
        for state in queue._publisher.stats().values():
            most_in_flight = max(most_in_flight, state["sent"] - state["acked"])
            most_bytes = max(most_bytes, state["in_flight_bytes"])
    elapsed = time.monotonic() - started
    if then == "die":
        report.send("sent")
        control.poll(120)
        os.kill(os.getpid(), signal.SIGKILL)
    stats = queue.stats()
    queue.close()
    return {"stats": stats, "elapsed": elapsed, "most_in_flight": most_in_flight,
            "most_in_flight_bytes": most_bytes}  # fmt: skip


def _event_loop_runner(use_uvloop: bool) -> Callable[[Any], Any]:
    """``asyncio.run``, or uvloop's when asked (the test skips where it is not installed)."""
    import asyncio

    if use_uvloop:
        import uvloop

        return uvloop.run
    return asyncio.run


def async_reader_check_plan(
    handle: Any,
    reader: int,
    seed: int,
    plan: Sequence[tuple[str, int]],
    timeout: float = 30.0,
    use_uvloop: bool = False,
) -> dict[str, Any]:
    """Attach as ``reader`` and receive the whole ``plan`` with ``async for`` inside an event
    loop (each message checked as :func:`check_plan` does; the loop ends at the writer's
    close).  Returns ``{"count", "digest"}``."""
    import asyncio

    from shmcast import BroadcastQueue

    async def main(queue: Any) -> dict[str, Any]:
        digest = hashlib.sha256()
        number = 0
        async for got in queue:
            check_message(reader, seed, plan, number, got, digest)
            number += 1
        return {"count": number, "digest": digest.hexdigest()}

    with BroadcastQueue.attach(handle, reader) as queue:
        return _event_loop_runner(use_uvloop)(asyncio.wait_for(main(queue), timeout * 4))


def async_gather_writer(
    handle: Any, writer: int, seed: int, plan: Sequence[tuple[str, int]], timeout: float = 30.0
) -> int:
    """Attach as gather ``writer`` and send ``plan`` with ``put_async`` / ``put_bytes_async``
    from an event loop; returns how many were sent."""
    import asyncio

    from shmcast import GatherQueue

    async def main(queue: Any) -> int:
        for number, (kind, size) in enumerate(plan):
            if kind == RAW:
                await queue.put_bytes_async(message_payload(seed, number, size), timeout=timeout)
            else:
                await queue.put_async(message_object(seed, number, size), timeout=timeout)
        return len(plan)

    with GatherQueue.attach(handle, writer) as queue:
        return asyncio.run(main(queue))


def async_wait_for_a_dead_writer(policy: Any) -> tuple[float, Any, bool]:
    """A forked writer sends one message and is killed while this process, attached with
    ``policy``, awaits the next: ``(seconds from the kill's start to QueueBroken, what the
    await slept on in the loop or None, whether the helper thread was started)``."""
    import asyncio

    from shmcast import BroadcastQueue, QueueBroken

    with process_group("fork", timeout=60) as group:
        report, report_child = group.back_channel()
        control, control_child = group.channel()
        child = group.start(writer_then_die, report_child, 1, [b"last"], control_child)
        if not report.poll(30):
            raise AssertionError("the writer did not report its handle")
        with BroadcastQueue.attach(report.recv(), 0, wait=policy) as reader:
            if not (report.poll(30) and report.recv() == "sent"):
                raise AssertionError("the writer did not send")

            async def main() -> float:
                if await reader.get_async(timeout=20) != b"last":
                    raise AssertionError("not the writer's message")
                later(0.2, group.kill, child)
                start = time.monotonic()
                try:
                    await reader.get_async(timeout=20)
                except QueueBroken:
                    return time.monotonic() - start
                raise AssertionError("a message after the writer's last")

            took = asyncio.run(main())
            sleeper = reader._aio_sleep[1] if reader._aio_sleep else None
            helper = reader._aio_helper is not None
        control.close()
    return took, sleeper, helper


def async_readers_through_sleeps(readers: int, count: int = 3000) -> list[dict[str, Any]]:
    """``readers`` forked :func:`async_reader_gaps` readers (30 s slices) of a queue this
    process writes ``count`` messages to, pausing now and then so that they fall asleep in
    between; their results.  A lost wake-up shows as a gap of a slice."""
    from shmcast import BroadcastQueue

    with (
        process_group("fork", timeout=100) as group,
        BroadcastQueue(readers, n_slots=4, slot_size=256) as writer,
    ):
        for i in range(readers):
            group.start(async_reader_gaps, writer.handle, i, count, 30.0, 80.0)
        writer.wait_until_ready(timeout=60)
        for n in range(count):
            writer.put(n, timeout=30)
            if n % 3 == 0:
                time.sleep(0.0002 * (n % 7))  # let the readers fall asleep in between
        return group.results()


def async_reader_gaps(handle: Any, reader: int, count: int, slice_: float,
                      timeout: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """Attach as ``reader`` with a wait policy that does not spin and sleeps in slices of
    ``slice_`` seconds, and receive ``count`` messages (0, 1, ... in order) with
    ``get_async``.  Returns the longest gap between two messages, how many awaits a wake
    ended (a datagram, an io_uring completion), and whether the helper thread was started."""
    import asyncio

    from shmcast import BroadcastQueue, FutexWait

    policy = FutexWait(spin_us=0, min_spin_us=0, slice=slice_)

    async def main(queue: Any) -> dict[str, Any]:
        longest = 0.0
        last = time.monotonic()
        for number in range(count):
            got = await queue.get_async(timeout=timeout)
            if got != number:
                raise AssertionError(f"reader {reader}: message {number} was {got!r}")
            now = time.monotonic()
            longest, last = max(longest, now - last), now
        sock = queue._aio_sleep[1] if queue._aio_sleep else None
        return {
            "longest": longest,
            "wakes": sock.wakes if sock is not None else 0,
            "helper": queue._aio_helper is not None,
        }

    with BroadcastQueue.attach(handle, reader, wait=policy) as queue:
        return asyncio.run(asyncio.wait_for(main(queue), timeout))


def inherited_async_reader(queue: Any) -> dict[str, Any]:
    """In a forked child: what an async reader inherited from the parent does here (its loop
    sleeper, a socket or an io_uring, is released in the child; the endpoint refuses)."""
    import asyncio

    from shmcast import InheritedEndpoint

    sleeper = queue._aio_sleep[1]
    try:  # a closed socket's descriptor reads -1, a closed ring refuses
        released = sleeper.closed and sleeper._fileno() == -1
    except ValueError:
        released = sleeper.closed
    try:
        asyncio.run(queue.get_async(timeout=0.5))
        refused = False
    except InheritedEndpoint:
        refused = True
    return {"released": released, "refused": refused}


#: A wait policy that never spins and sleeps in slices far longer than any test waits: only a
#: wake (a futex wake, a datagram, a pidfd) can end such a reader's await in time.
LONG_SLICES = FutexWait(spin_us=0, min_spin_us=0, slice=30.0)


def why_no_uring() -> str | None:
    """Why this machine cannot wait on futexes through io_uring (a skip reason), or None."""
    from shmcast._native import FutexRing

    try:
        FutexRing().close()
    except OSError as exc:
        return f"no futex waits through io_uring here ({exc}; Linux 6.7 and io_uring needed)"
    return None


def assert_served_by_the_helper(writer: Any, reader: Any) -> None:
    """An await of ``reader`` gets a message ``writer`` puts a little later through the
    helper thread: no loop sleeper (io_uring or socket) for this process."""
    import asyncio

    async def main() -> Any:
        later(0.1, writer.put, "through the helper")
        return await reader.get_async(timeout=10)

    assert asyncio.run(main()) == "through the helper"
    assert reader._aio_sleep == (os.getpid(), None)
    assert reader._aio_helper is not None


def later(delay: float, fn: Callable, *args: Any) -> threading.Thread:
    """Call ``fn(*args)`` from another thread of this process after ``delay`` seconds (a peer
    that is not the event loop's thread)."""

    def body() -> None:
        time.sleep(delay)
        fn(*args)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread
