"""Liveness across processes: a dead peer is noticed, named, and costs no message.

Each test kills a peer with SIGKILL at a moment it chooses (``_faults.DelayedKill``) and
measures the time from the kill to the error the survivor gets.  The bound asserted is loose
(:data:`DETECTION_BOUND`, for an oversubscribed machine; the protocol looks at its peer once
per 100 ms slice); the measured figure is printed, so that ``pytest -s`` shows it.  Every wait
has a timeout, and every segment a killed creator leaves behind is removed by name.

Also here: the ``on_dead_reader="drop"`` policy, a reader that detaches cleanly and a new
process that attaches at its index (it starts at the next message boundary, even when the
writer is in the middle of a streamed message), and taking over the index of a dead reader.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time

import pytest
from _faults import (
    OP_TIMEOUT,
    DelayedKill,
    gather_reader_holds,
    gather_writer_publishes_on_command_then_closes,
    gather_writer_sends_then_holds,
    make_message,
    message_error,
    reader_attaches_on_command,
    reader_closes_after,
    reader_survivor,
    reader_victim,
    segment_left,
    writer_publishes_on_command_then_dies,
    writer_sends_then_holds,
)
from _procs import process_group

from shmcast import (
    AttachError,
    BroadcastQueue,
    FutexWait,
    GatherQueue,
    QueueBroken,
    QueueClosed,
)

DETECTION_BOUND = 1.5  # seconds from a peer's death to the error, at most
N_SLOTS = 8
SLOT_SIZE = 256
SMALL = 100  # bytes: a message of one slot
KILL_DELAY = 0.3  # s after the victim announced itself: the survivor is asleep by then


def report_latency(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds * 1e3:.0f} ms from the kill to the error")
    assert seconds < DETECTION_BOUND, f"{what}: {seconds:.2f} s"


# -- a dead reader ----------------------------------------------------------------------------


def test_dead_reader_breaks_the_writers_blocked_put() -> None:
    """Reader 1 reads 3 messages and stops; the writer fills the ring and sleeps in put;
    reader 1 is killed; the put raises QueueBroken naming reader 1 and its pid.  Reader 0 got
    every completed put, then QueueClosed."""
    rng = random.Random(1)
    with (
        BroadcastQueue(2, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as queue,
        process_group("fork") as group,
    ):
        where_in, where_out = group.context.Pipe(duplex=False)
        victim = group.start(reader_victim, queue.handle, 1, FutexWait(), where_out, "stall", 3)
        where_out.close()
        survivor = group.start(reader_survivor, queue.handle, 0, None, 0)
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        killer = DelayedKill(victim.pid, where_in, KILL_DELAY).start()
        sent = 0
        give_up = time.monotonic() + OP_TIMEOUT
        with pytest.raises(QueueBroken) as info:
            while time.monotonic() < give_up:
                queue.put_bytes(make_message(0, sent, SMALL, rng), timeout=OP_TIMEOUT)
                sent += 1
        raised_at = time.monotonic()
        queue.close()
        report = group.result(survivor)
        killer.join()
        assert group.join(victim) == -signal.SIGKILL
    assert killer.announced == "stall"
    broken = info.value
    assert (broken.peer, broken.pid) == ("reader 1", victim.pid)
    assert "reader 1" in str(broken) and str(victim.pid) in str(broken)
    assert sent == 3 + N_SLOTS  # the writer was held back by reader 1 when it died
    report_latency("dead reader -> writer's put", raised_at - killer.killed_at)
    assert (report.errors, report.count, report.end) == ([], sent, "QueueClosed")


def test_drop_policy_goes_on_without_the_dead_reader(caplog: pytest.LogCaptureFixture) -> None:
    """With ``on_dead_reader="drop"``, the writer blocked by a dead reader drops it and goes
    on; the other readers get every message."""
    caplog.set_level(logging.WARNING, logger="shmcast")
    rng = random.Random(2)
    total = 10 * N_SLOTS
    done_at: list[float] = []
    with (
        BroadcastQueue(
            3, n_slots=N_SLOTS, slot_size=SLOT_SIZE, on_dead_reader="drop"
        ) as queue,
        process_group("fork") as group,
    ):  # fmt: skip
        where_in, where_out = group.context.Pipe(duplex=False)
        victim = group.start(reader_victim, queue.handle, 1, FutexWait(), where_out, "stall", 2)
        where_out.close()
        survivors = [group.start(reader_survivor, queue.handle, i, None, i) for i in (0, 2)]
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        killer = DelayedKill(victim.pid, where_in, KILL_DELAY).start()
        for seq in range(total):
            queue.put_bytes(make_message(0, seq, SMALL, rng), timeout=OP_TIMEOUT)
            done_at.append(time.monotonic())
        queue.close()
        reports = [group.result(child) for child in survivors]
        killer.join()
        assert group.join(victim) == -signal.SIGKILL
    before = sum(1 for t in done_at if t < killer.killed_at)
    assert before == 2 + N_SLOTS  # held back by reader 1 until it died
    report_latency("dead reader -> dropped, put goes on", done_at[before] - killer.killed_at)
    assert any(str(victim.pid) in r.getMessage() for r in caplog.records)
    for report in reports:
        assert (report.errors, report.count, report.end) == ([], total, "QueueClosed")


# -- a dead writer ----------------------------------------------------------------------------


def test_dead_writer_readers_drain_then_break() -> None:
    """The writer publishes 6 messages and is killed.  Reader 1 (a child) had read them all
    and sleeps in get: it raises QueueBroken.  Reader 0 (this process) reads only after the
    death: it first gets all 6, intact, then QueueBroken naming the writer and its pid."""
    sizes = [SMALL, 2 * SLOT_SIZE, 20, 3 * SLOT_SIZE, SLOT_SIZE, 1]  # 9 slots of 16
    with process_group("fork") as group:
        context = group.context
        handle_in, handle_out = context.Pipe(duplex=False)
        where_in, where_out = context.Pipe(duplex=False)
        writer = group.start(
            writer_sends_then_holds, handle_out, where_out, 2, 16, SLOT_SIZE, sizes, 3
        )
        handle_out.close()
        where_out.close()
        assert handle_in.poll(OP_TIMEOUT)
        handle = handle_in.recv()
        other = group.start(reader_survivor, handle, 1, None, 1)
        with BroadcastQueue.attach(handle, 0) as queue:
            killer = DelayedKill(writer.pid, where_in, KILL_DELAY).start()
            killer.wait()
            received = [queue.get_bytes(timeout=OP_TIMEOUT) for _ in sizes]
            with pytest.raises(QueueBroken) as info:
                queue.get(timeout=OP_TIMEOUT)
            raised_at = time.monotonic()
        report = group.result(other)
        killer.join()
        assert group.join(writer) == -signal.SIGKILL
    assert segment_left(handle.name) is None  # the kernel freed it with its last process
    assert [message_error(m, 0, seq) for seq, m in enumerate(received)] == [None] * len(sizes)
    assert (info.value.peer, info.value.pid) == ("writer", writer.pid)
    assert str(writer.pid) in str(info.value)
    assert (report.errors, report.count, report.end) == ([], len(sizes), "QueueBroken")
    assert (report.peer, report.pid) == ("writer", writer.pid)
    report_latency("dead writer -> reader asleep in get", report.ended_at - killer.killed_at)
    report_latency(
        "dead writer -> reader that drained 6 messages first", raised_at - killer.killed_at
    )


# -- gather queues ----------------------------------------------------------------------------


def _start_gather_writers(group, queue: GatherQueue, sizes: list[int]):
    """Writers 0..n-1 of ``queue`` in children; each puts ``sizes`` and holds.  Returns the
    children and the parent's ends of their "sent" pipes."""
    children, pipes = [], []
    for index in range(queue.n_writers):
        where_in, where_out = group.context.Pipe(duplex=False)
        child = group.start(
            gather_writer_sends_then_holds, queue.handle, index, sizes, index, where_out,
            label=f"writer {index}",
        )  # fmt: skip
        children.append(child)
        where_out.close()
        pipes.append(where_in)
    return children, pipes


@pytest.mark.parametrize("read_from", ["writer 1", "any writer"])
@pytest.mark.parametrize("when", ["read after the death", "asleep at the death"])
def test_gather_reader_learns_of_a_dead_writer(read_from: str, when: str) -> None:
    """Writer 1 of 3 dies; the reader, reading from writer 1 (``get(writer=1)``) or from any
    writer (``get_with_sender``), gets everything writer 1 (and the others) sent, then
    QueueBroken naming writer 1 and its pid.  Either it reads only after the death, or it has
    read everything and sleeps in get when writer 1 dies."""
    sizes = [SMALL, 2 * SLOT_SIZE, 40, SLOT_SIZE]  # 6 slots of each writer's 16
    with (
        GatherQueue(3, n_slots=16, slot_size=SLOT_SIZE) as queue,
        process_group("fork") as group,
    ):
        writers, sent_pipes = _start_gather_writers(group, queue, sizes)
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        for pipe in sent_pipes[::2]:
            assert pipe.poll(OP_TIMEOUT) and pipe.recv() == "sent"
        delay = 0.0 if when == "read after the death" else 0.5
        killer = DelayedKill(writers[1].pid, sent_pipes[1], delay).start()
        if when == "read after the death":
            killer.wait()
        got: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
        with pytest.raises(QueueBroken) as info:
            while True:
                if read_from == "writer 1":
                    got[1].append(queue.get(timeout=OP_TIMEOUT, writer=1))
                else:
                    index, message = queue.get_with_sender(timeout=OP_TIMEOUT)
                    got[index].append(message)
        raised_at = time.monotonic()
        killer.join()
        assert group.join(writers[1]) == -signal.SIGKILL
        for pipe in sent_pipes[::2]:
            pipe.close()
    assert killer.announced == "sent"
    expected = [1] if read_from == "writer 1" else [0, 1, 2]
    for index in expected:
        errors = [message_error(m, index, seq) for seq, m in enumerate(got[index])]
        assert errors == [None] * len(sizes), f"writer {index}: {errors}"
    broken = info.value
    assert broken.pid == writers[1].pid and str(writers[1].pid) in str(broken)
    report_latency(f"gather: dead writer 1 -> get from {read_from}, {when}",
                   raised_at - killer.killed_at)  # fmt: skip
    assert broken.peer == "writer 1", f"QueueBroken does not name writer 1: {broken.peer!r}"
    assert "writer 1" in str(broken), f"QueueBroken does not name writer 1: {broken}"


def test_dead_gather_reader_breaks_a_blocked_writer() -> None:
    """The gather reader (the creator) reads nothing and is killed while writer 0 sleeps in
    put on its full ring: the put raises QueueBroken naming the reader's pid."""
    rng = random.Random(4)
    with process_group("fork") as group:
        context = group.context
        handle_in, handle_out = context.Pipe(duplex=False)
        where_in, where_out = context.Pipe(duplex=False)
        reader = group.start(gather_reader_holds, handle_out, where_out, 1, N_SLOTS, SLOT_SIZE)
        handle_out.close()
        where_out.close()
        assert handle_in.poll(OP_TIMEOUT)
        handle = handle_in.recv()
        with GatherQueue.attach(handle, writer=0) as queue:
            killer = DelayedKill(reader.pid, where_in, KILL_DELAY).start()
            sent = 0
            give_up = time.monotonic() + OP_TIMEOUT
            with pytest.raises(QueueBroken) as info:
                while time.monotonic() < give_up:
                    queue.put(make_message(0, sent, SMALL, rng), timeout=OP_TIMEOUT)
                    sent += 1
            raised_at = time.monotonic()
        killer.join()
        assert group.join(reader) == -signal.SIGKILL
    assert segment_left(handle.name) is None  # its creator was killed: nothing is left
    assert killer.announced == "idle"
    assert sent == N_SLOTS  # a full ring: the writer was asleep in put
    assert info.value.pid == reader.pid and str(reader.pid) in str(info.value)
    assert "reader" in info.value.peer
    report_latency("gather: dead reader -> writer's put", raised_at - killer.killed_at)


# -- detach, re-attach, take over -------------------------------------------------------------


def test_detached_reader_no_longer_holds_the_writer_back() -> None:
    """Reader 1 reads 2 messages, holds (the writer fills the ring and sleeps in put), then
    closes cleanly: the blocked put goes through, and the writer puts many ring-fulls more
    without it."""
    rng = random.Random(5)
    total = 6 * N_SLOTS
    done_at: list[float] = []
    with (
        BroadcastQueue(2, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as queue,
        process_group("fork") as group,
    ):
        where_in, where_out = group.context.Pipe(duplex=False)
        leaver = group.start(reader_closes_after, queue.handle, 1, 2, KILL_DELAY, where_out)
        where_out.close()
        survivor = group.start(reader_survivor, queue.handle, 0, None, 0)
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        for seq in range(total):
            queue.put_bytes(make_message(0, seq, SMALL, rng), timeout=OP_TIMEOUT)
            done_at.append(time.monotonic())
        closed_at = group.result(leaver)
        assert where_in.poll(0) and where_in.recv() == "holding"
        queue.close()
        report = group.result(survivor)
    before = sum(1 for t in done_at if t < closed_at)
    assert before == 2 + N_SLOTS  # held back until the close
    print(f"\ndetach -> blocked put returns: {(done_at[before] - closed_at) * 1e3:.1f} ms")
    assert (report.errors, report.count, report.end) == ([], total, "QueueClosed")


def test_reattach_in_the_middle_of_a_streamed_message_starts_at_the_next_one() -> None:
    """Reader index 1 is detached.  While the writer is in the middle of a streamed message
    (it has published a ring-full of its slots and sleeps, reader 0 being paused), a new
    process attaches at index 1.  It must not see any part of that message: its first
    message is the next one, and it then gets every later message, intact and in order."""
    rng = random.Random(6)
    before = 4  # messages before the streamed one
    after = 20  # messages after it
    with (
        BroadcastQueue(2, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as queue,
        process_group("fork") as group,
    ):
        context = group.context
        paused_in, paused_out = context.Pipe(duplex=False)
        resume_in, resume_out = context.Pipe(duplex=False)
        command_in, command_out = context.Pipe(duplex=False)
        attached_in, attached_out = context.Pipe(duplex=False)
        holding_in, holding_out = context.Pipe(duplex=False)
        first = group.start(reader_closes_after, queue.handle, 1, 0, 0.0, holding_out)
        reader0 = group.start(reader_survivor, queue.handle, 0, None, 0, before, paused_out,
                              resume_in)  # fmt: skip
        late = group.start(reader_attaches_on_command, queue.handle, 1, 1, command_in,
                           attached_out)  # fmt: skip
        for end in (paused_out, resume_in, command_in, attached_out, holding_out):
            end.close()
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        group.result(first)  # index 1 is detached now
        assert holding_in.poll(0) and holding_in.recv() == "holding"
        holding_in.close()
        for seq in range(before):
            queue.put_bytes(make_message(0, seq, SMALL, rng), timeout=OP_TIMEOUT)
        assert paused_in.poll(OP_TIMEOUT) and paused_in.recv() == "paused"

        streamed = make_message(0, before, 5 * queue.capacity, rng)
        failure: list[BaseException] = []

        def put_streamed() -> None:
            try:
                queue.put_bytes(streamed, timeout=OP_TIMEOUT)
            except BaseException as exc:
                failure.append(exc)

        putter = threading.Thread(target=put_streamed)
        putter.start()
        try:
            give_up = time.monotonic() + OP_TIMEOUT
            while queue.stats().waits == 0 and time.monotonic() < give_up:
                time.sleep(0.005)  # until the streamed put sleeps on the full ring
            sequence_at_attach = queue.stats().sequence
            command_out.send("attach")
            assert attached_in.poll(OP_TIMEOUT) and attached_in.recv() == "attached"
            assert putter.is_alive() and queue.stats().sequence == sequence_at_attach
            resume_out.send("resume")
        finally:
            putter.join(OP_TIMEOUT)
        assert not putter.is_alive() and failure == []
        for seq in range(before + 1, before + 1 + after):
            size = rng.choice([SMALL, 3 * SLOT_SIZE, queue.capacity, 2 * queue.capacity])
            queue.put_bytes(make_message(0, seq, size, rng), timeout=OP_TIMEOUT)
        queue.close()
        report0 = group.result(reader0)
        report1 = group.result(late)
    # A ring-full of the streamed message's slots was published when index 1 was attached.
    assert sequence_at_attach == before + N_SLOTS
    assert (report0.errors, report0.count, report0.end) == ([], before + 1 + after, "QueueClosed")
    assert report1.errors == [], report1.describe()
    assert report1.first == before + 1, report1.describe()
    assert (report1.count, report1.end) == (after, "QueueClosed"), report1.describe()


def test_attach_to_a_live_readers_index_fails_a_dead_ones_is_taken_over() -> None:
    """Index 1 is held by a live process: attaching there raises AttachError naming it.  Once
    that process is dead, attaching succeeds, and the new reader gets the messages put after
    it attached, from the first one."""
    rng = random.Random(7)
    with (
        BroadcastQueue(2, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as queue,
        process_group("fork") as group,
    ):
        where_in, where_out = group.context.Pipe(duplex=False)
        holder = group.start(reader_victim, queue.handle, 1, FutexWait(), where_out, "stall", 2)
        where_out.close()
        survivor = group.start(reader_survivor, queue.handle, 0, None, 0)
        queue.wait_until_ready(timeout=OP_TIMEOUT)
        for seq in range(5):
            queue.put_bytes(make_message(0, seq, SMALL, rng), timeout=OP_TIMEOUT)
        assert where_in.poll(OP_TIMEOUT) and where_in.recv() == "stall"
        with pytest.raises(AttachError) as info:
            BroadcastQueue.attach(queue.handle, 1)
        assert str(holder.pid) in str(info.value)
        group.kill(holder)
        with BroadcastQueue.attach(queue.handle, 1) as taken:
            for seq in range(5, 5 + 3 * N_SLOTS):
                queue.put_bytes(make_message(0, seq, SMALL, rng), timeout=OP_TIMEOUT)
                got = taken.get_bytes(timeout=OP_TIMEOUT)
                assert message_error(got, 0, seq) is None, message_error(got, 0, seq)
        queue.close()
        report = group.result(survivor)
    assert (report.errors, report.count, report.end) == ([], 5 + 3 * N_SLOTS, "QueueClosed")


# -- the worst moment -------------------------------------------------------------------------
#
# A reader that finds nothing new and then looks at its writer must not conclude "the writer
# is gone and I have read everything" from two looks taken in the wrong order: a writer that
# publishes a message and then dies (or closes) between the two looks leaves that message
# unread.  These tests put the writer's last put exactly there, by pausing the reader inside
# its second look (as a reader descheduled at that point would be) until the writer is done.


@pytest.mark.parametrize("kind", ["broadcast get", "gather get(writer=0)", "gather get()"])
def test_writer_dying_right_after_its_last_put_loses_nothing(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer puts a message and is killed while the reader, having seen nothing new,
    checks whether the writer lives.  The reader must still get the message, then
    QueueBroken."""
    import shmcast._participants

    gather = kind.startswith("gather")
    with process_group("fork") as group:
        context = group.context
        out_in, out_out = context.Pipe(duplex=False)
        go_in, go_out = context.Pipe(duplex=False)
        own: GatherQueue | None = GatherQueue(1, n_slots=4, slot_size=256) if gather else None
        writer = group.start(
            writer_publishes_on_command_then_dies, out_out, go_in, gather, label="writer"
        )
        out_out.close()
        go_in.close()
        if own is not None:
            name = ""
            go_out.send(own.handle)
            assert out_in.poll(OP_TIMEOUT) and out_in.recv() == "attached"
            queue: GatherQueue | BroadcastQueue = own
        else:
            assert out_in.poll(OP_TIMEOUT)
            handle = out_in.recv()
            name = handle.name
            queue = BroadcastQueue.attach(handle, 0)
        real_is_alive = shmcast._participants.is_alive
        calls: list[int] = []

        def is_alive_at_the_worst_moment(pid: int, start: int) -> bool:
            if pid == writer.pid and not calls:
                calls.append(pid)
                go_out.send("go")  # the writer publishes and dies now ...
                writer.process.join(OP_TIMEOUT)  # ... while this reader looks at it
            return real_is_alive(pid, start)

        monkeypatch.setattr(shmcast._participants, "is_alive", is_alive_at_the_worst_moment)
        try:
            try:
                if kind == "gather get(writer=0)":
                    first: object = queue.get(timeout=OP_TIMEOUT, writer=0)
                else:
                    first = queue.get(timeout=OP_TIMEOUT)
            except QueueBroken as exc:
                first = exc
            monkeypatch.undo()
            try:
                second: object = queue.get(timeout=OP_TIMEOUT)
            except QueueBroken as exc:
                second = exc
            assert group.join(writer) == -signal.SIGKILL
        finally:
            queue.close()
    assert calls == [writer.pid], "the reader never looked at its writer's liveness"
    assert segment_left(name) is None if name else True
    assert first == "last words", (
        f"{kind}: the writer's last message was published before it died, yet the first get "
        f"gave {first!r}; the next get gave {second!r}"
    )
    assert isinstance(second, QueueBroken), second


def test_writer_closing_right_after_its_last_put_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gather reader that found every ring empty checks whether every writer closed; the
    last writer puts a message and closes just then.  get() must return that message, and
    raise QueueClosed only on the next call."""
    with (
        GatherQueue(1, n_slots=4, slot_size=256) as reader,
        process_group("fork") as group,
    ):
        go_in, go_out = group.context.Pipe(duplex=False)
        done_in, done_out = group.context.Pipe(duplex=False)
        group.start(gather_writer_publishes_on_command_then_closes, reader.handle, 0, go_in,
                    done_out)  # fmt: skip
        go_in.close()
        done_out.close()
        reader.wait_until_ready(timeout=OP_TIMEOUT)
        real_check = GatherQueue._all_writers_closed
        calls: list[bool] = []

        def all_closed_at_the_worst_moment(self: GatherQueue) -> bool:
            if not calls:
                calls.append(True)
                go_out.send("go")  # the writer puts and closes now ...
                assert done_in.poll(OP_TIMEOUT) and done_in.recv() == "done"
            return real_check(self)  # ... while this reader checks whether all closed

        monkeypatch.setattr(GatherQueue, "_all_writers_closed", all_closed_at_the_worst_moment)
        try:
            first: object = reader.get(timeout=OP_TIMEOUT)
        except QueueClosed as exc:
            first = exc
        monkeypatch.undo()
        try:
            second: object = reader.get(timeout=OP_TIMEOUT)
        except QueueClosed as exc:
            second = exc
        group.results()
    assert calls, "the reader never checked whether its writers closed"
    assert first == "last words", (
        f"the last writer put a message before it closed, yet the first get gave {first!r}; "
        f"the next get gave {second!r}"
    )
    assert isinstance(second, QueueClosed), second
