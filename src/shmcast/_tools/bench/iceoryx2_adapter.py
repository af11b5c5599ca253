"""iceoryx2 as a comparator: its Python bindings (the ``iceoryx2`` wheel), zero-copy
publish-subscribe of byte slices, with an event service so that readers sleep instead of
polling.

Configuration (the strongest lossless one its Python API offers for one writer and N readers):

- one ``publish_subscribe(Slice[c_uint8])`` service per case: one publisher, N subscribers, no
  history, safe overflow *off* and the publisher's backpressure ``RetryUntilDelivered``: a
  publisher whose subscriber's buffer is full retries until there is room, and never drops;
- each subscriber's buffer holds :func:`buffer_size` samples (128 up to 256 KiB, as shmcast's
  128 slots; 10 above, as vLLM's 10 chunks), the publisher's slices start at the case's largest
  message (``initial_max_slice_len``, power-of-two growth);
- one ``event`` service of the same name: after each send the writer notifies; a reader that
  finds no sample waits on its listener (``timed_wait``), which returns at once when a
  notification came after its last wait, so no wake-up is lost;
- replies (engine and executor workloads) travel on iceoryx2's own many-to-one path: one more
  publish-subscribe service with a publisher per worker and the engine as its one subscriber,
  with its own event service.

A message is one slice: an 8-byte header (kind, number of parts), the length of each part, then
the parts.  Raw bytes are one part, copied into the loaned slice.  Objects are pickled
(protocol 5): the stream, then every out-of-band buffer (a numpy array's data), each copied
into the slice once.  A reader copies what it takes out of the sample (it gets an object it
owns) and releases the sample at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import pickle
import struct
import time
import uuid
from typing import Any

from .adapters import (
    Adapter,
    Reader,
    ReplyCollector,
    ReplyPath,
    ReplySender,
    Writer,
)

_HEADER = struct.Struct("<BxxxI")  # kind, number of parts
_LENGTH = struct.Struct("<Q")
_RAW, _PICKLED = ord("R"), ord("P")
#: Messages up to this size get subscriber buffers of 128 samples, larger ones of 10.
_SMALL_MESSAGE = 256 * 1024
_POLL_S = 0.001  # while waiting for the other side's ports to appear (not timed)


def buffer_size(max_message_bytes: int) -> int:
    """Samples each subscriber's buffer holds for a case whose largest message is
    ``max_message_bytes``: 128 for small messages (shmcast's ring has 128 slots), 10 for large
    ones (vLLM's 10 chunks; the publisher's data segment holds about that many samples per
    subscriber, each of the largest size)."""
    return 128 if max_message_bytes <= _SMALL_MESSAGE else 10


def _iox() -> Any:
    import iceoryx2

    iceoryx2.set_log_level(iceoryx2.LogLevel.Error)
    return iceoryx2


def _node(iox: Any) -> Any:
    return iox.NodeBuilder.new().create(iox.ServiceType.Ipc)


def _encode(obj: Any, raw: bool) -> list[Any]:
    if raw:
        return [obj]
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [stream, *(b.raw() for b in buffers)]


def _slice_view(address: int, length: int) -> memoryview:
    """A writable byte view of ``length`` bytes of shared memory at ``address`` (valid only
    while the sample that owns it is held)."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def _send(publisher: Any, notifier: Any, obj: Any, raw: bool) -> None:
    """Loan a slice, write the message into it, send it and notify the listeners.  Blocks
    (iceoryx2 retries) while a subscriber's buffer is full."""
    parts = _encode(obj, raw)
    sizes = [memoryview(p).nbytes for p in parts]
    head = _HEADER.size + _LENGTH.size * len(parts)
    total = head + sum(sizes)
    sample = publisher.loan_slice_uninit(total)
    view = _slice_view(sample.payload_ptr, total)
    _HEADER.pack_into(view, 0, _RAW if raw else _PICKLED, len(parts))
    offset = _HEADER.size
    for size in sizes:
        _LENGTH.pack_into(view, offset, size)
        offset += _LENGTH.size
    for part, size in zip(parts, sizes, strict=True):
        view[offset : offset + size] = memoryview(part).cast("B")
        offset += size
    view.release()
    sample.assume_init().send()
    notifier.notify()


def _decode(view: memoryview) -> Any:
    """The message in ``view`` (a received slice), as an object that owns its memory.
    ValueError for a malformed one."""
    if view.nbytes < _HEADER.size:
        raise ValueError(f"a {view.nbytes}-byte sample has no header")
    kind, count = _HEADER.unpack_from(view, 0)
    head = _HEADER.size + _LENGTH.size * count
    if kind not in (_RAW, _PICKLED) or count < 1 or head > view.nbytes:
        raise ValueError(f"bad sample header (kind {kind}, {count} parts)")
    sizes = [_LENGTH.unpack_from(view, _HEADER.size + _LENGTH.size * i)[0] for i in range(count)]
    if head + sum(sizes) != view.nbytes:
        raise ValueError(f"sample parts add up to {head + sum(sizes)} bytes, not {view.nbytes}")
    bounds = []
    offset = head
    for size in sizes:
        bounds.append((offset, offset + size))
        offset += size
    if kind == _RAW:
        start, end = bounds[0]
        return bytes(view[start:end])
    start, end = bounds[0]
    buffers = [bytearray(view[a:b]) for a, b in bounds[1:]]
    return pickle.loads(view[start:end], buffers=buffers)


def _receive(subscriber: Any) -> tuple[bool, Any]:
    """(True, message) for the next sample, (False, None) when there is none."""
    sample = subscriber.receive()
    if sample is None:
        return False, None
    try:
        payload = sample.payload()
        view = _slice_view(payload.as_ptr(), payload.len())
        try:
            return True, _decode(view)
        finally:
            view.release()
    finally:
        sample.delete()


def _wait_for(count: Any, wanted: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while count() < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"iceoryx2: {count()} of {wanted} {what} after {timeout:.0f} s")
        time.sleep(_POLL_S)


class _Channel:
    """One publish-subscribe service and its event service, named ``name``: created by the
    side that calls :meth:`create`, opened by the others.  Owns a node of its own."""

    def __init__(self, name: str) -> None:
        self.iox = _iox()
        self.name = name
        self.node = _node(self.iox)
        self.ports: list[Any] = []

    def _builder(self) -> Any:
        return self.node.service_builder(self.iox.ServiceName.new(self.name))

    def create(self, publishers: int, subscribers: int, buffer: int) -> None:
        iox = self.iox
        self.service = (
            self._builder()
            .publish_subscribe(iox.Slice[ctypes.c_uint8])
            .max_publishers(publishers)
            .max_subscribers(subscribers)
            .history_size(0)
            .subscriber_max_buffer_size(buffer)
            .subscriber_max_borrowed_samples(1)
            .enable_safe_overflow(False)
            .create()
        )
        self.event = (
            self._builder().event().max_notifiers(publishers).max_listeners(subscribers).create()
        )

    def open(self) -> None:
        self.service = self._builder().publish_subscribe(self.iox.Slice[ctypes.c_uint8]).open()
        self.event = self._builder().event().open()

    def publisher(self, max_slice: int) -> tuple[Any, Any]:
        iox = self.iox
        publisher = (
            self.service.publisher_builder()
            .initial_max_slice_len(max_slice)
            .allocation_strategy(iox.AllocationStrategy.PowerOfTwo)
            .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
            .max_loaned_samples(1)
            .create()
        )
        notifier = self.event.notifier_builder().create()
        self.ports += [publisher, notifier]
        return publisher, notifier

    def subscriber(self) -> tuple[Any, Any]:
        subscriber = self.service.subscriber_builder().create()
        listener = self.event.listener_builder().create()
        self.ports += [subscriber, listener]
        return subscriber, listener

    def wait_subscribers(self, n: int, timeout: float) -> None:
        _wait_for(lambda: self.service.dynamic_config.number_of_subscribers, n, timeout,
                  "subscribers")  # fmt: skip
        _wait_for(lambda: self.event.dynamic_config.number_of_listeners, n, timeout, "listeners")

    def wait_publishers(self, n: int, timeout: float) -> None:
        _wait_for(lambda: self.service.dynamic_config.number_of_publishers, n, timeout,
                  "publishers")  # fmt: skip
        _wait_for(lambda: self.event.dynamic_config.number_of_notifiers, n, timeout, "notifiers")

    def close(self) -> None:
        """Release the ports, the services and the node (idempotent)."""
        ports, self.ports = self.ports, []
        for port in reversed(ports):
            with contextlib.suppress(Exception):
                port.delete()
        self.service = self.event = self.node = None


def _wait_receive(subscriber: Any, listener: Any, timeout: float, iox: Any) -> Any:
    """The next message, sleeping on ``listener`` while there is none; None after
    ``timeout``.  A notification sent after the last wait is kept by the listener, so a
    sample that arrives between ``receive`` and ``timed_wait`` wakes the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        got, msg = _receive(subscriber)
        if got:
            return msg
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        listener.timed_wait(iox.Duration.from_secs_f64(left))


class _Iceoryx2Writer(Writer):
    def __init__(self, n_readers: int, max_message_bytes: int) -> None:
        self.n_readers = n_readers
        self.channel = _Channel(f"shmcast-bench/{uuid.uuid4().hex}")
        self.channel.create(1, n_readers, buffer_size(max_message_bytes))
        self.publisher, self.notifier = self.channel.publisher(max_message_bytes + 4096)

    def reader_handle(self, index: int) -> Any:
        return self.channel.name

    def wait_ready(self, timeout: float) -> None:
        self.channel.wait_subscribers(self.n_readers, timeout)
        self.publisher.update_connections()

    def send(self, obj: Any, raw: bool) -> None:
        _send(self.publisher, self.notifier, obj, raw)

    def close(self) -> None:
        self.channel.close()


class _Iceoryx2Reader(Reader):
    def __init__(self, name: str) -> None:
        self.channel = _Channel(name)
        self.channel.open()
        self.subscriber, self.listener = self.channel.subscriber()

    def recv(self, timeout: float) -> Any:
        return _wait_receive(self.subscriber, self.listener, timeout, self.channel.iox)

    def close(self) -> None:
        self.channel.close()


class _Iceoryx2ReplySender(ReplySender):
    def __init__(self, name: str) -> None:
        self.channel = _Channel(name)
        self.channel.open()
        self.publisher, self.notifier = self.channel.publisher(64 * 1024)

    def wait_ready(self, timeout: float) -> None:
        self.channel.wait_subscribers(1, timeout)
        self.publisher.update_connections()

    def send(self, obj: Any) -> None:
        _send(self.publisher, self.notifier, obj, raw=False)

    def close(self) -> None:
        self.channel.close()


class _Iceoryx2ReplyCollector(ReplyCollector):
    def __init__(self, channel: _Channel, n_workers: int) -> None:
        self.channel = channel
        self.n_workers = n_workers
        self.subscriber, self.listener = channel.subscriber()

    def wait_ready(self, timeout: float) -> None:
        self.channel.wait_publishers(self.n_workers, timeout)

    def gather(self, n: int, timeout: float) -> list[Any] | None:
        deadline = time.monotonic() + timeout
        replies = []
        for _ in range(n):
            left = max(0.0, deadline - time.monotonic())
            reply = _wait_receive(self.subscriber, self.listener, left, self.channel.iox)
            if reply is None:
                return None
            replies.append(reply)
        return replies

    def close(self) -> None:
        self.channel.close()


class _Iceoryx2Replies(ReplyPath):
    """One publish-subscribe service for the replies: a publisher per worker, the engine its
    one subscriber (iceoryx2's many-to-one), and an event service to wake the engine."""

    def engine_prepare(self, n_workers: int) -> list[Any]:
        self._n = n_workers
        self._channel = _Channel(f"shmcast-bench/{uuid.uuid4().hex}/replies")
        self._channel.create(n_workers, 1, 4)
        self._collector = _Iceoryx2ReplyCollector(self._channel, n_workers)
        return [self._channel.name] * n_workers

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        return _Iceoryx2ReplySender(forward)

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        return self._collector


class Iceoryx2Adapter(Adapter):
    """iceoryx2's publish-subscribe of byte slices, readers blocking on an event service,
    lossless backpressure (``RetryUntilDelivered``, safe overflow off).  See the module
    docstring for the configuration."""

    name = "iceoryx2"
    requires = ("iceoryx2",)
    install_hint = "install the bench extra (pip install -e '.[bench]') or the iceoryx2 wheel"
    preload = ("iceoryx2",)
    distributions = ("iceoryx2",)

    def describe(self) -> dict[str, Any]:
        return {
            "pattern": "publish_subscribe(Slice[c_uint8]) + event service (blocking readers)",
            "backpressure": "RetryUntilDelivered, safe overflow off, no history",
            "subscriber_buffer": "128 samples up to 256 KiB messages, 10 above",
            "encoding": "raw bytes copied into the loaned slice; objects pickled (protocol 5, "
            "out-of-band buffers copied into the slice)",
            "reply_path": "one publish_subscribe service: a publisher per worker, the engine "
            "its subscriber, with an event service",
        }

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _Iceoryx2Writer(n_readers, max_message_bytes)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _Iceoryx2Reader(handle)

    def reply_path(self) -> ReplyPath:
        return _Iceoryx2Replies()
