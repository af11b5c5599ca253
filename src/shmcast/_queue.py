"""``BroadcastQueue``: one writer, many readers; every reader gets every message, in order."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from . import _layout as L
from ._aio import BroadcastAsync
from ._endpoint import (
    Handle,
    QueueStats,
    check_serializer,
    close_side,
    deadline_of,
)
from ._errors import QueueTimeout, RoleError, SegmentError
from ._liveness import identity
from ._participants import announce, check_index, claim_line, event_wait, initialize
from ._region import (
    RegionReader,
    RegionSerializer,
    RegionWriter,
    SharedBuffers,
    attach_region,
    create_region,
)
from ._remote._options import KeyPair, RemoteOptions, host_identity
from ._ring import RingReader, RingWriter
from ._segment import Segment
from ._serialize import Serializer
from ._wait import WaitPolicy, resolve_policy

DEFAULT_SLOTS = 128
DEFAULT_SLOT_SIZE = 256 * 1024


def create_segment(
    kind: int, n_peers: int, n_slots: int, slot_size: int, checksum: bool = False
) -> tuple[Segment, L.Header, Handle]:
    """A new, initialised segment for a queue of ``kind``, already without a name in /dev/shm
    (creator only; see _segment), and the handle its peers attach with."""
    geometry = L.Geometry.checked(kind, n_peers, n_slots, slot_size)
    if not isinstance(checksum, bool):
        raise TypeError(f"checksum must be a bool, not {type(checksum).__name__}")
    seg = Segment.create(geometry.total_size)
    try:
        pid, start = identity()
        header = L.Header(
            version=L.LAYOUT_VERSION, nonce=secrets.randbits(63), geometry=geometry,
            creator_pid=pid, creator_start=start, created_ns=time.time_ns(),
            options=L.OPT_CHECKSUM if checksum else 0,
        )  # fmt: skip
        initialize(seg, header)
    finally:
        seg.unlink()  # from here on the segment lives exactly as long as its processes
    return seg, header, Handle(seg.name, header.nonce, pid, seg.fd)


def check_shared(shared: Any, serializer: Any, remote: Any, checksum: bool) -> None:
    """TypeError or ValueError unless a queue with ``shared`` can have these other options."""
    if not isinstance(shared, SharedBuffers):
        raise TypeError(f"shared must be a SharedBuffers, not {type(shared).__name__}")
    shared.checked()
    for given, what in ((serializer, "a serializer"), (remote, "remote readers")):
        if given is not None:
            raise ValueError(f"a queue with shared buffers cannot have {what} (pickle only)")
    if checksum:
        raise ValueError("a queue with shared buffers cannot have checksums (the region has none)")


def open_segment(handle: Handle, kind: int, queue: str) -> tuple[Segment, L.Header]:
    """Map the segment behind ``handle`` and check it is the ``kind`` of queue it claims."""
    if not isinstance(handle, Handle):
        raise TypeError(
            f"attach() needs the queue's handle (queue.handle), not {type(handle).__name__}"
        )
    if not isinstance(handle.nonce, int):
        raise SegmentError(f"invalid handle: nonce {handle.nonce!r}")
    seg = Segment.attach(handle.name, handle.pid, handle.fd)
    try:
        header = L.Header.read(seg.buf, handle.name)
        if header.nonce != handle.nonce:
            raise SegmentError(f"stale handle: segment {handle.name!r} now holds another queue")
        if header.geometry.kind != kind:
            other = L.KIND_NAMES[header.geometry.kind]
            raise SegmentError(f"segment {handle.name!r} holds a {other} queue, not a {queue}")
    except BaseException:
        seg.close()
        raise
    return seg, header


def wait_all_attached(seg: Segment, geometry: L.Geometry, deadline: float | None, slice_: float,
                      tick=None) -> None:  # fmt: skip
    """Block until no peer line of the segment is still *expected* (the collective start)."""
    a = seg.atomics
    lines = [geometry.peer_line(i) for i in range(geometry.n_peers)]

    def all_attached() -> bool:
        return all(a.load32(line + L.STATE) != L.EXPECTED for line in lines)

    if not event_wait(a, L.ATTACH_FUTEX_OFF, all_attached, deadline, slice_, tick):
        missing = [i for i, line in enumerate(lines) if a.load32(line + L.STATE) == L.EXPECTED]
        raise QueueTimeout(f"wait_until_ready timed out; not attached yet: {missing}")


def _is_remote(handle: Any) -> bool:
    """True when ``handle``'s writer serves remote readers and runs on another host (or
    network namespace) than the caller."""
    return (
        isinstance(handle, Handle)
        and handle.remote is not None
        and bool(handle.host)
        and handle.host != host_identity()
    )


def attach_reader_ring(seg: Segment, header: L.Header, index: int, policy: WaitPolicy,
                       label: str) -> RingReader:  # fmt: skip
    """Take reader line ``index`` for the calling process (docs/protocol.md, "Joining late"):
    a fresh index reads from the first message, one that was detached or whose process died
    from the writer's current position.  AttachError if a live process holds it."""
    ring = RingReader(seg, header.geometry.ring(), index, policy, header=header)
    ring.label = label
    line = header.geometry.peer_line(index)
    if claim_line(seg.atomics, line, f"reader index {index}") == L.EXPECTED:
        seg.atomics.store32(line + L.STATE, L.ATTACHED)
    else:
        ring.rejoin()
    announce(seg.atomics, L.ATTACH_FUTEX_OFF)
    return ring


class BroadcastQueue(BroadcastAsync):
    """A shared-memory broadcast queue: one writer, ``n_readers`` readers.

    The writer creates the queue and hands :attr:`handle` to the reader processes; each reader
    attaches at its own index::

        q = BroadcastQueue(n_readers=4)                    # writer
        r = BroadcastQueue.attach(handle, reader=i)        # reader i, in its own process

    Every reader receives every message, in order.  The writer never overwrites a message a
    reader has not read: it waits (backpressure).  A message may be any size; one larger than
    :attr:`capacity` travels through the ring in pieces as the readers drain it.

    Parameters (writer):
        n_readers: how many reader indices the queue has.
        n_slots, slot_size: the ring's geometry.  A message takes ``ceil(size / slot_size)``
            slots (at least one); ``n_slots * slot_size`` bytes is the :attr:`capacity`, the
            largest message that can be reserved or viewed in place.  The memory is reserved
            at creation (SharedMemoryFull if /dev/shm lacks room).
        wait: a wait policy or its name: ``"futex"`` (default), ``"spin"``, ``"backoff"``,
            ``"idle"`` (see :class:`~shmcast.WaitPolicy`).
        serializer: encodes objects for :meth:`put` (default: pickle protocol 5 with
            out-of-band buffers).  Readers must use a compatible one.
        on_dead_reader: ``"raise"`` (default): a writer blocked by a dead reader raises
            QueueBroken naming it; ``"drop"``: it drops that reader and goes on.
        checksum: if True, every message carries a CRC-32C of its bytes, which readers check
            when they take it, and a :meth:`view` block again when it ends (SegmentError if
            another process changed them).  Costs a pass over each message on both sides
            (about 8 GiB/s where the processor has a CRC-32C instruction), a second one for a
            view, and a copy for :meth:`reserve` (its block fills a private buffer); off by
            default.

    Closing: the writer's :meth:`close` marks the queue closed (readers get QueueClosed once
    they have read everything); a reader's detaches it (the writer stops waiting for it and the
    index may be attached again).  The segment has no name in /dev/shm once created: the
    kernel frees it when the last process that maps it is gone, however it ends.  Readers
    attach while the writer has the queue open.

    Threads: an endpoint serves one call at a time; a concurrent call (or one inside its own
    ``reserve``/``view`` block) raises RuntimeError instead of corrupting state.  Processes:
    pass :attr:`handle`; the queue object itself does not pickle.
    """

    def __init__(
        self,
        n_readers: int,
        *,
        n_slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        wait: str | WaitPolicy | None = None,
        serializer: Serializer | None = None,
        on_dead_reader: str = "raise",
        remote: RemoteOptions | None = None,
        checksum: bool = False,
        shared: SharedBuffers | None = None,
    ) -> None:
        policy = resolve_policy(wait)
        if shared is not None:
            check_shared(shared, serializer, remote, checksum)
        serializer = check_serializer(serializer)
        if remote is not None:
            if not isinstance(remote, RemoteOptions):
                raise TypeError(f"remote must be a RemoteOptions, not {type(remote).__name__}")
            remote.checked(n_readers if isinstance(n_readers, int) else 1)
        seg, header, handle = create_segment(
            L.KIND_BROADCAST, n_readers, n_slots, slot_size, checksum
        )
        publisher = None
        try:
            writer = RingWriter(seg, header.geometry.ring(), policy, on_dead_reader, header=header)
            writer.label = f"{seg.name} (writer)"
            region = None
            if shared is not None:
                rseg, info = create_region(shared, n_readers, header.nonce)
                seg.companions.append(rseg)
                region = RegionWriter(rseg, header.nonce, info.min_size, seg, writer._ring)
                serializer = RegionSerializer(writer=region)
                handle = dataclasses.replace(handle, shared=info)
            if remote is not None:
                from ._remote import start_publisher

                publisher, info = start_publisher(seg, header, remote)
                handle = dataclasses.replace(handle, host=host_identity(), remote=info)
        except BaseException:
            seg.close()
            raise
        what = f"BroadcastQueue writer of {seg.name}"
        self._setup(seg, header, handle, serializer, policy, what)
        self._region = region
        self._writer: RingWriter | None = writer
        self._reader: RingReader | None = None
        self._publisher = publisher
        # The publisher reads the ring: it finishes (sends what is left) before the unmap.
        leave = [writer.close] if publisher is None else [writer.close, publisher.finish]
        self._finalizer = weakref.finalize(self, close_side, seg, leave, os.getpid())

    @classmethod
    def attach(
        cls,
        handle: Handle,
        reader: int,
        *,
        wait: str | WaitPolicy | None = None,
        serializer: Serializer | None = None,
        network: bool | None = None,
        key: KeyPair | None = None,
        allow_pickle: bool = False,
        connect_timeout: float | None = None,
    ) -> BroadcastQueue:
        """Attach the calling process as reader ``reader`` of the queue behind ``handle``.

        A fresh index reads from the first message; an index that was detached (or whose
        process died) is taken over at the writer's current position.  Raises SegmentError (no
        such queue, not shmcast's, another layout version, corrupted, or a stale handle),
        AttachError (index out of range, or attached by a live process), TypeError (not a
        Handle).

        Remote readers (docs/remote.md): when the queue has remote slots and the handle says
        its writer runs on another host (another boot id or network namespace), the reader
        connects over ZeroMQ instead, and behaves the same.  ``network``: None (default)
        decides from the handle, True forces the network path (for a reader on the writer's
        host, such as over loopback), False forces shared memory.  ``key``: this reader's
        CURVE key pair, when the writer requires one.  ``allow_pickle``: accept pickled
        objects from a writer that is not authenticated with CURVE (off by default: unpickling
        data from an unauthenticated peer runs whatever it says).  ``connect_timeout``: how
        long to wait for the writer's answer (default 30 s; SegmentError then).
        """
        if network or (network is None and _is_remote(handle)):
            from ._remote import remote_reader

            return remote_reader(
                handle, reader, wait=wait, serializer=serializer, key=key,
                allow_pickle=allow_pickle, connect_timeout=connect_timeout,
            )  # fmt: skip
        policy = resolve_policy(wait)
        serializer = check_serializer(serializer)
        seg, header = open_segment(handle, L.KIND_BROADCAST, "broadcast queue")
        try:
            g = header.geometry
            index = check_index(reader, g.n_peers, "reader")
            if handle.shared is not None:  # the region first: attached, we may be sent to it
                rseg, _min = attach_region(handle.shared, handle.pid, header.nonce, g.n_peers)
                seg.companions.append(rseg)
                serializer = RegionSerializer(
                    reader=RegionReader(rseg, header.nonce, g.n_peers, index)
                )
            ring = attach_reader_ring(seg, header, index, policy, f"{seg.name} (reader {index})")
        except BaseException:
            seg.close()
            raise
        self = cls.__new__(cls)
        what = f"BroadcastQueue reader {index} of {seg.name}"
        self._setup(seg, header, handle, serializer, policy, what)
        self._writer = None
        self._reader = self._fast = ring
        self._publisher = None
        self._finalizer = weakref.finalize(self, close_side, seg, [ring.detach], os.getpid())
        return self

    # Remote readers: after the writer published slots, its publisher sends them at once
    # (docs/remote.md, "The publisher").
    def _send(self, writer, parts, kind, timeout, deadline=None, publish=True) -> None:
        super()._send(writer, parts, kind, timeout, deadline, publish)
        if self._publisher is not None and publish:
            self._publisher.kick()

    def put_many(self, objs, timeout=None) -> None:
        try:
            super().put_many(objs, timeout)
        finally:
            if self._publisher is not None:
                self._publisher.kick()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[memoryview]:
        with super().reserve(nbytes, timeout) as region:
            yield region
        if self._publisher is not None:
            self._publisher.kick()

    # -- properties ---------------------------------------------------------------------------

    @property
    def is_writer(self) -> bool:
        return self._writer is not None

    @property
    def reader(self) -> int | None:
        """This endpoint's reader index, or None for the writer."""
        return None if self._reader is None else self._reader.index

    @property
    def n_readers(self) -> int:
        return self._geometry.n_peers

    def __repr__(self) -> str:
        role = "writer" if self._writer is not None else f"reader {self.reader}"
        return (
            f"<BroadcastQueue {role} name={self.name!r} readers={self.n_readers} "
            f"slots={self.n_slots}x{self.slot_size} wait={self._policy.name!r} "
            f"{'closed' if self.closed else 'open'}>"
        )

    def stats(self) -> QueueStats:
        """Counters of this endpoint (cheap; no locking)."""
        if self._writer is not None:
            w = self._writer
            return QueueStats("writer", None, w.messages, w.write_seq, w.waits, self._policy.name)
        r = self._reader
        assert r is not None
        return QueueStats("reader", r.index, r.messages, r.read_seq, r.waits, self._policy.name)

    # -- lifecycle ----------------------------------------------------------------------------

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until every reader index has been attached (the collective start).

        Any endpoint may call it.  QueueTimeout (naming the missing readers) if that does not
        happen in time; a reader whose writer died raises QueueBroken.
        """
        deadline = deadline_of(timeout)
        self._guard.check()
        tick = None if self._reader is None else self._reader.tick
        wait_all_attached(self._seg, self._geometry, deadline, self._policy.slice, tick)

    # -- the put/get family -------------------------------------------------------------------

    def _sender(self) -> RingWriter:
        if self._writer is None:
            raise RoleError(f"only the writer can send; this endpoint is reader {self.reader}")
        return self._writer

    def _receive(self, deadline, timeout, want_kind, source):
        reader = self._reader
        if reader is None:
            raise RoleError("only readers can receive; this endpoint is the writer")
        return (reader, *reader.next_message(deadline, timeout, want_kind))

    def get(self, timeout: float | None = None) -> Any:
        """Receive the next message (reader only): the object sent with :meth:`put`, or
        ``bytes`` for a message sent with :meth:`put_bytes` / :meth:`reserve`.

        Blocks up to ``timeout`` seconds (None: forever).  Raises QueueTimeout (nothing taken),
        QueueClosed (the writer closed and everything was read), QueueBroken (the writer died
        and everything it published was read), SerializationError (the message could not be
        decoded; it is consumed), RoleError.
        """
        return self._get(timeout, None, None)

    def get_shared(self, timeout: float | None = None) -> Any:
        """Like :meth:`get`, but the large out-of-band buffers of the object (numpy arrays of a
        queue created with ``shared=SharedBuffers(...)``) are not copied: they are read-only
        views of the queue's shared region, which the caller may keep as long as it likes
        (the ring goes on meanwhile).  The region's piece is handed back when the last view of
        it is gone; ``numpy.array(a)`` (or ``a.copy()``) makes a private, writable copy.
        Buffers the writer could not place in the region (it was full, or they were smaller
        than ``min_size``) come as private copies, as with :meth:`get`.  On a queue without a
        region this is :meth:`get`.  Blocks and raises as :meth:`get`.
        """
        ser = self._serializer
        if not isinstance(ser, RegionSerializer):
            return self._get(timeout, None, None)
        ser.share = True
        try:
            return self._get(timeout, None, None)
        finally:
            ser.share = False

    def get_many(self, max_count: int = 64, timeout: float | None = None) -> list[Any]:
        """Receive up to ``max_count`` messages: wait up to ``timeout`` for the first, then take
        what is already there, releasing their slots together.  Each item is what :meth:`get`
        would return.  A condition met after the first message (closed, broken, a message that
        cannot be decoded) ends the batch and is raised by the next call.  Raises as
        :meth:`get` when nothing was received."""
        return self._get_many(max_count, timeout, None)

    def get_bytes(self, timeout: float | None = None) -> bytes:
        """Receive the next message as bytes.  It must have been sent as raw bytes, else
        MessageKindError is raised and the message stays queued.  Blocks as :meth:`get`."""
        return self._get(timeout, None, L.MSG_RAW)

    def view(self, timeout: float | None = None) -> AbstractContextManager[Any]:
        """Zero-copy receive: like :meth:`get`, without copying out of the ring.  Use as
        ``with queue.view() as msg:``.

        The block gets a read-only ``memoryview`` for a raw message, or the decoded object
        whose out-of-band buffers (numpy arrays, ...) lie in the ring, read-only.  The
        message's slots are held until the block exits (also when it raises), and the message
        is consumed then; do not keep what it gives past the block.  A message larger than
        :attr:`capacity` is assembled privately (a copy, then).  Waits and raises as
        :meth:`get` does, when called (before the block).  On a queue with checksums the
        block's exit raises SegmentError if the message's bytes changed in the ring while the
        block ran (another process wrote there); the message is then not consumed.
        """
        return self._view(timeout, None)


__all__ = ["BroadcastQueue"]
