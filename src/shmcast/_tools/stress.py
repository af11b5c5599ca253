"""Drive an engine and N workers through batches of requests; report throughput and hangs.

The scenario of a frozen inference server, replayed on the queues: this process is the
*engine*; it runs a scheduler loop over requests that arrive in batches (default: 120 batches
of 12 requests, at most 62 running at once, each needing 8 to 64 steps, from a seeded RNG).
Every step it broadcasts the step's data (the running requests with a small payload each) to
N *worker* processes through a BroadcastQueue; each worker does some simulated work and
replies through a GatherQueue with a digest of what it received; the engine waits for all N
replies, checks every one, and goes on to the next step.  A request completes after its steps,
a batch once all its requests have completed.

Nothing waits without a limit: every put and get has a timeout, and a watchdog ends the run
when no step completes for --watchdog seconds, printing who is stalled (the workers that have
not replied, whether their processes are alive and what they are doing, and the words of both
queues' segments).  A worker that dies ends the run at once with its index and exit signal.
The workers and both queues are always cleaned up, also on Ctrl-C.

Exit status: 0 only if every repetition completed every request with every reply verified;
1 if a repetition stalled (a hang), lost a worker or got a wrong reply; 130 on Ctrl-C.

Workers are started with 'forkserver' by default ('spawn' where it is not available): each
worker is forked from a small, clean server process, so it inherits none of the engine's
mappings, threads or locks and reaches the queues only through their handles, as the workers
of a real engine do; and it starts in milliseconds, where 'spawn' boots a new interpreter per
worker (slow on a small machine).  'fork' is accepted for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from .. import _layout as L
from .._endpoint import Handle
from .._errors import QueueBroken, QueueClosed, QueueTimeout, SegmentError
from .._gather import GatherQueue
from .._liveness import stat_fields
from .._queue import BroadcastQueue
from .._segment import Segment
from .._wait import POLICIES, IdleWait, WaitPolicy, resolve_policy

START_METHODS = ("forkserver", "spawn", "fork")
DEFAULT_START_METHOD = (
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)
WORK_MODES = ("busy", "sleep")

#: Verdicts of one run.  Only "ok" is a success; "stall" is a hang caught by the watchdog.
VERDICTS = ("ok", "stall", "worker-died", "worker-error", "wrong-reply", "startup-failed")

POLL = 0.25  # longest single wait of the engine, so it looks at its watchdog this often
PROGRESS_EVERY = 0.1  # the engine calls the progress callback at most this often
TEARDOWN_JOIN = 10.0  # seconds for the workers to exit after the broadcast queue closed
KILL_JOIN = 3.0  # seconds to wait for a terminated or killed worker
WORKER_POLL = 1.0  # a worker's single get() timeout

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads the worker index over the digest


# -- configuration and results -------------------------------------------------------------


@dataclass(frozen=True)
class StressConfig:
    """The parameters of one stress run (see :func:`run_stress`).

    ``arrival_every``: a new batch arrives every this many engine steps (open loop, so the
    ``max_running`` cap binds); 0 means closed loop: the next batch arrives when every earlier
    one has completed, as a client that sends a batch and waits for it does.  In both modes a
    batch arrives at once when nothing is running or waiting.

    Fault injection (for tests; steps count from 0; ``fault_worker`` -1 means the last one):
    ``kill_worker_at_step`` SIGKILLs the worker just before that step is broadcast;
    ``freeze_worker_at_step`` SIGSTOPs it (the watchdog must then report it);
    ``corrupt_reply_at_step`` makes it send a wrong digest for that step.
    """

    workers: int = 12
    batches: int = 120
    batch_size: int = 12
    max_running: int = 62
    min_steps: int = 8
    max_steps: int = 64
    arrival_every: int = 4
    work_us: float = 20.0
    work_mode: str = "busy"
    payload_bytes: int = 16
    seed: int = 0
    watchdog: float = 30.0
    wait: str | WaitPolicy = "futex"
    start_method: str = DEFAULT_START_METHOD
    startup_timeout: float = 60.0
    kill_worker_at_step: int | None = None
    freeze_worker_at_step: int | None = None
    corrupt_reply_at_step: int | None = None
    fault_worker: int = -1

    def check(self) -> None:
        """Raise ValueError (or TypeError) naming the first parameter that is out of range."""
        positive = ("workers", "batches", "batch_size", "max_running", "min_steps", "max_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")
        if self.arrival_every < 0 or self.payload_bytes < 0:
            raise ValueError("arrival_every and payload_bytes must be >= 0")
        if not (self.work_us >= 0 and math.isfinite(self.work_us)):
            raise ValueError(f"work_us must be a finite number >= 0, got {self.work_us!r}")
        if self.work_mode not in WORK_MODES:
            raise ValueError(f"work_mode must be one of {WORK_MODES}, got {self.work_mode!r}")
        for name in ("watchdog", "startup_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method {self.start_method!r} is not available here; choose one of "
                f"{', '.join(multiprocessing.get_all_start_methods())}"
            )
        resolve_policy(self.wait)  # ValueError / TypeError for an unknown policy
        if not -self.workers <= self.fault_worker < self.workers:
            raise ValueError(f"fault_worker {self.fault_worker} is not a worker index")
        for name in ("kill_worker_at_step", "freeze_worker_at_step", "corrupt_reply_at_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a step number >= 0, got {value!r}")

    @property
    def wait_name(self) -> str:
        """The wait policy's name ("futex", "spin", "backoff", "idle")."""
        return resolve_policy(self.wait).name

    @property
    def fault_index(self) -> int:
        """``fault_worker`` as an index in ``range(workers)``."""
        return self.fault_worker % self.workers

    def describe(self) -> str:
        """One line stating the scenario's parameters."""
        arrival = (
            f"a batch every {self.arrival_every} steps"
            if self.arrival_every
            else "next batch when the previous completed"
        )
        return (
            f"{self.workers} workers, {self.batches} batches x {self.batch_size} requests, "
            f"max {self.max_running} running, {self.min_steps}..{self.max_steps} steps per "
            f"request, {arrival}, work {self.work_us:g} us ({self.work_mode}), "
            f"payload {self.payload_bytes} B/request, wait {self.wait_name}, start method "
            f"{self.start_method}, watchdog {self.watchdog:g} s, seed {self.seed}"
        )


@dataclass(frozen=True)
class Progress:
    """What the engine reports while it runs (passed to the ``progress`` callback)."""

    repetition: int
    wait: str
    step: int
    batches_done: int
    batches_total: int
    items_done: int
    items_total: int
    running: int
    waiting: int
    elapsed: float  #: seconds since the first step
    steps_per_s: float
    waiting_for: tuple[int, ...] = ()  #: workers whose reply to ``step`` has not come
    silent_for: float = 0.0  #: seconds since the last step completed


@dataclass(frozen=True)
class StressResult:
    """The outcome of one run.  ``verdict`` is one of :data:`VERDICTS`; only "ok" succeeded."""

    repetition: int
    wait: str
    seed: int
    verdict: str
    steps: int  #: steps completed (every reply received and verified)
    steps_per_s: float
    items_completed: int  #: requests that completed all their steps
    items_total: int
    batches_completed: int
    batches_total: int
    duration: float  #: seconds of the scheduler loop (first step to the end)
    startup: float  #: seconds to start the workers and see them attached
    max_running_seen: int
    #: CPU seconds used by the engine and the workers during the scheduler loop
    cpu_seconds: float = 0.0
    stalled_party: str | None = None  #: who stalled or failed, in words
    stalled_workers: tuple[int, ...] = ()
    message: str = ""  #: one line saying what went wrong ("" if ok)
    report: str = ""  #: multi-line diagnostics (the stall report)
    worker_pids: tuple[int, ...] = ()
    segments: tuple[str, ...] = ()  #: names of the two queues' segments (removed at the end)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def hung(self) -> bool:
        """True when the watchdog found the run stalled."""
        return self.verdict == "stall"

    def summary(self) -> str:
        """One line: the repetition's figures and verdict."""
        line = (
            f"rep {self.repetition:>3} [{self.wait}] {self.verdict:<14} steps {self.steps:>6}  "
            f"{self.steps_per_s:9.1f} steps/s  items {self.items_completed}/{self.items_total}  "
            f"batches {self.batches_completed}/{self.batches_total}  "
            f"duration {self.duration:7.2f} s  cpu {self.cpu_seconds:6.2f} s  "
            f"(startup {self.startup:.2f} s, max running {self.max_running_seen})"
        )
        if self.message:
            line += f"\n    {self.message}"
        return line


class _RunFailed(Exception):
    """Ends a run early; carries the verdict and the diagnostics."""

    def __init__(self, verdict: str, message: str, party: str | None = None,
                 workers: tuple[int, ...] = (), report: str = "") -> None:  # fmt: skip
        super().__init__(message)
        self.verdict = verdict
        self.message = message
        self.party = party
        self.workers = workers
        self.report = report


# -- what the workers compute ---------------------------------------------------------------

StepRequests = list[tuple[int, int, bytes]]  # (request id, steps done, payload)


def step_digest(step: int, requests: StepRequests) -> int:
    """A 64-bit digest of one step's data: CRC-32 of the step number and every payload, mixed
    with a polynomial hash of the request ids and their progress.  Pure; both sides compute it."""
    crc = zlib.crc32(step.to_bytes(8, "little"))
    ids = 0
    for rid, done, payload in requests:
        crc = zlib.crc32(payload, crc)
        ids = (ids * 1_000_003 + rid * 65_537 + done) & _MASK64
    return (ids ^ (crc << 32) ^ crc) & _MASK64


def reply_digest(base: int, worker: int) -> int:
    """The digest worker ``worker`` must return for a step whose :func:`step_digest` is
    ``base`` (so that a reply from the wrong worker, or for the wrong step, does not pass)."""
    return (base ^ ((worker + 1) * _GOLDEN)) & _MASK64


def _simulate_work(work_us: float, mode: str) -> None:
    if work_us <= 0:
        return
    if mode == "sleep":
        time.sleep(work_us * 1e-6)
        return
    end = time.perf_counter() + work_us * 1e-6
    while time.perf_counter() < end:
        pass


def _answer(index: int, msg: dict[str, Any], work_us: float, work_mode: str) -> dict[str, Any]:
    step, requests = msg["step"], msg["requests"]
    digest = reply_digest(step_digest(step, requests), index)
    _simulate_work(work_us, work_mode)
    if msg.get("corrupt") == index:
        digest ^= 1  # fault injection: a wrong reply
    return {"step": step, "worker": index, "count": len(requests), "digest": digest}


def _worker_main(index: int, steps: Handle, replies: Handle, wait: str | WaitPolicy,
                 work_us: float, work_mode: str, idle_limit: float) -> None:  # fmt: skip
    """Body of worker ``index`` (runs in its own process; started by the engine only).

    Attaches as reader ``index`` of the step queue and writer ``index`` of the reply queue,
    then answers every step until the engine closes the step queue (exit status 0).  Exit
    status 2: the engine died; 3: no step for ``idle_limit`` seconds; 1: any other error,
    after sending the engine an error reply if it can.  Ignores SIGINT: on Ctrl-C the
    engine shuts the workers down.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: BroadcastQueue | None = None
    outbox: GatherQueue | None = None
    status = 0
    try:
        inbox = BroadcastQueue.attach(steps, reader=index, wait=wait)
        outbox = GatherQueue.attach(replies, writer=index, wait=wait)
        last = time.monotonic()
        while True:
            try:
                msg = inbox.get(timeout=WORKER_POLL)
            except QueueTimeout:
                if time.monotonic() - last > idle_limit:
                    print(f"stress worker {index}: no step for {idle_limit:g} s; exiting",
                          file=sys.stderr)  # fmt: skip
                    status = 3
                    break
                continue
            except QueueClosed:
                break
            last = time.monotonic()
            outbox.put(_answer(index, msg, work_us, work_mode), timeout=idle_limit)
    except QueueBroken:
        status = 2  # the engine is gone: nobody to report to
    except QueueClosed:
        status = 0  # the engine closed the reply queue while we were replying: shutting down
    except BaseException as exc:
        status = 1
        text = "".join(traceback.format_exception(exc))
        print(f"stress worker {index} failed:\n{text}", file=sys.stderr)
        if outbox is not None:
            with contextlib.suppress(Exception):
                outbox.put({"step": -1, "worker": index, "error": text}, timeout=1.0)
    finally:
        for queue in (outbox, inbox):
            if queue is not None:
                with contextlib.suppress(Exception):
                    queue.close()
    sys.exit(status)


# -- the scheduler ----------------------------------------------------------------------------


class _Request:
    __slots__ = ("batch", "done", "needed", "rid")

    def __init__(self, rid: int, batch: int, needed: int) -> None:
        self.rid = rid
        self.batch = batch
        self.needed = needed
        self.done = 0


class _Scheduler:
    """Arrivals, admission (FIFO, at most ``max_running``) and completion of requests."""

    def __init__(self, config: StressConfig, rng: random.Random) -> None:
        self.config = config
        size = config.batch_size
        self.batches = [
            [_Request(b * size + k, b, rng.randint(config.min_steps, config.max_steps))
             for k in range(size)]
            for b in range(config.batches)
        ]  # fmt: skip
        self.left_in_batch = [size] * config.batches
        self.arrived = 0
        self.next_arrival = 0
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.items_done = 0
        self.batches_done = 0
        self.max_running_seen = 0

    @property
    def items_total(self) -> int:
        return self.config.batches * self.config.batch_size

    def finished(self) -> bool:
        return self.batches_done == self.config.batches

    def admit(self, step: int) -> None:
        """Let batches arrive for ``step`` and move waiting requests into the running set."""
        c = self.config
        while self.arrived < c.batches:
            idle = not self.running and not self.waiting
            if c.arrival_every:
                due = step >= self.next_arrival
            else:
                due = self.batches_done == self.arrived
            if not (due or idle):
                break
            self.waiting.extend(self.batches[self.arrived])
            self.arrived += 1
            self.next_arrival = step + c.arrival_every
        while self.waiting and len(self.running) < c.max_running:
            self.running.append(self.waiting.popleft())
        self.max_running_seen = max(self.max_running_seen, len(self.running))

    def complete_step(self) -> None:
        """Every running request made one step; retire those that are done."""
        still = []
        for request in self.running:
            request.done += 1
            if request.done < request.needed:
                still.append(request)
                continue
            self.items_done += 1
            self.left_in_batch[request.batch] -= 1
            if self.left_in_batch[request.batch] == 0:
                self.batches_done += 1
        self.running = still


# -- diagnostics --------------------------------------------------------------------------------

_PROC_STATES = {
    "R": "running", "S": "sleeping", "D": "uninterruptible", "T": "stopped", "t": "traced",
    "Z": "zombie", "X": "dead", "I": "idle",
}  # fmt: skip


def describe_process(pid: int) -> str:
    """The kernel's view of ``pid``: its state letter and what it waits in (wchan)."""
    fields = stat_fields(pid)
    if not fields:
        return "no such process"
    letter = fields[0].decode(errors="replace")
    words = f"state {letter} ({_PROC_STATES.get(letter, '?')})"
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
        if wchan and wchan != "0":
            words += f", in {wchan}"
    except OSError:
        pass
    return words


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` so far, or None when it cannot be read."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


def describe_exit(exitcode: int | None) -> str:
    """A process's exit code in words (None: still running)."""
    if exitcode is None:
        return "alive"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@dataclass(frozen=True)
class _Line:
    seq: int
    sleeping: int
    state: str
    pid: int
    msgs: int


def _read_line(a: Any, line: int) -> _Line:
    state = a.load32(line + L.STATE)
    return _Line(
        a.load64(line + L.SEQ), a.load32(line + L.SLEEPING),
        L.STATE_NAMES.get(state, f"?{state}"), a.load64(line + L.PID), a.load64(line + L.MSGS),
    )  # fmt: skip


@contextlib.contextmanager
def _mapped(handle: Handle) -> Iterator[Any]:
    seg = Segment.attach(handle.name, handle.pid, handle.fd)
    try:
        yield seg.atomics
    finally:
        seg.close()


def queue_state(steps: BroadcastQueue, replies: GatherQueue,
                focus: frozenset[int] = frozenset()) -> list[str]:  # fmt: skip
    """The control words of both queues' segments, one line per participant, read through a
    second mapping of each segment with the offsets of :mod:`shmcast._layout`.  Workers in
    ``focus`` are marked.  For diagnostics only (plain snapshots, taken while peers run)."""
    out: list[str] = []
    try:
        with _mapped(steps.handle) as a:
            g = L.Geometry(L.KIND_BROADCAST, steps.n_readers, steps.n_slots, steps.slot_size)
            ring = g.ring()
            w = _read_line(a, ring.writer)
            out.append(
                f"step queue {steps.name} (broadcast, {g.n_slots} slots): write_seq {w.seq}, "
                f"messages {w.msgs}, writer {w.state}, writer_sleeping {w.sleeping}; "
                f"sleepers {a.load32(ring.sleepers)}, data_futex {a.load32(ring.data_futex)}, "
                f"space_futex {a.load32(ring.space_futex)}"
            )
            for i in range(g.n_peers):
                r = _read_line(a, ring.reader_line(i))
                mark = "  <-- stalled" if i in focus else ""
                out.append(
                    f"  reader {i:>3}: read_seq {r.seq} ({w.seq - r.seq} unread), {r.state}, "
                    f"sleeping {r.sleeping}, messages {r.msgs}, pid {r.pid}{mark}"
                )
    except SegmentError as exc:
        out.append(f"step queue: cannot map its segment: {exc}")
    try:
        with _mapped(replies.handle) as a:
            g = L.Geometry(L.KIND_GATHER, replies.n_writers, replies.n_slots, replies.slot_size)
            out.append(
                f"reply queue {replies.name} (gather, {g.n_slots} slots per writer): "
                f"sleepers {a.load32(L.SLEEPERS_OFF)}, data_futex {a.load32(L.DATA_FUTEX_OFF)}"
            )
            for j in range(g.n_peers):
                ring = g.ring(j)
                w = _read_line(a, ring.writer)
                consumed = a.load64(ring.reader_line(0) + L.SEQ)
                mark = "  <-- stalled" if j in focus else ""
                out.append(
                    f"  writer {j:>3}: write_seq {w.seq} (engine read {consumed}), {w.state}, "
                    f"sleeping {w.sleeping}, messages {w.msgs}, pid {w.pid}{mark}"
                )
    except SegmentError as exc:
        out.append(f"reply queue: cannot map its segment: {exc}")
    return out


# -- the engine -------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C while cleaning up (in the main thread); re-raise it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _Engine:
    """One run: start the workers, drive the scheduler, verify, tear down.  Not reusable."""

    def __init__(self, config: StressConfig, repetition: int,
                 progress: Callable[[Progress], None] | None) -> None:  # fmt: skip
        self.config = config
        self.repetition = repetition
        self.progress = progress
        self.wait_name = config.wait_name
        self.sched = _Scheduler(config, random.Random(config.seed))
        self.payload_rng = random.Random(config.seed + 0x5EED)
        self.steps_q: BroadcastQueue | None = None
        self.replies_q: GatherQueue | None = None
        self.procs: list[Any] = []
        self.step = 0
        self.phase = "starting"
        self.loop_start = 0.0
        self.loop_end = 0.0
        self.startup = 0.0
        self.last_done = 0.0
        self.sent_at = 0.0
        self.last_progress = 0.0
        self.pending: set[int] = set()  # workers whose reply to this step has not come
        self.cpu_start: dict[int, float] = {}
        self.cpu_used = 0.0

    # -- lifecycle ------------------------------------------------------------------------------

    def execute(self) -> StressResult:
        c = self.config
        failure: _RunFailed | None = None
        t0 = time.monotonic()
        try:
            self._start()
            self.startup = time.monotonic() - t0
            self._loop()
        except _RunFailed as exc:
            failure = exc
        finally:
            if not self.loop_end:
                self.loop_end = time.monotonic()
            self._measure_cpu()
            if not self.startup:
                self.startup = time.monotonic() - t0
            self._teardown()
        s = self.sched
        duration = self.loop_end - self.loop_start if self.loop_start else 0.0
        return StressResult(
            repetition=self.repetition, wait=self.wait_name, seed=c.seed,
            verdict="ok" if failure is None else failure.verdict, steps=self.step,
            steps_per_s=self.step / duration if duration > 0 else 0.0,
            items_completed=s.items_done, items_total=s.items_total,
            batches_completed=s.batches_done, batches_total=c.batches, duration=duration,
            startup=self.startup, max_running_seen=s.max_running_seen,
            cpu_seconds=self.cpu_used,
            stalled_party=None if failure is None else failure.party,
            stalled_workers=() if failure is None else failure.workers,
            message="" if failure is None else failure.message,
            report="" if failure is None else failure.report,
            worker_pids=tuple(p.pid for p in self.procs if p.pid is not None),
            segments=tuple(q.name for q in (self.steps_q, self.replies_q) if q is not None),
        )  # fmt: skip

    def _start(self) -> None:
        c = self.config
        self.steps_q = BroadcastQueue(n_readers=c.workers, wait=c.wait)
        self.replies_q = GatherQueue(n_writers=c.workers, wait=c.wait)
        ctx = multiprocessing.get_context(c.start_method)
        if c.start_method == "forkserver":
            ctx.set_forkserver_preload(["shmcast._tools.stress"])
        idle_limit = c.startup_timeout + c.watchdog + 10.0
        for i in range(c.workers):
            proc = ctx.Process(
                target=_worker_main, name=f"shmcast-stress-worker-{i}", daemon=True,
                args=(i, self.steps_q.handle, self.replies_q.handle, c.wait, c.work_us,
                      c.work_mode, idle_limit),
            )  # fmt: skip
            self.procs.append(proc)
            proc.start()
        deadline = time.monotonic() + c.startup_timeout
        for queue in (self.steps_q, self.replies_q):
            while True:
                try:
                    queue.wait_until_ready(timeout=POLL)
                    break
                except QueueTimeout as exc:
                    dead = [i for i, p in enumerate(self.procs) if p.exitcode is not None]
                    if dead:
                        i = dead[0]
                        raise _RunFailed(
                            "startup-failed",
                            f"worker {i} (pid {self.procs[i].pid}) "
                            f"{describe_exit(self.procs[i].exitcode)} before attaching",
                            f"worker {i}",
                            (i,),
                        ) from None
                    if time.monotonic() >= deadline:
                        raise _RunFailed(
                            "startup-failed",
                            f"workers not attached after {c.startup_timeout:g} s: {exc}",
                        ) from None

    def _teardown(self) -> None:
        with _sigint_deferred():
            if self.steps_q is not None:
                self.steps_q.close()  # the workers see QueueClosed and exit
            for proc in self.procs:
                if proc.pid is not None and proc.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGCONT)  # a stopped worker must run to exit
            deadline = time.monotonic() + TEARDOWN_JOIN
            for proc in self.procs:
                if proc.pid is not None:
                    proc.join(max(0.0, deadline - time.monotonic()))
            for proc in self.procs:
                if proc.pid is not None and proc.exitcode is None:
                    proc.terminate()
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGCONT)
            for proc in self.procs:
                if proc.pid is not None and proc.exitcode is None:
                    proc.join(KILL_JOIN)
                    if proc.exitcode is None:
                        proc.kill()
                        proc.join(KILL_JOIN)
            if self.replies_q is not None:
                self.replies_q.close()

    # -- the scheduler loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        c, s = self.config, self.sched
        assert self.steps_q is not None
        fault = c.fault_index
        self.cpu_start = self._cpu_now()
        self.loop_start = self.last_done = self.last_progress = time.monotonic()
        while not s.finished():
            s.admit(self.step)
            payload = self.payload_rng.randbytes
            requests = [(r.rid, r.done, payload(c.payload_bytes)) for r in s.running]
            msg: dict[str, Any] = {"step": self.step, "requests": requests}
            if self.step == c.corrupt_reply_at_step:
                msg["corrupt"] = fault
            if self.step == c.kill_worker_at_step:
                os.kill(self.procs[fault].pid, signal.SIGKILL)
            if self.step == c.freeze_worker_at_step:
                os.kill(self.procs[fault].pid, signal.SIGSTOP)
            self.phase = "broadcast"
            self._put(msg)
            self.phase = "gather"
            self.sent_at = time.monotonic()
            self._collect(len(requests), step_digest(self.step, requests))
            s.complete_step()
            self.step += 1
            self.last_done = time.monotonic()
            if self.last_done - self.last_progress >= PROGRESS_EVERY:
                self._report_progress()
        self.loop_end = time.monotonic()
        self._report_progress()

    def _cpu_now(self) -> dict[int, float]:
        now = {0: sum(os.times()[:2])}  # key 0: this process
        for proc in self.procs:
            used = cpu_seconds(proc.pid) if proc.pid is not None else None
            if used is not None:
                now[proc.pid] = used
        return now

    def _measure_cpu(self) -> None:
        """CPU used since the loop started (a process gone since counts nothing after)."""
        if not self.cpu_start:
            return
        end = self._cpu_now()
        self.cpu_used = sum(max(0.0, end.get(k, v) - v) for k, v in self.cpu_start.items())

    def _report_progress(self, pending: set[int] | None = None) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        self.last_progress = now
        s, elapsed = self.sched, now - self.loop_start
        self.progress(Progress(
            repetition=self.repetition, wait=self.wait_name, step=self.step,
            batches_done=s.batches_done, batches_total=self.config.batches,
            items_done=s.items_done, items_total=s.items_total, running=len(s.running),
            waiting=len(s.waiting), elapsed=elapsed,
            steps_per_s=self.step / elapsed if elapsed > 0 else 0.0,
            waiting_for=tuple(sorted(pending or ())), silent_for=now - self.last_done,
        ))  # fmt: skip

    def _slice(self) -> float:
        """The next wait's timeout; raises the stall once the watchdog period is over."""
        left = self.last_done + self.config.watchdog - time.monotonic()
        if left <= 0:
            raise self._stall()
        return min(POLL, left)

    def _put(self, msg: dict[str, Any]) -> None:
        assert self.steps_q is not None
        while True:
            try:
                self.steps_q.put(msg, timeout=self._slice())
                return
            except QueueTimeout:
                self._check_exits(set(range(self.config.workers)))
            except QueueBroken as exc:
                raise self._died(exc) from None

    def _collect(self, count: int, base: int) -> None:
        assert self.replies_q is not None
        pending = set(range(self.config.workers))
        self.pending = pending
        while pending:
            try:
                j, reply = self.replies_q.get_with_sender(timeout=self._slice())
            except QueueTimeout:
                self._check_exits(pending)
                if time.monotonic() - self.last_progress >= PROGRESS_EVERY:
                    self._report_progress(pending)
                continue
            except QueueBroken as exc:
                raise self._died(exc) from None
            except QueueClosed:
                raise _RunFailed(
                    "worker-died", f"every worker closed the reply queue during step {self.step}",
                    "all workers", tuple(sorted(pending)),
                ) from None  # fmt: skip
            self._verify(j, reply, count, base, pending)
            pending.discard(j)

    def _verify(self, j: int, reply: Any, count: int, base: int, pending: set[int]) -> None:
        if isinstance(reply, dict) and "error" in reply:
            raise _RunFailed(
                "worker-error", f"worker {j} failed at step {self.step}", f"worker {j}", (j,),
                str(reply["error"]),
            )  # fmt: skip
        expected = {"step": self.step, "worker": j, "count": count,
                    "digest": reply_digest(base, j)}  # fmt: skip
        if reply != expected:
            raise _RunFailed(
                "wrong-reply",
                f"worker {j} sent a wrong reply to step {self.step}: {reply!r}, expected "
                f"{expected!r}",
                f"worker {j}", (j,),
            )  # fmt: skip
        if j not in pending:
            raise _RunFailed(
                "wrong-reply", f"worker {j} replied twice to step {self.step}", f"worker {j}", (j,)
            )

    # -- failures -------------------------------------------------------------------------------

    def _worker_words(self, i: int) -> str:
        proc = self.procs[i]
        state = describe_exit(proc.exitcode)
        if proc.exitcode is None:
            state += ", " + describe_process(proc.pid)
        return f"worker {i} (pid {proc.pid}): {state}"

    def _check_exits(self, pending: set[int]) -> None:
        """A pending worker whose process has ended fails the run at once."""
        gone = tuple(i for i in sorted(pending) if self.procs[i].exitcode is not None)
        if gone:
            words = "; ".join(self._worker_words(i) for i in gone)
            raise _RunFailed(
                "worker-died",
                f"step {self.step}: {words}",
                ", ".join(f"worker {i}" for i in gone), gone, self._diagnostics(set(gone)),
            )  # fmt: skip

    def _died(self, exc: QueueBroken) -> _RunFailed:
        """The failure for a QueueBroken: name the worker (by the pid the queue reported)."""
        index = next((i for i, p in enumerate(self.procs) if p.pid == exc.pid), None)
        if index is None:
            return _RunFailed("worker-died", f"step {self.step}: {exc}", exc.peer or None)
        self.procs[index].join(KILL_JOIN)  # dead: reap it, for its exit status
        return _RunFailed(
            "worker-died",
            f"step {self.step}: {self._worker_words(index)} (the {self._which(exc)} queue "
            f"reported: {exc})",
            f"worker {index}", (index,), self._diagnostics({index}),
        )  # fmt: skip

    def _which(self, exc: QueueBroken) -> str:
        return "reply" if exc.peer.startswith("writer") else "step"

    def _stall(self) -> _RunFailed:
        c = self.config
        pending = set(self.pending) if self.phase == "gather" else set()
        if self.phase == "broadcast":
            party = "the engine's broadcast (the step queue is full)"
            stalled: tuple[int, ...] = ()
        else:
            stalled = tuple(sorted(pending))
            party = ", ".join(f"worker {i}" for i in stalled) or "none"
        message = (
            f"STALL: no step completed for {time.monotonic() - self.last_done:.1f} s "
            f"(watchdog {c.watchdog:g} s) at step {self.step}; stalled: {party}"
        )
        return _RunFailed("stall", message, party, stalled, self._diagnostics(pending))

    def _diagnostics(self, focus: set[int]) -> str:
        c, s = self.config, self.sched
        now = time.monotonic()
        replied = sorted(set(range(c.workers)) - self.pending) if self.phase == "gather" else []
        lines = [
            f"engine: step {self.step}, phase {self.phase!r}, "
            f"{now - self.last_done:.1f} s since the last step completed, "
            f"{now - self.sent_at:.1f} s since step {self.step} was sent"
            if self.phase == "gather"
            else f"engine: step {self.step}, phase {self.phase!r}",
            f"scheduler: batches {s.batches_done}/{c.batches}, items "
            f"{s.items_done}/{s.items_total}, running {len(s.running)}, waiting {len(s.waiting)}",
        ]
        if self.phase == "gather":
            lines.append(f"replied to step {self.step}: {_ranges(replied) or 'none'}; "
                         f"missing: {_ranges(sorted(self.pending)) or 'none'}")  # fmt: skip
        lines.append("workers:")
        lines += [f"  {self._worker_words(i)}" + ("  <--" if i in focus else "")
                  for i in range(len(self.procs))]  # fmt: skip
        if self.steps_q is not None and self.replies_q is not None:
            lines += queue_state(self.steps_q, self.replies_q, frozenset(focus))
        return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out: list[str] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def run_stress(config: StressConfig | None = None, /, *, repetition: int = 1,
               progress: Callable[[Progress], None] | None = None,
               **options: Any) -> StressResult:  # fmt: skip
    """Run the scenario once, in the calling process (the engine), and return its result.

    ``config`` (default: :class:`StressConfig`'s defaults, the seed report's scenario) with
    any field overridden by ``options``, e.g. ``run_stress(workers=4, batches=3,
    kill_worker_at_step=5)``.  ``progress`` is called from time to time with a
    :class:`Progress`, from this thread.

    Blocks until the run ends: completed, or failed (a stall caught by the watchdog after
    ``watchdog`` seconds without a step, a dead worker, a wrong reply), which is reported in
    the result's verdict, not raised.  Starts ``workers`` processes and two queues; all are
    gone when this returns or raises.  Raises ValueError/TypeError for bad parameters and
    KeyboardInterrupt when interrupted (after cleaning up).  Call it from one thread at a
    time; it must be the main thread for Ctrl-C during cleanup to be held back.
    """
    config = dataclasses.replace(config or StressConfig(), **options)
    config.check()
    return _Engine(config, repetition, progress).execute()


# -- the command line -------------------------------------------------------------------------


class _ProgressLine:
    """Live progress: one updating line on a terminal, a line every ``interval`` s otherwise."""

    def __init__(self, stream: TextIO, repetitions: int, interval: float) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.repetitions = repetitions
        self.interval = 0.2 if self.tty else interval
        self.last = 0.0
        self.shown = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        text = (
            f"rep {p.repetition}/{self.repetitions} [{p.wait}] batches {p.batches_done}/"
            f"{p.batches_total} items {p.items_done}/{p.items_total} running {p.running} "
            f"waiting {p.waiting} step {p.step} {p.steps_per_s:.0f} steps/s {p.elapsed:.1f} s"
        )
        if p.silent_for >= 1.0 and p.waiting_for:
            text += f" | {p.silent_for:.0f} s waiting for workers {_ranges(list(p.waiting_for))}"
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
        self.last = 0.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _microseconds(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``shmcast stress``."""
    d = StressConfig()
    sc = parser.add_argument_group("scenario")
    sc.add_argument(
        "--workers",
        type=_positive_int,
        default=d.workers,
        help="worker processes (default %(default)s)",
    )
    sc.add_argument(
        "--batches",
        type=_positive_int,
        default=d.batches,
        help="batches of requests (default %(default)s)",
    )
    sc.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="concurrent requests per batch (default %(default)s)",
    )
    sc.add_argument(
        "--max-running",
        type=_positive_int,
        default=d.max_running,
        help="most requests running at once (default %(default)s)",
    )
    sc.add_argument(
        "--min-steps",
        type=_positive_int,
        default=d.min_steps,
        help="fewest steps a request needs (default %(default)s)",
    )
    sc.add_argument(
        "--max-steps",
        type=_positive_int,
        default=d.max_steps,
        help="most steps a request needs (default %(default)s)",
    )
    sc.add_argument(
        "--arrival-every",
        type=_non_negative_int,
        default=d.arrival_every,
        metavar="STEPS",
        help="a new batch arrives every STEPS engine steps; 0: when the previous "
        "batch has completed (default %(default)s)",
    )
    sc.add_argument(
        "--work-us",
        type=_microseconds,
        default=d.work_us,
        help="simulated work per worker per step, microseconds (default %(default)s)",
    )
    sc.add_argument(
        "--work-mode",
        choices=WORK_MODES,
        default=d.work_mode,
        help="simulate work with a busy loop or a sleep (default %(default)s)",
    )
    sc.add_argument(
        "--payload-bytes",
        type=_non_negative_int,
        default=d.payload_bytes,
        help="payload bytes per running request per step (default %(default)s)",
    )
    sc.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="RNG seed; repetition k uses SEED+k-1 (default %(default)s)",
    )
    ru = parser.add_argument_group("run")
    ru.add_argument(
        "--wait",
        choices=sorted(POLICIES),
        default="futex",
        help="wait policy of every queue endpoint (default %(default)s)",
    )
    ru.add_argument(
        "--idle-busy-period",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="with --wait idle: spin for this long after activity before sleeping "
        f"(default {IdleWait.busy_period:g})",
    )
    ru.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        metavar="K",
        help="run the scenario K times, each with fresh workers and queues",
    )
    ru.add_argument(
        "--stop-on-failure",
        action="store_true",
        help="stop at the first repetition that fails (default: run all K)",
    )
    ru.add_argument(
        "--watchdog",
        type=_seconds,
        default=d.watchdog,
        metavar="SECONDS",
        help="report a stall when no step completes for this long (default %(default)s)",
    )
    ru.add_argument(
        "--startup-timeout",
        type=_seconds,
        default=d.startup_timeout,
        metavar="SECONDS",
        help="time for the workers to attach (default %(default)s)",
    )
    ru.add_argument(
        "--start-method",
        choices=START_METHODS,
        default=DEFAULT_START_METHOD,
        help="how workers are started (default %(default)s; see above)",
    )
    ru.add_argument(
        "--progress-interval",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default %(default)s)",
    )
    fa = parser.add_argument_group("fault injection (the run must then fail promptly)")
    fa.add_argument(
        "--kill-worker-at-step",
        type=_non_negative_int,
        default=None,
        metavar="K",
        help="SIGKILL a worker just before step K",
    )
    fa.add_argument(
        "--freeze-worker-at-step",
        type=_non_negative_int,
        default=None,
        metavar="K",
        help="SIGSTOP a worker just before step K (the watchdog fires)",
    )
    fa.add_argument(
        "--corrupt-reply-at-step",
        type=_non_negative_int,
        default=None,
        metavar="K",
        help="have a worker send a wrong reply to step K",
    )
    fa.add_argument("--fault-worker", type=int, default=-1, metavar="I",
                    help="the worker the faults hit (default: the last)")  # fmt: skip


def _config_from_args(args: argparse.Namespace) -> StressConfig:
    from .cli import UsageError

    wait: str | WaitPolicy = args.wait
    if args.idle_busy_period is not None:
        if args.wait != "idle":
            raise UsageError("--idle-busy-period applies to --wait idle only")
        wait = IdleWait(busy_period=args.idle_busy_period)
    config = StressConfig(
        workers=args.workers, batches=args.batches, batch_size=args.batch_size,
        max_running=args.max_running, min_steps=args.min_steps, max_steps=args.max_steps,
        arrival_every=args.arrival_every, work_us=args.work_us, work_mode=args.work_mode,
        payload_bytes=args.payload_bytes, seed=args.seed, watchdog=args.watchdog, wait=wait,
        start_method=args.start_method, startup_timeout=args.startup_timeout,
        kill_worker_at_step=args.kill_worker_at_step,
        freeze_worker_at_step=args.freeze_worker_at_step,
        corrupt_reply_at_step=args.corrupt_reply_at_step, fault_worker=args.fault_worker,
    )  # fmt: skip
    try:
        config.check()
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return config


def _summary(results: list[StressResult], repetitions: int, wall: float) -> str:
    ok = sum(r.ok for r in results)
    hangs = sum(r.hung for r in results)
    rates = [r.steps_per_s for r in results if r.ok]
    rate = (
        f"steps/s mean {sum(rates) / len(rates):.1f} (min {min(rates):.1f}, max {max(rates):.1f})"
        if rates
        else "steps/s -"
    )
    items_total = repetitions * results[0].items_total if results else 0
    return (
        f"summary: {ok}/{repetitions} repetitions ok, hangs {hangs}, other failures "
        f"{len(results) - ok - hangs}, not run {repetitions - len(results)}; "
        f"steps {sum(r.steps for r in results)}; {rate}; items "
        f"{sum(r.items_completed for r in results)}/{items_total}; wall {wall:.1f} s"
    )


def run(args: argparse.Namespace) -> int:
    """``shmcast stress``: run the scenario ``--repeat`` times, print each result and a
    summary; 0 only if every repetition verified every reply without a stall."""
    config = _config_from_args(args)
    out = sys.stdout
    line = _ProgressLine(sys.stderr, args.repeat, args.progress_interval)
    print(f"shmcast stress: {config.describe()}; {args.repeat} repetition(s)", file=out,
          flush=True)  # fmt: skip
    results: list[StressResult] = []
    previous_term = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        previous_term = signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    status = 0
    try:
        for k in range(1, args.repeat + 1):
            result = run_stress(config, seed=config.seed + k - 1, repetition=k, progress=line)
            line.clear()
            results.append(result)
            print(result.summary(), file=out, flush=True)
            if result.report:
                print("\n".join("    " + s for s in result.report.splitlines()), file=out)
            if not result.ok and args.stop_on_failure:
                break
    except KeyboardInterrupt:
        line.clear()
        print(f"interrupted during repetition {len(results) + 1}; workers stopped, queues "
              "removed", file=out)  # fmt: skip
        status = 130
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    print(_summary(results, args.repeat, time.monotonic() - started), file=out, flush=True)
    if status:
        return status
    return 0 if len(results) == args.repeat and all(r.ok for r in results) else 1


__all__ = [
    "VERDICTS",
    "Progress",
    "StressConfig",
    "StressResult",
    "add_arguments",
    "queue_state",
    "reply_digest",
    "run",
    "run_stress",
    "step_digest",
]
