"""Kill -9 a reader or the writer at random points, many times, and check what survives.

Each scenario repeats one kind of fault with a seeded random generator: random message sizes
(one slot, several, up to the capacity, and streamed messages larger than the ring), random
put/get calls (``put``, ``put_bytes``, ``reserve``; ``get``, ``view``), a random wait policy,
and a victim that announces "I am about to do X" through a pipe just before the operation,
then is SIGKILLed after a random short delay by a thread of the test (``_faults.DelayedKill``).

What must hold after every fault:

- nothing hangs: every put, get and join has a timeout;
- a killed **writer**: every surviving reader receives, in order and intact (sequence number,
  length and CRC checked), every message whose put completed before the kill (the writer
  counts them in shared memory after each put), at most one more (the one in flight), and
  then QueueBroken naming the writer and its pid.  Its segment has no name in /dev/shm, and
  once the readers have gone too, no process maps it or holds it: the kernel has freed it;
- a killed **reader**: with ``on_dead_reader="raise"`` the writer's put raises QueueBroken
  naming that reader and its pid; with ``"drop"`` the writer goes on.  Either way every other
  reader receives exactly every message whose put completed, intact and in order, then
  QueueClosed when the writer closes, and nothing of the segment is left once all have ended.

The many-iteration loops use the fork start method; one writer and one reader scenario run
under spawn.  ``-s`` shows how long each scenario took.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
import time
from dataclasses import dataclass

import pytest
from _faults import (
    OP_TIMEOUT,
    DelayedKill,
    ReadReport,
    make_message,
    policy_named,
    random_size,
    read_until_end,
    reader_survivor,
    reader_victim,
    segment_left,
    send_message,
    writer_victim,
)
from _procs import process_group

from shmcast import BroadcastQueue, QueueBroken

N_SLOTS = 8
SLOT_SIZE = 256
SLICE = 0.02  # the policies' liveness slice: a dead peer is noticed within a few of these
POLICIES = ("futex", "futex", "futex", "backoff", "spin", "idle")
N_READERS = 3  # reader-kill scenarios: the victim and two survivors
MAX_ANNOUNCE_AT = 150  # the victim announces before one of its first messages
AFTER_KILL = 4 * N_SLOTS  # messages the writer puts after a reader's death (> one ring)

WRITER_MODES = {"put": 40, "blocked_put": 40, "reserve": 40, "blocked_get": 40}
READER_MODES = {"get": 40, "view": 40, "blocked_get": 40, "stall": 40}


@dataclass(frozen=True)
class Trial:
    """The random choices of one fault, printed when it fails."""

    method: str
    mode: str
    seed: int
    policy: str
    announce_at: int
    delay: float

    @classmethod
    def draw(cls, rng: random.Random, method: str, mode: str, delays: tuple[float, float]):
        return cls(
            method, mode, rng.getrandbits(32), rng.choice(POLICIES),
            rng.randrange(MAX_ANNOUNCE_AT), rng.uniform(*delays),
        )  # fmt: skip

    def __str__(self) -> str:
        return (
            f"[{self.method}, kill {self.mode}, seed {self.seed}, policy {self.policy}, "
            f"announce before message {self.announce_at}, delay {self.delay * 1e3:.1f} ms]"
        )


# -- a killed writer --------------------------------------------------------------------------

WRITER_DELAYS = {
    "put": (0.0, 0.015),  # the writer goes on putting: the kill lands in a put (or between)
    "blocked_put": (0.01, 0.06),  # one reader stalls: the writer is asleep in put by then
    "reserve": (0.0, 0.02),  # the writer stays inside its reserve block
    "blocked_get": (0.0, 0.05),  # the writer idles: its readers are asleep in get
}


def check_survivor_of_writer(report: ReadReport, trial: Trial, writer_pid: int, completed: int):
    assert report.errors == [], f"{trial} {report.describe()}"
    assert report.end == "QueueBroken", f"{trial} {report.describe()}"
    assert (report.peer, report.pid) == ("writer", writer_pid), f"{trial} {report.describe()}"
    if trial.mode in ("reserve", "blocked_get"):
        # Killed inside a reserve block, or idle: no message was in flight.
        assert report.count == completed, f"{trial} {completed} puts completed; {report.describe()}"
    else:
        assert completed <= report.count <= completed + 1, (
            f"{trial} {completed} puts completed; {report.describe()}"
        )


def kill_writer_once(trial: Trial) -> int:
    """One fault: the writer (a child) is killed; reader 0 (this process) and reader 1 (a
    child) must get everything published, then QueueBroken.  Returns how many messages beyond
    the completed puts the readers got (1: the put in flight had published its message)."""
    wait = policy_named(trial.policy, SLICE)
    with process_group(trial.method, timeout=3 * OP_TIMEOUT) as group:
        context = group.context
        progress = context.RawValue("q", 0)
        handle_in, handle_out = context.Pipe(duplex=False)
        where_in, where_out = context.Pipe(duplex=False)
        writer = group.start(
            writer_victim, handle_out, where_out, progress, 2, N_SLOTS, SLOT_SIZE, wait,
            trial.seed, trial.mode, trial.announce_at, label="writer",
        )  # fmt: skip
        handle_out.close()
        where_out.close()
        assert handle_in.poll(OP_TIMEOUT), f"{trial} the writer sent no handle"
        handle = handle_in.recv()
        handle_in.close()
        survivor = group.start(reader_survivor, handle, 1, wait, trial.seed + 1)
        killer = DelayedKill(writer.pid, where_in, trial.delay).start()
        stall_at = trial.announce_at if trial.mode == "blocked_put" else None
        with BroadcastQueue.attach(handle, 0, wait=wait) as queue:
            mine = read_until_end(queue, 0, trial.seed, stall_at=stall_at, stall=killer.wait)
        theirs = group.result(survivor)
        killer.join()
        exit_code = group.join(writer)
        completed = progress.value
    assert killer.announced == trial.mode, f"{trial} the writer announced {killer.announced!r}"
    assert exit_code == -signal.SIGKILL, f"{trial} the writer exited with {exit_code}"
    left = segment_left(handle.name)
    assert left is None, f"{trial} the killed writer's segment {handle.name}: {left}"
    check_survivor_of_writer(mine, trial, writer.pid, completed)
    check_survivor_of_writer(theirs, trial, writer.pid, completed)
    assert mine.count == theirs.count, f"{trial} {mine.describe()}; {theirs.describe()}"
    return mine.count - completed


@pytest.mark.parametrize("mode", sorted(WRITER_MODES))
def test_writer_killed(mode: str) -> None:
    rng = random.Random(f"writer killed {mode}")
    started = time.monotonic()
    in_flight = sum(
        kill_writer_once(Trial.draw(rng, "fork", mode, WRITER_DELAYS[mode]))
        for _ in range(WRITER_MODES[mode])
    )
    elapsed = time.monotonic() - started
    print(
        f"\nwriter killed ({mode}): {WRITER_MODES[mode]} faults in {elapsed:.1f} s; the put in "
        f"flight had published its message in {in_flight} of them"
    )


def test_writer_killed_under_spawn() -> None:
    rng = random.Random("writer killed under spawn")
    for mode in sorted(WRITER_MODES):
        for _ in range(2):
            kill_writer_once(Trial.draw(rng, "spawn", mode, WRITER_DELAYS[mode]))


# -- a killed reader --------------------------------------------------------------------------

READER_DELAYS = {
    "get": (0.0, 0.01),  # the reader goes on reading: the kill lands in a get (or between)
    "view": (0.0, 0.03),  # the reader stays inside its view block
    "blocked_get": (0.0, 0.05),  # the writer holds back: the reader is asleep in get
    "stall": (0.0, 0.06),  # the reader stops reading: the writer is asleep in put
}


class _Sent:
    """Puts completed by the writer so far, and how many had completed at the kill."""

    def __init__(self) -> None:
        self.count = 0
        self.at_kill: int | None = None

    def mark_kill(self) -> None:
        self.at_kill = self.count


def kill_reader_once(trial: Trial, on_dead_reader: str, caplog: pytest.LogCaptureFixture):
    """One fault: reader ``victim`` (a child) is killed while this process writes; the other
    readers (children) must get every completed put; the writer raises or drops."""
    wait = policy_named(trial.policy, SLICE)
    victim_index = trial.seed % N_READERS
    writer_rng = random.Random(trial.seed)
    sent = _Sent()
    broken: QueueBroken | None = None
    caplog.clear()
    with (
        BroadcastQueue(
            N_READERS, n_slots=N_SLOTS, slot_size=SLOT_SIZE, wait=wait,
            on_dead_reader=on_dead_reader,
        ) as queue,
        process_group(trial.method, timeout=3 * OP_TIMEOUT) as group,
    ):  # fmt: skip
        where_in, where_out = group.context.Pipe(duplex=False)
        victim = group.start(
            reader_victim, queue.handle, victim_index, wait, where_out, trial.mode,
            trial.announce_at, label="victim",
        )  # fmt: skip
        where_out.close()
        survivors = [
            group.start(reader_survivor, queue.handle, i, wait, trial.seed + i, label=f"r{i}")
            for i in range(N_READERS)
            if i != victim_index
        ]
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        killer = DelayedKill(victim.pid, where_in, trial.delay, on_kill=sent.mark_kill).start()
        give_up = time.monotonic() + 2 * OP_TIMEOUT
        while sent.at_kill is None or sent.count < sent.at_kill + AFTER_KILL:
            assert time.monotonic() < give_up, f"{trial} the writer made no progress"
            if trial.mode == "blocked_get" and sent.count == trial.announce_at:
                killer.wait()  # keep the queue empty until the victim, asleep in get, is dead
            size = random_size(writer_rng, SLOT_SIZE, queue.capacity)
            message = make_message(0, sent.count, size, writer_rng)
            try:
                send_message(queue, message, writer_rng, OP_TIMEOUT)
            except QueueBroken as exc:
                broken = exc
                break
            sent.count += 1
        queue.close()
        reports = [group.result(child) for child in survivors]
        killer.join()
        exit_code = group.join(victim)
    assert killer.announced == trial.mode, f"{trial} the reader announced {killer.announced!r}"
    assert exit_code == -signal.SIGKILL, f"{trial} the victim exited with {exit_code}"
    left = segment_left(queue.name)
    assert left is None, f"{trial} segment {queue.name}: {left}"
    if on_dead_reader == "raise":
        assert broken is not None, (
            f"{trial} the writer put {AFTER_KILL} messages after reader {victim_index} died "
            "and never raised QueueBroken"
        )
        assert (broken.peer, broken.pid) == (f"reader {victim_index}", victim.pid), (
            f"{trial} {broken!r} peer={broken.peer!r} pid={broken.pid}"
        )
        assert f"reader {victim_index}" in str(broken), f"{trial} {broken}"
    else:
        assert broken is None, f"{trial} drop policy, yet {broken!r}"
        dropped = [r for r in caplog.records if str(victim.pid) in r.getMessage()]
        assert dropped, f"{trial} no warning about dropping reader {victim_index} ({victim.pid})"
    for report in reports:
        assert report.errors == [], f"{trial} {report.describe()}"
        assert report.end == "QueueClosed", f"{trial} {report.describe()}"
        assert report.count == sent.count, (
            f"{trial} the writer completed {sent.count} puts; {report.describe()}"
        )


@pytest.mark.parametrize("on_dead_reader", ["raise", "drop"])
@pytest.mark.parametrize("mode", sorted(READER_MODES))
def test_reader_killed(mode: str, on_dead_reader: str, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="shmcast")
    rng = random.Random(f"reader killed {mode} {on_dead_reader}")
    started = time.monotonic()
    for _ in range(READER_MODES[mode]):
        kill_reader_once(Trial.draw(rng, "fork", mode, READER_DELAYS[mode]), on_dead_reader, caplog)
    elapsed = time.monotonic() - started
    count = READER_MODES[mode]
    print(f"\nreader killed ({mode}, {on_dead_reader}): {count} faults in {elapsed:.1f} s")


def test_reader_killed_under_spawn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shmcast")
    rng = random.Random("reader killed under spawn")
    for mode, on_dead_reader in itertools.product(sorted(READER_MODES), ("raise", "drop")):
        kill_reader_once(
            Trial.draw(rng, "spawn", mode, READER_DELAYS[mode]), on_dead_reader, caplog
        )
