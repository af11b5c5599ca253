"""What every queue endpoint shares: guards, lifecycle, and the put/get family over rings.

A concrete queue (:class:`~shmcast.BroadcastQueue`, :class:`~shmcast.GatherQueue`) creates or
attaches to a segment and says which ring this endpoint writes (``_sender``) and which it reads
(``_receive``); everything else, encoding straight into the ring, zero-copy blocks, timeouts,
closing, lives here once.

**Exceptions at any point.**  A signal handler may raise (KeyboardInterrupt) between any two
statements of a call.  Every call runs inside the endpoint's native :class:`~shmcast._native.
Guard`, which is given back whatever the block raises; every change of a position is one native
call (see ``_ring``); and a message is *delivered or still there*:

- an exception before the native call that takes a message (while waiting, decoding, copying)
  leaves the message in the queue: it is only released on success, or on a
  SerializationError (which consumes it, as documented);
- an exception after that call, before the value reaches the caller, leaves the value in
  ``_undelivered``, and the next receive returns it first.  The hand-over into
  ``_undelivered`` runs in ``finally`` clauses and ``except`` handlers, which CPython enters
  for an exception raised at any instruction of the guarded range, and the receive paths
  return values through statements that make no call (CPython runs signal handlers only at
  calls and backward jumps).  What remains: a second exception raised inside that handler.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _layout as L
from ._errors import (
    MessageKindError,
    MessageTooLarge,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    SegmentError,
    SerializationError,
)
from ._native import Guard, Hold, crc32c
from ._ring import RingReader, RingWriter, _kind_mismatch
from ._segment import Segment
from ._serialize import PickleSerializer, Serializer
from ._wait import WaitPolicy


@dataclass(frozen=True)
class Handle:
    """What a peer needs to attach: the segment's name, the nonce that proves it is the same
    queue, and the creator's pid and open descriptor, through which the segment (which has no
    name in /dev/shm once created) is reached.  Small and picklable; pass it to the other
    processes.  Valid while the creator keeps the queue open.

    A queue with remote reader slots also records where its writer runs (``host``: boot id and
    network namespace) and how to reach it over the network (``remote``); a reader on another
    host attaches through the network with the same handle.
    """

    name: str
    nonce: int
    pid: int
    fd: int
    host: str = ""  #: the writer's host identity ("" when the queue has no remote slots)
    remote: Any = None  #: the remote path's RemoteInfo, or None
    shared: Any = None  #: the shared region's RegionInfo (SharedBuffers), or None


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one endpoint's counters, from ``stats()``."""

    role: str  #: "writer" or "reader"
    index: int | None  #: this endpoint's reader (broadcast) or writer (gather) index
    messages: int  #: messages put or taken by this endpoint's ring(s)
    sequence: int  #: slots published or consumed
    waits: int  #: calls that had to wait
    wait_policy: str


def check_timeout(timeout: float | None) -> None:
    """TypeError or ValueError unless ``timeout`` is None or a number of seconds >= 0."""
    if timeout is None:
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout != timeout:
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")


def check_max_count(max_count: object) -> None:
    """ValueError unless ``max_count`` (of ``get_many``) is a positive int."""
    if not isinstance(max_count, int) or isinstance(max_count, bool) or max_count < 1:
        raise ValueError(f"max_count must be a positive int, got {max_count!r}")


def deadline_of(timeout: float | None) -> float | None:
    """Absolute monotonic deadline for a ``timeout`` argument (None: no deadline).

    The fast paths, which never wait, only check the argument (:func:`check_timeout`); the
    deadline is taken when a call first has to wait, a few microseconds after it started.
    """
    check_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


def as_bytes_view(part: Any) -> memoryview:
    """A flat byte view of any contiguous buffer, C or Fortran order (its bytes as they lie in
    memory).  TypeError for an object without the buffer protocol (or a str), BufferError for
    a buffer that is not contiguous."""
    if isinstance(part, str):
        raise TypeError("a str is not a buffer (encode it first)")
    view = part if isinstance(part, memoryview) else memoryview(part)
    if view.ndim == 1 and view.format == "B":  # strided too: the native copy keeps the order
        return view
    if view.c_contiguous:
        return view.cast("B")
    return pickle.PickleBuffer(view).raw()  # Fortran order; BufferError if not contiguous


def check_parts(parts: Any) -> Sequence[Any]:
    """The parts a serializer's ``dumps`` returned, if they are a list or tuple of contiguous
    buffers or deferred parts; SerializationError saying what they are otherwise."""
    if not isinstance(parts, (list, tuple)):
        raise SerializationError(
            f"the serializer's dumps() must return a list or tuple of buffers, not "
            f"{type(parts).__name__}"
        )
    for i, part in enumerate(parts):
        if hasattr(part, "write_into"):  # a DeferredPart: its length must be a byte count
            size = len(part)
            if not isinstance(size, int) or size < 0:
                raise SerializationError(f"deferred part {i} has a bad length {size!r}")
            continue
        try:
            as_bytes_view(part)
        except (TypeError, ValueError, BufferError) as exc:
            raise SerializationError(
                f"part {i} returned by the serializer's dumps() is not a contiguous buffer "
                f"({type(part).__name__}: {exc})"
            ) from None
    return parts


def materialize(part: Any) -> Any:
    """A buffer with the bytes of ``part``: the part itself, or what a DeferredPart writes."""
    if type(part) is bytes or not hasattr(part, "write_into"):
        return part
    data = bytearray(len(part))
    part.write_into(memoryview(data))
    return data


def release_quietly(view: memoryview) -> None:
    # BufferError: something made from the view is still alive; it goes when it is collected.
    with contextlib.suppress(BufferError):
        view.release()


def close_side(seg: Segment, leave: list[Callable[[], None]], pid: int, unmap: bool = True) -> None:
    """Close one endpoint's side of a segment: ``leave`` (close a writer's ring, detach a
    reader's), then unmap unless told not to.  Only in the process that opened it: a forked
    child that inherited the object does nothing."""
    if os.getpid() != pid:
        return
    for step in leave:
        step()
    if unmap:
        seg.close()


def check_serializer(serializer: Serializer | None) -> Serializer:
    if serializer is None:
        return PickleSerializer()
    if not isinstance(serializer, Serializer):
        raise TypeError("serializer must have dumps(obj) and loads(data, *, copy) methods")
    return serializer


class Endpoint:
    """Base class of the queues.  Subclasses set the attributes in ``_setup``, set
    ``_finalizer`` (a ``weakref.finalize`` whose function takes ``unmap=``: it closes this
    endpoint's side for its peers, and unmaps unless told not to), and implement ``_sender``
    and ``_receive``."""

    _seg: Segment
    _geometry: L.Geometry
    _handle: Handle
    _serializer: Serializer
    _policy: WaitPolicy
    _guard: Guard
    _finalizer: weakref.finalize

    def _setup(self, seg: Segment, header: L.Header, handle: Handle, serializer: Serializer,
               policy: WaitPolicy, what: str) -> None:  # fmt: skip
        self._seg = seg
        self._geometry = header.geometry
        self._checksum = header.checksum
        self._handle = handle
        self._serializer = serializer
        #: Parts from shmcast's own serializers (a class that says so in its own body, so that
        #: a subclass overriding dumps() is checked) are known good; others are checked.
        self._check_parts = not vars(type(serializer)).get("trusted_parts", False)
        self._policy = policy
        #: The writer's shared region (SharedBuffers), told when a message is sent or not.
        self._region: Any = None
        #: One call at a time, in this process only, until closed; unmaps once closed and idle.
        self._guard = Guard(what, seg.close)
        self._deferred_error: SerializationError | None = None
        #: (kind, value, sender) of messages taken by a call that an exception interrupted
        #: after the message left the ring; the next receive returns them first.
        self._undelivered: list[tuple[int, Any, int]] = []
        #: The ring index (a gather queue's writer) of the message received last.
        self._last = -1
        #: The one ring this endpoint reads, when a plain get has just one (a broadcast
        #: reader): get() looks there first, without going through _receive.
        self._fast: RingReader | None = None

    # -- to be provided by each queue ---------------------------------------------------------

    def _sender(self) -> RingWriter:
        """The ring this endpoint writes; RoleError (or QueueClosed) if it cannot send."""
        raise NotImplementedError

    def _receive(self, deadline: float | None, timeout: float | None, want_kind: int | None,
                 source: int | None) -> tuple[RingReader, int, memoryview, int]:  # fmt: skip
        """Wait for the next message; return (ring, kind, data, slots) as
        :meth:`RingReader.next_message` does, with the ring to finish it on."""
        raise NotImplementedError

    # -- common properties --------------------------------------------------------------------

    @property
    def handle(self) -> Handle:
        """The picklable handle the other processes attach with."""
        return self._handle

    @property
    def name(self) -> str:
        """The shared-memory segment's name (shown by ``shmcast ls``; it has no entry in
        /dev/shm once the queue exists)."""
        return self._handle.name

    @property
    def n_slots(self) -> int:
        return self._geometry.n_slots

    @property
    def slot_size(self) -> int:
        return self._geometry.slot_size

    @property
    def capacity(self) -> int:
        """The largest message that can be reserved or viewed in place (``n_slots*slot_size``);
        larger messages are streamed through the ring."""
        return self._geometry.capacity

    @property
    def checksum(self) -> bool:
        """Whether messages carry a CRC-32C that readers check (set by the creator)."""
        return self._checksum

    @property
    def closed(self) -> bool:
        """True once this endpoint was closed."""
        return self._guard.closed

    def __reduce__(self):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled; send queue.handle to the other "
            f"process and attach there with {type(self).__name__}.attach(handle, ...)"
        )

    def _activity(self) -> None:
        if self._policy.tracks_activity:
            self._policy.activity()

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close this endpoint (idempotent).  Also done at interpreter exit and when the object
        is collected.  See the queue's own documentation for what closing means to peers.

        May be called from another thread while a call of this endpoint blocks: that call
        returns with QueueClosed, and the segment is unmapped once it has.  In a process forked
        from the endpoint's own it only forgets the endpoint (the parent's is unaffected).
        """
        if self._guard.closed:
            return
        job = self._finalizer.detach()  # None if it already ran (interpreter exit)
        if job is not None:
            _obj, close_peer_side, args, _kwargs = job
            close_peer_side(*args, unmap=False)
        self._guard.close()  # unmaps now if idle, else when the call in flight leaves

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------------

    def put(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj``.

        Blocks until the readers have freed room for the message (backpressure), up to
        ``timeout`` seconds (None: forever).  Raises SerializationError (nothing sent),
        QueueTimeout (nothing sent), QueueBroken (a reader died), QueueClosed, RoleError (this
        endpoint cannot send), InheritedEndpoint (used in a forked child).
        """
        with self._guard:
            self._send_object(self._sender(), obj, timeout)

    def put_bytes(self, data: Any, timeout: float | None = None) -> None:
        """Send raw bytes (any contiguous buffer, C or Fortran order: bytes, bytearray,
        memoryview, numpy array); received with ``get_bytes`` (or ``get``).  Blocks and raises
        as :meth:`put`; TypeError for an object that is not a contiguous buffer."""
        with self._guard:
            writer = self._sender()
            try:
                view = as_bytes_view(data)
            except (TypeError, ValueError, BufferError) as exc:
                raise TypeError(f"put_bytes needs a contiguous buffer: {exc}") from None
            self._send(writer, (view,), L.MSG_RAW, timeout)

    def put_many(self, objs: Iterable[Any], timeout: float | None = None) -> None:
        """Send several objects, in order, publishing them together (fewer wake-ups).

        ``timeout`` bounds the whole call.  Messages are published at the latest when the call
        returns, and before any wait for room, so a batch never holds readers back.  On an
        error the messages before the failing one have been sent: the exception's ``sent``
        attribute says how many.  Raises as :meth:`put`.
        """
        with self._guard:
            writer = self._sender()
            deadline = deadline_of(timeout)
            sent = 0
            try:
                for obj in objs:
                    self._send_object(writer, obj, timeout, deadline, False)
                    sent += 1
            except BaseException as exc:
                exc.sent = sent  # type: ignore[attr-defined]
                raise
            finally:
                writer.flush()

    def _send_object(self, writer: RingWriter, obj: Any, timeout: float | None,
                     deadline: float | None = None, publish: bool = True) -> None:  # fmt: skip
        region = self._region
        if region is None:
            self._send(writer, self._encode(obj), L.MSG_OBJECT, timeout, deadline, publish)
            return
        if deadline is None:
            check_timeout(timeout)
            deadline = deadline_of(timeout)
        region.deadline, region.flush = deadline, writer.flush
        try:  # the slabs the encoding filled are the message's once it is sent, else free
            self._send(writer, self._encode(obj), L.MSG_OBJECT, timeout, deadline, publish)
        except BaseException:
            region.abandon()
            raise
        region.sent(writer.cursor.pos)

    def _encode(self, obj: Any) -> Any:
        try:
            parts = self._serializer.dumps(obj)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize {type(obj).__name__} object: {exc}"
            ) from exc
        return check_parts(parts) if self._check_parts else parts

    def _send(self, writer: RingWriter, parts: Any, kind: int, timeout: float | None,
              deadline: float | None = None, publish: bool = True) -> None:  # fmt: skip
        if deadline is None:
            check_timeout(timeout)  # whichever path is taken
        # The fast path: a contiguous message that fits before the ring's end in slots known
        # to be free is stored and published by one native call.  Anything else (the ring
        # must wrap or is full, the message is larger than the ring, parts that are not plain
        # contiguous buffers) takes the general path below, which waits, streams, or says why.
        try:
            if writer.cursor.put(parts, kind, publish):
                self._activity()
                return
        except (BufferError, TypeError):
            pass
        if deadline is None:
            deadline = deadline_of(timeout)
        # bytes need no wrapping: a slice of the ring takes them as they are.  A part with
        # write_into (a DeferredPart) writes itself into its place.
        views = [p if type(p) is bytes or hasattr(p, "write_into") else as_bytes_view(p)
                 for p in parts]  # fmt: skip
        total = sum(len(v) for v in views)
        if total <= self._geometry.capacity:
            k, region = writer.begin_contiguous(total, kind, deadline, timeout)
            crc = 0 if self._checksum else None  # of the source bytes, as copied
            try:
                pos = 0
                for v in views:
                    n = len(v)
                    if type(v) is bytes or not hasattr(v, "write_into"):
                        region[pos : pos + n] = v
                        if crc is not None:
                            crc = crc32c(v, crc)
                    elif crc is None:
                        v.write_into(region[pos : pos + n])
                    else:  # the CRC of what it wrote, not of the ring (see reserve)
                        private = bytearray(n)
                        v.write_into(memoryview(private))
                        region[pos : pos + n] = private
                        crc = crc32c(private, crc)
                    pos += n
            finally:
                release_quietly(region)
            writer.commit_contiguous(k, total, publish, crc)
        else:
            streamed = [memoryview(materialize(v)) for v in views]
            writer.write_streamed(streamed, total, kind, deadline, timeout)
        self._activity()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[memoryview]:
        """Zero-copy send: yield a writable view of ``nbytes`` bytes in the ring, to fill.

        On normal exit the bytes are published as one raw message (read with ``get_bytes``);
        if the block raises, nothing is published.  Do not keep the view, or arrays made on it,
        past the block.  MessageTooLarge if ``nbytes`` exceeds :attr:`capacity`.  Blocks and
        raises as :meth:`put` while waiting for room.

        On a queue with checksums the view is a private buffer, copied into the ring at the
        block's end: the CRC-32C is then that of the bytes the caller wrote, which a process
        writing into the ring meanwhile cannot change unseen (one copy more than without
        checksums).
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if nbytes > self._geometry.capacity:
            raise MessageTooLarge(
                f"cannot reserve {nbytes} bytes: the ring holds {self._geometry.capacity} at "
                "once (put_bytes streams any size; or create the queue with more or larger slots)"
            )
        with self._guard:
            writer = self._sender()
            k, region = writer.begin_contiguous(nbytes, L.MSG_RAW, deadline_of(timeout), timeout)
            private = memoryview(bytearray(nbytes)) if self._checksum else None
            try:
                yield region if private is None else private
                crc = None
                if private is not None:
                    region[:] = private
                    crc = crc32c(private)
            finally:
                release_quietly(region)
                if private is not None:
                    release_quietly(private)
            writer.commit_contiguous(k, nbytes, crc=crc)
            self._activity()

    # -- receiving ----------------------------------------------------------------------------

    def _raise_deferred(self) -> None:
        """A decoding error met inside a get_many batch is raised by the next receive."""
        if self._deferred_error is not None:
            error, self._deferred_error = self._deferred_error, None
            raise error

    def _take_undelivered(self, want_kind: int | None) -> tuple[int, Any, int]:
        """``(kind, value, sender)`` of the first message an interrupted call took;
        MessageKindError if it is not of ``want_kind`` (it stays).  Makes no call once the
        check is done (see the module docstring)."""
        entry = self._undelivered[0]
        if want_kind is not None and entry[0] != want_kind:
            raise MessageKindError(_kind_mismatch(entry[0]))
        del self._undelivered[0]
        self._last = entry[2]
        return entry

    def _get(self, timeout: float | None, source: int | None, want_kind: int | None) -> Any:
        handed = None  # (kind, value, sender) of a message taken out of the ring for good
        try:
            with self._guard:
                if self._undelivered:
                    handed = self._take_undelivered(want_kind)
                    return handed[1]
                self._raise_deferred()
                check_timeout(timeout)
                # The fast path: with one ring to read, a contiguous message already published
                # is found by one native call, without the general machinery of _receive; raw
                # bytes are even copied out and released by that same call.
                fast = self._fast
                if fast is not None and fast.streaming:
                    fast = None  # a streamed message comes first
                if fast is not None and want_kind == L.MSG_RAW:
                    cursor = fast.cursor
                    taken = cursor.msgs
                    try:
                        raw = cursor.take_bytes(L.MSG_RAW)
                    finally:
                        if cursor.msgs != taken:
                            handed = (L.MSG_RAW, cursor.last, self._last)
                            cursor.last = None
                    if raw is not None:
                        self._activity()
                        return raw
                head = None if fast is None else fast.cursor.next()
                if head is not None and (want_kind is None or head[0] == want_kind):
                    kind, off, total, slots = head
                    ring, data = fast, self._seg.buf[off : off + total]
                else:
                    ring, kind, data, slots = self._receive(
                        deadline_of(timeout), timeout, want_kind, source
                    )
                cursor = ring.cursor
                try:
                    value = self._owned(ring, kind, data, slots)
                except SerializationError:
                    cursor.finish(slots, False)  # consumed, as documented
                    raise
                # Any other exception leaves the message in the queue.  From here on it is
                # handed over, to the caller or, if interrupted, to the next call.
                taken = cursor.msgs
                try:
                    cursor.finish(slots, False)
                finally:
                    if cursor.msgs != taken:
                        handed = (kind, value, self._last)
                        self._activity()
                return value
        except BaseException:
            if handed is not None:
                self._undelivered.insert(0, handed)
            raise

    def _get_many(self, max_count: int, timeout: float | None, source: int | None) -> list[Any]:
        check_max_count(max_count)
        taken_out: list[tuple[int, Any, int]] = []  # (kind, value, sender) taken for good
        out: list[Any] = []  # their values, returned
        try:
            with self._guard:
                while self._undelivered and len(taken_out) < max_count:
                    taken_out.append(self._take_undelivered(None))
                    out.append(taken_out[-1][1])
                if out:
                    return out
                self._raise_deferred()
                rings: set[RingReader] = set()
                deadline = deadline_of(timeout)
                try:
                    while len(out) < max_count:
                        try:
                            ring, kind, data, slots = self._receive(deadline, timeout, None,
                                                                    source)  # fmt: skip
                        except (QueueTimeout, QueueClosed, QueueBroken):
                            if out:
                                break  # deliver what we have; the condition shows next call
                            raise
                        rings.add(ring)
                        cursor = ring.cursor
                        try:
                            value = self._owned(ring, kind, data, slots)
                        except SerializationError as exc:
                            cursor.finish(slots, True)
                            if not out:
                                raise
                            self._deferred_error = exc  # raised by the next call, in order
                            break
                        taken = cursor.msgs
                        try:
                            cursor.finish(slots, True)
                        finally:
                            if cursor.msgs != taken:
                                taken_out.append((kind, value, self._last))
                                out.append(value)
                        deadline = time.monotonic()  # after the first: only what is there now
                finally:
                    for ring in rings:
                        ring.flush()
                    self._activity()
                return out
        except BaseException:
            self._undelivered[:0] = taken_out
            raise

    def _view(self, timeout: float | None, source: int | None) -> Hold:
        """The message for a ``view()`` block: a native :class:`~shmcast._native.Hold` that
        holds this endpoint's guard until the block exits.  Until the block is entered,
        nothing is consumed: an exception here, or before the ``with`` enters it, leaves the
        message in the queue (and gives the guard back when the Hold is dropped)."""
        hold = self._guard.hold()
        try:
            if self._undelivered:
                entry = self._undelivered[0]
                self._last = entry[2]
                hold.set(entry[1], stash=self._undelivered)  # taken from there when entered
                return hold
            self._raise_deferred()
            ring, kind, data, slots = self._receive(deadline_of(timeout), timeout, None, source)
            # Read-only, so that no reader can change what the others receive: the raw view,
            # and every buffer a decoded object is built on (numpy arrays come out read-only).
            given = data.toreadonly()
            try:
                value = given if kind == L.MSG_RAW else self._decode(given, False)
            except SerializationError:
                release_quietly(given)
                release_quietly(data)
                ring.cursor.finish(slots, False)  # consumed, as documented
                raise
            hold.set(value, cursor=ring.cursor, slots=slots, views=(given, data))
            self._activity()
            return hold
        except BaseException:
            hold.release()  # now, not when the traceback that holds this frame goes
            raise

    def _owned(self, ring: RingReader, kind: int, data: memoryview, slots: int) -> Any:
        """The value of a received message as the caller owns it: bytes for a raw message,
        else the decoded object with its buffers copied out of the ring.  With checksums,
        the message is copied out first and the copy is checked against its CRC-32C, so
        that what was checked is what is decoded, whatever is written into the ring
        meanwhile.  (A streamed message, ``slots == 0``, is private and checked already.)"""
        if not (self._checksum and slots):
            return bytes(data) if kind == L.MSG_RAW else self._decode(data, slots != 0)
        copy = bytes(data) if kind == L.MSG_RAW else bytearray(data)
        ring.check_copy(copy)
        return copy if kind == L.MSG_RAW else self._decode(memoryview(copy), False)

    def _decode(self, data: memoryview, copy: bool) -> Any:
        try:
            return self._serializer.loads(data, copy=copy)
        except (SerializationError, SegmentError):  # SegmentError: a shared region's check
            raise
        except Exception as exc:
            raise SerializationError(f"cannot decode message: {exc}") from exc
