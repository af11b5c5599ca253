"""vLLM's ``MessageQueue`` API (as of vLLM 0.33.0), built on :class:`~shmcast.BroadcastQueue`.

One writer, ``n_reader`` readers; the ``n_local_reader`` readers on this host read through one
shmcast ring.  What the original carries over ZeroMQ on this host (messages larger than a
chunk, the start-up handshake, wake-ups) shmcast does in shared memory: large messages stream
through the ring, ``wait_until_ready`` waits for every reader to attach, waiting sleeps on a
futex.  Readers on other hosts (``n_local_reader < n_reader``) are remote slots of the same
ring, served over ZeroMQ TCP by shmcast's remote path (:mod:`shmcast.compat._remote`).

Errors, where callers catch them, are the original's: every timeout is a ``TimeoutError``
(:class:`~shmcast.QueueTimeout`); a call that waits when :meth:`MessageQueue.shutdown` is
called from another thread raises ``RuntimeError`` whose message contains "cancelled" (the
writer's as well as a reader's).  Where the original would wait forever, shmcast's errors say
why: :class:`~shmcast.QueueBroken` when a peer died (the writer stops within about a second
of a reader's death; a reader after reading what a dead writer published),
:class:`~shmcast.QueueClosed` to a reader once the writer shut down and everything was read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .. import _layout as L
from .._errors import QueueClosed, QueueTimeout, RoleError, SerializationError
from .._queue import BroadcastQueue
from . import _remote
from ._tensors import TensorSerializer
from ._vllm_attrs import RingFlags, SpinCondition

log = logging.getLogger("shmcast.compat.vllm")

MIB = 1024 * 1024
DEFAULT_MAX_CHUNK_BYTES = 24 * MIB
DEFAULT_MAX_CHUNKS = 10
#: The largest slot the drop-in uses: a chunk of vLLM's becomes several slots of the ring, so
#: that small messages take little room and large ones stream.
MAX_SLOT_SIZE = 256 * 1024
#: Seconds a call may wait before logging whom it waits for, as vLLM's setting of that name.
WARNING_INTERVAL_ENV = "VLLM_RINGBUFFER_WARNING_INTERVAL"


def warning_interval() -> float | None:
    """Seconds between long-wait log lines: ``$VLLM_RINGBUFFER_WARNING_INTERVAL`` (vLLM's
    setting; default 60), None if it is 0 or negative."""
    raw = os.environ.get(WARNING_INTERVAL_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{WARNING_INTERVAL_ENV} must be a number of seconds, not {raw!r}"
        ) from None
    return value if value > 0 else None


def ring_geometry(max_chunk_bytes: int, max_chunks: int) -> tuple[int, int]:
    """``(n_slots, slot_size)`` of the ring for vLLM's chunk geometry.

    The ring holds as many bytes as the original's ``max_chunks`` chunks of
    ``max_chunk_bytes`` (its room for messages in flight), cut into slots of at most
    :data:`MAX_SLOT_SIZE`.  A message of up to a chunk is written in place; a larger one (the
    original sends it over a socket) streams through the ring.

    And a whole chunk fits wherever the writer stands once the readers have read everything
    (what ``acquire_write`` needs to go on as soon as the last message was read, as in the
    original): a message in place cannot wrap around the ring's end, so the slots before the
    end become padding, up to one chunk's slots less one.  With two chunks or more the ring
    has that room already; with one it gets that many slots more.
    """
    for name, value in (("max_chunk_bytes", max_chunk_bytes), ("max_chunks", max_chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    total = max_chunk_bytes * max_chunks

    def slots(size: int) -> int:
        return max(2, _ceil_div(total, size), 2 * _ceil_div(max_chunk_bytes, size) - 1)

    slot = min(_round_up(max_chunk_bytes, L.SLOT_ALIGN), MAX_SLOT_SIZE)
    if slots(slot) > L.MAX_SLOTS:  # an enormous ring: fewer, larger slots
        room = max(total, 2 * max_chunk_bytes)
        slot = _round_up(_ceil_div(room, L.MAX_SLOTS - 1), L.SLOT_ALIGN)
    return slots(slot), slot


def map_slot_heads(queue: BroadcastQueue) -> int:
    """Map, in the calling process, the pages of ``queue``'s ring that a small message
    touches: the slot descriptors and the first page of every slot.  Returns how many pages
    it looked at.

    The ring of the drop-in has many slots (640 of 256 KiB for vLLM's executor queue), and
    each small message takes the next one, so that each of a process's first trips round
    the ring takes a page fault per message, in the writer and in every reader: about a dozen
    per step of an executor loop with 12 workers, for its first 640 steps, measured at about
    a tenth of the loop's CPU time then (docs/vllm.md, "How it compares").  Looking at each
    page once, when the queue is created or joined, maps them all at once (a few
    milliseconds per queue).  The memory was reserved when the queue was created: this
    adds page-table entries, not memory.  Nothing is written.
    """
    buf = queue._seg.buf
    ring = queue._geometry.ring()
    page = L.PAGE
    first = ring.desc_off - ring.desc_off % page
    end = ring.desc_off + L.DESC_SIZE * ring.n_slots
    heads = [*range(first, end, page), *(ring.data_at(i) for i in range(ring.n_slots))]
    seen = 0
    for offset in heads:
        seen |= buf[offset]  # a read: enough to map a page of a shared mapping writable
    return len(heads)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, align: int) -> int:
    return _ceil_div(n, align) * align


@dataclass
class Handle:
    """What a reader needs to join a :class:`MessageQueue`: picklable; pass it to the readers
    (``export_handle()``, then ``MessageQueue.create_from_handle(handle, rank)``).

    The fields up to ``tensor_arena_handle`` are vLLM's, so that code which reads them keeps
    working: ``local_reader_ranks`` (the ranks that read through shared memory, in reader
    order), ``buffer_handle`` (here the ring's :class:`shmcast.Handle`, which remote readers
    attach with too; None without readers), ``remote_subscribe_addr`` (the address the
    writer's socket for remote readers is bound on; None without remote readers) and
    ``remote_addr_ipv6``.
    ``local_subscribe_addr``, ``local_notify_addr`` and ``tensor_arena_handle`` are always None:
    no socket and no separate tensor arena are needed on this host.  The fields after them are
    shmcast's own.
    """

    local_reader_ranks: list[int] = field(default_factory=list)
    buffer_handle: Any = None
    local_subscribe_addr: str | None = None
    local_notify_addr: str | None = None
    remote_subscribe_addr: str | None = None
    remote_addr_ipv6: bool = False
    tensor_arena_handle: Any = None
    #: The writer's process id, to name it in long-wait log lines.
    writer_pid: int = 0
    #: The chunk size the writer asked for (the size of an ``acquire_write`` block).
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES


def _check_reader_counts(n_reader: Any, n_local_reader: Any, ranks: Any) -> list[int]:
    for name, value in (("n_reader", n_reader), ("n_local_reader", n_local_reader)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if n_local_reader > n_reader:
        raise ValueError(f"n_local_reader ({n_local_reader}) exceeds n_reader ({n_reader})")
    if ranks is None:
        return list(range(n_local_reader))
    ranks = list(ranks)
    if len(ranks) != n_local_reader:
        raise ValueError(
            f"local_reader_ranks has {len(ranks)} ranks, but n_local_reader is {n_local_reader}"
        )
    if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
        raise ValueError(f"local_reader_ranks must be ints, got {ranks!r}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"local_reader_ranks has a rank twice: {ranks!r}")
    return ranks


class MessageQueue:
    """A drop-in for vLLM's ``shm_broadcast.MessageQueue``: one writer, ``n_reader`` readers.

    The writer constructs it and passes :meth:`export_handle` to the readers, which join with
    :meth:`create_from_handle`; then every process calls :meth:`wait_until_ready`, the writer
    :meth:`enqueue` and each reader :meth:`dequeue`, every reader receiving every object, in
    order.  Objects are pickled with protocol 5; numpy arrays and CPU torch tensors travel out
    of band, copied once into shared memory and once out into memory the reader owns.

    Parameters are the original's.  ``max_chunk_bytes`` and ``max_chunks`` size the ring (the
    same bytes as the original's chunks, and room for a whole chunk wherever the writer stands,
    see :func:`ring_geometry`); a message of any size can be sent.  ``connect_ip``: where the
    socket of the ``n_reader - n_local_reader`` readers on other hosts is bound (None: this
    host's address, as vLLM picks it; zmq.ZMQError for an address this host does not have; see
    :mod:`shmcast.compat._remote`, also for security: as vLLM's, remote readers unpickle what
    they receive, unauthenticated).  ``enable_shm_tensor_arena`` is accepted and has nothing
    to do: tensors already travel straight into shared memory.

    Two of the original's private attributes are kept where the drop-in has what they stand
    for (None on a remote reader and without readers; :mod:`shmcast.compat._vllm_attrs`):
    ``_spin_condition``, how this end waits, with vLLM's knobs ``busy_loop_s`` and
    ``last_read``; ``buffer``, a read-only look at the ring's slots whose ``get_metadata(i)``
    yields vLLM's form of flag bytes for slot ``i``.

    Threads: one call at a time per queue, except :meth:`shutdown`, which any thread may call
    while a call waits.
    """

    handle: Handle
    shutting_down: bool

    def __init__(
        self,
        n_reader: int,
        n_local_reader: int,
        local_reader_ranks: list[int] | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        connect_ip: str | None = None,
        enable_shm_tensor_arena: bool = False,
    ) -> None:
        ranks = _check_reader_counts(n_reader, n_local_reader, local_reader_ranks)
        n_slots, slot_size = ring_geometry(max_chunk_bytes, max_chunks)
        self.n_local_reader = n_local_reader
        self.n_remote_reader = n_reader - n_local_reader
        self._init_common(writer=True)
        self._serializer = TensorSerializer()
        self._max_chunk_bytes = max_chunk_bytes
        if n_reader > 0:
            remote = None
            if self.n_remote_reader > 0:  # readers n_local_reader.. are remote slots
                remote = _remote.options(n_local_reader, n_reader, connect_ip)
            self._queue = BroadcastQueue(
                n_reader, n_slots=n_slots, slot_size=slot_size,
                wait=SpinCondition(warn_after=warning_interval()), serializer=self._serializer,
                remote=remote,
            )  # fmt: skip
            map_slot_heads(self._queue)
            self._expose_ring()
        ring = None if self._queue is None else self._queue.handle
        info = None if ring is None else ring.remote
        self.handle = Handle(
            local_reader_ranks=ranks,
            buffer_handle=ring,
            remote_subscribe_addr=None if info is None else info.endpoint,
            remote_addr_ipv6=False if info is None else info.ipv6,
            writer_pid=os.getpid(),
            max_chunk_bytes=max_chunk_bytes,
        )
        if info is not None:
            self.remote_socket = _remote.RemoteSocket(self)

    def _init_common(self, writer: bool) -> None:
        self.shutting_down = False
        self._is_writer = writer
        self._is_local_reader = False
        self._is_remote_reader = False
        self.local_reader_rank = -1
        self.tensor_arena = None  # vLLM's separate arena: never needed here
        self._queue: BroadcastQueue | None = None
        #: vLLM's attribute, for callers that close it (None without a network side).
        self.remote_socket: _remote.RemoteSocket | None = None
        self._warn_every = warning_interval()
        #: vLLM's attributes, mapped onto the ring (None without one, and on a remote reader):
        #: how this end waits, and a read-only look at the ring's slots (_vllm_attrs).
        self._spin_condition: SpinCondition | None = None
        self.buffer: RingFlags | None = None

    def _expose_ring(self) -> None:
        queue = self._queue
        assert queue is not None
        policy = queue._policy  # the queue's own copy of the policy it was given
        assert isinstance(policy, SpinCondition)
        self._spin_condition = policy
        self.buffer = RingFlags(queue)

    def __repr__(self) -> str:
        if self._is_writer:
            role = "writer"
        elif self._is_local_reader:
            role = f"local reader {self.local_reader_rank}"
        else:
            role = "remote reader"
        ring = "no ring" if self._queue is None else self._queue.name
        state = "shut down" if self.shutting_down else "open"
        return f"<shmcast MessageQueue {role} {ring} {state}>"

    # -- joining -------------------------------------------------------------------------------

    def export_handle(self) -> Handle:
        """The handle readers join with (writer)."""
        return self.handle

    @staticmethod
    def create_from_handle(handle: Handle, rank: int) -> MessageQueue:
        """Join the queue behind ``handle`` as the reader of ``rank``.

        A rank in ``handle.local_reader_ranks`` reads through shared memory (as reader
        ``local_reader_ranks.index(rank)`` of the ring); any other rank, such as -1, reads
        remotely, over ZeroMQ TCP (also on the writer's host), in the first free remote slot
        (:func:`shmcast.compat._remote.attach`).  TypeError for a handle of another queue
        class (vLLM's own, when the plugin is active in some processes and not others);
        shmcast's attach errors otherwise
        (:class:`~shmcast.SegmentError`: the writer is gone or does not answer;
        :class:`~shmcast.AttachError`: the rank is already attached by a live process, or no
        remote slot is free).
        """
        if not isinstance(handle, Handle):
            raise TypeError(
                f"create_from_handle needs a handle of shmcast's MessageQueue, not a "
                f"{type(handle).__module__}.{type(handle).__qualname__}; is the shmcast vLLM "
                "plugin active in the writer's process but not in this one (or the reverse)?"
            )
        self = MessageQueue.__new__(MessageQueue)
        self._init_common(writer=False)
        self.handle = handle
        self._serializer = TensorSerializer()
        self._max_chunk_bytes = handle.max_chunk_bytes
        self.n_local_reader = len(handle.local_reader_ranks)
        self.n_remote_reader = 0
        if rank in handle.local_reader_ranks:
            index = handle.local_reader_ranks.index(rank)
            self._queue = BroadcastQueue.attach(
                handle.buffer_handle, reader=index, serializer=self._serializer, network=False,
                wait=SpinCondition(warn_after=None),  # dequeue logs long waits itself
            )  # fmt: skip
            map_slot_heads(self._queue)
            self._expose_ring()
            self._is_local_reader = True
            self.local_reader_rank = index
        else:
            self._queue = _remote.attach(handle.buffer_handle, rank, self._serializer)
            self._is_remote_reader = True
            self.remote_socket = _remote.RemoteSocket(self)
        return self

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until every reader has joined (collective: the writer and every reader call
        it).  ``timeout`` (shmcast's addition; None: no limit): TimeoutError naming the readers
        not joined yet."""
        with self._calls():
            if self._queue is not None:
                self._queue.wait_until_ready(timeout)

    # -- sending and receiving ------------------------------------------------------------------

    def _cancelled(self) -> RuntimeError:
        return RuntimeError(f"cancelled: {self!r} was shut down")

    @contextmanager
    def _calls(self) -> Iterator[None]:
        """Map the end of a call by :meth:`shutdown` to the original's RuntimeError.  (The
        per-message calls do the same inline: a context manager costs more than the call.)"""
        if self.shutting_down:
            raise self._cancelled()
        try:
            yield
        except QueueClosed as exc:
            if self.shutting_down:
                raise self._cancelled() from exc
            raise

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj`` to every reader (writer).

        Blocks while the ring is full, up to ``timeout`` seconds (None: no limit; a long wait
        logs which readers hold it back).  TimeoutError (nothing sent); SerializationError
        (``obj`` cannot be pickled; nothing sent); QueueBroken (a reader died);
        RuntimeError "cancelled" (shut down); RoleError on a reader.  With no reader at all,
        ``obj`` is pickled and nothing is sent.
        """
        if not self._is_writer:
            raise RoleError("only the writer can enqueue; this MessageQueue is a reader")
        if self.shutting_down:
            raise self._cancelled()
        try:
            if self._queue is not None:
                self._queue.put(obj, timeout)
            else:
                try:  # nobody to send to: the object must still be one that can be sent
                    self._serializer.dumps(obj)
                except Exception as exc:
                    raise SerializationError(
                        f"cannot serialize {type(obj).__name__} object: {exc}"
                    ) from exc
        except QueueClosed as exc:
            if self.shutting_down:
                raise self._cancelled() from exc
            raise

    def dequeue(self, timeout: float | None = None, indefinite: bool = False) -> Any:
        """Receive the next object (reader).

        Blocks up to ``timeout`` seconds (None: no limit).  Unless ``indefinite`` (a reader
        for which waiting is normal, such as an idle worker), a long wait logs a line naming
        the writer every ``$VLLM_RINGBUFFER_WARNING_INTERVAL`` seconds.  TimeoutError (nothing
        taken); RuntimeError "cancelled" (shut down); QueueBroken (the writer died and
        everything it sent was read); QueueClosed (the writer shut down and everything it
        sent was read); SerializationError (could not be decoded; consumed).
        """
        if self.shutting_down:
            raise self._cancelled()
        try:
            if not self._is_writer:
                return self._get(timeout, indefinite)
        except QueueClosed as exc:
            if self.shutting_down:
                raise self._cancelled() from exc
            raise
        raise RuntimeError("only readers can dequeue; this MessageQueue is the writer")

    def _get(self, timeout: float | None, indefinite: bool) -> Any:
        queue = self._queue
        assert queue is not None
        every = self._warn_every
        if indefinite or every is None or (timeout is not None and timeout <= every):
            return queue.get(timeout)  # no long-wait line is due: the ring's own wait
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        next_warning = start + every
        while True:
            if deadline is not None and deadline <= next_warning:
                return queue.get(max(0.0, deadline - time.monotonic()))
            try:
                return queue.get(max(0.0, next_warning - time.monotonic()))
            except QueueTimeout:
                log.info(
                    "dequeue on %s has waited %.0f s for the writer (pid %d); "
                    "nothing new was sent meanwhile",
                    queue.name, time.monotonic() - start, self.handle.writer_pid,
                )  # fmt: skip
                next_warning += every

    def broadcast_object(self, obj: Any = None) -> Any:
        """The writer sends ``obj`` and returns it; a reader returns the next object."""
        if self._is_writer:
            self.enqueue(obj)
            return obj
        return self.dequeue()

    @contextmanager
    def acquire_write(self, timeout: float | None = None) -> Iterator[memoryview]:
        """Zero-copy send (writer): yields a writable view of
        ``max_chunk_bytes`` bytes in the ring, published as one raw message when the block
        ends (nothing is published if it raises).  Blocks and raises as :meth:`enqueue`."""
        if not self._is_writer:
            raise RoleError("only the writer can acquire_write; this MessageQueue is a reader")
        if self._queue is None:
            raise RuntimeError("acquire_write needs readers; this queue has none")
        with self._calls(), self._queue.reserve(self._max_chunk_bytes, timeout) as buf:
            yield buf

    @contextmanager
    def acquire_read(self, timeout: float | None = None, indefinite: bool = False) -> Iterator[Any]:
        """Zero-copy receive (reader): yields the next message in place: a read-only
        view of the bytes of a message written with :meth:`acquire_write`, or the object sent
        with :meth:`enqueue` (its arrays and tensors lie in the ring, or for a remote reader in
        the received frame).  The message's slots are
        released when the block ends, also when it raises.  Blocks and raises as
        :meth:`dequeue` (``indefinite`` is accepted; this call does not log long waits)."""
        if self._is_writer:
            raise RoleError("only a reader can acquire_read; this MessageQueue is the writer")
        with self._calls(), self._queue.view(timeout) as value:  # type: ignore[union-attr]
            yield value

    # -- ending ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Shut this end of the queue down (idempotent; any thread).

        A call of this queue waiting in another thread, the writer's as well as a reader's,
        returns with RuntimeError "cancelled", and so does every later call.  A reader stops
        holding the writer back; readers of a writer that shut down read what it sent, then
        get QueueClosed.  The shared memory is released once no call uses it.
        """
        self.shutting_down = True
        if self._queue is not None:
            self._queue.close()

    # -- process groups (torch.distributed, vLLM's StatelessProcessGroup) -----------------------

    @staticmethod
    def create_from_process_group(
        pg: Any,
        max_chunk_bytes: int,
        max_chunks: int,
        writer_rank: int = 0,
        external_writer_handle: Handle | None = None,
        blocking: bool = True,
    ) -> MessageQueue:
        """A queue over a process group: ``writer_rank`` writes, every other rank reads.
        See :func:`shmcast.compat._vllm_groups.create_from_process_group`."""
        from ._vllm_groups import create_from_process_group

        return create_from_process_group(
            MessageQueue, pg, max_chunk_bytes, max_chunks, writer_rank,
            external_writer_handle, blocking,
        )  # fmt: skip

    @staticmethod
    def create_from_process_group_single_reader(
        pg: Any,
        max_chunk_bytes: int,
        max_chunks: int,
        reader_rank: int = 0,
        blocking: bool = False,
    ) -> tuple[MessageQueue, list[Handle]]:
        """One queue per rank, each read by ``reader_rank``.  See
        :func:`shmcast.compat._vllm_groups.create_from_process_group_single_reader`."""
        from ._vllm_groups import create_from_process_group_single_reader

        return create_from_process_group_single_reader(
            MessageQueue, pg, max_chunk_bytes, max_chunks, reader_rank, blocking
        )
