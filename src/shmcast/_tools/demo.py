"""Stream a mixed load from one writer to several reader processes and verify every message.

The writer (this process) creates a BroadcastQueue, starts the reader processes and streams
messages of mixed kinds and sizes for a few seconds: small dicts of ten fields, raw byte
messages of 4 KiB, 64 KiB and 1 MiB (written in place with reserve()), messages that span
several slots, messages larger than the whole ring (streamed through it), and numpy arrays
when numpy is installed.  Every message carries its sequence number, its send time
(time.monotonic_ns(), a clock shared by all processes of the machine) and a CRC-32 of its
payload.  Each reader checks that it receives every message, in order and intact, and records
the one-way latency (from the start of the send call to the moment the reader holds the
message).  At the end each reader reports back through a pipe and the demo prints a table and
a verdict; the exit status is 0 only if every reader received every message intact.

Readers are started with the 'forkserver' start method by default ('spawn' where forkserver is
not available): a reader then begins in a fresh interpreter and reaches the queue only through
its picklable handle, as the workers of a real application do, instead of inheriting the
writer's memory, locks and threads through fork().  '--start-method fork' is accepted for
comparison.

Nothing waits without a limit: every put and get has a timeout (see --stall-timeout), a watchdog
kills the readers if the writer makes no progress, a reader that dies is detected and reported,
and the queue is always closed and every reader joined (or killed), so no shared-memory segment
is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import signal
import struct
import sys
import threading
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

DEFAULT_READERS = 3
DEFAULT_SECONDS = 5.0
DEFAULT_STALL_TIMEOUT = 10.0
STARTUP_TIMEOUT = 60.0
WATCHDOG_MARGIN = 5.0  # the watchdog fires this long after a put should have timed out
MAX_LATENCY_SAMPLES = 200_000  # per reader; beyond, the samples are decimated evenly

END_OF_STREAM = -1  # sequence number of the closing marker, which carries the count

# A raw message: u64 seq | u64 sent_ns | u32 crc32(payload) | u32 kind index | payload
RAW_HEADER = struct.Struct("<QQII")

KiB = 1024
MiB = 1024 * 1024


# -- the message plan: which message carries what, shared by writer and readers ----------------


@dataclass(frozen=True)
class MessageKind:
    """One kind of message of the mix."""

    name: str
    form: str  #: "dict", "raw" (bytes written in place or streamed) or "ndarray"
    size: int  #: payload bytes (for a dict: nominal; the real size is measured per message)
    weight: int  #: occurrences per 1000 messages, after the opening tour
    dtype: str = ""  #: numpy dtype string, for an ndarray
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class MessagePlan:
    """The deterministic schedule of message kinds, a function of the ring's geometry.

    Message ``seq`` is of kind :meth:`kind_of` (seq): first one message of every kind (so
    that even a short run covers them all), then a cycle of 1000 in which each kind appears
    ``weight`` times, spread evenly.  Writer and readers compute the same schedule; a reader
    checks that each message is of the kind and size its sequence number calls for.
    """

    n_slots: int
    slot_size: int
    numpy: bool
    kinds: tuple[MessageKind, ...] = field(init=False)
    cycle: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        capacity = self.n_slots * self.slot_size
        kinds = [
            MessageKind("dict", "dict", 256, 700 if self.numpy else 740),
            MessageKind("bytes 4 KiB", "raw", 4 * KiB, 170),
            MessageKind("bytes 64 KiB", "raw", 64 * KiB, 60),
        ]
        if self.numpy:
            kinds += [
                MessageKind("ndarray f32 128x256", "ndarray", 128 * 256 * 4, 20, "<f4", (128, 256)),
                MessageKind("ndarray i64 1000", "ndarray", 1000 * 8, 20, "<i8", (1000,)),
            ]
        kinds += [
            MessageKind("bytes 1 MiB", "raw", MiB, 18),
            # Two and a half slots: spans slots and ends in a partly filled one.
            MessageKind("multi-slot", "raw", self.slot_size * 5 // 2 + 17, 10),
            # Larger than the whole ring: travels streamed, as readers free slots.
            MessageKind("larger than ring", "raw", capacity + self.slot_size + 4321, 2),
        ]
        assert sum(k.weight for k in kinds) == 1000
        spread = sorted(
            ((j + 0.5) * 1000 / k.weight, i) for i, k in enumerate(kinds) for j in range(k.weight)
        )
        object.__setattr__(self, "kinds", tuple(kinds))
        object.__setattr__(self, "cycle", tuple(i for _, i in spread))

    def index_of(self, seq: int) -> int:
        """The index in :attr:`kinds` of message ``seq``'s kind."""
        tour = len(self.kinds)
        return seq if seq < tour else self.cycle[(seq - tour) % len(self.cycle)]

    def kind_of(self, seq: int) -> MessageKind:
        return self.kinds[self.index_of(seq)]

    @property
    def largest(self) -> int:
        return max(k.size for k in self.kinds)


def make_dict(seq: int) -> dict[str, Any]:
    """The small dict message number ``seq`` carries (ten fields of assorted types)."""
    return {
        "seq": seq,
        "name": f"request-{seq}",
        "priority": seq % 7,
        "ratio": seq / 7.0,
        "done": seq % 2 == 0,
        "tags": ["alpha", "beta", f"t{seq % 13}"],
        "shape": (seq % 5 + 1, 16),
        "meta": {"node": seq % 3, "attempt": 1},
        "token_ids": list(range(seq % 17, seq % 17 + 8)),
        "note": None,
    }


def dict_bytes(body: dict[str, Any]) -> bytes:
    """The canonical bytes of a dict message that its checksum covers."""
    return repr(body).encode()


class _Payloads:
    """Random payload bytes for the writer: one pool, sliced at an offset that depends on the
    sequence number, so that consecutive messages of one kind differ."""

    def __init__(self, plan: MessagePlan) -> None:
        self.pool = memoryview(os.urandom(plan.largest + 4 * KiB))

    def raw(self, seq: int, size: int) -> memoryview:
        off = (seq * 264) % (4 * KiB)  # a multiple of 8, so arrays made on it are aligned
        return self.pool[off : off + size]

    def ndarray(self, seq: int, kind: MessageKind) -> Any:
        import numpy as np

        count = math.prod(kind.shape)
        return np.frombuffer(
            self.raw(seq, kind.size), dtype=np.dtype(kind.dtype), count=count
        ).reshape(kind.shape)


# -- configuration and results ------------------------------------------------------------


def _numpy_available() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def default_start_method() -> str:
    """'forkserver' where the platform has it, else 'spawn' (see the module docstring)."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class DemoConfigError(ValueError):
    """The queue refused the demo's geometry (a limit only the queue knows)."""


@dataclass(frozen=True)
class DemoConfig:
    """A validated demo configuration.  Build it with :meth:`checked`."""

    readers: int = DEFAULT_READERS
    messages: int | None = None  #: stop after this many messages (None: no count limit)
    seconds: float | None = DEFAULT_SECONDS  #: stop after this long (None: no time limit)
    wait: str = "futex"
    n_slots: int = 64
    slot_size: int = 256 * KiB
    start_method: str = "forkserver"
    numpy: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    kill_reader: int | None = None
    remote: bool = False  #: the last reader receives over the network (see _remote_setup)

    @classmethod
    def checked(
        cls,
        *,
        readers: int = DEFAULT_READERS,
        messages: int | None = None,
        seconds: float | None = None,
        wait: str = "futex",
        n_slots: int | None = None,
        slot_size: int | None = None,
        start_method: str | None = None,
        numpy: bool | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        kill_reader: int | None = None,
        remote: bool = False,
    ) -> DemoConfig:
        """Validate and fill in defaults; ValueError says what is wrong.

        With neither ``messages`` nor ``seconds`` the demo runs for DEFAULT_SECONDS; with
        both, it stops at whichever comes first.  ``numpy=None`` uses numpy if it is
        importable; ``numpy=True`` requires it.
        """
        from .._queue import DEFAULT_SLOT_SIZE, DEFAULT_SLOTS
        from .._wait import POLICIES

        n_slots = DEFAULT_SLOTS if n_slots is None else n_slots
        slot_size = DEFAULT_SLOT_SIZE if slot_size is None else slot_size
        # The queue checks the geometry in full (upper limits too) when it is created.
        if readers < 1:
            raise ValueError(f"the demo needs at least 1 reader, got {readers}")
        if n_slots < 2:
            raise ValueError(f"the ring needs at least 2 slots, got {n_slots}")
        if slot_size < 64 or slot_size % 64:
            raise ValueError(f"the slot size must be a multiple of 64 bytes, got {slot_size}")
        if messages is not None and messages < 1:
            raise ValueError(f"the number of messages must be at least 1, got {messages}")
        if seconds is not None and not seconds > 0:
            raise ValueError(f"the duration must be a positive number of seconds, got {seconds}")
        if messages is None and seconds is None:
            seconds = DEFAULT_SECONDS
        if wait not in POLICIES:
            raise ValueError(
                f"unknown wait policy {wait!r}; choose one of {', '.join(sorted(POLICIES))}"
            )
        methods = multiprocessing.get_all_start_methods()
        start_method = default_start_method() if start_method is None else start_method
        if start_method not in methods:
            raise ValueError(
                f"start method {start_method!r} is not available here; choose one of "
                f"{', '.join(methods)}"
            )
        have_numpy = _numpy_available()
        if numpy is None:
            numpy = have_numpy
        elif numpy and not have_numpy:
            raise ValueError("numpy arrays were asked for, but numpy is not installed")
        if not stall_timeout > 0:
            raise ValueError(f"the stall timeout must be positive, got {stall_timeout}")
        if kill_reader is not None and not 0 <= kill_reader < readers:
            raise ValueError(
                f"--kill-reader {kill_reader} is not a reader index (0 to {readers - 1})"
            )
        return cls(
            readers=readers,
            messages=messages,
            seconds=seconds,
            wait=wait,
            n_slots=n_slots,
            slot_size=slot_size,
            start_method=start_method,
            numpy=numpy,
            stall_timeout=stall_timeout,
            kill_reader=kill_reader,
            remote=remote,
        )


@dataclass
class ReaderResult:
    """What one reader reported (or what is known of a reader that did not report)."""

    index: int
    pid: int | None = None
    reported: bool = False  #: False: the reader died or hung before reporting
    messages: int = 0  #: messages received and verified (errors included)
    bytes: int = 0  #: payload bytes received
    errors: int = 0  #: messages lost, out of order, corrupted, of the wrong kind, ...
    error_samples: list[str] = field(default_factory=list)  #: the first few, described
    end_count: int | None = None  #: the count in the end-of-stream marker, if it arrived
    stopped_by: str = ""  #: why its loop ended ("closed", or the exception)
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    latency_max_us: float | None = None
    latency_samples: int = 0  #: how many samples the percentiles come from
    first_recv_ns: int | None = None
    last_recv_ns: int | None = None
    exitcode: int | None = None  #: None if it had to be killed and could not be reaped
    killed: bool = False  #: the demo killed it because it did not exit in time
    problems: list[str] = field(default_factory=list)  #: why it fails the run; empty: passed

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class DemoResult:
    """The outcome of :func:`run_demo`."""

    config: DemoConfig
    ok: bool
    verdict: str  #: the verdict line ("OK: ..." or "FAILED: ...")
    messages: int  #: messages the writer sent (the end-of-stream marker not counted)
    bytes: int  #: payload bytes the writer sent
    seconds: float  #: from the first send to the last receive by the slowest reader
    send_seconds: float  #: from the first send to the last send
    msgs_per_s: float
    mb_per_s: float  #: payload megabytes (10**6 bytes) per second, as each reader saw them
    kinds: dict[str, int]  #: messages sent, by kind
    readers: list[ReaderResult]
    failures: list[str]
    interrupted: bool = False
    writer_waits: int = 0  #: how many sends had to wait for space (backpressure)
    segment: str = ""  #: the queue's shared-memory segment (removed when the demo ends)


# -- the reader process -------------------------------------------------------------------


class _Latencies:
    """Latency samples in nanoseconds, decimated evenly once there are too many."""

    def __init__(self, cap: int = MAX_LATENCY_SAMPLES) -> None:
        self.samples = array("q")
        self.cap = cap
        self.stride = 1
        self.seen = 0
        self.max = 0

    def add(self, ns: int) -> None:
        self.max = max(self.max, ns)
        if self.seen % self.stride == 0:
            self.samples.append(ns)
            if len(self.samples) >= self.cap:
                self.samples = self.samples[::2]
                self.stride *= 2
        self.seen += 1


def _check_message(msg: Any, expected: int, plan: MessagePlan) -> tuple[int, int, int, str]:
    """Verify one message; return (seq, payload bytes, sent_ns, problem or "")."""
    if isinstance(msg, memoryview):
        if len(msg) < RAW_HEADER.size:
            return expected, len(msg), 0, f"raw message of {len(msg)} bytes has no header"
        seq, sent_ns, crc, kind_index = RAW_HEADER.unpack_from(msg, 0)
        payload = msg[RAW_HEADER.size :]
        try:
            size = len(payload)
            kind = plan.kind_of(seq)
            if kind.form != "raw" or kind_index != plan.index_of(seq):
                return seq, size, sent_ns, f"message #{seq} is raw bytes, expected {kind.name}"
            if size != kind.size:
                return seq, size, sent_ns, f"message #{seq} has {size} bytes, expected {kind.size}"
            if zlib.crc32(payload) != crc:
                return seq, size, sent_ns, f"message #{seq} ({kind.name}): checksum mismatch"
            return seq, size, sent_ns, ""
        finally:
            payload.release()
    if not (isinstance(msg, tuple) and len(msg) == 5 and isinstance(msg[0], int)):
        return expected, 0, 0, f"unexpected message of type {type(msg).__name__}"
    seq, sent_ns, crc, kind_index, body = msg
    kind = plan.kind_of(seq) if seq >= 0 else None
    if kind is None or kind_index != plan.index_of(seq):
        return seq, 0, sent_ns, f"message #{seq} has kind index {kind_index}, wrong for its number"
    if kind.form == "dict":
        if not isinstance(body, dict) or body.get("seq") != seq:
            return seq, 0, sent_ns, f"message #{seq}: not the dict expected"
        data = dict_bytes(body)
        ok = zlib.crc32(data) == crc
        return seq, len(data), sent_ns, "" if ok else f"message #{seq} (dict): checksum mismatch"
    if kind.form == "ndarray":
        dtype = getattr(getattr(body, "dtype", None), "str", None)
        if type(body).__name__ != "ndarray" or dtype != kind.dtype or body.shape != kind.shape:
            return seq, 0, sent_ns, f"message #{seq}: not the {kind.name} expected"
        ok = zlib.crc32(body) == crc
        problem = "" if ok else f"message #{seq} ({kind.name}): checksum mismatch"
        return seq, body.nbytes, sent_ns, problem
    return seq, 0, sent_ns, f"message #{seq} is an object, expected {kind.name}"


class _Verifier:
    """A reader's bookkeeping: checks each message against the plan and the expected sequence
    number, counts messages, bytes and errors, and records latencies."""

    MAX_ERROR_SAMPLES = 5

    def __init__(self, plan: MessagePlan) -> None:
        self.plan = plan
        self.expected = 0
        self.messages = 0
        self.bytes = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies = _Latencies()
        self.end_count: int | None = None
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def receive(self, msg: Any, now_ns: int) -> None:
        """Account for one message, received at ``now_ns`` (time.monotonic_ns())."""
        if isinstance(msg, tuple) and msg and msg[0] == END_OF_STREAM:
            self.end_count = msg[1]
            return
        seq, size, sent_ns, problem = _check_message(msg, self.expected, self.plan)
        if not problem:  # intact: its timestamp can be trusted
            self.latencies.add(now_ns - sent_ns)
            if seq != self.expected:
                problem = f"expected message #{self.expected}, got #{seq}"
        self.expected = seq + 1
        self.messages += 1
        self.bytes += size
        self.first_ns = now_ns if self.first_ns is None else self.first_ns
        self.last_ns = now_ns
        if problem:
            self.error(problem)

    def undecodable(self, exc: Exception) -> None:
        """Account for a message that could not be decoded (it was consumed)."""
        self.error(f"message #{self.expected} could not be decoded: {exc}")
        self.expected += 1
        self.messages += 1

    def error(self, problem: str) -> None:
        self.errors += 1
        if len(self.error_samples) < self.MAX_ERROR_SAMPLES:
            self.error_samples.append(problem)

    def report(self, index: int, stopped_by: str) -> dict[str, Any]:
        """The report sent to the writer (plain data: it goes through a pipe)."""
        return {
            "index": index,
            "pid": os.getpid(),
            "messages": self.messages,
            "bytes": self.bytes,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "end_count": self.end_count,
            "stopped_by": stopped_by,
            "latencies": self.latencies.samples.tobytes(),
            "latency_max": self.latencies.max,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
        }


def _reader_main(
    handle: Any, index: int, plan: MessagePlan, wait: str, stall_timeout: float, conn: Any,
    remote: tuple[str | None, bool] | None = None,
) -> None:  # fmt: skip
    """Body of reader process ``index``: attach, receive and verify until the queue closes,
    then send a report (a dict) through ``conn``.  Every get has a timeout; the parent
    handles Ctrl-C (the reader ignores SIGINT and stops when the writer closes the queue).
    ``remote``: (network namespace to enter or None, force the network path): a reader that
    receives over the network."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options: dict[str, Any] = {}
    if remote is not None:
        netns, force = remote
        if netns:
            from .._remote._netns import enter_netns

            enter_netns(netns)  # before any socket: the reader lives on "another host"
        # The demo's own network, made for this run: pickled objects are trusted on it.
        options = {"network": True if force else None, "allow_pickle": True}
    from .._errors import QueueClosed, SerializationError
    from .._queue import BroadcastQueue

    if plan.numpy:  # import now: the first array message must not pay for it in latency
        import numpy  # noqa: F401

    # A reader may legitimately wait while the writer itself waits (up to stall_timeout) for
    # a slower reader: it gives up later than the writer, which then names the culprit.
    get_timeout = 2 * stall_timeout
    verifier = _Verifier(plan)
    stopped_by = ""
    try:
        with BroadcastQueue.attach(handle, index, wait=wait, **options) as queue:
            while True:
                try:
                    with queue.view(timeout=get_timeout) as msg:
                        verifier.receive(msg, time.monotonic_ns())
                        del msg  # it may lie in the ring: do not keep it past the block
                except QueueClosed:
                    stopped_by = "closed"
                    break
                except SerializationError as exc:  # consumed: count it and go on
                    verifier.undecodable(exc)
    except Exception as exc:  # reported, not raised: the parent judges the run
        stopped_by = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):
        conn.send(verifier.report(index, stopped_by))
        conn.close()


# -- the writer (this process) --------------------------------------------------------------


class _Sender:
    """Sends message ``seq`` of the plan; returns its payload size."""

    def __init__(self, queue: Any, plan: MessagePlan, stall_timeout: float) -> None:
        self.queue = queue
        self.plan = plan
        self.timeout = stall_timeout
        self.payloads = _Payloads(plan)
        self.capacity = plan.n_slots * plan.slot_size

    def send(self, seq: int) -> tuple[MessageKind, int]:
        kind_index = self.plan.index_of(seq)
        kind = self.plan.kinds[kind_index]
        q, timeout = self.queue, self.timeout
        if kind.form == "dict":
            body = make_dict(seq)
            data = dict_bytes(body)
            crc = zlib.crc32(data)
            q.put((seq, time.monotonic_ns(), crc, kind_index, body), timeout=timeout)
            return kind, len(data)
        if kind.form == "ndarray":
            arr = self.payloads.ndarray(seq, kind)
            crc = zlib.crc32(arr)
            q.put((seq, time.monotonic_ns(), crc, kind_index, arr), timeout=timeout)
            return kind, kind.size
        payload = self.payloads.raw(seq, kind.size)
        crc = zlib.crc32(payload)
        total = RAW_HEADER.size + kind.size
        if total <= self.capacity:  # zero-copy: fill the reserved slots in place
            sent_ns = time.monotonic_ns()
            with q.reserve(total, timeout=timeout) as region:
                region[RAW_HEADER.size :] = payload
                RAW_HEADER.pack_into(region, 0, seq, sent_ns, crc, kind_index)
        else:  # larger than the ring: put_bytes streams it
            message = bytearray(total)
            message[RAW_HEADER.size :] = payload
            sent_ns = time.monotonic_ns()
            RAW_HEADER.pack_into(message, 0, seq, sent_ns, crc, kind_index)
            q.put_bytes(message, timeout=timeout)
        return kind, kind.size

    def send_end(self, count: int) -> None:
        self.queue.put((END_OF_STREAM, count, 0, 0, None), timeout=self.timeout)


class _Progress:
    """The live progress display: one rewritten line on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO | None, enabled: bool) -> None:
        self.out = out if enabled else None
        self.tty = bool(self.out is not None and _isatty(self.out))
        self.interval = 0.2 if self.tty else 1.0
        self.started = self.last = time.monotonic()
        self.last_count = self.last_bytes = 0
        self.next_at = self.started + self.interval
        self.drawn = False

    def update(self, count: int, nbytes: int, now: float, force: bool = False) -> None:
        if self.out is None or (now < self.next_at and not force):
            return
        if force and count == self.last_count:
            return  # nothing new since the last line
        span = max(now - self.last, 1e-9)
        rate = (count - self.last_count) / span
        mbps = (nbytes - self.last_bytes) / span / 1e6
        line = (
            f"  {now - self.started:5.1f} s  sent {count:>10,} messages  "
            f"{rate:>10,.0f} msg/s  {mbps:>9,.1f} MB/s"
        )
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self.last, self.last_count, self.last_bytes = now, count, nbytes
        self.next_at = now + self.interval

    def finish(self) -> None:
        if self.out is not None and self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Watchdog:
    """Calls ``on_stall`` once if :meth:`feed` is not called for ``limit`` seconds.

    A safety net: every wait of the demo has its own timeout, so this fires only if one of
    them failed to work.  ``on_stall`` kills the readers, which frees a blocked writer (it
    notices dead readers within one wait slice)."""

    def __init__(self, limit: float, on_stall: Callable[[], None]) -> None:
        self.limit = limit
        self.on_stall = on_stall
        self.fired = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmcast-demo-watchdog")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def feed(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if time.monotonic() - self._last > self.limit:
                self.fired = True
                self.on_stall()
                return


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _percentile(sorted_samples: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def _reader_result(index: int, report: dict[str, Any]) -> ReaderResult:
    samples = sorted(array("q", report["latencies"]))
    result = ReaderResult(
        index=index,
        pid=report["pid"],
        reported=True,
        messages=report["messages"],
        bytes=report["bytes"],
        errors=report["errors"],
        error_samples=list(report["error_samples"]),
        end_count=report["end_count"],
        stopped_by=report["stopped_by"],
        latency_samples=len(samples),
        first_recv_ns=report["first_ns"],
        last_recv_ns=report["last_ns"],
    )
    if samples:
        result.latency_p50_us = _percentile(samples, 50) / 1e3
        result.latency_p99_us = _percentile(samples, 99) / 1e3
        result.latency_max_us = report["latency_max"] / 1e3
    return result


def _execute(config: DemoConfig, out: TextIO | None, progress: bool) -> DemoResult:
    from .._errors import ShmcastError
    from .._queue import BroadcastQueue

    plan = MessagePlan(config.n_slots, config.slot_size, config.numpy)
    ctx = multiprocessing.get_context(config.start_method)
    failures: list[str] = []
    readers: list[ReaderResult] = [ReaderResult(i) for i in range(config.readers)]
    processes: list[Any] = []
    conns: list[Any] = []
    kinds: Counter[str] = Counter()
    sent = sent_bytes = 0
    send_start = send_end = time.monotonic()
    interrupted = False
    writer_waits = 0

    def say(text: str = "") -> None:
        if out is not None:
            out.write(text + "\n")
            out.flush()

    def kill_readers() -> None:
        for p in processes:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGKILL)

    def stalled() -> None:
        failures.append(
            f"watchdog: the writer made no progress for {watchdog.limit:g} s; "
            "killed the readers to free it"
        )
        kill_readers()

    watchdog = _Watchdog(config.stall_timeout + WATCHDOG_MARGIN, stalled)
    network = contextlib.ExitStack()
    remote = _remote_setup(config, network, say) if config.remote else None
    try:
        queue = BroadcastQueue(
            config.readers, n_slots=config.n_slots, slot_size=config.slot_size, wait=config.wait,
            remote=None if remote is None else remote.options,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        network.close()
        raise DemoConfigError(str(exc)) from exc
    try:
        capacity = queue.capacity
        say(
            f"shmcast demo: 1 writer (pid {os.getpid()}) -> {config.readers} reader processes "
            f"(start method {config.start_method}), wait policy {config.wait}"
        )
        say(
            f"ring: {config.n_slots} slots x {_fmt_size(config.slot_size)} "
            f"= {_fmt_size(capacity)} in /dev/shm/{queue.name}; "
            f"numpy arrays: {'yes' if config.numpy else 'no'}; "
            + (f"{config.messages:,} messages" if config.messages else "")
            + (" or " if config.messages and config.seconds else "")
            + (f"{config.seconds:g} s" if config.seconds else "")
        )
        if remote is not None:
            say(f"remote: reader {config.readers - 1} {remote.where}")
        for i in range(config.readers):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            far = remote.reader if remote is not None and i == config.readers - 1 else None
            p = ctx.Process(
                target=_reader_main,
                args=(queue.handle, i, plan, config.wait, config.stall_timeout, child_conn, far),
                name=f"shmcast-demo-reader-{i}",
                daemon=True,
            )
            p.start()
            child_conn.close()  # the child has its copy; EOF on parent_conn if it dies
            processes.append(p)
            conns.append(parent_conn)
            readers[i].pid = p.pid

        # The collective start: every reader attached (or one died trying).
        startup_deadline = time.monotonic() + max(STARTUP_TIMEOUT, config.stall_timeout)
        while True:
            try:
                queue.wait_until_ready(timeout=0.2)
                break
            except ShmcastError:
                dead = [i for i, p in enumerate(processes) if p.exitcode is not None]
                if dead or time.monotonic() >= startup_deadline:
                    what = (
                        f"reader(s) {dead} exited before attaching"
                        if dead
                        else f"the readers did not attach within {STARTUP_TIMEOUT:g} s"
                    )
                    raise _StartupFailed(what) from None

        sender = _Sender(queue, plan, config.stall_timeout)
        watchdog.start()
        display = _Progress(out, progress)
        send_start = display.started
        time_limit = None if config.seconds is None else send_start + config.seconds
        count_limit = config.messages
        kill_at = None
        if config.kill_reader is not None:
            kill_at = (count_limit // 2) if count_limit else None
        kill_time = send_start + config.seconds / 2 if config.seconds else None
        killed = False
        try:
            now = send_start
            while (count_limit is None or sent < count_limit) and (
                time_limit is None or now < time_limit
            ):
                if (
                    config.kill_reader is not None
                    and not killed
                    and (
                        (kill_at is not None and sent >= kill_at)
                        or (kill_time is not None and now >= kill_time)
                    )
                ):
                    victim = processes[config.kill_reader]
                    say(f"  killing reader {config.kill_reader} (pid {victim.pid}) on purpose")
                    os.kill(victim.pid, signal.SIGKILL)
                    killed = True
                kind, size = sender.send(sent)
                sent += 1
                sent_bytes += size
                kinds[kind.name] += 1
                now = time.monotonic()
                watchdog.feed()
                display.update(sent, sent_bytes, now)
            send_end = time.monotonic()
            display.update(sent, sent_bytes, send_end, force=True)
            display.finish()
            sender.send_end(sent)
        except ShmcastError as exc:
            send_end = time.monotonic()
            display.finish()
            failures.append(
                f"the writer stopped after {sent:,} messages: {type(exc).__name__}: {exc}"
            )
        except KeyboardInterrupt:
            send_end = time.monotonic()
            display.finish()
            interrupted = True
            failures.append(f"interrupted after {sent:,} messages")
        finally:
            watchdog.stop()
            writer_waits = queue.stats().waits
    except _StartupFailed as exc:
        failures.append(f"startup failed: {exc}")
    finally:
        queue.close()  # readers drain what was published, then see QueueClosed
        _collect(processes, conns, readers, config.stall_timeout + 10.0, failures)
        network.close()
    result = _judge(
        config, readers, failures, sent, sent_bytes, send_start, send_end, kinds,
        interrupted, writer_waits,
    )  # fmt: skip
    result.segment = queue.name
    return result


class _StartupFailed(Exception):
    pass


@dataclass
class _Remote:
    """How ``--remote`` runs: the writer's RemoteOptions, what the remote reader process
    needs (its namespace, whether to force the network path) and a line for the header."""

    options: Any
    reader: tuple[str | None, bool]
    where: str


def _remote_setup(config: DemoConfig, stack: contextlib.ExitStack,
                  say: Callable[[str], None]) -> _Remote:  # fmt: skip
    """The last reader receives over the network: from another network namespace (a veth
    pair made for the run; this process and its other readers move into the writer's
    namespace until the run ends), or, where namespaces cannot be made, over loopback.
    Needs pyzmq (UsageError-worthy ImportError otherwise)."""
    from .._remote import RemoteOptions, require_zmq
    from .._remote._netns import NetnsUnavailable, enter_netns, netns_pair

    require_zmq()
    last = (config.readers - 1,)
    try:
        pair = stack.enter_context(netns_pair())
    except NetnsUnavailable as exc:
        say(f"remote: network namespaces are not available here ({exc}); the remote reader "
            "connects over loopback instead")  # fmt: skip
        return _Remote(RemoteOptions(bind="tcp://127.0.0.1:0", readers=last), (None, True),
                       "receives over TCP on loopback (127.0.0.1)")  # fmt: skip
    # This thread (and so every process started from now on) goes into the writer's
    # namespace; the original one is re-entered when the run ends, before the pair goes.
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(os.close, home)
    stack.callback(_setns_fd, home)
    enter_netns(pair.writer_ns)
    return _Remote(
        RemoteOptions(bind=pair.bind(), readers=last),
        (pair.reader_ns, False),
        f"runs in network namespace {pair.reader_ns} and receives over TCP across a veth pair "
        f"from the writer in {pair.writer_ns} ({pair.writer_v4})",
    )


def _setns_fd(fd: int) -> None:
    """Re-enter the network namespace open at ``fd`` (the one this thread started in)."""
    import ctypes

    from .._remote._netns import CLONE_NEWNET

    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")


def _collect(
    processes: list[Any],
    conns: list[Any],
    readers: list[ReaderResult],
    timeout: float,
    failures: list[str],
) -> None:
    """Receive every reader's report (bounded wait), then join every reader, killing those
    that do not exit.  Never raises for a reader's misbehaviour: it records it."""
    deadline = time.monotonic() + timeout
    for i, conn in enumerate(conns):
        try:
            if conn.poll(max(0.0, deadline - time.monotonic())):
                pid = readers[i].pid
                readers[i] = _reader_result(i, conn.recv())
                readers[i].pid = readers[i].pid or pid
        except (EOFError, OSError):
            pass  # died before reporting: judged below
        finally:
            conn.close()
    for i, p in enumerate(processes):
        p.join(timeout=max(0.5, deadline - time.monotonic()))
        if p.exitcode is None:
            readers[i].killed = True
            p.kill()
            p.join(timeout=5)
        readers[i].exitcode = p.exitcode
        readers[i].pid = p.pid


def _judge(
    config: DemoConfig,
    readers: list[ReaderResult],
    failures: list[str],
    sent: int,
    sent_bytes: int,
    send_start: float,
    send_end: float,
    kinds: Counter[str],
    interrupted: bool,
    writer_waits: int,
) -> DemoResult:
    for r in readers:
        if not r.reported:
            if r.killed:
                r.problems.append(
                    f"reader {r.index} (pid {r.pid}) neither reported nor exited in time "
                    "(stuck or stopped); killed it"
                )
            else:
                r.problems.append(
                    f"reader {r.index} (pid {r.pid}) died without reporting "
                    f"({_describe_exit(r.exitcode)})"
                )
            continue
        if r.errors:
            r.problems.append(
                f"reader {r.index}: {r.errors} bad message(s), first: {r.error_samples[0]}"
            )
        if r.messages != sent:
            r.problems.append(f"reader {r.index} received {r.messages:,} of {sent:,} messages")
        elif r.bytes != sent_bytes:
            r.problems.append(f"reader {r.index} received {r.bytes:,} of {sent_bytes:,} bytes")
        if r.end_count is None:
            r.problems.append(
                f"reader {r.index} did not receive the end-of-stream marker "
                f"(it stopped with: {r.stopped_by or 'no reason given'})"
            )
        elif r.end_count != sent:
            r.problems.append(f"reader {r.index}: end marker says {r.end_count}, sent {sent}")
        if r.killed:
            r.problems.append(f"reader {r.index} (pid {r.pid}) did not exit; killed it")
        elif r.exitcode not in (0, None):
            r.problems.append(f"reader {r.index} ended with {_describe_exit(r.exitcode)}")
    all_failures = failures + [p for r in readers for p in r.problems]
    # End to end: from the first send to the last receive of the slowest reader.
    last = [r.last_recv_ns for r in readers if r.last_recv_ns is not None]
    end = max(last) / 1e9 if last and not all_failures else send_end
    seconds = max(end - send_start, send_end - send_start, 1e-9)
    ok = not all_failures and sent > 0
    if ok:
        verdict = f"OK: every reader received all {sent} messages in order"
    elif interrupted:
        verdict = f"INTERRUPTED: after {sent} messages"
    else:
        verdict = "FAILED: " + (all_failures[0] if all_failures else "no message was sent")
    return DemoResult(
        config=config,
        ok=ok,
        verdict=verdict,
        messages=sent,
        bytes=sent_bytes,
        seconds=seconds,
        send_seconds=send_end - send_start,
        msgs_per_s=sent / seconds,
        mb_per_s=sent_bytes / seconds / 1e6,
        kinds=dict(kinds),
        readers=readers,
        failures=all_failures,
        interrupted=interrupted,
        writer_waits=writer_waits,
    )


# -- formatting ---------------------------------------------------------------------------


def _fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def format_report(result: DemoResult) -> str:
    """The final table and verdict, as printed by ``shmcast demo``."""
    lines = [
        "",
        f"sent      {result.messages:,} messages, {_fmt_bytes(result.bytes)} of payload, "
        f"in {result.send_seconds:.2f} s ({result.writer_waits:,} sends waited for space)",
    ]
    if result.ok:
        lines += [
            f"received  by every reader {result.seconds:.2f} s after the first send",
            f"rate      {result.msgs_per_s:,.0f} msg/s, {result.mb_per_s:,.1f} MB/s per reader "
            f"({result.mb_per_s * len(result.readers):,.1f} MB/s delivered in all)",
        ]
    lines += [
        "mix       " + ", ".join(f"{name} {n:,}" for name, n in result.kinds.items()),
        "",
        f"{'reader':>6} {'pid':>8} {'messages':>10} {'payload':>10} {'errors':>6} "
        f"{'p50 us':>9} {'p99 us':>9} {'max us':>10}  status",
    ]
    for r in result.readers:
        status = "ok" if r.ok else ("no report" if not r.reported else "FAILED")
        lines.append(
            f"{r.index:>6} {r.pid or '-':>8} {r.messages:>10,} {_fmt_bytes(r.bytes):>10} "
            f"{r.errors:>6} {_fmt_us(r.latency_p50_us):>9} {_fmt_us(r.latency_p99_us):>9} "
            f"{_fmt_us(r.latency_max_us):>10}  {status}"
        )
    lines.append(
        "latency: one-way, from the start of the send call to the reader holding the message;\n"
        "         the writer sends flat out, so it includes time queued behind earlier messages"
    )
    lines.append("")
    lines.append(result.verdict)
    for failure in result.failures[1:]:
        lines.append(f"  also: {failure}")
    return "\n".join(lines)


# -- entry points -------------------------------------------------------------------------


def run_demo(
    *,
    readers: int = DEFAULT_READERS,
    messages: int | None = None,
    seconds: float | None = None,
    wait: str = "futex",
    n_slots: int | None = None,
    slot_size: int | None = None,
    start_method: str | None = None,
    numpy: bool | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    kill_reader: int | None = None,
    remote: bool = False,
    out: TextIO | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo and return its result (it does not print the final table: see
    :func:`format_report`).

    Call it from the main thread of the process that is to be the writer.  It blocks for
    about ``seconds`` (or until ``messages`` are sent) plus startup and shutdown, and never
    longer than its timeouts allow.  ``out`` receives the header and progress lines (None:
    silent).  Raises ValueError for an invalid configuration; everything that goes wrong
    while running is reported in the result (``ok`` False), not raised.  Ctrl-C stops the
    run cleanly and sets ``interrupted``.  Reader processes are always joined or killed and
    the queue closed before it returns.
    """
    config = DemoConfig.checked(
        readers=readers,
        messages=messages,
        seconds=seconds,
        wait=wait,
        n_slots=n_slots,
        slot_size=slot_size,
        start_method=start_method,
        numpy=numpy,
        stall_timeout=stall_timeout,
        kill_reader=kill_reader,
        remote=remote,
    )
    return _execute(config, out, progress)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _size(text: str) -> int:
    """A byte count, with an optional K/M/G suffix (binary: 64K = 65536)."""
    units = {"k": KiB, "m": MiB, "g": 1024 * MiB}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        value = int(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 1M)") from None
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 64 bytes, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shmcast demo``."""
    from .._queue import DEFAULT_SLOT_SIZE, DEFAULT_SLOTS
    from .._wait import POLICIES

    parser.add_argument(
        "--readers", type=_positive_int, default=DEFAULT_READERS, metavar="N",
        help=f"number of reader processes (default {DEFAULT_READERS})",
    )  # fmt: skip
    parser.add_argument(
        "--messages", type=_positive_int, default=None, metavar="N",
        help="stop after N messages (default: run for --seconds)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=_positive_float, default=None, metavar="S",
        help=f"stop after S seconds (default {DEFAULT_SECONDS:g} when --messages is not given; "
        "with both, whichever comes first)",
    )  # fmt: skip
    parser.add_argument(
        "--wait", choices=sorted(POLICIES), default="futex", metavar="POLICY",
        help="wait policy of writer and readers: " + ", ".join(sorted(POLICIES))
        + " (default futex)",
    )  # fmt: skip
    parser.add_argument(
        "--slots", type=_positive_int, default=DEFAULT_SLOTS, metavar="N",
        help=f"slots in the ring (default {DEFAULT_SLOTS})",
    )  # fmt: skip
    parser.add_argument(
        "--slot-size", type=_size, default=DEFAULT_SLOT_SIZE, metavar="BYTES",
        help=f"bytes per slot, a multiple of 64; K/M suffixes allowed "
        f"(default {_fmt_size(DEFAULT_SLOT_SIZE).replace(' ', '')})",
    )  # fmt: skip
    parser.add_argument(
        "--start-method", choices=multiprocessing.get_all_start_methods(), default=None,
        help=f"how reader processes are started (default {default_start_method()})",
    )  # fmt: skip
    parser.add_argument(
        "--no-numpy", action="store_true",
        help="leave numpy arrays out of the mix even if numpy is installed",
    )  # fmt: skip
    parser.add_argument(
        "--stall-timeout", type=_positive_float, default=DEFAULT_STALL_TIMEOUT, metavar="S",
        help="fail if the writer waits longer than S seconds to send a message "
        f"(readers: 2 S to receive one; default {DEFAULT_STALL_TIMEOUT:g})",
    )  # fmt: skip
    parser.add_argument(
        "--kill-reader", type=int, default=None, metavar="I",
        help="kill reader I half-way, to show that a dead reader is detected "
        "(the demo then fails, on purpose)",
    )  # fmt: skip
    parser.add_argument(
        "--remote", action="store_true",
        help="the last reader receives over the network (ZeroMQ TCP), from another network "
        "namespace when the machine allows it (root), else over loopback; needs pyzmq",
    )  # fmt: skip
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines, only the final report"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``shmcast demo``: print progress, the table and the verdict; 0 if OK, 1 if not."""
    from .cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, UsageError

    try:
        config = DemoConfig.checked(
            readers=args.readers,
            messages=args.messages,
            seconds=args.seconds,
            wait=args.wait,
            n_slots=args.slots,
            slot_size=args.slot_size,
            start_method=args.start_method,
            numpy=False if args.no_numpy else None,
            stall_timeout=args.stall_timeout,
            kill_reader=args.kill_reader,
            remote=args.remote,
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    try:
        result = _execute(config, sys.stdout, progress=not args.quiet)
    except (DemoConfigError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    print(format_report(result), flush=True)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_FAILURE


__all__ = ["DemoConfig", "DemoResult", "ReaderResult", "format_report", "run_demo"]
