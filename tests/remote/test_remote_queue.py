"""Remote readers over loopback: the same stream as local readers, in order, with flow control,
liveness and the local reader's interface (docs/remote.md)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from _procs import (
    OBJECT,
    RAW,
    plan_digest,
    process_group,
    reader_check_plan,
    remote_reader_plan,
    remote_reader_read_and_hold,
    remote_writer,
    wait_for_state,
)

from shmcast import (
    AttachError,
    BroadcastQueue,
    MessageKindError,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    RemoteOptions,
    RoleError,
    SerializationError,
)

pytestmark = pytest.mark.timeout(90)

LOOP4 = "tcp://127.0.0.1:0"
LOOP6 = "tcp://[::1]:0"
SMALL = {"n_slots": 8, "slot_size": 4096}  # a 32 KiB ring
MIXED_PLAN = [(RAW, 64), (OBJECT, 1000), (RAW, 100_000), (OBJECT, 50), (RAW, 0)] * 20 + [
    (RAW, 200_000),  # larger than the ring: streamed
    (OBJECT, 70_000),
]


@pytest.mark.parametrize("bind", [LOOP4, LOOP6], ids=["ipv4", "ipv6"])
def test_local_and_remote_readers_get_every_message_in_order(bind: str) -> None:
    with process_group("forkserver") as group:
        writer = BroadcastQueue(3, remote=RemoteOptions(bind=bind, readers=(1, 2)), **SMALL)
        with writer:
            h = writer.handle
            group.start(reader_check_plan, h, 0, 7, MIXED_PLAN)
            for i in (1, 2):
                group.start(remote_reader_plan, h, i, 7, MIXED_PLAN,
                            {"network": True, "allow_pickle": True})  # fmt: skip
            writer.wait_until_ready(timeout=30)
            from _procs import send_plan

            send_plan(writer, 7, MIXED_PLAN, timeout=30)
        local, *remote = group.results()
    assert local["digest"] == plan_digest(MIXED_PLAN)
    for r in remote:
        assert r["network"] and r["digest"] == plan_digest(MIXED_PLAN)
        assert r["stats"].messages == len(MIXED_PLAN)


def test_the_handle_decides_the_path_on_the_writers_host() -> None:
    with BroadcastQueue(2, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        local = BroadcastQueue.attach(writer.handle, 0)  # same host: shared memory
        remote = BroadcastQueue.attach(writer.handle, 1, network=True)
        assert not getattr(local, "remote", False) and remote.remote
        assert isinstance(remote, BroadcastQueue)
        writer.put_bytes(b"x", timeout=5)
        assert local.get_bytes(timeout=5) == remote.get_bytes(timeout=5) == b"x"
        local.close()
        remote.close()


def test_caller_may_change_the_buffer_right_after_put() -> None:
    np = pytest.importorskip("numpy")
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        reader = BroadcastQueue.attach(writer.handle, 0, network=True, allow_pickle=True)
        buf = bytearray(b"A" * 100_000)
        array = np.zeros(20_000, dtype=np.uint8)
        for n in range(30):
            buf[:] = bytes([65 + n % 26]) * len(buf)
            writer.put_bytes(buf, timeout=5)
            buf[:] = b"\0" * len(buf)  # changed as soon as put returned
            array[:] = n
            writer.put({"n": n, "a": array}, timeout=5)
            array[:] = 255
            assert reader.get_bytes(timeout=5) == bytes([65 + n % 26]) * len(buf)
            got = reader.get(timeout=5)
            assert got["n"] == n and (got["a"] == n).all()
        reader.close()


def test_remote_reader_interface() -> None:
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        r = BroadcastQueue.attach(writer.handle, 0, network=True, allow_pickle=True)
        assert (r.reader, r.is_writer, r.n_readers, r.n_slots, r.slot_size) == (
            0,
            False,
            1,
            8,
            4096,
        )
        with pytest.raises(QueueTimeout):
            r.get(timeout=0.2)
        with pytest.raises(RoleError):
            r.put(1)
        for n in range(5):
            writer.put(n, timeout=5)
        writer.put_bytes(b"raw", timeout=5)
        with pytest.raises(MessageKindError):
            r.get_bytes(timeout=5)  # an object: it stays queued
        got: list = []
        while len(got) < 6:  # what has arrived when each call looks, in order
            batch = r.get_many(3, timeout=5)
            assert 1 <= len(batch) <= 3
            got += batch
        assert got == [0, 1, 2, 3, 4, b"raw"]
        writer.put_bytes(b"view me", timeout=5)
        with r.view(timeout=5) as view:
            assert bytes(view) == b"view me" and view.readonly
        stats = r.stats()
        assert stats.role == "reader" and stats.index == 0 and stats.messages == 7
        writer.close()
        with pytest.raises(QueueClosed):
            r.get(timeout=5)
        r.close()
        with pytest.raises(QueueClosed):
            r.get(timeout=1)


def test_pickle_from_an_unauthenticated_writer_needs_the_opt_in() -> None:
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        r = BroadcastQueue.attach(writer.handle, 0, network=True)
        writer.put({"not": "trusted"}, timeout=5)
        writer.put_bytes(b"bytes are fine", timeout=5)
        with pytest.raises(SerializationError, match="allow_pickle"):
            r.get(timeout=5)
        assert r.get(timeout=5) == b"bytes are fine"
        r.close()


def test_a_detached_index_is_taken_again_at_the_current_position() -> None:
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        first = BroadcastQueue.attach(writer.handle, 0, network=True)
        with pytest.raises(AttachError, match="attached by another remote reader"):
            BroadcastQueue.attach(writer.handle, 0, network=True)
        writer.put_bytes(b"one", timeout=5)
        assert first.get_bytes(timeout=5) == b"one"
        writer.put_bytes(b"missed", timeout=5)
        first.close()  # BYE: the writer stops waiting for index 0
        deadline = time.monotonic() + 10
        while writer._publisher.stats() and time.monotonic() < deadline:
            time.sleep(0.02)
        for n in range(20):
            writer.put_bytes(b"%d" % n, timeout=5)  # more than the ring: nobody gates now
        second = BroadcastQueue.attach(writer.handle, 0, network=True)
        writer.put_bytes(b"after", timeout=5)
        assert second.get_bytes(timeout=5) == b"after"
        second.close()


def test_options_are_checked() -> None:
    for bind in ("tcp://0.0.0.0:0", "tcp://*:0", "tcp://[::]:0", "ipc:///x", "tcp://1.2.3.4"):
        with pytest.raises(ValueError):
            BroadcastQueue(1, remote=RemoteOptions(bind=bind))
    with pytest.raises(ValueError, match="index"):
        BroadcastQueue(2, remote=RemoteOptions(bind=LOOP4, readers=(2,)))
    with pytest.raises(ValueError, match="dead_after"):
        BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4, heartbeat=1.0, dead_after=1.5))
    with pytest.raises(ValueError, match="client_keys"):
        BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4, server_key=(b"x" * 40, b"y" * 40)))
    with pytest.raises(TypeError):
        BroadcastQueue(1, remote={"bind": LOOP4})  # type: ignore[arg-type]
    with BroadcastQueue(2, remote=RemoteOptions(bind=LOOP4, readers=(1,))) as writer:
        with pytest.raises(AttachError, match="not served over the network"):
            BroadcastQueue.attach(writer.handle, 0, network=True)
        with pytest.raises(AttachError, match="out of range"):
            BroadcastQueue.attach(writer.handle, 5, network=True)
    with BroadcastQueue(1) as plain, pytest.raises(AttachError, match="no remote reader"):
        BroadcastQueue.attach(plain.handle, 0, network=True)


def test_a_late_remote_reader_starts_where_the_writer_announces() -> None:
    with BroadcastQueue(2, remote=RemoteOptions(bind=LOOP4, readers=(1,)), **SMALL) as writer:
        local = BroadcastQueue.attach(writer.handle, 0)
        remote = BroadcastQueue.attach(writer.handle, 1, network=True)
        remote.close()  # detached: the writer no longer waits for index 1
        time.sleep(0.3)
        big = bytes(range(256)) * 80  # 20 KiB: three slots
        writer.put_bytes(b"before", timeout=5)
        assert local.get_bytes(timeout=5) == b"before"
        late = BroadcastQueue.attach(writer.handle, 1, network=True)
        writer.put_bytes(big, timeout=5)
        writer.put_bytes(b"next", timeout=5)
        assert local.get_bytes(timeout=5) == big and local.get_bytes(timeout=5) == b"next"
        assert late.get_bytes(timeout=5) == big and late.get_bytes(timeout=5) == b"next"
        local.close()
        late.close()


@pytest.mark.parametrize("policy", ["raise", "drop"])
def test_a_remote_reader_killed_mid_stream(policy: str) -> None:
    """raise: the blocked writer names the dead remote reader within about dead_after (here
    the connection drops at once); drop: it goes on without it, the local reader gets all."""
    plan = [(RAW, 1000)] * 400
    n_readers, victim_index = (1, 0) if policy == "raise" else (2, 1)
    with process_group("forkserver") as group:
        remote = {"bind": LOOP4, "readers": [victim_index], "window_messages": 8}
        report, report_child = group.back_channel()
        _control, control_child = group.channel()
        geometry = {**SMALL, "on_dead_reader": policy}
        writer = group.start(remote_writer, report_child, control_child, n_readers, remote,
                             geometry, 3, plan, "until-broken")  # fmt: skip
        assert report.poll(30)
        handle = report.recv()
        local = group.start(reader_check_plan, handle, 0, 3, plan) if policy == "drop" else None
        hold, hold_child = group.back_channel()
        victim = group.start(remote_reader_read_and_hold, handle, victim_index, 5, hold_child,
                             {"network": True})  # fmt: skip
        try:
            assert hold.poll(30) and hold.recv() == "read"
        except EOFError:
            group.result(victim, 1)  # says why it did not read
            raise
        group.kill(victim)
        result = group.result(writer)
        if local is not None:
            assert group.result(local)["digest"] == plan_digest(plan)
    if policy == "raise":
        assert result["peer"] == f"reader {victim_index}" and "remote" in result["message"]
        assert result["blocked_s"] < 5.0
    else:
        assert result["sent"] == len(plan) and result["peer"] is None


def test_a_stopped_remote_reader_goes_silent_and_is_named() -> None:
    """A reader whose process stops (as a host that goes silent: no frame, no connection
    error) is declared dead after dead_after; a blocked writer then names it."""
    plan = [(RAW, 1000)] * 300
    with process_group("forkserver") as group:
        remote = {"bind": LOOP4, "readers": [0], "window_messages": 8, "dead_after": 1.0,
                  "heartbeat": 0.2}  # fmt: skip
        report, report_child = group.back_channel()
        _control, control_child = group.channel()
        writer = group.start(remote_writer, report_child, control_child, 1, remote, SMALL, 3,
                             plan, "until-broken")  # fmt: skip
        assert report.poll(30)
        handle = report.recv()
        hold, hold_child = group.back_channel()
        victim = group.start(remote_reader_read_and_hold, handle, 0, 5, hold_child,
                             {"network": True})  # fmt: skip
        assert hold.poll(30) and hold.recv() == "read"
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            assert wait_for_state(victim.pid, "T", 5) == "T"
            result = group.result(writer)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    assert result["peer"] == "reader 0" and result["sent"] < len(plan), result
    assert result["blocked_s"] < 4.0


def test_a_slow_remote_reader_throttles_the_writer_with_bounded_memory() -> None:
    window = {"window_messages": 4, "window_bytes": 64 << 10}
    plan = [(RAW, 2000)] * 60
    options = RemoteOptions(bind=LOOP4, **window)
    with BroadcastQueue(1, remote=options, **SMALL) as writer, process_group("forkserver") as group:
        group.start(remote_reader_plan, writer.handle, 0, 5, plan,
                        {"network": True, "slow": 0.02})  # fmt: skip
        writer.wait_until_ready(timeout=30)
        started = time.monotonic()
        most = 0
        from _procs import message_payload

        for number, (_kind, size) in enumerate(plan):
            writer.put_bytes(message_payload(5, number, size), timeout=30)
            for s in writer._publisher.stats().values():
                most = max(most, s["sent"] - s["acked"])
                assert s["in_flight_bytes"] <= window["window_bytes"]
        elapsed = time.monotonic() - started
        writer.close()
        (result,) = group.results()
    assert result["digest"] == plan_digest(plan)
    assert most <= window["window_messages"]
    # At most ring (8) + window (4) messages ahead of a reader that takes 20 ms per message.
    assert elapsed >= (len(plan) - 8 - 4 - 1) * 0.02 * 0.9


def test_dataclass_handle_carries_the_remote_path() -> None:
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4)) as writer:
        h = writer.handle
        assert h.remote.endpoint.startswith("tcp://127.0.0.1:") and h.host
        assert dataclasses.replace(h) == h


def test_a_killed_remote_reader_restarts_at_its_index() -> None:
    """Like a local reader, a remote one whose process died can be replaced at its index:
    the new one joins at the writer's current position."""
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        with process_group("forkserver") as group:
            hold, hold_child = group.back_channel()
            victim = group.start(remote_reader_read_and_hold, writer.handle, 0, 1, hold_child,
                                 {"network": True})  # fmt: skip
            writer.wait_until_ready(timeout=30)
            writer.put_bytes(b"before", timeout=5)
            assert hold.poll(30) and hold.recv() == "read"
            group.kill(victim)
        deadline = time.monotonic() + 10
        while True:  # the writer may take a moment to see the old connection gone
            try:
                again = BroadcastQueue.attach(writer.handle, 0, network=True)
                break
            except AttachError:
                assert time.monotonic() < deadline, "the dead reader's index stayed taken"
                time.sleep(0.1)
        writer.put_bytes(b"after", timeout=5)
        assert again.get_bytes(timeout=5) == b"after"
        again.close()


def test_close_from_another_thread_ends_a_blocked_get() -> None:
    import threading

    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), **SMALL) as writer:
        reader = BroadcastQueue.attach(writer.handle, 0, network=True)
        errors: list = []

        def blocked() -> None:
            try:
                reader.get(timeout=20)
            except Exception as exc:
                errors.append(exc)

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.3)
        reader.close()
        thread.join(5)
        assert not thread.is_alive() and len(errors) == 1
        assert isinstance(errors[0], QueueClosed), errors


def test_a_reader_that_only_pauses_is_never_dropped() -> None:
    """It reads nothing for three times dead_after while the writer is blocked on it: its
    heartbeats go on, so even with on_dead_reader="drop" it gets every message."""
    plan = [(RAW, 3000)] * 40
    # A heartbeat every 0.2 s against 1 s of silence: a run on a busy machine may delay one
    # by most of a second without the reader being taken for dead.
    options = RemoteOptions(bind=LOOP4, window_messages=4, heartbeat=0.2, dead_after=1.0)
    writer = BroadcastQueue(1, remote=options, on_dead_reader="drop", **SMALL)
    with writer, process_group("forkserver") as group:
        group.start(remote_reader_plan, writer.handle, 0, 9, plan,
                    {"network": True, "pause": 3.0})  # fmt: skip
        writer.wait_until_ready(timeout=30)
        from _procs import send_plan

        send_plan(writer, 9, plan, timeout=30)
        writer.close()
        (result,) = group.results()
    assert result["digest"] == plan_digest(plan)


# pyzmq reports (and ignores) a KeyboardInterrupt that lands in its frames' deallocation.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(120, method="thread")
def test_an_interrupted_remote_get_delivers_the_message_or_leaves_it_there() -> None:
    """A signal handler raising (as Ctrl-C would) while a remote reader decodes or hands over a
    message it has received: the message is delivered, or returned by the next call.  The
    interrupts are aimed at calls that find their message received already; one inside pyzmq's
    receive of a frame can lose that frame, which the reader reports as QueueBroken for the
    gap (docs/remote.md, "Limits"), and is left out here."""
    import random
    import threading

    from _faults import (
        Interrupter,
        broadcast_sender,
        interrupted_receive,
        message_error,
        message_source_and_seq,
    )

    count = 400
    writer = BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4), n_slots=8, slot_size=512)
    reader = BroadcastQueue.attach(writer.handle, 0, network=True)
    errors: list[BaseException] = []
    sender = threading.Thread(target=broadcast_sender, args=(writer, count, 11, errors))
    interrupter = Interrupter(seed=12, low_us=5, high_us=60)
    received: list[bytes] = []
    rng = random.Random(13)
    try:
        sender.start()
        with interrupter.running():
            while len(received) < count:
                how = rng.choice(("get", "get_bytes", "view"))
                # Received already (the private buffer or the stash): no socket read follows.
                interrupter.armed = bool(reader._buf or reader._stash)
                try:
                    got = interrupted_receive(reader, how, interrupter, 10.0)
                except KeyboardInterrupt:
                    continue
                interrupter.armed = False
                received += got
    finally:
        reader.close()
        writer.close()
        sender.join(60)
    assert not errors, errors
    assert interrupter.raised >= 30, f"only {interrupter.raised} interrupts landed"
    seqs = [message_source_and_seq(m)[1] for m in received]
    assert seqs == list(range(count)), "a message was lost, doubled or reordered"
    assert [message_error(m, 0, i) for i, m in enumerate(received)] == [None] * count


def test_a_payload_changed_in_the_ring_never_reaches_a_remote_reader() -> None:
    """With checksums, the publisher checks what it sends: a message whose bytes another
    process changed in the ring is not sent; the publisher stops (the segment is not to be
    trusted any more) and the remote reader is told the writer is gone."""
    remote = RemoteOptions(bind=LOOP4)
    with BroadcastQueue(1, remote=remote, checksum=True, n_slots=32, slot_size=4096) as writer:
        reader = BroadcastQueue.attach(writer.handle, 0, network=True, allow_pickle=True)
        try:
            writer.wait_until_ready(timeout=10)
            for intact in (b"intact" * 100, os.urandom(100_000)):  # gathered; a frame alone
                writer.put_bytes(intact, timeout=5)
                assert reader.get_bytes(timeout=5) == intact
            payload = os.urandom(3000)
            with writer._publisher._lock:  # the publisher takes nothing meanwhile
                writer.put_bytes(payload, timeout=5)
                ring = writer._seg.buf
                at = bytes(ring).find(payload)
                assert at > 0
                ring[at + 1000] ^= 0xFF  # another process writes into the ring
            with pytest.raises(QueueBroken):
                reader.get_bytes(timeout=30)
        finally:
            reader.close()
