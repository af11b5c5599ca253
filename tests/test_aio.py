"""asyncio on both queues: get_async/put_async and their kin, async for, timeouts,
cancellation that loses nothing, several queues in one loop, uvloop, dead peers, and every
start method."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import threading
import time
from typing import Any

import pytest
from _procs import (
    async_gather_writer,
    async_reader_check_plan,
    later,
    plan_digest,
    process_group,
    send_plan,
    writer_then_die,
)
from _waiters import ScriptedWaiter

from shmcast import (
    BroadcastQueue,
    FutexWait,
    GatherQueue,
    MessageKindError,
    QueueBroken,
    QueueTimeout,
    RoleError,
    _aio,
    _wait,
)
from shmcast import _layout as L

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")
    ),
]
START_METHODS = ["spawn", "fork", "forkserver"]
pytestmark = pytest.mark.timeout(120)


def run(coro: Any, loop_kind: str = "asyncio") -> Any:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.fixture
def pair():
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
    ):
        yield writer, reader


# -- receiving ----------------------------------------------------------------------------------


def test_a_message_already_there_needs_no_helper_thread(pair) -> None:
    writer, reader = pair
    writer.put({"a": 1})
    writer.put_bytes(b"raw")

    async def main() -> tuple[Any, Any]:
        return await reader.get_async(timeout=1), await reader.get_bytes_async(timeout=1)

    assert run(main()) == ({"a": 1}, b"raw")
    assert reader._aio_helper is None  # taken by the first, non-blocking attempt


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_get_async_waits_without_blocking_the_loop(pair, loop_kind: str) -> None:
    writer, reader = pair
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main() -> Any:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        later(0.3, writer.put, "late")
        got = await reader.get_async(timeout=10)
        stop.set()
        await tick
        return got

    assert run(main(), loop_kind) == "late"
    assert len(gaps) > 20  # the loop went on running while get_async waited
    assert max(gaps) < 0.2, max(gaps)


def test_get_async_times_out_taking_nothing(pair) -> None:
    writer, reader = pair

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(QueueTimeout, match="get timed out"):
            await reader.get_async(timeout=0.2)
        return time.monotonic() - start

    assert 0.19 <= run(main()) < 2.0
    writer.put(1)
    assert reader.get(timeout=1) == 1


NEW_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.11 or newer")


@pytest.mark.parametrize(
    "how",
    ["cancel", "wait_for", pytest.param("timeout", marks=NEW_311),
     pytest.param("taskgroup", marks=NEW_311)],
)  # fmt: skip
def test_a_cancelled_get_async_loses_nothing(pair, how: str) -> None:
    writer, reader = pair

    async def cancelled() -> None:
        if how == "cancel":
            task = asyncio.create_task(reader.get_async())
            await asyncio.sleep(0.3)  # well into the helper's sleep
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "wait_for":
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.get_async(), 0.3)
        elif how == "timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.get_async()
        else:

            async def fail() -> None:
                await asyncio.sleep(0.3)
                raise ValueError("a sibling fails")

            with pytest.raises(BaseException) as caught:
                async with asyncio.TaskGroup() as group:
                    group.create_task(reader.get_async())
                    group.create_task(fail())
            assert type(caught.value).__name__ == "ExceptionGroup"

    async def main() -> list[Any]:
        await cancelled()
        writer.put("first")
        writer.put("second")
        return [await reader.get_async(timeout=5), await reader.get_async(timeout=5)]

    assert run(main()) == ["first", "second"]


def test_cancelled_in_the_spin_phase_loses_nothing(pair) -> None:
    writer, reader = pair

    async def main() -> tuple[list[Any], Any]:
        got = []
        for n in range(200):  # cancel after 0..199 loop passes: every phase of the wait
            task = asyncio.create_task(reader.get_async(timeout=5))
            for _ in range(n % 7):
                await asyncio.sleep(0)
            if n % 3 == 0:
                writer.put(n)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                got.append(await task)
            if n % 3 == 0 and (not got or got[-1] != n):
                got.append(await reader.get_async(timeout=5))  # it must still be there
        return got, _aio._spinners_in(asyncio.get_running_loop())

    got, spinners = run(main())
    assert got == list(range(0, 200, 3))
    assert spinners.count == 0  # every cancelled spin counted itself out of its loop


def _spin_record(reader: BroadcastQueue, monkeypatch, crowded: bool) -> list[int]:
    """Make the machine look crowded (or not) to the async waits, and record the spinning
    counts their spin phase adds."""
    monkeypatch.setattr(_wait.LOAD, "crowded", lambda now, idle: crowded)
    counts: list[int] = []
    ring = reader._reader
    count = ring.count_spin
    monkeypatch.setattr(ring, "count_spin", lambda d: (counts.append(d), count(d)))
    reader._aio_budget = 1.0  # a spin phase of up to 1 s, whatever came before
    return counts


@pytest.mark.parametrize("polite", [True, False])
def test_without_a_spinning_place_only_a_polite_spinner_spins(polite: bool, monkeypatch) -> None:
    policy = FutexWait(max_spinners=0, spin_us=1e6, polite=polite)  # never eager
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=policy) as reader,
    ):
        counts = _spin_record(reader, monkeypatch, False)
        later(0.2, writer.put, "x")  # well after the first attempt, even on a busy machine
        assert run(reader.get_async(timeout=10)) == "x"
    assert counts == ([1, -1] if polite else [])


@pytest.mark.parametrize("max_spinners", [1, 0])  # eager, polite
def test_a_spinner_ends_its_spin_when_every_core_is_taken(max_spinners: int,
                                                          monkeypatch) -> None:  # fmt: skip
    policy = FutexWait(max_spinners=max_spinners, spin_us=1e6)
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=policy) as reader,
    ):
        counts = _spin_record(reader, monkeypatch, True)
        yields = []
        monkeypatch.setattr(_aio.os, "sched_yield", lambda: yields.append(1))
        with pytest.raises(QueueTimeout):
            run(reader.get_async(timeout=2.0))
        assert writer._seg.atomics.load32(L.SPINNERS_OFF) == 0  # a place given back
    # It started (a crowded machine at the start does not stop it), then the load ended it:
    assert counts == [1, -1]
    assert len(yields) == 64  # 64 looks, a yield at each, far short of the 1 s budget


def test_other_tasks_run_while_a_get_async_spins(monkeypatch) -> None:
    policy = FutexWait(max_spinners=1, spin_us=1e6)
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=policy) as reader,
    ):
        counts = _spin_record(reader, monkeypatch, False)  # a spin of up to 1 s
        passes = 0

        async def sibling(stop: asyncio.Event) -> None:
            nonlocal passes
            while not stop.is_set():
                await asyncio.sleep(0)
                passes += 1

        async def main() -> Any:
            stop = asyncio.Event()
            other = asyncio.create_task(sibling(stop))
            await asyncio.sleep(0)  # the sibling is running
            before = passes
            later(0.2, writer.put, "x")
            got = await reader.get_async(timeout=10)
            during = passes - before
            stop.set()
            await other
            return got, during

        got, during = run(main())
    assert got == "x" and counts == [1, -1]  # taken in the spin phase, which lasted 0.2 s
    # The loop made a pass every LOOP_PASS_EVERY of spinning: thousands in 0.2 s here, and
    # still more than 5 on a loaded machine where each yield gives away a whole scheduler
    # slice (up to about 10 ms); a spin that passed only when it began would give one.
    assert during > 5, during


def test_a_spin_lets_the_loop_pass_before_its_first_look() -> None:
    async def main() -> tuple[Any, int]:
        ran = 0

        async def sibling() -> None:
            nonlocal ran
            ran += 1

        task = asyncio.create_task(sibling())  # scheduled, not run yet
        spinners = _aio._spinners_in(asyncio.get_running_loop())
        got = await _aio.AsyncEndpoint._aio_spin_phase(
            lambda: "x", waiter, spinners, False, False, time.monotonic() + 10, None
        )
        seen = ran  # before the sibling's task is awaited below
        await task
        return got, seen

    waiter = ScriptedWaiter(ready_on=1)  # a spin over it ends at its first look
    # The message was there at the first look, and the sibling still ran: a consumer whose
    # messages come a little after it asks cannot keep the loop from other tasks.
    assert run(main()) == ("x", 1)
    assert waiter.ready_calls == 1 and waiter.spinning_now == 0  # counted in and out


def test_the_loop_passes_after_each_spinners_share_of_the_interval() -> None:
    every = _aio.LOOP_PASS_EVERY
    assert not _aio._pass_due(0.9 * every, 1) and _aio._pass_due(every, 1)
    assert _aio._pass_due(every / 2, 2) and not _aio._pass_due(0.4 * every, 2)
    assert _aio._pass_due(every / 8, 8)
    assert not _aio._pass_due(0.9 * every, 0)  # never fewer than the spinner itself
    assert _aio._pass_due(float("inf"), 1)  # a spin's first pass


def test_each_loop_has_one_count_and_a_loop_without_weak_references_gets_its_own() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert _aio._spinners_in(loop) is _aio._spinners_in(loop)
    finally:
        loop.close()
    odd = object()  # a loop class without weak references: no sharing, no error
    assert _aio._spinners_in(odd) is not _aio._spinners_in(odd)  # type: ignore[arg-type]


def test_a_spin_ended_in_another_thread_counts_itself_out_of_its_own_loop(monkeypatch) -> None:
    policy = FutexWait(max_spinners=1, spin_us=1e6)
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=policy) as reader,
    ):
        counts = _spin_record(reader, monkeypatch, False)
        box: dict[str, Any] = {}

        def elsewhere() -> None:  # a loop in a thread, closed while a get_async spins in it
            loop = asyncio.new_event_loop()
            task = loop.create_task(reader.get_async(timeout=10))
            for _ in range(5):
                loop.run_until_complete(asyncio.sleep(0))
            box["spinners"] = _aio._SPINNERS[loop]
            box["while"] = box["spinners"].count
            loop.close()
            box["coro"] = task.get_coro()

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(10)
        assert box["while"] == 1 and counts == [1]
        box.pop("coro").close()  # its end runs here, in another thread than its loop's
        assert box["spinners"].count == 0 and counts == [1, -1]
        assert writer._seg.atomics.load32(L.SPINNERS_OFF) == 0  # its place given back

        async def here() -> int:  # this thread's loop knows nothing of it
            return _aio._spinners_in(asyncio.get_running_loop()).count

        assert run(here()) == 0
        writer.put("next")
        assert run(reader.get_async(timeout=5)) == "next"  # the endpoint is usable


def test_calls_spinning_in_one_loop_share_its_passes(monkeypatch) -> None:
    policy = FutexWait(max_spinners=2, spin_us=1e6)
    writer = BroadcastQueue(2, n_slots=8, slot_size=256)
    readers = [BroadcastQueue.attach(writer.handle, i, wait=policy) for i in range(2)]
    try:
        monkeypatch.setattr(_wait.LOAD, "crowded", lambda now, idle: False)
        for r in readers:
            r._aio_budget = 1.0  # spin phases of up to 1 s
        seen: list[int] = []
        shares: list[int] = []  # the spinners each pass decision counted
        real = _aio._pass_due

        def counted(since: float, spinners: int) -> bool:
            shares.append(spinners)
            return real(since, spinners)

        monkeypatch.setattr(_aio, "_pass_due", counted)

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                seen.append(_aio._spinners_in(asyncio.get_running_loop()).count)
                await asyncio.sleep(0)

        async def main() -> tuple[list[Any], Any]:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            later(0.2, writer.put, "x")
            got = await asyncio.gather(*(r.get_async(timeout=10) for r in readers))
            stop.set()
            await watcher
            return got, _aio._spinners_in(asyncio.get_running_loop())

        got, spinners = run(main())
        assert got == ["x", "x"]
        # both spun at once in the loop, each passing after its share, and both counted out
        assert max(seen) == 2 and 2 in shares and spinners.count == 0
    finally:
        for q in [*readers, writer]:
            q.close()


def test_kinds_and_many(pair) -> None:
    writer, reader = pair
    writer.put("object")
    writer.put_many([1, 2, 3])

    async def main() -> list[Any]:
        with pytest.raises(MessageKindError):
            await reader.get_bytes_async(timeout=1)  # it stays queued
        first = await reader.get_async(timeout=1)
        many = await reader.get_many_async(10, timeout=1)
        later(0.2, writer.put_many, [4, 5])
        return [first, many, await reader.get_many_async(10, timeout=5)]

    got = run(main())
    assert got[0] == "object" and got[1] == [1, 2, 3]
    assert got[2] in ([4, 5], [4])  # what was there when the first arrived


def test_async_for_ends_when_the_writer_closes(pair) -> None:
    writer, reader = pair

    def send() -> None:
        for n in range(50):
            writer.put(n, timeout=5)
        writer.close()

    async def main() -> list[Any]:
        later(0.1, send)
        return [message async for message in reader]

    assert run(main()) == list(range(50))


# Closing wakes an awaiting get_async: tests/test_sockwake.py (with a slice no test waits for).


def test_one_call_at_a_time(pair) -> None:
    _writer, reader = pair

    async def main() -> None:
        first = asyncio.create_task(reader.get_async(timeout=5))
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match="already in use"):
            await reader.get_async(timeout=5)
        first.cancel()

    run(main())


def test_roles(pair) -> None:
    writer, reader = pair

    async def main() -> None:
        with pytest.raises(RoleError):
            await writer.get_async(timeout=0.1)
        with pytest.raises(RoleError):
            await reader.put_async(1, timeout=0.1)

    run(main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_eight_readers_awaited_in_one_loop(loop_kind: str) -> None:
    writers = [BroadcastQueue(1, n_slots=4, slot_size=256) for _ in range(8)]
    readers = [BroadcastQueue.attach(w.handle, 0) for w in writers]
    try:

        def send() -> None:
            for n in range(40):
                for i, w in enumerate(writers):
                    w.put((i, n), timeout=10)
            for w in writers:
                w.close()

        async def drain(reader: BroadcastQueue) -> list[Any]:
            return [message async for message in reader]

        async def main() -> list[list[Any]]:
            later(0.05, send)
            return await asyncio.gather(*(drain(r) for r in readers))

        got = run(main(), loop_kind)
        assert got == [[(i, n) for n in range(40)] for i in range(8)]
    finally:
        for q in readers + writers:
            q.close()


# -- sending ------------------------------------------------------------------------------------


def test_put_async_waits_for_room(pair) -> None:
    writer, reader = pair

    def drain_later() -> None:
        time.sleep(0.3)
        for _ in range(20):
            assert reader.get(timeout=5) is not None

    async def main() -> None:
        thread = threading.Thread(target=drain_later, daemon=True)
        thread.start()
        for n in range(20):  # 8 slots: the writer must wait for the reader
            await writer.put_async(("n", n, b"x" * 100), timeout=10)
        await asyncio.to_thread(thread.join, 10)

    run(main())
    assert writer.stats().waits > 0


def test_put_async_times_out_sending_nothing(pair) -> None:
    writer, reader = pair

    async def main() -> None:
        for n in range(8):
            await writer.put_async(n, timeout=1)  # the ring is full now
        with pytest.raises(QueueTimeout, match="put timed out"):
            await writer.put_async("late", timeout=0.2)

    run(main())
    assert [reader.get(timeout=1) for _ in range(8)] == list(range(8))
    with pytest.raises(QueueTimeout):
        reader.get(timeout=0.1)


@pytest.mark.parametrize("size", [3 * 256, 8 * 256 * 3], ids=["contiguous", "streamed"])
def test_a_cancelled_put_async_sent_all_or_nothing(pair, size: int) -> None:
    writer, reader = pair
    streamed = size > writer.capacity
    payload = bytes(range(256)) * (size // 256)
    got: list[bytes] = []

    def read() -> None:
        for _ in range(6):
            got.append(reader.get_bytes(timeout=5))
        if streamed:
            time.sleep(1.0)  # the writer is in the middle of the message now
        got.append(reader.get_bytes(timeout=5))

    async def main() -> None:
        for n in range(6):
            await writer.put_bytes_async(bytes([n]), timeout=1)  # 6 of 8 slots taken
        thread = threading.Thread(target=read, daemon=True)
        if streamed:  # a streamed message goes as far as the reader lets it, then waits
            thread.start()
        task = asyncio.create_task(writer.put_bytes_async(payload, timeout=10))
        await asyncio.sleep(0.5)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if not streamed:
            thread.start()
        await writer.put_bytes_async(b"after", timeout=5)
        await asyncio.to_thread(thread.join, 15)

    run(main())
    assert got == [bytes([n]) for n in range(6)] + [b"after"]  # nothing of the cancelled one
    with pytest.raises(QueueTimeout):
        reader.get(timeout=0.1)


def test_put_many_async_and_a_streamed_put(pair) -> None:
    writer, reader = pair
    big = bytes(range(256)) * 40  # five times the ring

    async def main() -> None:
        await writer.put_many_async(range(5), timeout=5)
        await writer.put_bytes_async(big, timeout=10)
        await writer.put_async({"done": True}, timeout=5)

    def read() -> list[Any]:
        return [reader.get(timeout=10) for _ in range(7)]

    async def both() -> list[Any]:
        reading = asyncio.create_task(asyncio.to_thread(read))
        await main()
        return await reading

    assert run(both()) == [0, 1, 2, 3, 4, big, {"done": True}]


# -- gather -------------------------------------------------------------------------------------


def test_gather_queue_async() -> None:
    with GatherQueue(3, n_slots=4, slot_size=256) as replies:
        writers = [GatherQueue.attach(replies.handle, j) for j in range(3)]
        try:

            async def main() -> list[Any]:
                for j, w in enumerate(writers):
                    await w.put_async(("from", j), timeout=5)
                got = [await replies.get_with_sender_async(timeout=5) for _ in range(3)]
                later(0.2, writers[2].put_bytes, b"two")
                got.append(await replies.get_bytes_async(timeout=5, writer=2))
                later(0.2, writers[1].put, "one")
                got.append(await replies.get_async(timeout=5))
                writers[0].put_many([7, 8])
                got.append(await replies.get_many_async(4, timeout=5, writer=0))
                return got

            got = run(main())
            assert sorted(got[:3]) == [(j, ("from", j)) for j in range(3)]
            assert got[3:] == [b"two", "one", [7, 8]]
            for w in writers:
                w.close()

            async def rest() -> list[Any]:
                return [m async for m in replies]

            assert run(rest()) == []  # every writer closed: async for ends
        finally:
            for w in writers:
                w.close()


# -- dead peers ---------------------------------------------------------------------------------


def test_a_dead_writer_raises_queue_broken_in_time() -> None:
    with process_group("fork", timeout=60) as group:
        report, report_child = group.back_channel()
        control, control_child = group.channel()
        child = group.start(writer_then_die, report_child, 1, [b"last"], control_child)
        assert report.poll(30)
        handle = report.recv()
        with BroadcastQueue.attach(handle, 0) as reader:
            assert report.poll(30) and report.recv() == "sent"

            async def main() -> tuple[Any, float]:
                first = await reader.get_async(timeout=10)
                group.kill(child)
                start = time.monotonic()
                with pytest.raises(QueueBroken):
                    await reader.get_async(timeout=10)
                return first, time.monotonic() - start

            first, took = run(main())
            assert first == b"last"
            assert took < 2.5, took  # a slice or two, as for the sync get (slack for load)
        control.close()


# -- every start method -------------------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_async_readers_under_every_start_method(method: str) -> None:
    plan = [("raw", n * 37 % 700) if n % 2 else ("object", n * 53 % 3000) for n in range(120)]
    with process_group(method, timeout=90) as group:
        with BroadcastQueue(2, n_slots=8, slot_size=256) as writer:
            for i in range(2):
                group.start(async_reader_check_plan, writer.handle, i, 7, plan, 30.0, False)
            writer.wait_until_ready(timeout=60)
            send_plan(writer, 7, plan, timeout=30)
        results = group.results()
    assert [r["digest"] for r in results] == [plan_digest(plan)] * 2


@pytest.mark.parametrize("method", START_METHODS)
def test_async_gather_writers_under_every_start_method(method: str) -> None:
    plan = [("raw", n * 41 % 900) if n % 3 else ("object", n * 7 % 400) for n in range(60)]
    with process_group(method, timeout=90) as group:
        with GatherQueue(2, n_slots=4, slot_size=256) as replies:
            for j in range(2):
                group.start(async_gather_writer, replies.handle, j, 10 + j, plan, 30.0)

            async def main() -> dict[int, list[Any]]:
                got: dict[int, list[Any]] = {0: [], 1: []}
                async for message in replies:
                    got[replies._last].append(message)
                return got

            got = run(asyncio.wait_for(main(), 60))
        assert group.results() == [len(plan), len(plan)]
    from _procs import message_object, message_payload

    for j in range(2):
        want = [
            message_payload(10 + j, n, size) if kind == "raw" else message_object(10 + j, n, size)
            for n, (kind, size) in enumerate(plan)
        ]
        assert got[j] == want


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")
def test_an_async_reader_under_uvloop_in_a_child() -> None:
    plan = [("object", n) for n in range(50)]
    with process_group("forkserver", timeout=90) as group:
        with BroadcastQueue(1, n_slots=8, slot_size=256) as writer:
            group.start(async_reader_check_plan, writer.handle, 0, 3, plan, 30.0, True)
            writer.wait_until_ready(timeout=60)
            send_plan(writer, 3, plan, timeout=30)
        assert group.results()[0]["digest"] == plan_digest(plan)
