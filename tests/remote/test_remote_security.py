"""The remote path's defences: CURVE keys, frames that are garbage, truncated, oversized, out of
sequence or from another queue, on the writer's socket and on a reader's (docs/remote.md)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

zmq = pytest.importorskip("zmq")

from shmcast import (  # noqa: E402
    AttachError,
    BroadcastQueue,
    QueueBroken,
    RemoteOptions,
    SegmentError,
)
from shmcast._remote import _wire as W  # noqa: E402
from shmcast._tools.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.timeout(60)

LOOP = "tcp://127.0.0.1:0"
SMALL = {"n_slots": 8, "slot_size": 4096}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A writer's key pair, an accepted reader's and a stranger's; only the accepted reader's
    public key lies in the directory the writer trusts."""
    made = {}
    for name in ("writer", "reader", "stranger"):
        assert cli_main(["keygen", str(tmp_path / "keys"), name]) == 0
        made[name] = tmp_path / "keys" / f"{name}.key_secret"
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "reader.key").write_bytes((tmp_path / "keys" / "reader.key").read_bytes())
    made["trusted"] = trusted
    assert oct(made["reader"].stat().st_mode & 0o777) == "0o600"
    return made


def curve_queue(keys: dict[str, Path], n_readers: int = 1) -> BroadcastQueue:
    options = RemoteOptions(bind=LOOP, server_key=keys["writer"], client_keys=keys["trusted"])
    return BroadcastQueue(n_readers, remote=options, **SMALL)


def test_keygen_refuses_to_overwrite(keys: dict[str, Path], capsys) -> None:
    directory = str(keys["writer"].parent)
    assert cli_main(["keygen", directory, "writer"]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli_main(["keygen", directory, "writer", "--force"]) == 0


def test_an_accepted_key_gets_everything_objects_included(keys: dict[str, Path]) -> None:
    with curve_queue(keys) as writer:
        reader = BroadcastQueue.attach(writer.handle, 0, network=True, key=keys["reader"])
        writer.put({"step": 1}, timeout=5)  # pickle is fine from an authenticated writer
        writer.put_bytes(b"raw", timeout=5)
        assert reader.get(timeout=5) == {"step": 1}
        assert reader.get_bytes(timeout=5) == b"raw"
        reader.close()


def test_a_wrong_or_missing_key_gets_nothing_and_injects_nothing(keys: dict[str, Path]) -> None:
    with curve_queue(keys, n_readers=2) as writer:
        publisher = writer._publisher
        good = BroadcastQueue.attach(writer.handle, 0, network=True, key=keys["reader"])
        with pytest.raises(AttachError, match="did not accept"):
            BroadcastQueue.attach(writer.handle, 1, network=True, key=keys["stranger"],
                                  connect_timeout=10)  # fmt: skip
        with pytest.raises(AttachError, match="requires CURVE"):
            BroadcastQueue.attach(writer.handle, 1, network=True)
        # A peer that speaks no CURVE at all: its frames never reach the writer.
        context = zmq.Context()
        try:
            raw = context.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(writer.handle.remote.endpoint)
            hello = W.header(W.HELLO, writer.handle.nonce, 0, 1, 0)
            for frames in ([hello], [b"garbage"], [hello, b"x" * 100]):
                raw.send_multipart(frames)
            time.sleep(0.5)
            assert not raw.poll(200), "the writer answered a peer without a key"
        finally:
            context.destroy(linger=0)
        assert publisher.rejected_frames == 0  # nothing got past the handshake
        assert sorted(publisher.stats()) == [0]  # only the accepted reader has a session
        writer.put_bytes(b"after", timeout=5)
        assert good.get_bytes(timeout=5) == b"after"
        good.close()


def test_garbage_to_the_writers_socket_is_dropped_and_harms_nobody() -> None:
    options = RemoteOptions(bind=LOOP, readers=(0,))
    with BroadcastQueue(1, remote=options, **SMALL) as writer:
        publisher = writer._publisher
        reader = BroadcastQueue.attach(writer.handle, 0, network=True)
        nonce = writer.handle.nonce
        bad = [
            [b""],
            [b"\x00" * 3],
            [W.header(W.HELLO, nonce)[:39]],  # truncated
            [b"XXXX" + W.header(W.HELLO, nonce)[4:]],  # wrong magic
            [W.header(W.HELLO, nonce ^ 1, 0, 0)],  # another queue
            [W.header(W.DATA, nonce)],  # a kind readers never send
            [W.header(W.ACK, nonce, 5)],  # before HELLO
            [W.header(W.HELLO, nonce, 0, 7)],  # index out of range: refused
            [W.header(W.HELLO, nonce)[:4] + bytes([9]) + W.header(W.HELLO, nonce)[5:]],  # version
        ]
        context = zmq.Context()
        try:
            peers = []
            for frames in bad:
                peer = context.socket(zmq.DEALER)
                peer.setsockopt(zmq.LINGER, 0)
                peer.connect(writer.handle.remote.endpoint)
                peer.send_multipart(frames)
                peers.append(peer)
            big = context.socket(zmq.DEALER)  # oversized: ZeroMQ cuts it off unread
            big.setsockopt(zmq.LINGER, 0)
            big.connect(writer.handle.remote.endpoint)
            big.send(b"\0" * 100_000)
            for n in range(50):
                writer.put_bytes(b"%d" % n, timeout=5)
                assert reader.get_bytes(timeout=5) == b"%d" % n
            deadline = time.monotonic() + 5
            while publisher.rejected_frames < len(bad) - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert publisher.rejected_frames == len(bad) - 1  # the 8th got a REJECT instead
            refused = peers[7]
            assert refused.poll(2000)
            head = W.parse_header(refused.recv_multipart()[0], nonce, W.FROM_WRITER)
            assert head.kind == W.REJECT
            assert sorted(publisher.stats()) == [0]
            assert publisher._thread.is_alive()
        finally:
            context.destroy(linger=0)
        reader.close()


# -- a writer that misbehaves ---------------------------------------------------------------------


class FakeWriter:
    """A ROUTER on loopback that answers one HELLO with WELCOME, then sends what it is told."""

    def __init__(self, nonce: int) -> None:
        self.nonce = nonce
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(LOOP)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer: bytes | None = None

    def accept(self, reply: list[bytes] | None = None) -> None:
        assert self.socket.poll(10_000)
        self.peer, head, *_ = self.socket.recv_multipart()
        W.parse_header(head, self.nonce, W.FROM_READER)
        body = (100, 2000, 1, 8, 4096)
        frames = reply or W.welcome_frames(self.nonce, 0, 16, 1 << 20, body)
        self.socket.send_multipart([self.peer, *frames])

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart([self.peer, *frames])

    def close(self) -> None:
        self.context.destroy(linger=0)


@pytest.fixture
def fake() -> Iterator[tuple[FakeWriter, object]]:
    """A fake writer and a handle that leads to it (a real queue's handle, redirected)."""
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP), **SMALL) as real:
        writer = FakeWriter(real.handle.nonce)
        info = dataclasses.replace(real.handle.remote, endpoint=writer.endpoint)
        try:
            yield writer, dataclasses.replace(real.handle, remote=info)
        finally:
            writer.close()


def attach_to(writer: FakeWriter, handle) -> BroadcastQueue:
    """A remote reader of the fake writer (which answers its HELLO with WELCOME)."""
    box: list = []
    thread = threading.Thread(
        target=lambda: box.append(BroadcastQueue.attach(handle, 0, network=True))
    )
    thread.start()
    writer.accept()
    thread.join(10)
    (reader,) = box
    return reader


def data(nonce: int, seq: int, payloads: list[bytes]) -> list[bytes]:
    return W.data_frames(nonce, seq, [(1, len(p)) for p in payloads], b"".join(payloads))


BAD_FRAMES: dict[str, Callable[[int], list[bytes]]] = {
    "truncated header": lambda n: [W.header(W.DATA, n, 2, 1, 1)[:-1], b"x"],
    "garbage": lambda n: [b"\xff" * 40],
    "table too short": lambda n: [W.header(W.DATA, n, 2, 2, 2) + W.ENTRY.pack(1, 1, 0)],
    "payload too short": lambda n: [W.header(W.DATA, n, 2, 1, 5) + W.ENTRY.pack(5, 1, 0) + b"abc"],
    "message across frames": lambda n: [
        W.header(W.DATA, n, 2, 1, 4) + W.ENTRY.pack(4, 1, 0) + b"ab",
        b"cd",
    ],
    "a gap": lambda n: data(n, 3, [b"skipped one"]),
    "a duplicate": lambda n: data(n, 1, [b"again"]),
    "another queue": lambda n: data(n ^ 0x5A5A, 2, [b"foreign"]),
    "over the window": lambda n: data(n, 2, [b"x"] * 17),
    "reserved bits": lambda n: [W.header(W.DATA, n, 2, 1, 1) + W.ENTRY.pack(1, 1, 7) + b"x"],
    "a heartbeat that lies": lambda n: [W.header(W.HEARTBEAT, n, 9)],
    "a long header of another kind": lambda n: [W.header(W.HEARTBEAT, n, 2) + b"x"],
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_a_bad_frame_to_a_reader_breaks_the_stream_after_what_came_before(fake, case) -> None:
    writer, handle = fake
    reader = attach_to(writer, handle)
    try:
        writer.send(data(writer.nonce, 0, [b"first", b"second"]))
        writer.send(BAD_FRAMES[case](writer.nonce))
        writer.send(data(writer.nonce, 2, [b"never delivered"]))
        assert reader.get_many(10, timeout=5) == [b"first", b"second"]
        with pytest.raises(QueueBroken) as info:
            reader.get(timeout=5)
        assert info.value.peer == "writer" and "broke" in str(info.value)
    finally:
        reader.close()


def test_a_peer_that_is_not_the_writer_is_refused_at_attach(fake) -> None:
    writer, handle = fake
    errors: list = []

    def attach() -> None:
        try:
            BroadcastQueue.attach(handle, 0, network=True, connect_timeout=10)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=attach)
    thread.start()
    writer.accept([b"SHMR" + b"\0" * 36])
    thread.join(15)
    assert len(errors) == 1 and isinstance(errors[0], SegmentError)
    assert "not this queue's writer" in str(errors[0])


def test_a_data_frame_replayed_from_another_queue_is_refused(fake) -> None:
    """Real DATA frames of queue A, captured by a peer of A, sent to a reader of queue B."""
    writer_b, handle_b = fake
    with BroadcastQueue(1, remote=RemoteOptions(bind=LOOP), **SMALL) as queue_a:
        context = zmq.Context()
        try:
            spy = context.socket(zmq.DEALER)
            spy.setsockopt(zmq.LINGER, 0)
            spy.connect(queue_a.handle.remote.endpoint)
            spy.send(W.header(W.HELLO, queue_a.handle.nonce, 0, 0, 0))
            assert spy.poll(5000)
            spy.recv_multipart()  # WELCOME
            queue_a.put_bytes(b"message of queue A", timeout=5)
            captured = None
            deadline = time.monotonic() + 5
            while captured is None and time.monotonic() < deadline:
                assert spy.poll(5000)
                frames = spy.recv_multipart()
                if frames[0][5] == W.DATA:
                    captured = frames
        finally:
            context.destroy(linger=0)
    assert captured is not None
    reader = attach_to(writer_b, handle_b)
    try:
        writer_b.send(captured)
        with pytest.raises(QueueBroken, match="another queue"):
            reader.get(timeout=5)
    finally:
        reader.close()
