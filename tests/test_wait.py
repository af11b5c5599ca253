"""Wait policies (shmcast._wait), against a scripted waiter and against real futexes."""

from __future__ import annotations

import mmap
import os
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from _waiters import ScriptedWaiter

from shmcast import (
    BackoffWait,
    BroadcastQueue,
    FutexWait,
    IdleWait,
    SpinWait,
    WaitPolicy,
    _native,
    _wait,
)
from shmcast._wait import POLICIES, resolve_policy

ALL_POLICIES = [FutexWait, SpinWait, BackoffWait, IdleWait]


class FutexWaiter(ScriptedWaiter):
    """A Waiter that sleeps on a real futex word (nobody ever wakes it)."""

    def __init__(self, atomics: _native.Atomics) -> None:
        super().__init__()
        self.atomics = atomics

    def sleep(self, timeout: float) -> bool:
        self.sleeps.append(timeout)
        self.atomics.wait32(0, 0, timeout)
        return False


class FakeLoad:
    """What the policies' look at the run queues finds (``runnable_tasks``), set by a test."""

    def __init__(self) -> None:
        self.running = 1  # this process alone: every other CPU is free

    def __call__(self) -> int:
        return self.running


@pytest.fixture(autouse=True)
def load(monkeypatch: pytest.MonkeyPatch) -> FakeLoad:
    """The machine's load as the wait policies see it: free unless a test says otherwise (the
    real one depends on whatever else runs)."""
    fake = FakeLoad()
    monkeypatch.setattr(_wait, "runnable_tasks", fake)
    monkeypatch.setattr(_wait, "LOAD", _wait.CpuLoad())
    return fake


@pytest.fixture
def sleep_calls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the policies' calls of time.sleep (they still sleep)."""
    calls: list[float] = []

    def recording_sleep(seconds: float) -> None:
        calls.append(seconds)
        time.sleep(seconds)

    clock = types.SimpleNamespace(
        monotonic=time.monotonic, perf_counter=time.perf_counter, sleep=recording_sleep
    )
    monkeypatch.setattr(_wait, "time", clock)
    return calls


@pytest.fixture
def futex_word() -> Iterator[_native.Atomics]:
    mapping = mmap.mmap(-1, 4096)
    atomics = _native.Atomics(mapping)
    yield atomics
    atomics.release()
    mapping.close()


# -- resolution -------------------------------------------------------------------------------


def test_default_policy_is_futex() -> None:
    policy = resolve_policy(None)
    assert type(policy) is FutexWait
    assert policy == FutexWait()


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_policies_resolve_by_name(cls: type[WaitPolicy]) -> None:
    policy = resolve_policy(cls.name)
    assert type(policy) is cls
    assert POLICIES[cls.name] is cls


def test_policy_names() -> None:
    assert sorted(POLICIES) == ["backoff", "futex", "idle", "spin"]
    assert [FutexWait.name, SpinWait.name, BackoffWait.name, IdleWait.name] == [
        "futex",
        "spin",
        "backoff",
        "idle",
    ]
    assert not FutexWait.tracks_activity and not SpinWait.tracks_activity
    assert BackoffWait.tracks_activity and IdleWait.tracks_activity


@pytest.mark.parametrize(
    "policy",
    [
        FutexWait(spin_us=5.0, slice=0.05),
        SpinWait(slice=0.2),
        BackoffWait(spins=10, sleep=0.002),
        IdleWait(busy_period=0.5, sleep=0.01, warn_after=None),
    ],
    ids=lambda p: p.name,
)
def test_instances_are_copied_per_endpoint(policy: WaitPolicy) -> None:
    fresh = resolve_policy(policy)
    assert fresh is not policy
    assert type(fresh) is type(policy)
    assert fresh == policy  # same parameters


def test_copied_policies_do_not_share_state() -> None:
    template = IdleWait(busy_period=1.0)
    template._last = 0.0  # long idle
    fresh = resolve_policy(template)
    assert fresh._last > 0.0  # a fresh endpoint starts busy
    backoff = BackoffWait()
    backoff._count = 500
    assert resolve_policy(backoff)._count == 0


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match=r"unknown wait policy 'nope'; choose one of "
                       r"backoff, futex, idle, spin"):  # fmt: skip
        resolve_policy("nope")


@pytest.mark.parametrize("bad", [3, FutexWait, object(), b"futex"])
def test_policy_of_wrong_type(bad: object) -> None:
    with pytest.raises(TypeError, match="wait must be a policy name or a WaitPolicy"):
        resolve_policy(bad)


def test_queue_reports_its_policy() -> None:
    with BroadcastQueue(1, n_slots=4, slot_size=64, wait="spin") as q:
        assert q.stats().wait_policy == "spin"
        assert "wait='spin'" in repr(q)
        r = BroadcastQueue.attach(q.handle, 0, wait=IdleWait(busy_period=0.1))
        with r:
            assert r.stats().wait_policy == "idle"
    with pytest.raises(ValueError, match="unknown wait policy"):
        BroadcastQueue(1, wait="fast")


# -- every policy: ready, deadlines, ticks ----------------------------------------------------


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_returns_at_once_when_ready(cls: type[WaitPolicy]) -> None:
    waiter = ScriptedWaiter(ready_on=1)
    assert cls().wait(waiter, time.monotonic() + 10) is True
    assert waiter.sleeps == [] and waiter.ticks == 0


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_past_deadline_returns_false_at_once(cls: type[WaitPolicy]) -> None:
    waiter = ScriptedWaiter()
    started = time.monotonic()
    assert cls().wait(waiter, started - 1.0) is False
    assert time.monotonic() - started < 1.0
    assert waiter.sleeps == []


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_honours_the_deadline(cls: type[WaitPolicy]) -> None:
    waiter = ScriptedWaiter()
    started = time.monotonic()
    assert cls(slice=0.05).wait(waiter, started + 0.3) is False
    elapsed = time.monotonic() - started
    assert elapsed >= 0.3
    assert elapsed < 5.0  # it did not wait on past its deadline


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_returns_when_the_condition_becomes_true(cls: type[WaitPolicy]) -> None:
    waiter = ScriptedWaiter()
    timer = threading.Timer(0.1, waiter.event.set)
    timer.start()
    try:
        started = time.monotonic()
        assert cls(slice=0.05).wait(waiter, None) is True
        assert time.monotonic() - started < 10.0
    finally:
        timer.cancel()
        timer.join(5)


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_ticks_at_least_once_per_slice(cls: type[WaitPolicy]) -> None:
    waiter = ScriptedWaiter()
    started = time.monotonic()
    cls(slice=0.02).wait(waiter, started + 0.4)
    elapsed = time.monotonic() - started
    # Ideally elapsed / slice ticks; at least a good fraction even on a loaded machine.
    assert waiter.ticks >= 5, (waiter.ticks, elapsed)


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_tick_errors_propagate(cls: type[WaitPolicy]) -> None:
    class PeerDied(Exception):
        pass

    waiter = ScriptedWaiter(tick_error=PeerDied("gone"))
    started = time.monotonic()
    with pytest.raises(PeerDied):
        cls(slice=0.02).wait(waiter, None)  # no deadline: only the tick ends it
    assert time.monotonic() - started < 10.0


# -- FutexWait --------------------------------------------------------------------------------


def test_futex_wait_sleeps_no_longer_than_a_slice(sleep_calls: list[float]) -> None:
    waiter = ScriptedWaiter()
    FutexWait(spin_us=0, slice=0.05).wait(waiter, time.monotonic() + 0.3)
    assert waiter.sleeps and max(waiter.sleeps) <= 0.05
    assert sleep_calls == []  # it sleeps on the futex only


def test_futex_wait_returns_when_the_sleep_recheck_finds_it_ready() -> None:
    waiter = ScriptedWaiter(ready_on=2)  # false at first (spin disabled), true in sleep
    assert FutexWait(spin_us=0).wait(waiter, time.monotonic() + 10) is True
    assert len(waiter.sleeps) == 1


def test_futex_wait_spins_before_sleeping() -> None:
    waiter = ScriptedWaiter(ready_on=50)  # becomes true while spinning
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert waiter.sleeps == []
    assert waiter.spins == waiter.spins_ended == 1


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Record the policies' calls of os.sched_yield (they still yield)."""
    calls: list[None] = []
    real = os.sched_yield

    def recording_yield() -> None:
        calls.append(None)
        real()

    monkeypatch.setattr(_wait.os, "sched_yield", recording_yield)
    return calls


def test_futex_wait_eager_spin_yields_every_16_looks(yields: list[None]) -> None:
    waiter = ScriptedWaiter(ready_on=100)
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert waiter.sleeps == [] and waiter.spins == waiter.spins_ended == 1
    assert len(yields) == (waiter.ready_calls - 2) // 16  # one look before the spin


def test_futex_wait_spins_politely_when_no_spinning_place_is_free(yields: list[None]) -> None:
    waiter = ScriptedWaiter(ready_on=40)
    waiter.may_spin = False
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert waiter.sleeps == []  # caught while spinning
    assert waiter.spins == 1 and waiter.spins_ended == 0  # refused: nothing to give back
    assert len(yields) == waiter.ready_calls - 2  # a yield after every look that found nothing


def test_futex_wait_polite_spin_ends_with_the_budget_and_sleeps() -> None:
    waiter = ScriptedWaiter()
    waiter.may_spin = False
    policy = FutexWait(spin_us=2000, min_spin_us=2000, slice=0.02)
    start = time.monotonic()
    assert policy.wait(waiter, start + 0.1) is False
    assert waiter.sleeps, "a polite spin is bounded by the same budget"


def test_futex_wait_not_polite_sleeps_at_once_when_no_spinning_place_is_free(
    yields: list[None],
) -> None:
    waiter = ScriptedWaiter(ready_on=3)
    waiter.may_spin = False
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000, polite=False)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert len(waiter.sleeps) == 1  # went to sleep instead of spinning
    assert waiter.spins == 1 and waiter.spins_ended == 0
    assert yields == []


def _ready_after(waiter: ScriptedWaiter, seconds: float) -> threading.Timer:
    waiter.event.clear()
    timer = threading.Timer(seconds, waiter.event.set)
    timer.start()
    return timer


@pytest.mark.timeout(30)
def test_futex_wait_spin_adapts_to_how_long_waits_last() -> None:
    policy = FutexWait(spin_us=400_000, min_spin_us=20, slice=0.05)
    waiter = ScriptedWaiter()
    # A first wait of ~60 ms: the short first spin fails, it sleeps and is woken.
    timer = _ready_after(waiter, 0.06)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    timer.join()
    assert waiter.sleeps, "the first wait should have slept"
    # The next wait of ~30 ms fits in twice the last wait: caught while spinning.
    waiter.sleeps.clear()
    timer = _ready_after(waiter, 0.03)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    timer.join()
    assert waiter.sleeps == []
    # A wait longer than the cap (0.4 s) leaves only the short spin for the next one.
    timer = _ready_after(waiter, 0.5)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    timer.join()
    waiter.sleeps.clear()
    timer = _ready_after(waiter, 0.06)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    timer.join()
    assert waiter.sleeps, "after a long wait the spin should be short again"


def test_futex_wait_burns_no_cpu(futex_word: _native.Atomics) -> None:
    waiter = FutexWaiter(futex_word)
    cpu = time.process_time()
    wall = time.monotonic()
    assert FutexWait().wait(waiter, wall + 0.5) is False
    cpu = time.process_time() - cpu
    assert time.monotonic() - wall >= 0.5
    assert cpu < 0.05, f"FutexWait used {cpu:.3f} s of CPU in a 0.5 s wait"


def test_idle_reader_on_the_futex_policy_burns_no_cpu() -> None:
    with (
        BroadcastQueue(1, n_slots=4, slot_size=64) as q,
        BroadcastQueue.attach(q.handle, 0) as r,
    ):
        cpu = time.process_time()
        with pytest.raises(TimeoutError):
            r.get(timeout=0.5)
        cpu = time.process_time() - cpu
    assert cpu < 0.05, f"an idle get() used {cpu:.3f} s of CPU in 0.5 s"


# -- the polling policies ---------------------------------------------------------------------


def test_spin_wait_never_sleeps(sleep_calls: list[float]) -> None:
    waiter = ScriptedWaiter(ready_on=200)
    assert SpinWait().wait(waiter, time.monotonic() + 30) is True
    assert sleep_calls == [] and waiter.sleeps == []


def test_backoff_sleeps_every_spins_looks_and_activity_resets(sleep_calls: list[float]) -> None:
    policy = BackoffWait(spins=4, sleep=0.01)
    # Ready on the 11th look: 10 pauses, of which the 4th and the 8th sleep.
    assert policy.wait(ScriptedWaiter(ready_on=11), time.monotonic() + 30) is True
    assert sleep_calls == [0.01, 0.01]
    # Two pauses are pending towards the next sleep; activity() forgets them, so three more
    # pauses do not reach four.
    policy.activity()
    sleep_calls.clear()
    assert policy.wait(ScriptedWaiter(ready_on=4), time.monotonic() + 30) is True
    assert sleep_calls == []
    # Without activity the count goes on: 2 more pauses make 5 since the reset, 1 sleep.
    assert policy.wait(ScriptedWaiter(ready_on=3), time.monotonic() + 30) is True
    assert sleep_calls == [0.01]


def test_backoff_sleep_is_cut_to_the_deadline(sleep_calls: list[float]) -> None:
    policy = BackoffWait(spins=1, sleep=10.0)
    started = time.monotonic()
    assert policy.wait(ScriptedWaiter(), started + 0.2) is False
    assert time.monotonic() - started < 5.0
    assert sleep_calls and max(sleep_calls) <= 0.2


def test_idle_spins_while_busy_and_sleeps_when_idle(sleep_calls: list[float]) -> None:
    policy = resolve_policy(IdleWait(busy_period=0.2, sleep=0.01))
    assert policy.wait(ScriptedWaiter(ready_on=6), time.monotonic() + 30) is True
    assert sleep_calls == []  # fresh: busy, so it spins
    time.sleep(0.25)  # no activity for longer than busy_period: idle
    assert policy.wait(ScriptedWaiter(ready_on=4), time.monotonic() + 30) is True
    assert sleep_calls == [0.01, 0.01, 0.01]
    sleep_calls.clear()
    policy.activity()  # busy again
    assert policy.wait(ScriptedWaiter(ready_on=4), time.monotonic() + 30) is True
    assert sleep_calls == []


# -- FutexWait under load (CpuLoad) ------------------------------------------------------------

CROWDED = 1000  # runnable tasks: more than any test machine has CPUs


def test_futex_wait_sleeps_in_quanta_instead_of_spinning_while_crowded(load: FakeLoad) -> None:
    load.running = CROWDED
    waiter = ScriptedWaiter(ready_on=6)  # one look before the wait, then one per quantum
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000, quantum_us=300)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert waiter.spins == 0, "nobody spins while every core is taken"
    assert waiter.sleeps and all(t == pytest.approx(300e-6) for t in waiter.sleeps)


def test_without_a_quantum_a_crowded_wait_sleeps_until_woken(load: FakeLoad) -> None:
    load.running = CROWDED
    waiter = ScriptedWaiter()
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000, quantum_us=None, slice=5.0)
    wake = threading.Timer(0.05, waiter.event.set)
    wake.start()
    try:
        assert policy.wait(waiter, time.monotonic() + 10) is True
    finally:
        wake.cancel()
    assert waiter.spins == 0, "nobody spins while every core is taken"
    assert waiter.sleeps == [5.0], "one sleep, ended by the wake-up, not by a quantum"


def wait_while_the_load_changes(
    load: FakeLoad, running: int, change_at: float, ready_at: float, **policy_options: Any
) -> ScriptedWaiter:
    """A FutexWait with a long budget (and ``policy_options``; a quantum of 1 ms unless they
    say otherwise), while the load turns to ``running`` tasks after ``change_at`` s and the
    condition comes after ``ready_at`` s; the waiter, after the wait."""
    waiter = ScriptedWaiter()
    options = {"quantum_us": 1000, **policy_options}
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000, **options)
    change = threading.Timer(change_at, lambda: setattr(load, "running", running))
    ready = threading.Timer(ready_at, waiter.event.set)
    change.start()
    ready.start()
    try:
        assert policy.wait(waiter, time.monotonic() + 10) is True
    finally:
        change.cancel()
        ready.cancel()
    return waiter


def test_futex_wait_spins_again_once_a_core_is_free(load: FakeLoad) -> None:
    load.running = CROWDED
    waiter = wait_while_the_load_changes(load, 1, 0.02, 0.05)
    assert len(waiter.sleeps) >= 5, "slept in quanta while crowded"
    assert waiter.spins == 1 and waiter.spins_ended == 1, "then spun, and gave the place back"
    assert waiter.spinning_now == 0


def test_futex_wait_spin_stops_when_the_cores_fill_up(load: FakeLoad) -> None:
    waiter = wait_while_the_load_changes(load, CROWDED, 0.02, 0.1)
    assert waiter.spins >= 1 and waiter.spins == waiter.spins_ended
    assert len(waiter.sleeps) >= 10, "left the spin for quanta of sleep"
    assert waiter.spinning_now == 0


def test_without_a_quantum_a_spin_that_finds_the_cores_taken_sleeps_until_woken(
    load: FakeLoad,
) -> None:
    waiter = wait_while_the_load_changes(load, CROWDED, 0.02, 0.1, quantum_us=None, slice=5.0)
    assert waiter.spins == 1 and waiter.spins_ended == 1 and waiter.spinning_now == 0
    assert waiter.sleeps == [5.0], "one sleep, ended by the wake-up"


def test_futex_wait_counts_itself_among_spinners_while_it_spins(load: FakeLoad) -> None:
    seen: list[int] = []

    class Counting(ScriptedWaiter):
        def ready(self) -> bool:
            seen.append(self.spinning_now)
            return super().ready()

    waiter = Counting(ready_on=20)
    waiter.may_spin = False  # polite spin
    assert FutexWait(spin_us=1_000_000, min_spin_us=1_000_000).wait(waiter, None) is True
    assert seen[0] == 0 and set(seen[1:]) == {1}
    assert waiter.spinning_now == 0


def test_spinners_of_the_queue_are_not_counted_as_work(load: FakeLoad) -> None:
    # Every runnable task but this one is a spinner of the queue: the cores are free for work.
    load.running = CROWDED
    waiter = ScriptedWaiter(ready_on=50)
    waiter.spinning_now = CROWDED - 1
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert waiter.sleeps == [] and waiter.spins == 1


def test_futex_wait_without_detection_spins_whatever_the_load(load: FakeLoad) -> None:
    load.running = CROWDED
    waiter = ScriptedWaiter(ready_on=50)
    policy = FutexWait(spin_us=1_000_000, min_spin_us=1_000_000, detect_crowding=False)
    assert policy.wait(waiter, time.monotonic() + 10) is True
    assert waiter.sleeps == [] and waiter.spins == 1


def test_cpu_load_looks_at_most_once_per_period(load: FakeLoad) -> None:
    cpu = _wait.CpuLoad()
    cpus = len(os.sched_getaffinity(0))
    load.running = cpus + 1
    assert cpu.crowded(100.0, 1) is True  # cpus others at work
    assert cpu.crowded(100.0, 2) is False  # one of them only spins
    load.running = 1
    assert cpu.crowded(100.0 + cpu.period / 2, 1) is True, "the last look still stands"
    assert cpu.looks == 1
    assert cpu.crowded(100.0 + cpu.period, 1) is False
    assert cpu.looks == 2


def test_cpu_load_without_proc_is_never_crowded(load: FakeLoad) -> None:
    load.running = -1  # runnable_tasks() could not read /proc/loadavg
    assert _wait.CpuLoad().crowded(1.0, 0) is False


def test_runnable_tasks_reads_the_run_queues() -> None:
    running = _native.runnable_tasks()
    with open("/proc/loadavg") as f:
        total = int(f.read().split()[3].split("/")[1])
    assert 1 <= running <= total  # this process is running while it asks


def test_the_queue_counts_its_spinners_in_the_segment() -> None:
    with (
        BroadcastQueue(1, n_slots=4, slot_size=64) as queue,
        BroadcastQueue.attach(queue.handle, reader=0) as reader,
    ):
        ring, writer = reader._reader, queue._writer
        assert ring.spinning() == 0
        ring.count_spin(1)
        assert writer.spinning() == 1  # the writer sees the reader's spin
        ring.count_spin(-1)
        assert writer.spinning() == 0
