"""One small adapter per implementation under test, all behind the same interface.

An :class:`Adapter` knows how to open the writer's side of a one-to-many channel, how a reader
attaches to it from another process, and (for the engine workload) a many-to-one reply path.
The workloads only ever talk to these interfaces, so every implementation runs exactly the same
code around its own calls.

Life cycle, for one case (see ``case.py``):

1. in the writer process: ``w = adapter.open_writer(n_readers, max_message_bytes)``;
2. ``w.reader_handle(i)`` is passed to reader process *i* as a process argument (so handles may
   be objects that only pickle at process creation, such as ``multiprocessing.Queue``);
3. in reader process *i*: ``r = adapter.open_reader(handle, i)``; then both sides call
   ``wait_ready`` (a collective start for the implementations that have one);
4. ``w.send(obj, raw)`` / ``r.recv(timeout)``; ``close()`` on both.

Adapters are created in every process from their class and keyword options, so an adapter
holds only picklable configuration.  An implementation whose library cannot be imported is
reported as "not installed" (see :func:`missing_modules`), never as an error.

Contract shared by all adapters: the caller never mutates an object after sending it, so an
implementation may keep a reference to it (zero-copy sends).  ``recv`` returns an object the
reader owns (a copy), ``None`` when nothing arrived within ``timeout``.  Raw messages
(``raw=True``) are bytes-like and come back bytes-like.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import pickle
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

# -- resource bookkeeping ------------------------------------------------------------------------

RESOURCE_LOG_ENV = "SHMCAST_BENCH_RESOURCES"
TMPDIR_ENV = "SHMCAST_BENCH_TMPDIR"


def record_resource(path: str) -> None:
    """Note a file this run created that must not outlive it (a /dev/shm segment, a socket).

    Appended to the file named by ``$SHMCAST_BENCH_RESOURCES``, so that the harness can remove
    it after killing a hung case, and report it as leaked when a case ended normally and the
    implementation left it behind.  A no-op when the variable is not set.
    """
    log = os.environ.get(RESOURCE_LOG_ENV)
    if not log:
        return
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (path + "\n").encode())
    finally:
        os.close(fd)


def scratch_dir() -> str:
    """A directory for socket files, removed by the harness when the run ends."""
    return os.environ.get(TMPDIR_ENV) or tempfile.gettempdir()


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The top-level modules among ``modules`` that cannot be found (cheap: nothing is
    imported)."""
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


# -- interfaces ---------------------------------------------------------------------------------


class Writer:
    """The writer's end of a one-to-many channel.  Owned by the one writer process."""

    def reader_handle(self, index: int) -> Any:
        """What reader ``index`` needs to attach; passed as a process argument."""
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> None:
        """Block until every reader has attached (for implementations with a collective
        start; a no-op otherwise).  Called after every reader reported it had attached."""

    def send(self, obj: Any, raw: bool) -> None:
        """Send ``obj`` to every reader, in order.  ``raw``: ``obj`` is a bytes-like buffer.
        May block (backpressure); raises on failure."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything (idempotent)."""


class Reader:
    """One reader's end.  Owned by its reader process."""

    def wait_ready(self, timeout: float) -> None:
        """The reader's half of the collective start (a no-op for most)."""

    def recv(self, timeout: float) -> Any:
        """The next message, or None if nothing arrived within ``timeout`` seconds."""
        raise NotImplementedError

    def recv_indefinite(self, timeout: float) -> Any:
        """As :meth:`recv`, for a reader that waits for work as long as it takes (a worker
        between steps); vLLM's API says so with ``dequeue(indefinite=True)``.  ``timeout``
        still bounds the wait, for the benchmark's stall check."""
        return self.recv(timeout)

    def close(self) -> None:
        """Release everything (idempotent)."""


class ReplySender:
    """A worker's end of the reply path (engine workload)."""

    #: Sent back to the engine after the worker opened its end (None: nothing to send).
    back_handle: Any = None

    def wait_ready(self, timeout: float) -> None:
        """The worker's half of the reply path's collective start (a no-op for most)."""

    def send(self, obj: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release everything (idempotent)."""


class ReplyCollector:
    """The engine's end of the reply path."""

    def wait_ready(self, timeout: float) -> None:
        """Block until every worker's end is connected (a no-op for most)."""

    def gather(self, n: int, timeout: float) -> list[Any] | None:
        """One reply from each of the ``n`` workers (any order), or None when they did not all
        arrive within ``timeout`` seconds (the replies received are then lost to the caller)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything (idempotent)."""


class ReplyPath:
    """How workers reply to the engine: many-to-one.

    1. engine: ``forward = path.engine_prepare(n)`` before the workers start; ``forward[i]``
       is passed to worker *i* as a process argument;
    2. worker *i*: ``sender = path.worker_open(forward[i], i)``; it reports
       ``sender.back_handle`` to the engine;
    3. engine: ``collector = path.engine_connect(back_handles)``; both sides ``wait_ready``.
    """

    def engine_prepare(self, n_workers: int) -> list[Any]:
        return [None] * n_workers

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        raise NotImplementedError

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        raise NotImplementedError


class Adapter:
    """An implementation under test.  Subclasses set :attr:`name` and :attr:`requires` and
    implement the ``open_*`` methods and :meth:`reply_path`.  Keyword options must be
    picklable: the adapter is re-created from ``(class, options)`` in every process."""

    #: The name used on the command line and in the results.
    name: ClassVar[str] = "?"
    #: Modules that must be importable, else the implementation is "not installed".
    requires: ClassVar[tuple[str, ...]] = ()
    #: How to install it, said when it is "not installed" ("" for nothing to add).
    install_hint: ClassVar[str] = ""
    #: Modules imported once by the process that forks the readers (costly imports).
    preload: ClassVar[tuple[str, ...]] = ()
    #: Distribution names whose versions are recorded in the results.
    distributions: ClassVar[tuple[str, ...]] = ()
    #: The workloads it runs (None: all).
    workloads: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def describe(self) -> dict[str, Any]:
        """Configuration recorded with the results (geometry, buffer sizes, ...)."""
        return {}

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        raise NotImplementedError

    def open_reader(self, handle: Any, index: int) -> Reader:
        raise NotImplementedError

    def reply_path(self) -> ReplyPath:
        raise NotImplementedError


# -- shmcast ----------------------------------------------------------------------------------


class _ShmcastWriter(Writer):
    def __init__(self, n_readers: int, wait: str) -> None:
        import shmcast

        self.queue = shmcast.BroadcastQueue(n_readers, wait=wait)

    def reader_handle(self, index: int) -> Any:
        return self.queue.handle

    def wait_ready(self, timeout: float) -> None:
        self.queue.wait_until_ready(timeout=timeout)

    def send(self, obj: Any, raw: bool) -> None:
        if raw:
            self.queue.put_bytes(obj)
        else:
            self.queue.put(obj)

    def close(self) -> None:
        self.queue.close()


class _ShmcastReader(Reader):
    def __init__(self, handle: Any, index: int, wait: str) -> None:
        import shmcast

        self._timeout_error = shmcast.QueueTimeout
        self.queue = shmcast.BroadcastQueue.attach(handle, reader=index, wait=wait)

    def wait_ready(self, timeout: float) -> None:
        self.queue.wait_until_ready(timeout=timeout)

    def recv(self, timeout: float) -> Any:
        try:
            return self.queue.get(timeout=timeout)
        except self._timeout_error:
            return None

    def close(self) -> None:
        self.queue.close()


class _OwnQueueReplySender(ReplySender):
    """A worker that replies through a one-reader queue of its own: ``writer`` is that queue's
    writer, ``back_handle`` what the engine's reader attaches with."""

    def __init__(self, writer: Writer, back_handle: Any) -> None:
        self._writer = writer
        self.back_handle = back_handle

    def wait_ready(self, timeout: float) -> None:
        self._writer.wait_ready(timeout)

    def send(self, obj: Any) -> None:
        self._writer.send(obj, raw=False)

    def close(self) -> None:
        self._writer.close()


class _PerWorkerCollector(ReplyCollector):
    """The engine's end when each worker replies through a queue of its own: it reads one
    reply from each worker's reader in turn."""

    def __init__(self, readers: list[Reader]) -> None:
        self._readers = readers

    def wait_ready(self, timeout: float) -> None:
        for reader in self._readers:
            reader.wait_ready(timeout)

    def gather(self, n: int, timeout: float) -> list[Any] | None:
        # One deadline for the whole step, as vLLM's collective_rpc waits for its workers.
        deadline = time.monotonic() + timeout
        replies = []
        for reader in self._readers[:n]:
            reply = reader.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                return None
            replies.append(reply)
        return replies

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class _ShmcastPerWorkerReplies(ReplyPath):
    """Replies through one ``BroadcastQueue`` per worker: the worker writes, the engine is its
    only reader, and the engine reads the workers' queues in turn."""

    def __init__(self, wait: str) -> None:
        self.wait = wait

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        writer = _ShmcastWriter(1, self.wait)
        return _OwnQueueReplySender(writer, writer.queue.handle)

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        return _PerWorkerCollector([_ShmcastReader(h, 0, self.wait) for h in back_handles])


class _ShmcastGatherSender(ReplySender):
    def __init__(self, handle: Any, index: int, wait: str) -> None:
        import shmcast

        self.queue = shmcast.GatherQueue.attach(handle, writer=index, wait=wait)

    def wait_ready(self, timeout: float) -> None:
        self.queue.wait_until_ready(timeout=timeout)

    def send(self, obj: Any) -> None:
        self.queue.put(obj)

    def close(self) -> None:
        self.queue.close()


class _ShmcastGatherCollector(ReplyCollector):
    def __init__(self, queue: Any) -> None:
        import shmcast

        self.queue = queue
        self._timeout_error = shmcast.QueueTimeout

    def wait_ready(self, timeout: float) -> None:
        self.queue.wait_until_ready(timeout=timeout)

    def gather(self, n: int, timeout: float) -> list[Any] | None:
        replies = []
        for _ in range(n):
            try:
                replies.append(self.queue.get(timeout=timeout))
            except self._timeout_error:
                return None
        return replies

    def close(self) -> None:
        self.queue.close()


class _ShmcastGatherReplies(ReplyPath):
    """Replies through one ``GatherQueue``: the engine creates it and reads whichever worker
    has a reply; each worker attaches at its index."""

    def __init__(self, wait: str) -> None:
        self.wait = wait
        self._queue: Any = None

    def engine_prepare(self, n_workers: int) -> list[Any]:
        import shmcast

        self._queue = shmcast.GatherQueue(n_workers, wait=self.wait)
        return [self._queue.handle] * n_workers

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        return _ShmcastGatherSender(forward, index, self.wait)

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        return _ShmcastGatherCollector(self._queue)


class ShmcastAdapter(Adapter):
    """``shmcast.BroadcastQueue`` with its default geometry and one wait policy.

    Option ``replies``: the engine scenario's reply path, ``"gather"`` (default: one
    GatherQueue) or ``"broadcast"`` (one BroadcastQueue per worker).
    """

    name = "shmcast-futex"
    requires = ("shmcast",)
    preload = ("shmcast",)
    distributions = ("shmcast",)
    wait: ClassVar[str] = "futex"

    def __init__(self, replies: str = "gather", **options: Any) -> None:
        if replies not in ("broadcast", "gather"):
            raise ValueError(f"replies must be 'broadcast' or 'gather', not {replies!r}")
        super().__init__(replies=replies, **options)
        self.replies = replies

    def describe(self) -> dict[str, Any]:
        from shmcast import _queue

        return {
            "wait": self.wait,
            "n_slots": _queue.DEFAULT_SLOTS,
            "slot_size": _queue.DEFAULT_SLOT_SIZE,
            "reply_path": (
                "one GatherQueue"
                if self.replies == "gather"
                else "one BroadcastQueue(n_readers=1) per worker"
            ),
        }

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _ShmcastWriter(n_readers, self.wait)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _ShmcastReader(handle, index, self.wait)

    def reply_path(self) -> ReplyPath:
        # Replies travel through one GatherQueue (every worker writes, the engine reads),
        # unless the "broadcast" option asks for one BroadcastQueue per worker.
        if self.replies == "gather":
            return _ShmcastGatherReplies(self.wait)
        return _ShmcastPerWorkerReplies(self.wait)


class ShmcastSpinAdapter(ShmcastAdapter):
    name = "shmcast-spin"
    wait = "spin"


class ShmcastBackoffAdapter(ShmcastAdapter):
    name = "shmcast-backoff"
    wait = "backoff"


class ShmcastIdleAdapter(ShmcastAdapter):
    name = "shmcast-idle"
    wait = "idle"


class ShmcastFutexSpinAlwaysAdapter(ShmcastAdapter):
    """``shmcast-futex`` with its oversubscription check off (``FutexWait(detect_crowding=
    False)``: it spins whatever the load), to compare the check with the rule before it.  Not
    in a plain run: name it as
    ``--impl shmcast._tools.bench.adapters:ShmcastFutexSpinAlwaysAdapter``."""

    name = "shmcast-futex-nodetect"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "wait": "futex", "detect_crowding": False}

    def _policy(self) -> Any:
        from shmcast import FutexWait

        return FutexWait(detect_crowding=False)

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _ShmcastWriter(n_readers, self._policy())

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _ShmcastReader(handle, index, self._policy())

    def reply_path(self) -> ReplyPath:
        if self.replies == "gather":
            return _ShmcastGatherReplies(self._policy())
        return _ShmcastPerWorkerReplies(self._policy())


class _ShmcastSharedWriter(_ShmcastWriter):
    def __init__(self, n_readers: int, wait: str) -> None:
        import shmcast

        shared = shmcast.SharedBuffers(
            slabs=SHARED_SLABS, slab_size=SHARED_SLAB_SIZE, min_size=SHARED_MIN_SIZE
        )
        self.queue = shmcast.BroadcastQueue(n_readers, wait=wait, shared=shared)


class _ShmcastSharedReader(_ShmcastReader):
    def recv(self, timeout: float) -> Any:
        try:
            return self.queue.get_shared(timeout=timeout)
        except self._timeout_error:
            return None


#: The shared region of ``shmcast-shared``: eight slabs that take a 16 MiB array each (with
#: the ring, the memory of vLLM's queue as the harness configures it: ten 16 MiB chunks).
SHARED_SLABS, SHARED_SLAB_SIZE, SHARED_MIN_SIZE = 8, 16 << 20, 1 << 20


class ShmcastSharedAdapter(ShmcastAdapter):
    """``shmcast.BroadcastQueue`` with shared buffers: readers receive with ``get_shared``, so
    numpy arrays of 1 MiB and more stay in the queue's shared region (read-only views, no
    second copy).  Throughput only (the other workloads send no large arrays)."""

    name = "shmcast-shared"
    workloads = ("throughput",)
    # numpy is what it is for; imported before the case, as vLLM's readers import it with torch
    requires = ("shmcast", "numpy")
    preload = ("shmcast", "numpy")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "shared": {
                "slabs": SHARED_SLABS,
                "slab_size": SHARED_SLAB_SIZE,
                "min_size": SHARED_MIN_SIZE,
            },
            "receive": "get_shared",
        }

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _ShmcastSharedWriter(n_readers, self.wait)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _ShmcastSharedReader(handle, index, self.wait)


# -- multiprocessing.Queue ---------------------------------------------------------------------


def _mp_context() -> Any:
    """The multiprocessing context the harness starts readers with (queues must come from
    the same one)."""
    import multiprocessing

    return multiprocessing.get_context(os.environ.get("SHMCAST_BENCH_START_METHOD", "forkserver"))


class _QueueGetReader(Reader):
    """A reader on a queue with ``get(timeout=)`` raising ``queue.Empty`` on timeout."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def recv(self, timeout: float) -> Any:
        import queue as queue_module

        try:
            return self.queue.get(timeout=timeout)
        except queue_module.Empty:
            return None


class _PerReaderQueuesWriter(Writer):
    """One queue per reader; a send puts the object on each in turn."""

    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def reader_handle(self, index: int) -> Any:
        return self.queues[index]

    def send(self, obj: Any, raw: bool) -> None:
        for q in self.queues:
            q.put(obj)

    def close(self) -> None:
        # By now every reader has reported: nothing is left to flush, and joining a feeder
        # thread whose reader died would block forever.
        for q in self.queues:
            q.close()
            if hasattr(q, "cancel_join_thread"):
                q.cancel_join_thread()


class _SharedQueueSender(ReplySender):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def send(self, obj: Any) -> None:
        self.queue.put(obj)


class _SharedQueueCollector(ReplyCollector):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def gather(self, n: int, timeout: float) -> list[Any] | None:
        import queue as queue_module

        replies = []
        for _ in range(n):
            try:
                replies.append(self.queue.get(timeout=timeout))
            except queue_module.Empty:
                return None
        return replies


class _SharedQueueReplies(ReplyPath):
    """Replies through one queue that every worker puts on (a native many-to-one)."""

    def __init__(self, make_queue: Any) -> None:
        self._make_queue = make_queue
        self._queue: Any = None

    def engine_prepare(self, n_workers: int) -> list[Any]:
        self._queue = self._make_queue()
        return [self._queue] * n_workers

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        return _SharedQueueSender(forward)

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        return _SharedQueueCollector(self._queue)


class MultiprocessingQueueAdapter(Adapter):
    """``multiprocessing.Queue``, one per reader (it has no broadcast)."""

    name = "mp-queue"

    def describe(self) -> dict[str, Any]:
        return {"topology": "one multiprocessing.Queue per reader", "reply_path": "one shared"}

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        ctx = _mp_context()
        return _PerReaderQueuesWriter([ctx.Queue() for _ in range(n_readers)])

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _QueueGetReader(handle)

    def reply_path(self) -> ReplyPath:
        return _SharedQueueReplies(lambda: _mp_context().Queue())


# -- faster-fifo --------------------------------------------------------------------------------


def _faster_fifo_queue(max_message_bytes: int) -> Any:
    import faster_fifo

    # Room for a few of the largest messages (pickled), at least faster-fifo's default.
    return faster_fifo.Queue(max_size_bytes=max(200_000, 4 * (max_message_bytes + 4096)))


class FasterFifoAdapter(Adapter):
    """``faster_fifo.Queue``, one per reader."""

    name = "faster-fifo"
    requires = ("faster_fifo",)
    preload = ("faster_fifo",)
    distributions = ("faster-fifo",)

    def describe(self) -> dict[str, Any]:
        return {
            "topology": "one faster_fifo.Queue per reader",
            "max_size_bytes": "max(200000, 4 x (largest message + 4 KiB))",
            "reply_path": "one shared faster_fifo.Queue",
        }

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _PerReaderQueuesWriter(
            [_faster_fifo_queue(max_message_bytes) for _ in range(n_readers)]
        )

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _QueueGetReader(handle)

    def reply_path(self) -> ReplyPath:
        return _SharedQueueReplies(lambda: _faster_fifo_queue(64 * 1024))


# -- pyzmq PUB/SUB over ipc:// -----------------------------------------------------------------

_ZMQ_HWM = 1_000_000  # messages; PUB drops beyond this per subscriber, and we count drops
_RAW, _PICKLED = b"R", b"P"


def _zmq_encode(obj: Any, raw: bool) -> list[Any]:
    if raw:
        return [_RAW, obj]
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [_PICKLED, stream, *(b.raw() for b in buffers)]


def _zmq_decode(frames: list[Any]) -> Any:
    if frames[0] == _RAW:
        return frames[1]
    return pickle.loads(frames[1], buffers=frames[2:])


def _ipc_address() -> tuple[str, str]:
    path = os.path.join(scratch_dir(), f"zmq-{uuid.uuid4().hex[:16]}.ipc")
    record_resource(path)
    return "ipc://" + path, path


class _ZmqWriter(Writer):
    def __init__(self, n_readers: int, bind: str | None = None) -> None:
        """Over ``ipc://`` (a socket file of the run), or at ``bind`` (a tcp address)."""
        import zmq

        self.n_readers = n_readers
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)  # XPUB: sees each subscription
        self.socket.setsockopt(zmq.SNDHWM, _ZMQ_HWM)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        if bind is None:
            self.address, self._path = _ipc_address()
            self.socket.bind(self.address)
        else:
            self._path = ""
            self.socket.bind(bind)
            self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def reader_handle(self, index: int) -> Any:
        return self.address

    def wait_ready(self, timeout: float) -> None:
        # A subscription arrives asynchronously after connect(); until the writer has seen all
        # of them, PUB would drop messages for the late subscribers ("slow joiner").
        for _ in range(self.n_readers):
            if not self.socket.poll(int(timeout * 1000)):
                raise TimeoutError("not every subscriber connected")
            self.socket.recv()

    def send(self, obj: Any, raw: bool) -> None:
        self.socket.send_multipart(_zmq_encode(obj, raw))

    def close(self) -> None:
        self.socket.close(linger=1000)
        self.context.term()
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class _ZmqReader(Reader):
    def __init__(self, address: str) -> None:
        import zmq

        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, _ZMQ_HWM)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(address)

    def recv(self, timeout: float) -> Any:
        if not self.socket.poll(int(timeout * 1000)):
            return None
        return _zmq_decode(self.socket.recv_multipart())

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


class _ZmqReplySender(ReplySender):
    def __init__(self, address: str) -> None:
        import zmq

        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.connect(address)

    def send(self, obj: Any) -> None:
        self.socket.send_multipart(_zmq_encode(obj, False))

    def close(self) -> None:
        self.socket.close(linger=1000)
        self.context.term()


class _ZmqReplyCollector(ReplyCollector):
    def __init__(self, context: Any, socket: Any, path: str) -> None:
        self.context, self.socket, self._path = context, socket, path

    def gather(self, n: int, timeout: float) -> list[Any] | None:
        replies = []
        for _ in range(n):
            if not self.socket.poll(int(timeout * 1000)):
                return None
            replies.append(_zmq_decode(self.socket.recv_multipart()))
        return replies

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class _ZmqReplies(ReplyPath):
    """PUSH from every worker to one PULL socket of the engine."""

    def engine_prepare(self, n_workers: int) -> list[Any]:
        import zmq

        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        address, self._path = _ipc_address()
        self._socket.bind(address)
        return [address] * n_workers

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        return _ZmqReplySender(forward)

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        return _ZmqReplyCollector(self._context, self._socket, self._path)


class ZmqPubSubAdapter(Adapter):
    """pyzmq PUB (XPUB) / SUB over ``ipc://``; objects pickled (protocol 5, buffers as
    frames).  PUB drops messages for a subscriber past the high-water mark: the sequence check
    reports such drops."""

    name = "zmq-pubsub"
    requires = ("zmq",)
    preload = ("zmq",)
    distributions = ("pyzmq",)

    def describe(self) -> dict[str, Any]:
        return {"hwm": _ZMQ_HWM, "transport": "ipc://", "reply_path": "PUSH/PULL"}

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _ZmqWriter(n_readers)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _ZmqReader(handle)

    def reply_path(self) -> ReplyPath:
        return _ZmqReplies()


# -- vLLM's MessageQueue, and shmcast's drop-in for it ------------------------------------------

_VLLM_MODULE = "vllm.distributed.device_communicators.shm_broadcast"
_DROP_IN_MODULE = "shmcast.compat.vllm"
# vLLM's executor builds its broadcast queue with max_chunk_bytes = VLLM_MQ_MAX_CHUNK_BYTES_MB
# (16 MiB by default) and the default max_chunks (10); a larger message goes through its zmq
# socket instead of the ring (through the ring, streamed, with shmcast's drop-in).  The
# benchmark uses the same configuration for both.
_VLLM_MAX_CHUNK_BYTES = 16 * 1024 * 1024
_VLLM_MAX_CHUNKS = 10


def _message_queue_class(module: str) -> Any:
    return importlib.import_module(module).MessageQueue


def _vllm_record(queue: Any) -> None:
    handle = queue.export_handle()
    if handle.buffer_handle is None:
        return
    name = getattr(handle.buffer_handle, "name", None)  # shmcast's Handle
    if name is None:
        name = handle.buffer_handle[3]  # vLLM's (n_reader, chunk bytes, chunks, name)
    record_resource(os.path.join("/dev/shm", name))


def _vllm_release(queue: Any) -> None:
    """vLLM unlinks its segment and closes its sockets when the queue is collected."""
    with contextlib.suppress(Exception):
        queue.shutdown()
    del queue
    gc.collect()


class _VllmWriter(Writer):
    def __init__(self, module: str, n_readers: int, max_chunk_bytes: int, max_chunks: int) -> None:
        self.queue: Any = _message_queue_class(module)(
            n_readers, n_readers, max_chunk_bytes=max_chunk_bytes, max_chunks=max_chunks
        )
        _vllm_record(self.queue)

    def reader_handle(self, index: int) -> Any:
        return self.queue.export_handle()

    def wait_ready(self, timeout: float) -> None:
        self.queue.wait_until_ready()  # no timeout in vLLM's API; the case's time limit holds

    def send(self, obj: Any, raw: bool) -> None:
        self.queue.enqueue(obj)

    def close(self) -> None:
        if self.queue is not None:
            queue, self.queue = self.queue, None
            _vllm_release(queue)


class _VllmReader(Reader):
    def __init__(self, module: str, handle: Any, index: int) -> None:
        self.queue: Any = _message_queue_class(module).create_from_handle(handle, index)

    def wait_ready(self, timeout: float) -> None:
        self.queue.wait_until_ready()

    def recv(self, timeout: float) -> Any:
        try:
            return self.queue.dequeue(timeout=timeout)
        except TimeoutError:
            return None

    def recv_indefinite(self, timeout: float) -> Any:
        try:
            return self.queue.dequeue(timeout=timeout, indefinite=True)
        except TimeoutError:
            return None

    def close(self) -> None:
        if self.queue is not None:
            queue, self.queue = self.queue, None
            _vllm_release(queue)


class _VllmReplies(ReplyPath):
    """As vLLM's executor does: each worker creates a ``MessageQueue(1, 1)`` for its
    responses and the engine reads them in turn."""

    def __init__(self, module: str) -> None:
        self.module = module

    def worker_open(self, forward: Any, index: int) -> ReplySender:
        writer = _VllmWriter(self.module, 1, _VLLM_MAX_CHUNK_BYTES, _VLLM_MAX_CHUNKS)
        return _OwnQueueReplySender(writer, writer.queue.export_handle())

    def engine_connect(self, back_handles: list[Any]) -> ReplyCollector:
        return _PerWorkerCollector([_VllmReader(self.module, h, 0) for h in back_handles])


class VllmMessageQueueAdapter(Adapter):
    """vLLM's ``shm_broadcast.MessageQueue``, all readers local (shared memory)."""

    name = "vllm-mq"
    requires = ("vllm", "torch", "zmq")
    preload = (_VLLM_MODULE,)
    distributions = ("vllm", "torch")
    #: The module whose MessageQueue class this adapter runs.
    module: ClassVar[str] = _VLLM_MODULE

    def describe(self) -> dict[str, Any]:
        return {
            "max_chunk_bytes": _VLLM_MAX_CHUNK_BYTES,
            "max_chunks": _VLLM_MAX_CHUNKS,
            "note": "as vLLM's executor configures it; larger messages go through zmq",
            "reply_path": "one MessageQueue(1, 1) per worker, as vLLM's executor",
        }

    def open_writer(self, n_readers: int, max_message_bytes: int) -> Writer:
        return _VllmWriter(self.module, n_readers, _VLLM_MAX_CHUNK_BYTES, _VLLM_MAX_CHUNKS)

    def open_reader(self, handle: Any, index: int) -> Reader:
        return _VllmReader(self.module, handle, index)

    def reply_path(self) -> ReplyPath:
        return _VllmReplies(self.module)


class ShmcastVllmAdapter(VllmMessageQueueAdapter):
    """shmcast's drop-in for vLLM's MessageQueue (``shmcast.compat.vllm``), configured and
    used exactly as vLLM's: the same code runs both.

    Its processes import torch, as every vLLM process (and vllm-mq's) does: with torch loaded
    the drop-in pickles through its tensor-aware path, and the C allocator serves the large
    buffers pickle makes differently (without torch, a 1 MiB pickle stream cost this machine
    a page fault per 4 KiB, every step).
    """

    name = "shmcast-vllm"
    requires = ("shmcast", "torch")
    preload = ("torch", _DROP_IN_MODULE)
    distributions = ("shmcast", "torch")
    module = _DROP_IN_MODULE

    def describe(self) -> dict[str, Any]:
        from shmcast.compat._vllm_queue import ring_geometry

        n_slots, slot_size = ring_geometry(_VLLM_MAX_CHUNK_BYTES, _VLLM_MAX_CHUNKS)
        return {
            "max_chunk_bytes": _VLLM_MAX_CHUNK_BYTES,
            "max_chunks": _VLLM_MAX_CHUNKS,
            "n_slots": n_slots,
            "slot_size": slot_size,
            "note": "as vLLM's executor configures it; every message goes through the ring",
            "reply_path": "one MessageQueue(1, 1) per worker, as vLLM's executor",
        }


# -- registry -----------------------------------------------------------------------------------

ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (
        ShmcastAdapter,
        ShmcastSpinAdapter,
        ShmcastBackoffAdapter,
        ShmcastIdleAdapter,
        ShmcastSharedAdapter,
        MultiprocessingQueueAdapter,
        ZmqPubSubAdapter,
        FasterFifoAdapter,
        VllmMessageQueueAdapter,
        ShmcastVllmAdapter,
    )
}

from .remote_adapters import REMOTE_ADAPTERS  # noqa: E402  (it builds on the classes above)

ADAPTERS.update((cls.name, cls) for cls in REMOTE_ADAPTERS)

from .iceoryx2_adapter import Iceoryx2Adapter  # noqa: E402  (as above)

ADAPTERS[Iceoryx2Adapter.name] = Iceoryx2Adapter


def resolve(spec: str) -> type[Adapter]:
    """The adapter class named ``spec``: a registered name, or ``module:Class`` for an adapter
    defined elsewhere (its module must be importable by the reader processes too).

    Raises ValueError for an unknown name, ImportError/AttributeError for a bad reference.
    """
    if spec in ADAPTERS:
        return ADAPTERS[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise ValueError(f"{spec} is not an Adapter subclass")
        return cls
    raise ValueError(
        f"unknown implementation {spec!r}; choose from {', '.join(ADAPTERS)} or module:Class"
    )


from .aio_adapters import AIO_ADAPTERS  # noqa: E402  (they build on the classes above)

ADAPTERS.update((cls.name, cls) for cls in AIO_ADAPTERS)
