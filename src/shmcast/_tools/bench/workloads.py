"""The workloads: what the writer sends, what each reader checks and measures, and the summary.

Every message carries its sequence number and the writer's ``time.monotonic_ns()`` taken just
before the send call (CLOCK_MONOTONIC is system-wide, so a reader's ``monotonic_ns()`` minus that
stamp is the one-way latency).  Every reader checks that it got numbers ``0 .. n-1`` exactly once,
in order, and that each message's content matches its number; an implementation that loses,
reorders or corrupts a message is flagged by the summary, not ranked.

Each workload is a pair of functions run by ``case.py``: ``write_*`` in the writer process
(after every reader is attached and released from the start barrier) and ``read_*`` in each
reader process; both return plain data (picklable, JSON-able).  :func:`summarize` turns them
into a status, verification details and metrics.  Payloads are built before the timed part
starts, and a payload is never modified after it was sent (implementations may send zero-copy).
"""

from __future__ import annotations

import gc
import os
import resource
import struct
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import Reader, ReplyCollector, ReplySender, Writer
from .stats import SequenceCheck, cdf_points, latency_summary

KiB = 1024
MiB = 1024 * 1024

_HEADER = struct.Struct("<QQ")  # seq, send timestamp (ns)
_TAIL = struct.Struct("<Q")  # seq again, in the last 8 bytes
_FILL = 0xA5


@dataclass
class CaseSpec:
    """One case: a workload, a payload and a reader count, with its parameters.

    ``payload`` is ``"dict"`` (a small dict of 10 fields), ``"bytes"`` or ``"numpy"`` (``size``
    bytes).  Only the parameters of the case's workload matter; ``time_limit`` is the hard
    limit the harness enforces on the whole case.
    """

    workload: str
    variant: str
    readers: int
    payload: str = "dict"
    size: int = 0
    messages: int = 0
    warmup: int = 0
    interval_us: float = 0.0
    idle_s: float = 0.0
    stall_s: float = 10.0
    time_limit: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.variant}/r{self.readers}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseSpec:
        return cls(**data)

    def max_message_bytes(self) -> int:
        return self.size + 4 * KiB if self.payload in ("bytes", "numpy") else 4 * KiB


# -- payloads ----------------------------------------------------------------------------------


class Payloads:
    """Makes, stamps and checks the messages of one payload kind."""

    def __init__(self, kind: str, size: int = 0) -> None:
        if kind not in ("dict", "bytes", "numpy"):
            raise ValueError(f"unknown payload kind {kind!r}")
        if kind != "dict" and size < _HEADER.size + _TAIL.size:
            raise ValueError(f"a {kind} payload needs at least 24 bytes, not {size}")
        self.kind = kind
        self.size = size
        #: True when messages are raw bytes (sent with the raw path of the adapter).
        self.raw = kind == "bytes"

    def make(self, seq: int) -> Any:
        """A fresh message numbered ``seq`` (the writer stamps it just before sending)."""
        if self.kind == "dict":
            return {
                "seq": seq,
                "ts": 0,
                "check": seq ^ 0x5A5A5A,
                "kind": "decode",
                "request_ids": [f"req-{seq % 97}-{i}" for i in range(4)],
                "num_tokens": [17, 3, 250, 9],
                "temperature": 0.7,
                "top_p": 0.95,
                "finished": [],
                "flags": {"stream": True, "logprobs": False},
            }
        if self.kind == "bytes":
            buf: Any = bytearray([_FILL]) * self.size
        else:
            import numpy as np

            buf = np.full(self.size, _FILL, dtype=np.uint8)
        _HEADER.pack_into(buf, 0, seq, 0)
        _TAIL.pack_into(buf, self.size - _TAIL.size, seq)
        return buf

    def stamp(self, msg: Any, now_ns: int) -> None:
        """Write the send timestamp into ``msg`` (before it is sent)."""
        if self.kind == "dict":
            msg["ts"] = now_ns
        else:
            struct.pack_into("<Q", msg, 8, now_ns)

    def header(self, msg: Any) -> tuple[int, int]:
        """(seq, send timestamp) of a received message.  Raises on a malformed one."""
        if self.kind == "dict":
            return int(msg["seq"]), int(msg["ts"])
        seq, ts = _HEADER.unpack_from(msg, 0)
        return seq, ts

    def problem(self, msg: Any, seq: int) -> str:
        """What is wrong with the content of message ``seq`` ("" if nothing)."""
        if self.kind == "dict":
            if not isinstance(msg, dict) or len(msg) != 10:
                return f"message {seq}: not the 10-field dict"
            if msg.get("check") != seq ^ 0x5A5A5A:
                return f"message {seq}: check field does not match"
            return ""
        if self.kind == "numpy":
            import numpy as np

            if not isinstance(msg, np.ndarray) or msg.nbytes != self.size:
                return f"message {seq}: not a {self.size}-byte array ({type(msg).__name__})"
            length = msg.nbytes
        else:
            length = len(memoryview(msg).cast("B"))
            if length != self.size:
                return f"message {seq}: {length} bytes, expected {self.size}"
        (tail,) = _TAIL.unpack_from(msg, length - _TAIL.size)
        if tail != seq:
            return f"message {seq}: torn (tail says {tail})"
        return ""


def _payloads(spec: CaseSpec) -> Payloads:
    return Payloads(spec.payload, spec.size)


# -- shared reader loop ------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Receiver:
    """Receives and verifies messages ``0 .. expected-1`` for one reader.

    ``unwrap`` takes the payload out of what arrives (the executor's requests carry it inside
    a tuple); ``indefinite`` receives as a worker waiting for its next step does.
    """

    def __init__(self, reader: Reader, payloads: Payloads, expected: int, unwrap: Any = None,
                 indefinite: bool = False) -> None:  # fmt: skip
        self.reader = reader
        self.payloads = payloads
        self.check = SequenceCheck(expected)
        self.stalled = False
        self._recv = reader.recv_indefinite if indefinite else reader.recv
        self._unwrap = unwrap

    def next(self, timeout: float) -> tuple[int, int, int, Any] | None:
        """The next message as ``(seq, send_ns, recv_ns, msg)``; ``seq`` is -1 for an
        unreadable or out-of-order message.  None once everything was seen, or when nothing
        arrived within ``timeout`` (then :attr:`stalled` is set).  After the last number, while
        gaps remain, it waits at most 1 s for late arrivals (a reordering is not a loss)."""
        if self.check.complete:
            return None
        late = self.check.awaiting_late  # only late arrivals can still come
        msg = self._recv(min(timeout, 1.0) if late else timeout)
        return self.accept(msg, time.monotonic_ns(), late)

    async def anext(self, timeout: float) -> tuple[int, int, int, Any] | None:
        """:meth:`next` for a reader that awaits (``reader.recv_async``), inside its loop."""
        if self.check.complete:
            return None
        late = self.check.awaiting_late
        msg = await self.reader.recv_async(min(timeout, 1.0) if late else timeout)
        return self.accept(msg, time.monotonic_ns(), late)

    def accept(self, msg: Any, now: int, late: bool) -> tuple[int, int, int, Any] | None:
        """Check what one receive returned at ``now`` (None: nothing came); see :meth:`next`."""
        if msg is None:
            self.stalled = not late
            return None
        try:
            if self._unwrap is not None:
                msg = self._unwrap(msg)
            seq, sent = self.payloads.header(msg)
        except (KeyError, TypeError, ValueError, IndexError, struct.error) as exc:
            self.check.received += 1
            self.check.corrupted(f"unreadable message: {exc!r}")
            return -1, 0, now, msg
        problem = self.payloads.problem(msg, seq)
        if problem:
            self.check.corrupted(problem)
        if not self.check.observe(seq):
            return -1, sent, now, msg
        return seq, sent, now, msg

    def result(self, **extra: Any) -> dict[str, Any]:
        self.check.finish()
        return {"verification": self.check.as_dict(), "stalled": self.stalled, **extra}


# -- latency -----------------------------------------------------------------------------------


def _paced_sends(spec: CaseSpec, writer: Writer, pace: Any, gate: Any = None) -> dict:
    """Send ``spec.messages`` messages on a schedule of one every ``interval_us`` (absolute;
    when the writer falls more than an interval behind, the schedule restarts from now instead
    of bursting).  ``pace(due_ns)`` waits until ``due_ns`` and returns the time then;
    ``gate(seq)``, when given, is called before message ``seq`` is stamped (it may block: the
    time it blocks is not part of any latency)."""
    pl = _payloads(spec)
    messages = [pl.make(seq) for seq in range(spec.messages)]
    interval = int(spec.interval_us * 1000)
    sent = array("q")
    due = time.monotonic_ns()
    for seq, msg in enumerate(messages):
        if gate is not None:
            gate(seq)
        now = time.monotonic_ns()
        if now < due:
            now = pace(due)
        elif now - due > interval:
            due = now
        pl.stamp(msg, now)
        writer.send(msg, pl.raw)
        sent.append(now)
        due += interval
    gaps = sorted(
        b - a for a, b in zip(sent[spec.warmup : -1], sent[spec.warmup + 1 :], strict=True)
    )
    return {
        "target_interval_us": spec.interval_us,
        "achieved_interval_us": (sum(gaps) / len(gaps) / 1e3) if gaps else 0.0,
        "send_gap": latency_summary(gaps),
    }


def _sleep_until(due_ns: int) -> int:
    time.sleep(max(0, due_ns - time.monotonic_ns()) / 1e9)
    return time.monotonic_ns()


def write_latency(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None) -> dict:
    """Paced sends: one message every ``interval_us``, the writer sleeping in between."""
    return _paced_sends(spec, writer, _sleep_until)


def read_latency(spec: CaseSpec, reader: Reader, replies: ReplySender | None, index: int,
                 credits: Credits | None = None) -> dict:  # fmt: skip
    """One-way latency of every message after the warm-up.  With ``credits`` (the saturated
    workload), the reader acknowledges each message as soon as it has taken its time."""
    rx = _Receiver(reader, _payloads(spec), spec.messages)
    lat = array("q")
    while (got := rx.next(spec.stall_s)) is not None:
        seq, sent, now, _ = got
        if credits is not None and seq >= 0:
            credits.ack(index, seq + 1)
        if seq >= spec.warmup:
            lat.append(now - sent)
    return rx.result(latencies_ns=lat.tolist())


# -- saturated latency ---------------------------------------------------------------------
#
# The writer sends faster than the readers can take (a target interval of 20 us), with the
# same bound on messages in flight for every implementation: the harness's credits.  Each
# reader stores how many messages it has taken in a counter of its own in shared memory; the
# writer does not send message ``seq`` until every reader has taken ``seq - window + 1``, so no
# reader ever has more than ``window`` messages sent to it and not yet taken, whatever the
# implementation's own capacity (every implementation's is at least that).  Each
# implementation's own backpressure therefore never engages; what differs is how fast each
# delivers and how its readers wait.  Waiting for credits and for the schedule, the writer
# yields its CPU in a loop (``sched_yield``): on a machine with fewer cores than processes the
# readers get it, and no timer (whose slack on Linux is 50 us) paces the writer.


class Credits:
    """The credit counters of one saturated case: one per reader, in shared memory.

    Memory ordering: counter ``i`` is written only by reader ``i`` (an aligned 8-byte store,
    which no CPU this runs on tears) and only grows; the writer only reads.  A stale read
    makes the writer wait longer than it needs, never send too early: a reader stores its
    count only after the message was taken, so any value the writer sees is a lower bound.
    """

    def __init__(self, counters: Any, window: int) -> None:
        if window < 1:
            raise ValueError(f"the window must be at least 1 message, not {window}")
        self.counters = counters  # a multiprocessing RawArray of c_uint64, one per reader
        self.window = window

    def ack(self, index: int, taken: int) -> None:
        """Reader ``index`` has taken ``taken`` messages (0 .. taken-1)."""
        self.counters[index] = taken

    def blocked(self, seq: int) -> bool:
        """Would sending message ``seq`` put more than the window in flight to a reader?"""
        return seq - min(self.counters) >= self.window

    def wait(self, seq: int, timeout: float) -> bool:
        """Wait until message ``seq`` may be sent; False when ``timeout`` seconds passed first
        (a reader stopped taking messages: it will report what it missed)."""
        deadline = time.monotonic() + timeout
        while self.blocked(seq):
            if time.monotonic() > deadline:
                return False
            os.sched_yield()
        return True


def _yield_until(due_ns: int) -> int:
    """Wait until ``due_ns`` yielding the CPU (no timer: intervals are below its slack)."""
    while (now := time.monotonic_ns()) < due_ns:
        os.sched_yield()
    return now


def write_saturated(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None,
                    credits: Credits | None = None) -> dict:  # fmt: skip
    """Sends every ``interval_us`` (20 us by default), never more than the credit window in
    flight to any reader; reports the interval achieved and how often the credits held the
    writer back."""
    assert credits is not None
    held = 0
    timeouts = 0

    def gate(seq: int) -> None:
        nonlocal held, timeouts
        if credits.blocked(seq):
            held += 1
            if not credits.wait(seq, spec.stall_s):
                timeouts += 1

    result = _paced_sends(spec, writer, _yield_until, gate)
    result.update(window=credits.window, credit_waits=held, credit_timeouts=timeouts)
    return result


# -- throughput --------------------------------------------------------------------------------


def write_throughput(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None) -> dict:
    """Back-to-back sends of prebuilt messages."""
    pl = _payloads(spec)
    messages = [pl.make(seq) for seq in range(spec.messages)]
    start = time.monotonic_ns()
    for msg in messages:
        pl.stamp(msg, time.monotonic_ns())
        writer.send(msg, pl.raw)
    return {"send_elapsed_s": (time.monotonic_ns() - start) / 1e9}


def read_throughput(
    spec: CaseSpec, reader: Reader, replies: ReplySender | None, index: int
) -> dict:
    """Per reader: from the send stamp of message 0 to the arrival of the last message."""
    rx = _Receiver(reader, _payloads(spec), spec.messages)
    first_sent = last_recv = 0
    while (got := rx.next(spec.stall_s)) is not None:
        seq, sent, now, _ = got
        if seq == 0:
            first_sent = sent
        last_recv = now
    elapsed = (last_recv - first_sent) / 1e9 if first_sent and last_recv > first_sent else 0.0
    return rx.result(elapsed_s=elapsed)


# -- wake-up -----------------------------------------------------------------------------------


def write_wakeup(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None) -> dict:
    """Message 0 at once, then one message after each ``idle_s`` of silence."""
    pl = _payloads(spec)
    messages = [pl.make(seq) for seq in range(spec.messages)]
    for seq, msg in enumerate(messages):
        if seq:
            time.sleep(spec.idle_s)
        pl.stamp(msg, time.monotonic_ns())
        writer.send(msg, pl.raw)
    return {"idle_s": spec.idle_s}


def read_wakeup(spec: CaseSpec, reader: Reader, replies: ReplySender | None, index: int) -> dict:
    rx = _Receiver(reader, _payloads(spec), spec.messages)
    lat = array("q")
    while (got := rx.next(spec.idle_s + spec.stall_s)) is not None:
        seq, sent, now, _ = got
        if seq >= 1:
            lat.append(now - sent)
    return rx.result(latencies_ns=lat.tolist())


# -- idle CPU ----------------------------------------------------------------------------------


def write_idle_cpu(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None) -> dict:
    """A burst of ``messages - 1`` messages, ``idle_s`` of silence, then one last message."""
    pl = _payloads(spec)
    messages = [pl.make(seq) for seq in range(spec.messages)]
    for msg in messages[:-1]:
        pl.stamp(msg, time.monotonic_ns())
        writer.send(msg, pl.raw)
    cpu0 = _cpu_seconds()
    time.sleep(spec.idle_s)
    cpu1 = _cpu_seconds()
    pl.stamp(messages[-1], time.monotonic_ns())
    writer.send(messages[-1], pl.raw)
    return {"writer_idle_cpu_s": cpu1 - cpu0}


def read_idle_cpu(spec: CaseSpec, reader: Reader, replies: ReplySender | None, index: int) -> dict:
    """CPU seconds this process used between the last message of the burst and the final one.

    The rusage counters cover every thread of the process (an implementation's background
    threads count too).
    """
    rx = _Receiver(reader, _payloads(spec), spec.messages)
    window = IdleWindow(spec)
    while (got := rx.next(spec.idle_s + spec.stall_s)) is not None:
        window.see(got[0], got[2])
    return window.result(rx)


class IdleWindow:
    """The idle-CPU reader's measurement: CPU time and clock at the burst's last message and
    at the final one (``see`` each message's number and arrival)."""

    def __init__(self, spec: CaseSpec) -> None:
        self.burst_end = spec.messages - 2
        self.cpu0 = self.cpu1 = 0.0
        self.t0 = self.t1 = 0

    def see(self, seq: int, now: int) -> None:
        if seq == self.burst_end:
            self.cpu0, self.t0 = _cpu_seconds(), now
        elif seq == self.burst_end + 1:
            self.cpu1, self.t1 = _cpu_seconds(), now

    def result(self, rx: _Receiver) -> dict[str, Any]:
        measured = bool(self.t0 and self.t1)
        return rx.result(
            idle_cpu_s=(self.cpu1 - self.cpu0) if measured else None,
            window_s=((self.t1 - self.t0) / 1e9) if measured else None,
        )


# -- engine ------------------------------------------------------------------------------------


def _step_loop(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None, wrap: Any,
               replied_to: Any) -> dict:  # fmt: skip
    """Broadcast a step, wait for every worker's reply, repeat; steps/s after the warm-up.

    ``wrap(msg)`` is what is sent for a payload; ``replied_to(reply)`` is ``(step, worker)``
    of a reply (KeyError, TypeError or ValueError for a malformed one).
    """
    assert replies is not None
    pl = _payloads(spec)
    steps = [pl.make(seq) for seq in range(spec.messages)]
    rtt = array("q")
    problems = 0
    first_problem = ""
    completed = 0
    start = time.monotonic_ns()
    cpu_start = _cpu_seconds()
    workers = list(range(spec.readers))
    for step, msg in enumerate(steps):
        if step == spec.warmup:
            start = time.monotonic_ns()
            cpu_start = _cpu_seconds()
        sent = time.monotonic_ns()
        pl.stamp(msg, sent)
        writer.send(wrap(msg), pl.raw and wrap is _same)
        got = replies.gather(spec.readers, spec.stall_s)
        done = time.monotonic_ns()
        if got is None:
            first_problem = first_problem or f"replies to step {step} did not all arrive"
            problems += 1
            break
        try:
            answers = [replied_to(r) for r in got]
            ok = sorted(w for _, w in answers) == workers and all(s == step for s, _ in answers)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            problems += 1
            first_problem = first_problem or f"wrong replies to step {step}"
        completed += 1
        if step >= spec.warmup:
            rtt.append(done - sent)
    elapsed = (time.monotonic_ns() - start) / 1e9
    cpu = _cpu_seconds() - cpu_start
    timed = completed - spec.warmup
    return {
        "cpu_s": cpu,
        "steps_completed": completed,
        "reply_problems": problems,
        "first_problem": first_problem,
        "steps_per_s": timed / elapsed if timed > 0 and elapsed > 0 else 0.0,
        "step_rtt": latency_summary(rtt),
    }


def _same(msg: Any) -> Any:
    return msg


def write_engine(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None) -> dict:
    """Broadcast a step, wait for every worker's reply, repeat; steps/s after the warm-up."""
    return _step_loop(spec, writer, replies, _same, lambda r: (r["step"], r["worker"]))


def read_engine(spec: CaseSpec, reader: Reader, replies: ReplySender | None, index: int) -> dict:
    """A worker: reply to each step with its number and the worker's index."""
    assert replies is not None
    rx = _Receiver(reader, _payloads(spec), spec.messages)
    while (got := rx.next(spec.stall_s)) is not None:
        seq = got[0]
        if seq >= 0:
            replies.send({"step": seq, "worker": index})
    return rx.result()


# -- executor: vLLM's executor loop ---------------------------------------------------------
#
# As vLLM's multiprocessing executor drives its workers: every step the engine broadcasts one
# request (method name, args, kwargs, output rank), each worker waits for it as an idle worker
# does (vLLM: dequeue(indefinite=True)), runs it and replies (status, result) through a queue
# of its own, and the engine reads every worker's reply within one deadline
# (collective_rpc).  The payload rides in the request's args: the small dict of a decode step,
# or 1 MiB of bytes.

EXECUTOR_METHOD = "execute_model"


def _executor_request(msg: Any) -> tuple[str, tuple[Any, ...], dict[str, Any], None]:
    return (EXECUTOR_METHOD, (msg,), {"non_block": False}, None)


def _executor_payload(request: Any) -> Any:
    method, args, _kwargs, _rank = request
    if method != EXECUTOR_METHOD:
        raise ValueError(f"unexpected method {method!r}")
    return args[0]


def _executor_reply(reply: Any) -> tuple[int, int]:
    status, result = reply
    if status != "SUCCESS":
        raise ValueError(f"status {status!r}")
    return result["step"], result["worker"]


def write_executor(spec: CaseSpec, writer: Writer, replies: ReplyCollector | None) -> dict:
    """The engine of vLLM's executor loop; steps/s after the warm-up.

    As vLLM's engine core does once started, the objects that exist when the loop starts are
    frozen out of the garbage collector (``gc.freeze()``), so that a full collection costs
    the loop's own objects only: in the harness's process, with torch loaded, one otherwise
    took about 90 ms, landing at random in one implementation's case or the other's.
    """
    gc.freeze()
    try:
        return _step_loop(spec, writer, replies, _executor_request, _executor_reply)
    finally:
        gc.unfreeze()


def read_executor(spec: CaseSpec, reader: Reader, replies: ReplySender | None, index: int) -> dict:
    """A worker of vLLM's executor loop: wait for each request as long as it takes, reply."""
    assert replies is not None
    rx = _Receiver(reader, _payloads(spec), spec.messages, _executor_payload, indefinite=True)
    cpu_start = None  # CPU time when the first timed request arrived (the engine's warm-up)
    while (got := rx.next(spec.stall_s)) is not None:
        seq = got[0]
        if seq == spec.warmup:
            cpu_start = _cpu_seconds()
        if seq >= 0:
            replies.send(("SUCCESS", {"step": seq, "worker": index}))
    cpu = None if cpu_start is None else _cpu_seconds() - cpu_start
    return rx.result(cpu_s=cpu)


#: Workloads whose workers reply to the writer (they need a reply path).
REPLYING = ("engine", "executor")
#: Workloads whose writer and readers share the harness's credit counters (:class:`Credits`).
CREDITED = ("saturated",)

WRITERS = {
    "latency": write_latency,
    "saturated": write_saturated,
    "throughput": write_throughput,
    "wakeup": write_wakeup,
    "idle_cpu": write_idle_cpu,
    "engine": write_engine,
    "executor": write_executor,
}
READERS = {
    "latency": read_latency,
    "saturated": read_latency,
    "throughput": read_throughput,
    "wakeup": read_wakeup,
    "idle_cpu": read_idle_cpu,
    "engine": read_engine,
    "executor": read_executor,
}
WORKLOADS = tuple(WRITERS)


# -- summary -----------------------------------------------------------------------------------


def _verdict(readers: list[dict], writer: dict) -> tuple[str, str]:
    """(status, detail) from the readers' verifications (and the engine's replies)."""
    lost = sum(r["verification"]["lost"] for r in readers)
    reordered = sum(
        r["verification"]["out_of_order"] + r["verification"]["duplicated"] for r in readers
    )
    corrupt = sum(r["verification"]["corrupt"] for r in readers)
    first = next(
        (
            f"reader {i}: {r['verification']['first_problem']}"
            for i, r in enumerate(readers)
            if r["verification"]["first_problem"]
        ),
        "",
    )
    if corrupt:
        return "corrupt", f"{corrupt} corrupt message(s); {first}"
    if reordered:
        return "reordered", f"{reordered} out-of-order or duplicated message(s); {first}"
    if lost:
        stalled = sum(1 for r in readers if r["stalled"])
        return "lost", f"{lost} message(s) lost, {stalled} reader(s) stalled; {first}"
    if writer.get("reply_problems"):
        return "lost", f"engine replies: {writer['first_problem']}"
    return "ok", ""


def summarize(spec: CaseSpec, writer: dict, readers: list[dict]) -> dict[str, Any]:
    """The case's status, verification and metrics, from the writer's and readers' results."""
    status, detail = _verdict(readers, writer)
    verification = {
        "messages": spec.messages,
        "readers": [r["verification"] for r in readers],
    }
    metrics: dict[str, Any] = {}
    if spec.workload in ("latency", "saturated", "wakeup"):
        every = [v for r in readers for v in r["latencies_ns"]]
        metrics.update(latency_summary(every))
        metrics["per_reader_p99_us"] = [
            latency_summary(r["latencies_ns"]).get("p99_us") for r in readers
        ]
        metrics["cdf"] = cdf_points(every)
        if spec.workload in ("latency", "saturated"):
            metrics["target_interval_us"] = writer["target_interval_us"]
            metrics["achieved_interval_us"] = writer["achieved_interval_us"]
            metrics["send_gap_p99_us"] = writer["send_gap"].get("p99_us")
        if spec.workload == "saturated":
            metrics["window"] = writer["window"]
            metrics["credit_waits"] = writer["credit_waits"]
            metrics["credit_wait_share"] = writer["credit_waits"] / max(1, spec.messages)
            metrics["credit_timeouts"] = writer["credit_timeouts"]
        else:
            metrics["idle_s"] = spec.idle_s
            metrics["repetitions"] = spec.messages - 1
    elif spec.workload == "throughput":
        rates = [spec.messages / r["elapsed_s"] if r["elapsed_s"] > 0 else 0.0 for r in readers]
        size = spec.size if spec.payload != "dict" else 0
        metrics["msgs_per_s_per_reader"] = sum(rates) / len(rates)
        metrics["msgs_per_s_min_reader"] = min(rates)
        metrics["mb_per_s_per_reader"] = metrics["msgs_per_s_per_reader"] * size / 1e6
        metrics["mb_per_s_min_reader"] = metrics["msgs_per_s_min_reader"] * size / 1e6
        metrics["mb_per_s_total"] = sum(rates) * size / 1e6
        metrics["send_elapsed_s"] = writer["send_elapsed_s"]
        metrics["message_bytes"] = size
    elif spec.workload == "idle_cpu":
        cpus = [r["idle_cpu_s"] for r in readers if r["idle_cpu_s"] is not None]
        windows = [r["window_s"] for r in readers if r["window_s"] is not None]
        if cpus:
            metrics["reader_cpu_s"] = cpus
            metrics["reader_cpu_s_mean"] = sum(cpus) / len(cpus)
            metrics["reader_cpu_s_max"] = max(cpus)
            metrics["window_s"] = sum(windows) / len(windows)
            metrics["cpu_percent_of_core"] = (
                100 * metrics["reader_cpu_s_mean"] / metrics["window_s"]
            )
        metrics["writer_idle_cpu_s"] = writer["writer_idle_cpu_s"]
    elif spec.workload in REPLYING:
        metrics["steps_per_s"] = writer["steps_per_s"]
        metrics["steps_completed"] = writer["steps_completed"]
        metrics["workers"] = spec.readers
        timed = writer["steps_completed"] - spec.warmup
        worker_cpu = [r.get("cpu_s") for r in readers]
        if "cpu_s" in writer and timed > 0 and None not in worker_cpu:
            # CPU time of the engine and every worker over the timed steps (user + system,
            # every thread): what one step costs the machine, whatever else runs on it.
            metrics["cpu_us_per_step"] = (writer["cpu_s"] + sum(worker_cpu)) / timed * 1e6
            metrics["engine_cpu_us_per_step"] = writer["cpu_s"] / timed * 1e6
        for key, value in writer["step_rtt"].items():
            metrics[f"step_rtt_{key}"] = value
    return {"status": status, "detail": detail, "verification": verification, "metrics": metrics}
