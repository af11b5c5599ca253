"""The remote path's start: binding the writer's socket and the collective start of a remote
reader (docs/remote.md), over loopback."""

from __future__ import annotations

import time

import pytest
from _netns import foreign_ipv4

from shmcast import BroadcastQueue, RemoteOptions

pytestmark = pytest.mark.timeout(90)

LOOP4 = "tcp://127.0.0.1:0"
SMALL = {"n_slots": 8, "slot_size": 4096}  # a 32 KiB ring


def test_a_remote_readers_wait_until_ready_returns_when_messages_came_first() -> None:
    # The writer sends before the heartbeat that tells the reader everyone is attached: the
    # reader's wait_until_ready must still see that heartbeat (and keep acknowledging).
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP4, dead_after=1.0), **SMALL) as writer:
        reader = BroadcastQueue.attach(writer.handle, 0, network=True)
        try:
            writer.wait_until_ready(timeout=30)
            for number in range(3):
                writer.put_bytes(b"m%d" % number, timeout=30)
            time.sleep(0.05)  # the messages arrive well before the first heartbeat
            started = time.monotonic()
            reader.wait_until_ready(timeout=10)
            assert time.monotonic() - started < 5
            time.sleep(1.5)  # past dead_after: only acknowledgements keep the reader alive
            writer.put_bytes(b"m3", timeout=30)
            assert [reader.get_bytes(timeout=10) for _ in range(4)] == [b"m0", b"m1", b"m2", b"m3"]
        finally:
            reader.close()


def test_an_address_this_host_lacks_fails_at_once_with_zmqs_error() -> None:

    import zmq

    foreign = foreign_ipv4()
    started = time.monotonic()
    with pytest.raises(zmq.ZMQError, match="Cannot assign requested address"):
        BroadcastQueue(1, remote=RemoteOptions(bind=f"tcp://{foreign}:0"))
    assert time.monotonic() - started < 10  # the failed socket does not hold the context
