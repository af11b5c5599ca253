"""The drop-in's readers on other hosts (shmcast.compat._remote): remote slots of the queue's
one ring, over ZeroMQ TCP on loopback.  vLLM's connect_ip semantics, the handle's remote
fields, every object to local and remote readers alike, slots, shutdown and dead readers.

Runs with pyzmq and without torch and vLLM; the tests that need them are skipped here and run
under make test-vllm.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _netns import foreign_ipv4
from _procs import mq_reader, mq_reader_then_hold, process_group

from shmcast import AttachError, QueueBroken
from shmcast.compat import _remote
from shmcast.compat.vllm import MessageQueue

zmq = pytest.importorskip("zmq", reason="the remote path needs pyzmq")

pytestmark = pytest.mark.timeout(120)

SMALL = {"max_chunk_bytes": 4096, "max_chunks": 4}  # a ring of 4 slots of 4 KiB
OBJECTS = [
    {"step": 0, "tokens": list(range(100))},
    b"x" * 10_000,  # more than a chunk: streamed through the ring, then sent on
    np.arange(20_000, dtype=np.int32),  # out of band
    ("SUCCESS", None),
    b"",
]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def remote_pair() -> Iterator[tuple[MessageQueue, MessageQueue]]:
    """A writer on loopback and its one reader, remote (rank -1), both in this process and
    ready; both shut down at the end."""
    writer = MessageQueue(1, 0, connect_ip="127.0.0.1", **SMALL)
    reader = MessageQueue.create_from_handle(writer.export_handle(), -1)
    try:
        writer.wait_until_ready(timeout=30)
        reader.wait_until_ready(timeout=30)
        yield writer, reader
    finally:
        reader.shutdown()
        writer.shutdown()


# -- connect_ip and the handle ------------------------------------------------------------------


def test_the_remote_socket_is_bound_on_connect_ip_and_the_handle_says_where() -> None:
    writer = MessageQueue(3, 1, connect_ip="127.0.0.1", **SMALL)
    try:
        handle = writer.export_handle()
        host, port = handle.remote_subscribe_addr.rsplit(":", 1)
        assert host == "tcp://127.0.0.1" and 0 < int(port) < 65536
        assert handle.remote_addr_ipv6 is False
        assert writer.n_local_reader == 1 and writer.n_remote_reader == 2
        assert handle.buffer_handle.remote.readers == (1, 2)  # after the local one
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # something listens there
        assert pickle.loads(pickle.dumps(handle)) == handle
    finally:
        writer.shutdown()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_connect_ip_is_bracketed_and_flagged() -> None:
    writer = MessageQueue(1, 0, connect_ip="::1", **SMALL)
    try:
        handle = writer.export_handle()
        assert handle.remote_subscribe_addr.startswith("tcp://[::1]:")
        assert handle.remote_addr_ipv6 is True
        reader = MessageQueue.create_from_handle(handle, -1)
        writer.wait_until_ready(timeout=30)
        reader.wait_until_ready(timeout=30)
        writer.enqueue("over ipv6")
        assert reader.dequeue(timeout=30) == "over ipv6"
        reader.shutdown()
    finally:
        writer.shutdown()


def test_without_connect_ip_the_socket_is_bound_on_this_hosts_address() -> None:
    expected = _remote.host_ip()
    writer = MessageQueue(2, 1, **SMALL)
    try:
        addr = writer.export_handle().remote_subscribe_addr
        assert addr.startswith(f"tcp://{expected}:") or addr.startswith(f"tcp://[{expected}]:")
    finally:
        writer.shutdown()


def test_this_hosts_address_is_the_one_vllm_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    assert _remote.host_ip() == "127.0.0.1"
    assert _remote.bind_address(None) == "tcp://127.0.0.1:0"
    monkeypatch.delenv("VLLM_HOST_IP")
    guessed = _remote.host_ip()
    assert guessed  # an address of this host: a socket can be bound on it
    family = socket.AF_INET6 if ":" in guessed else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((guessed, 0))
    vllm_network = pytest.importorskip(
        "vllm.utils.network_utils", reason="vLLM is not installed here (make test-vllm has it)"
    )
    assert guessed == vllm_network.get_ip()


@pytest.mark.parametrize(
    "connect_ip, address",
    [("10.1.2.3", "tcp://10.1.2.3:0"), ("fd00::1", "tcp://[fd00::1]:0"),
     ("[fd00::1]", "tcp://[fd00::1]:0"), ("node7", "tcp://node7:0")],
)  # fmt: skip
def test_bind_addresses_take_vllms_connect_ip(connect_ip: str, address: str) -> None:
    assert _remote.bind_address(connect_ip) == address


def test_a_foreign_address_fails_with_zmqs_error_and_leaves_nothing() -> None:
    foreign = foreign_ipv4()
    with pytest.raises(zmq.ZMQError, match="Cannot assign requested address"):
        MessageQueue(n_reader=2, n_local_reader=1, connect_ip=foreign, **SMALL)


@pytest.mark.parametrize("bad", ["0.0.0.0", "[::]"])
def test_a_wildcard_connect_ip_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="every interface"):
        MessageQueue(2, 1, connect_ip=bad, **SMALL)


def test_concurrent_writers_get_distinct_addresses() -> None:
    queues: list[MessageQueue] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def make() -> None:
        try:
            q = MessageQueue(1, 0, connect_ip="127.0.0.1", **SMALL)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            queues.append(q)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors
        addrs = {q.export_handle().remote_subscribe_addr for q in queues}
        assert len(addrs) == len(queues) == 8
    finally:
        for q in queues:
            q.shutdown()


# -- the stream ---------------------------------------------------------------------------------


def test_local_and_remote_readers_get_every_object_in_order() -> None:
    writer = MessageQueue(3, 1, local_reader_ranks=[4], connect_ip="127.0.0.1", **SMALL)
    try:
        with process_group() as group:
            h = writer.export_handle()
            for rank in (4, -1, 9):  # the local rank, then two ranks that read remotely
                group.start(mq_reader, "shmcast", h, rank, len(OBJECTS))
            writer.wait_until_ready(timeout=60)
            for obj in OBJECTS:
                writer.enqueue(obj, timeout=30)
            results = group.results()
        for got in results:
            assert len(got) == len(OBJECTS)
            assert all(same(a, b) for a, b in zip(got, OBJECTS, strict=True))
    finally:
        writer.shutdown()


def test_a_remote_reader_in_this_process_and_acquire_write() -> None:
    writer = MessageQueue(1, 0, connect_ip="127.0.0.1", **SMALL)
    reader = MessageQueue.create_from_handle(writer.export_handle(), -1)
    try:
        assert reader._is_remote_reader and reader.remote_socket is not None
        writer.wait_until_ready(timeout=30)
        reader.wait_until_ready(timeout=30)
        with writer.acquire_write(timeout=30) as buf:
            buf[:5] = b"hello"
        writer.enqueue({"after": "raw"})
        with reader.acquire_read(timeout=30) as raw:
            assert bytes(raw[:5]) == b"hello" and len(raw) == SMALL["max_chunk_bytes"]
        assert reader.dequeue(timeout=30) == {"after": "raw"}
    finally:
        reader.shutdown()
        writer.shutdown()


def test_remote_slots_are_taken_in_turn_and_an_extra_reader_is_refused() -> None:
    writer = MessageQueue(2, 0, connect_ip="127.0.0.1", **SMALL)
    readers = [MessageQueue.create_from_handle(writer.export_handle(), r) for r in (-1, -1)]
    try:
        assert sorted(r._queue.reader for r in readers) == [0, 1]
        with pytest.raises(AttachError, match="every remote reader slot of this queue"):
            MessageQueue.create_from_handle(writer.export_handle(), -1)
        writer.wait_until_ready(timeout=30)
        writer.enqueue("both")
        assert [r.dequeue(timeout=30) for r in readers] == ["both", "both"]
    finally:
        for q in (*readers, writer):
            q.shutdown()


def test_tensors_reach_a_remote_reader() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed here (make test-vllm)")
    with remote_pair() as (writer, reader):
        sent = [torch.arange(3000, dtype=torch.bfloat16).reshape(30, 100)[:, ::3],
                torch.tensor(7.5), torch.empty(0, 4, dtype=torch.int64)]  # fmt: skip
        writer.enqueue(sent)
        got = reader.dequeue(timeout=30)
        writer.enqueue([torch.zeros(10)])  # a later message changes nothing received
        reader.dequeue(timeout=30)
        for a, b in zip(sent, got, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# -- ending ---------------------------------------------------------------------------------------


def test_shutdown_from_another_thread_cancels_a_waiting_remote_reader() -> None:
    with remote_pair() as (_writer, reader):
        timer = threading.Timer(0.3, reader.shutdown)
        timer.start()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="cancelled"):
            reader.dequeue(timeout=30)
        assert time.monotonic() - start < 5
        timer.join()
        with pytest.raises(RuntimeError, match="cancelled"):
            reader.dequeue(timeout=1)


def test_remote_socket_close_shuts_that_end_down() -> None:
    writer = MessageQueue(1, 0, connect_ip="127.0.0.1", **SMALL)
    reader = MessageQueue.create_from_handle(writer.export_handle(), -1)
    writer.wait_until_ready(timeout=30)
    writer.enqueue("last")
    assert reader.dequeue(timeout=30) == "last"
    reader.remote_socket.close(linger=0)
    assert reader.shutting_down and reader.remote_socket.closed
    start = time.monotonic()
    writer.remote_socket.close(linger=0)
    assert writer.shutting_down and time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="cancelled"):
        writer.enqueue("more")


def test_a_remote_reader_killed_while_the_writer_waits_is_named() -> None:
    writer = MessageQueue(1, 0, connect_ip="127.0.0.1", **SMALL)
    try:
        with process_group() as group:
            _control, child_end = group.channel()
            stuck = group.start(mq_reader_then_hold, "shmcast", writer.export_handle(), -1, 0,
                                child_end)  # fmt: skip
            writer.wait_until_ready(timeout=60)
            sent = 0
            with pytest.raises(QueueBroken) as info:
                while sent < 10_000:
                    try:
                        writer.enqueue(sent, timeout=0.05)
                        sent += 1
                    except TimeoutError:  # full: the reader reads nothing; kill it now
                        group.kill(stuck)
                        start = time.monotonic()
                        writer.enqueue(sent, timeout=30)
            assert time.monotonic() - start < 10  # a heartbeat or dead_after, not 30 s
            assert info.value.peer == "reader 0"
    finally:
        writer.shutdown()
