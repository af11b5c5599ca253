"""``BroadcastQueue``: one writer, many readers, every reader gets every message, in order."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _layout as L
from ._errors import (
    MessageTooLarge,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SegmentError,
    SerializationError,
)
from ._liveness import identity
from ._ring import RingReader, RingWriter, event_wait, initialize
from ._segment import Segment
from ._serialize import PickleSerializer, Serializer
from ._wait import WaitPolicy, resolve_policy

DEFAULT_SLOTS = 64
DEFAULT_SLOT_SIZE = 256 * 1024


@dataclass(frozen=True)
class Handle:
    """What a reader needs to attach: the segment's name and the nonce that proves it is the
    same queue.  Small and picklable; pass it to reader processes."""

    name: str
    nonce: int


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one endpoint, from :meth:`BroadcastQueue.stats`."""

    role: str  #: "writer" or "reader"
    reader: int | None  #: the reader index, None for the writer
    messages: int  #: messages put (writer) or taken (reader) over the queue's life
    sequence: int  #: slots published (writer) or consumed (this reader)
    waits: int  #: calls that had to wait, by this endpoint
    wait_policy: str


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout != timeout:
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    return time.monotonic() + timeout


def _as_bytes_view(part: Any) -> memoryview:
    view = part if isinstance(part, memoryview) else memoryview(part)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _close_writer(seg: Segment, writer: RingWriter, pid: int) -> None:
    if os.getpid() == pid:
        writer.close()
        seg.unlink()
        seg.close()


def _close_reader(seg: Segment, reader: RingReader, pid: int) -> None:
    if os.getpid() == pid:
        reader.detach()
        seg.close()


class BroadcastQueue:
    """A shared-memory broadcast queue: one writer, ``n_readers`` readers.

    The writer creates the queue::

        q = BroadcastQueue(n_readers=4)
        pass q.handle to each reader process

    and each reader attaches at its own index::

        q = BroadcastQueue.attach(handle, reader=i)

    Every reader receives every message, in order.  The writer never overwrites a message that
    a reader has not read (it waits: backpressure).  A message may be any size; one larger than
    the ring travels through it in pieces as the readers drain it.

    Parameters (writer):
        n_readers: how many reader indices the queue has.
        n_slots, slot_size: the ring's geometry.  A message takes ``ceil(size / slot_size)``
            slots; ``n_slots * slot_size`` bytes (the *capacity*) is the largest message that
            can be viewed in place or reserved.  Shared memory pages are only used as touched.
        wait: a wait policy or its name: ``"futex"`` (default), ``"spin"``, ``"backoff"``,
            ``"idle"``.  See :mod:`shmcast._wait`.
        serializer: encodes objects for :meth:`put` (default: pickle protocol 5 with
            out-of-band buffers).  Readers must use a compatible one.
        on_dead_reader: ``"raise"`` (default): a writer blocked by a dead reader raises
            QueueBroken; ``"drop"``: it drops that reader and goes on for the others.

    Threads: an endpoint serves one call at a time; a second concurrent call (or a call
    inside its own ``reserve``/``view`` block) raises RuntimeError rather than corrupting state.
    Processes: pass :attr:`handle`, not the queue; the queue object itself does not pickle.
    """

    _writer: RingWriter | None
    _reader: RingReader | None

    def __init__(
        self,
        n_readers: int,
        *,
        n_slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        wait: str | WaitPolicy | None = None,
        serializer: Serializer | None = None,
        on_dead_reader: str = "raise",
    ) -> None:
        geometry = L.Geometry.checked(n_readers, n_slots, slot_size)
        policy = resolve_policy(wait)
        serializer = self._check_serializer(serializer)
        seg = Segment.create(geometry.total_size)
        try:
            pid, start = identity()
            header = L.Header(
                version=L.LAYOUT_VERSION,
                kind=L.KIND_BROADCAST,
                nonce=secrets.randbits(63),
                total_size=geometry.total_size,
                geometry=geometry,
                creator_pid=pid,
                creator_start=start,
                created_ns=time.time_ns(),
            )
            initialize(seg, header)
            writer = RingWriter(seg, geometry, policy, on_dead_reader)
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        self._setup(seg, geometry, Handle(seg.name, header.nonce), serializer, writer, None)
        self._finalizer = weakref.finalize(self, _close_writer, seg, writer, pid)

    @classmethod
    def attach(
        cls,
        handle: Handle,
        reader: int,
        *,
        wait: str | WaitPolicy | None = None,
        serializer: Serializer | None = None,
    ) -> BroadcastQueue:
        """Attach the calling process as reader ``reader`` of the queue behind ``handle``.

        Raises SegmentError (no such queue, not shmcast's, another layout version, corrupted,
        or a stale handle), AttachError (index out of range or taken), TypeError (not a Handle).
        """
        if not isinstance(handle, Handle):
            raise TypeError(
                f"attach() needs the queue's handle (queue.handle), not {type(handle).__name__}"
            )
        policy = resolve_policy(wait)
        serializer = cls._check_serializer(serializer)
        seg = Segment.open(handle.name)
        try:
            header = L.Header.read(seg.buf, handle.name)
            if header.nonce != handle.nonce:
                raise SegmentError(f"stale handle: segment {handle.name!r} now holds another queue")
            RingReader.claim_index(seg.atomics, header.geometry, reader)
            ring = RingReader(seg, header.geometry, reader, policy)
        except BaseException:
            seg.close()
            raise
        self = cls.__new__(cls)
        self._setup(seg, header.geometry, handle, serializer, None, ring)
        self._finalizer = weakref.finalize(self, _close_reader, seg, ring, os.getpid())
        return self

    def _setup(
        self,
        seg: Segment,
        geometry: L.Geometry,
        handle: Handle,
        serializer: Serializer,
        writer: RingWriter | None,
        reader: RingReader | None,
    ) -> None:
        self._seg = seg
        self._geometry = geometry
        self._handle = handle
        self._serializer = serializer
        self._writer = writer
        self._reader = reader
        self._closed = False
        self._busy = threading.Lock()
        ring = writer or reader
        assert ring is not None
        self._policy = ring.policy

    @staticmethod
    def _check_serializer(serializer: Serializer | None) -> Serializer:
        if serializer is None:
            return PickleSerializer()
        if not isinstance(serializer, Serializer):
            raise TypeError("serializer must have dumps(obj) and loads(data, *, copy) methods")
        return serializer

    # -- properties ---------------------------------------------------------------------------

    @property
    def handle(self) -> Handle:
        """The picklable handle readers attach with."""
        return self._handle

    @property
    def name(self) -> str:
        """The shared-memory segment's name (in /dev/shm)."""
        return self._handle.name

    @property
    def is_writer(self) -> bool:
        return self._writer is not None

    @property
    def reader(self) -> int | None:
        """This endpoint's reader index, or None for the writer."""
        return None if self._reader is None else self._reader.index

    @property
    def n_readers(self) -> int:
        return self._geometry.n_readers

    @property
    def n_slots(self) -> int:
        return self._geometry.n_slots

    @property
    def slot_size(self) -> int:
        return self._geometry.slot_size

    @property
    def capacity(self) -> int:
        """The largest message that can be reserved or viewed in place (``n_slots*slot_size``)."""
        return self._geometry.capacity

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        role = "writer" if self._writer is not None else f"reader {self.reader}"
        state = "closed" if self._closed else "open"
        return (
            f"<BroadcastQueue {role} name={self.name!r} readers={self.n_readers} "
            f"slots={self.n_slots}x{self.slot_size} wait={self._policy.name!r} {state}>"
        )

    def __reduce__(self):
        raise TypeError(
            "a BroadcastQueue cannot be pickled; send queue.handle to the other process and "
            "call BroadcastQueue.attach(handle, reader=i) there"
        )

    def stats(self) -> QueueStats:
        """Counters of this endpoint (cheap; no locking)."""
        if self._writer is not None:
            w = self._writer
            return QueueStats("writer", None, w.messages, w.write_seq, w.waits, self._policy.name)
        r = self._reader
        assert r is not None
        return QueueStats("reader", r.index, r.messages, r.read_seq, r.waits, self._policy.name)

    # -- guards -------------------------------------------------------------------------------

    @contextmanager
    def _use(self, role: str) -> Iterator[None]:
        if self._closed:
            raise QueueClosed(f"{self!r} is closed")
        if role == "writer" and self._writer is None:
            raise RoleError(f"only the writer can send; this endpoint is reader {self.reader}")
        if role == "reader" and self._reader is None:
            raise RoleError("only readers can receive; this endpoint is the writer")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this queue endpoint is already in use: by another thread, or by an enclosing "
                "reserve()/view() block of the same thread"
            )
        try:
            yield
        finally:
            self._busy.release()

    # -- lifecycle ----------------------------------------------------------------------------

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until every reader index has been attached (the collective start).

        Any endpoint may call it.  QueueTimeout if it does not happen in time; a reader whose
        writer died raises QueueBroken.
        """
        deadline = _deadline(timeout)
        if self._closed:
            raise QueueClosed(f"{self!r} is closed")
        a, g = self._seg.atomics, self._geometry

        def all_attached() -> bool:
            return all(
                a.load32(g.reader_off(i) + L.R_STATE) != L.READER_EXPECTED
                for i in range(g.n_readers)
            )

        tick = None if self._reader is None else self._reader.tick
        if not event_wait(a, L.ATTACH_FUTEX_OFF, all_attached, deadline, self._policy.slice, tick):
            missing = [
                i
                for i in range(g.n_readers)
                if a.load32(g.reader_off(i) + L.R_STATE) == L.READER_EXPECTED
            ]
            raise QueueTimeout(f"wait_until_ready timed out; readers not attached: {missing}")

    def close(self) -> None:
        """Close this endpoint (idempotent).

        The writer marks the queue closed (readers get QueueClosed once they have read
        everything) and removes the segment's name; a reader detaches (the writer stops
        waiting for it).  Also done at interpreter exit and when the object is collected.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> BroadcastQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------

    def put(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj`` to every reader (writer only).

        Blocks while the ring is full (a reader is behind), up to ``timeout`` seconds (None:
        forever).  Raises SerializationError (nothing sent), QueueTimeout (nothing sent),
        QueueBroken (a reader died), QueueClosed, RoleError.
        """
        with self._use("writer"):
            try:
                parts = self._serializer.dumps(obj)
            except Exception as exc:
                raise SerializationError(
                    f"cannot serialize {type(obj).__name__} object: {exc}"
                ) from exc
            self._send(parts, L.MSG_OBJECT, timeout)

    def put_bytes(self, data: Any, timeout: float | None = None) -> None:
        """Send raw bytes (any buffer: bytes, bytearray, memoryview, numpy array) to every
        reader; they receive it with :meth:`get_bytes` (or :meth:`get`).  Blocks and raises as
        :meth:`put`."""
        with self._use("writer"):
            try:
                view = _as_bytes_view(data)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"put_bytes needs a contiguous buffer: {exc}") from None
            self._send((view,), L.MSG_RAW, timeout)

    def _send(self, parts: Any, kind: int, timeout: float | None) -> None:
        deadline = _deadline(timeout)
        views = [_as_bytes_view(p) for p in parts]
        total = sum(len(v) for v in views)
        writer = self._writer
        assert writer is not None
        if total <= self._geometry.capacity:
            k, region = writer.begin_contiguous(total, deadline, timeout)
            pos = 0
            for v in views:
                region[pos : pos + len(v)] = v
                pos += len(v)
            writer.commit_contiguous(k, total, kind)
        else:
            writer.write_streamed(views, total, kind, deadline, timeout)
        if self._policy.tracks_activity:
            self._policy.activity()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[memoryview]:
        """Zero-copy send: yield a writable view of ``nbytes`` bytes in the ring; fill it.

        On normal exit the bytes are published as one raw message (read with ``get_bytes``);
        if the block raises, nothing is published.  Do not keep the view (or arrays made on
        it) past the block.  MessageTooLarge if ``nbytes`` exceeds :attr:`capacity`.
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if nbytes > self._geometry.capacity:
            raise MessageTooLarge(
                f"cannot reserve {nbytes} bytes: the ring holds {self._geometry.capacity} at "
                "once (use put_bytes, which streams any size, or a larger queue)"
            )
        with self._use("writer"):
            writer = self._writer
            assert writer is not None
            k, region = writer.begin_contiguous(nbytes, _deadline(timeout), timeout)
            try:
                yield region
            except BaseException:
                raise
            else:
                writer.commit_contiguous(k, nbytes, L.MSG_RAW)
                if self._policy.tracks_activity:
                    self._policy.activity()
            finally:
                _release_quietly(region)

    # -- reading ------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Any:
        """Receive the next message (reader only): the object sent with :meth:`put`, or
        ``bytes`` for a message sent with :meth:`put_bytes` / :meth:`reserve`.

        Blocks up to ``timeout`` seconds (None: forever).  Raises QueueTimeout (nothing taken),
        QueueClosed (the writer closed and everything was read), QueueBroken (the writer died
        and everything it published was read), SerializationError (the message could not be
        decoded; it is consumed), RoleError.
        """
        with self._use("reader"):
            reader = self._reader
            assert reader is not None
            kind, data, slots = reader.next_message(_deadline(timeout), timeout)
            try:
                if kind == L.MSG_RAW:
                    return bytes(data)
                return self._decode(data, copy=slots != 0)
            finally:
                reader.finish_message(slots)
                if self._policy.tracks_activity:
                    self._policy.activity()

    def get_bytes(self, timeout: float | None = None) -> bytes:
        """Receive the next message as bytes; it must have been sent as raw bytes
        (MessageKindError otherwise, and the message stays queued).  Blocks as :meth:`get`."""
        with self._use("reader"):
            reader = self._reader
            assert reader is not None
            _kind, data, slots = reader.next_message(_deadline(timeout), timeout, L.MSG_RAW)
            try:
                return bytes(data)
            finally:
                reader.finish_message(slots)
                if self._policy.tracks_activity:
                    self._policy.activity()

    @contextmanager
    def view(self, timeout: float | None = None) -> Iterator[Any]:
        """Zero-copy receive: like :meth:`get`, but without copying out of the ring.

        Yields a read-only ``memoryview`` for a raw message, or the decoded object whose
        out-of-band buffers (numpy arrays, ...) lie in the ring.  The message's slots are held
        until the block exits (also when it raises); do not keep what it yields past the block.
        A message larger than :attr:`capacity` is assembled privately (then it is a copy).
        """
        with self._use("reader"):
            reader = self._reader
            assert reader is not None
            kind, data, slots = reader.next_message(_deadline(timeout), timeout)
            try:
                if kind == L.MSG_RAW:
                    yield data.toreadonly()
                else:
                    yield self._decode(data, copy=False)
            finally:
                _release_quietly(data)
                reader.finish_message(slots)
                if self._policy.tracks_activity:
                    self._policy.activity()

    def _decode(self, data: memoryview, copy: bool) -> Any:
        try:
            return self._serializer.loads(data, copy=copy)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot decode message: {exc}") from exc


def _release_quietly(view: memoryview) -> None:
    # BufferError: something made from the view is still alive; it goes when it is collected.
    with contextlib.suppress(BufferError):
        view.release()


__all__ = ["BroadcastQueue", "Handle", "QueueStats"]
