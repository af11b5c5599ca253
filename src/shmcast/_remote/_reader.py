"""A remote reader: the reader's side of the remote path, behind the same interface as a local
reader of a :class:`~shmcast.BroadcastQueue`.

``BroadcastQueue.attach`` returns one of these when the handle says the writer runs on another
host (or network namespace), or when asked to with ``network=True``.  It holds one DEALER socket
connected to the writer's ROUTER.  Calls of the endpoint (``get`` and friends) read the socket
themselves, so a message costs no hand-over between threads; a small thread sends heartbeats
(and acknowledgements) while the application is not inside a call, so that a reader that is
only slow is never taken for dead.  The two never use the socket at once: both take
``_io`` (a lock, which also orders their uses of the socket as ZeroMQ requires).

What it checks (docs/remote.md): every frame's header (magic, version, kind, nonce), that
DATA messages arrive numbered exactly one after another from the first one WELCOME announced
(a gap or a duplicate is QueueBroken, never a silent skip), that the writer stays within the
window, and that the writer is heard from at least every ``dead_after`` seconds.  A broken
stream is reported after everything received before the fault was delivered, like a dead
local writer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
import weakref
from collections import deque
from typing import Any

import zmq

from .. import _layout as L
from .._endpoint import Handle, QueueStats, check_max_count, check_serializer, deadline_of
from .._errors import (
    AttachError,
    MessageKindError,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SegmentError,
    SerializationError,
)
from .._native import Guard, Hold
from .._queue import BroadcastQueue
from .._serialize import Serializer
from .._wait import WaitPolicy, resolve_policy
from . import _wire as W
from ._options import KeyPair, RemoteInfo, load_key_pair

#: How long attach waits for the writer's WELCOME by default.
CONNECT_TIMEOUT = 30.0


class RemoteReader(BroadcastQueue):
    """Reader ``index`` of a queue whose writer runs elsewhere.  Made by
    ``BroadcastQueue.attach``; see there.  The put family raises RoleError; ``view`` yields
    the message as it lies in the received frame."""

    def __init__(self, handle: Handle, index: int, *, wait: str | WaitPolicy | None,
                 serializer: Serializer | None, key: KeyPair | None, allow_pickle: bool,
                 connect_timeout: float | None) -> None:  # fmt: skip
        info: RemoteInfo = handle.remote
        if index not in info.readers:
            raise AttachError(
                f"reader index {index} is not served over the network by this queue "
                f"(remote indices: {list(info.readers)}); attach on the writer's host"
            )
        self._policy = resolve_policy(wait)
        self._serializer = check_serializer(serializer)
        self._handle = handle
        self._index = index
        self._closed = False
        #: The endpoint's call guard, as a local reader's (one call at a time, in this
        #: process only, QueueClosed after close); there is no segment to unmap.
        self._guard = Guard(f"BroadcastQueue remote reader {index} of {handle.name}", _nothing)
        self._undelivered: list[tuple[int, Any, int]] = []
        self._deferred_error: SerializationError | None = None
        self._fast = None
        self._info = info
        self._nonce = handle.nonce
        self._authenticated = info.server_public_key is not None
        self._allow_pickle = bool(allow_pickle) or self._authenticated
        self._io = threading.Lock()
        self._buf: deque[tuple[int, memoryview]] = deque()
        #: Messages taken from ``_buf`` and decoded whose call was interrupted before it
        #: returned them (``(kind, value)``): the next receive returns them first.
        self._stash: list[tuple[int, Any, bool]] = []
        self._next_seq = 0  # the sequence number the next DATA message must start with
        self._consumed = 0  # messages taken by the application
        self._acked = 0  # the last ACK sent
        self._unacked_bytes = 0  # bytes received and not yet covered by an ACK
        self._consumed_bytes = 0  # bytes consumed since the last ACK
        self._end: Exception | None = None  # raised once the buffer is empty
        self._lost = 0.0  # when the connection was found gone: deliver what came, then raise
        self._expected = -1  # reader indices the writer still waits for (from heartbeats)
        self.waits = 0
        self._context = zmq.Context(io_threads=1)
        try:
            self._socket = self._connect(key)
            self._welcome(CONNECT_TIMEOUT if connect_timeout is None else connect_timeout)
        except BaseException:
            self._context.destroy(linger=0)
            raise
        self._stop = threading.Event()
        # At exit or collection without close(): say BYE all the same, as a local reader
        # detaches then.  (The thread holds only a weak reference, so collection happens.)
        self._finalizer = weakref.finalize(
            self, _close_socket, self._io, self._stop, self._socket, self._monitor,
            self._context, self._nonce,
        )  # fmt: skip
        self._beater = threading.Thread(target=_beat_loop, args=(weakref.ref(self), self._stop),
                                        name="shmcast-remote-reader", daemon=True)  # fmt: skip
        self._beater.start()

    # -- connecting -----------------------------------------------------------------------------

    def _connect(self, key: KeyPair | None) -> Any:
        info = self._info
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTING_ID, secrets.token_bytes(16))
        # Reconnecting is left on: ZeroMQ then keeps what had arrived when a connection drops
        # (without it, the pipe and the frames in it may be thrown away).  A connection that
        # dropped is still the end of the stream (docs/remote.md): the monitor reports it, and
        # anything lost in between would show as a gap.
        if info.ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if info.server_public_key is not None:
            if key is None:
                raise AttachError(
                    "this queue's writer requires CURVE authentication: attach with "
                    "key=<this reader's key pair> (shmcast keygen makes one)"
                )
            public, secret = load_key_pair(key, "key")
            sock.curve_serverkey = info.server_public_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        elif key is not None:
            raise AttachError("a key was given, but this queue's writer does not use CURVE")
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED
        )  # fmt: skip
        sock.connect(info.endpoint)
        sock.send_multipart([W.header(W.HELLO, self._nonce, 0, self._index, os.getpid())],
                            zmq.NOBLOCK)  # queued until the connection is made  # fmt: skip
        return sock

    def _read_monitor(self) -> str | None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._lost = self._lost or time.monotonic()
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "the writer did not accept this reader's CURVE key"
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                         zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):  # fmt: skip
                return "the security handshake with the writer failed (mismatched keys?)"
        return None

    def _welcome(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        where = self._info.endpoint
        while True:
            failure = self._read_monitor()
            if failure is not None:
                raise AttachError(f"cannot attach to the writer at {where}: {failure}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SegmentError(
                    f"no answer from the writer at {where} within {timeout:g} s (is it "
                    "running, and reachable from here?)"
                )
            if not self._socket.poll(int(min(remaining, 0.1) * 1000) + 1):
                continue
            frames = self._socket.recv_multipart()
            try:
                head = W.parse_header(frames[0], self._nonce, W.FROM_WRITER)
                if head.kind == W.REJECT:
                    raise AttachError(
                        f"the writer at {where} refused reader {self._index}: "
                        f"{W.parse_reject(frames[1:])}"
                    )
                if head.kind != W.WELCOME:
                    raise W.WireError(f"{W.KIND_NAMES[head.kind]} before WELCOME")
                body = W.parse_welcome(head, frames[1:])
            except W.WireError as exc:
                raise SegmentError(
                    f"the peer at {where} is not this queue's writer: {exc}"
                ) from None
            break
        heartbeat_ms, dead_ms, n_readers, n_slots, slot_size = body
        self._next_seq = self._acked = self._consumed = head.seq
        self._window_msgs, self._window_bytes = head.a, head.b
        self._heartbeat = heartbeat_ms / 1000
        self._dead_after = dead_ms / 1000
        self._geometry = L.Geometry(L.KIND_BROADCAST, n_readers, max(n_slots, 2), slot_size)
        self._last_heard = self._last_sent = time.monotonic()

    # -- the socket (callers hold _io) --------------------------------------------------------

    def _fail(self, why: str) -> None:
        """The stream is broken: no more frames are taken; what was received is delivered
        first, then QueueBroken."""
        if self._end is None:
            self._end = QueueBroken(
                f"the remote stream from the writer at {self._info.endpoint} broke: {why}; "
                "everything received before was delivered",
                peer="writer",
            )

    def _pump(self, wait: float) -> None:
        """Take every frame waiting (waiting up to ``wait`` s for the first), send an ACK if
        one is due, and check that the writer is alive.  Holds ``_io``."""
        sock = self._socket
        got = False
        if self._end is None and sock.poll(int(wait * 1000)):
            for _ in range(1000):
                frames = sock.recv_multipart(copy=False)  # poll or EVENTS said one is there
                got = True
                self._frame(frames)
                if self._end is not None or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
        now = time.monotonic()
        if got:
            self._last_heard = now
        elif self._end is None:
            self._read_monitor()  # nothing came: was the connection dropped?
        if self._end is None and not self._lost:
            self._ack_if_due(now)
        if (self._end is None and self._lost and not sock.poll(0)
                and now - max(self._lost, self._last_heard) > self._heartbeat):  # fmt: skip
            # Frames that were on their way when the connection closed have been taken: TCP
            # delivered them before its end, and ZeroMQ has had a heartbeat to hand them over.
            self._fail("the connection to the writer was lost")
        if self._end is None and now - self._last_heard > self._dead_after:
            self._end = QueueBroken(
                f"the writer at {self._info.endpoint} was silent for "
                f"{now - self._last_heard:.1f} s: it died or its host is unreachable; "
                "everything received was delivered",
                peer="writer",
            )

    def _frame(self, frames: list[Any]) -> None:
        try:
            head = W.parse_header(frames[0].buffer, self._nonce, W.FROM_WRITER)
            if head.kind == W.DATA:
                self._data(head, frames)
            elif head.kind == W.HEARTBEAT:
                if head.seq != self._next_seq:
                    raise W.WireError(f"the writer says it sent {head.seq} messages, we got "
                                      f"{self._next_seq}")  # fmt: skip
                self._expected = head.a
            elif head.kind == W.CLOSE:
                if head.seq != self._next_seq:
                    raise W.WireError(f"the writer closed after message {head.seq}, we got "
                                      f"{self._next_seq}")  # fmt: skip
                self._end = QueueClosed("the writer closed the queue and everything it sent "
                                        "was read")  # fmt: skip
            elif head.kind == W.REJECT:
                raise W.WireError(f"the writer ended this reader: {W.parse_reject(frames[1:])}")
            else:
                raise W.WireError(f"unexpected {W.KIND_NAMES[head.kind]}")
        except W.WireError as exc:
            self._fail(str(exc))

    def _data(self, head: W.Header, frames: list[Any]) -> None:
        if head.seq != self._next_seq:
            what = "a gap" if head.seq > self._next_seq else "a duplicate"
            raise W.WireError(f"{what}: message {head.seq} arrived where {self._next_seq} was due")
        unacked_msgs = self._next_seq - self._acked
        alone = unacked_msgs == 0 and head.a == 1
        limit = (1 << 62) if alone else self._window_bytes - self._unacked_bytes
        messages = W.parse_data(head, [f.buffer for f in frames],
                                self._window_msgs - unacked_msgs, limit)  # fmt: skip
        self._buf.extend(messages)
        self._next_seq += len(messages)
        self._unacked_bytes += head.b

    def _ack_if_due(self, now: float) -> None:
        pending = self._consumed - self._acked
        # A quarter of the window consumed, or a heartbeat due: the writer never waits on
        # an acknowledgement for more than a heartbeat while we read.
        due = (
            now - self._last_sent >= self._heartbeat
            or pending >= max(1, self._window_msgs // 4)
            or self._consumed_bytes >= max(1, self._window_bytes // 4)
        )
        if due and not isinstance(self._end, QueueClosed):
            try:
                self._socket.send_multipart([W.header(W.ACK, self._nonce, self._consumed)],
                                            zmq.NOBLOCK)  # fmt: skip
            except zmq.Again:  # no connection any more (the reader never reconnects)
                self._lost = self._lost or now
                return
            self._acked = self._consumed
            self._unacked_bytes -= self._consumed_bytes
            self._consumed_bytes = 0
            self._last_sent = now

    def _beat(self) -> None:
        """One heartbeat round, unless the application is in a call (it sends them then)."""
        if self._io.acquire(blocking=False):
            try:
                if not self._closed:
                    self._pump(0)
            finally:
                self._io.release()

    # -- taking messages ----------------------------------------------------------------------

    def _wait_message(self, deadline: float | None, timeout: float | None) -> None:
        """Block until a message is buffered.  QueueTimeout, QueueClosed, QueueBroken."""
        if self._buf:
            return
        self.waits += 1
        while True:
            with self._io:
                if self._buf:
                    return
                if self._closed:  # close() from another thread: the socket is gone
                    raise QueueClosed("the queue was closed while get was waiting")
                if self._end is not None:
                    raise self._end
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise QueueTimeout(
                        "get timed out" + (f" after {timeout:g} s" if timeout else "")
                    )
                most = self._heartbeat / 2
                if deadline is not None:
                    most = min(most, deadline - now)
                self._pump(most)

    def _ack_due(self) -> None:
        """Send an ACK if a quarter of the window was consumed since the last one."""
        if self._consumed - self._acked >= max(1, self._window_msgs // 4) or (
            self._consumed_bytes >= max(1, self._window_bytes // 4)
        ):
            with self._io:
                if not self._closed:
                    self._ack_if_due(time.monotonic())

    def _decode_remote(self, kind: int, data: memoryview, copy: bool) -> Any:
        if kind == L.MSG_RAW:
            return bytes(data) if copy else data.toreadonly()
        if kind != L.MSG_OBJECT:
            raise SerializationError(f"message of unknown kind {kind} (consumed)")
        if not self._allow_pickle:
            raise SerializationError(
                "refused to unpickle an object from an unauthenticated writer (consumed): "
                "use CURVE keys (RemoteOptions.server_key), or attach with allow_pickle=True "
                "if you trust the network"
            )
        return self._decode(data, copy=copy)

    def _stage(self, want_kind: int | None, copy: bool) -> tuple[int, Any, bool]:
        """Make the next message the front of the stash, decoded, and return that entry
        ``(kind, value, owned)`` (a message must be buffered or stashed).

        *Delivered or still there*, as for a local reader (``shmcast._endpoint``): an
        exception while decoding leaves the message in the buffer (a SerializationError
        consumes it, as documented); the entry goes to the stash's front in a statement
        without a call, then leaves the buffer in one native call (``popleft``) inside a
        ``try`` whose handler, without a call, looks at the buffer's front and leaves the
        message in exactly one of the two.  The ACK counts change with the move, in statements
        without calls."""
        if self._stash:
            item = self._stash[0]
            if want_kind is not None and item[0] != want_kind:
                raise _kind_error(item[0])
            if copy and not item[2]:  # staged by a view() that was not entered
                owned = (item[0], bytes(item[1]) if item[0] == L.MSG_RAW else item[1], True)
                self._stash[0] = owned
                return owned
            return item
        entry = self._buf[0]
        kind, data = entry
        if want_kind is not None and kind != want_kind:
            raise _kind_error(kind)
        size = data.nbytes
        try:
            # A view's value is read-only, as a local reader's: the raw view and the buffers.
            value = self._decode_remote(kind, data if copy else data.toreadonly(), copy=copy)
        except SerializationError:
            self._buf.popleft()
            self._consumed += 1
            self._consumed_bytes += size
            raise
        item = (kind, value, copy)
        self._stash[:0] = (item,)  # a statement, no call: nothing can come between
        try:
            self._buf.popleft()
        except BaseException:
            if not self._buf or self._buf[0] is not entry:  # taken: it stays staged
                self._consumed += 1
                self._consumed_bytes += size
            else:
                del self._stash[0]
            raise
        self._consumed += 1
        self._consumed_bytes += size
        return item

    def _deliver(self) -> tuple[int, Any, bool]:
        """Take the front of the stash, in statements that make no call."""
        item = self._stash[0]
        del self._stash[0]
        return item

    def _before_take(self, timeout: float | None) -> None:
        """What every receive does first: raise a deferred decoding error, acknowledge what
        was consumed, and wait until a message is there (stashed or buffered)."""
        self._raise_deferred()
        self._ack_due()
        if not self._stash:
            self._wait_message(deadline_of(timeout), timeout)

    def _get(self, timeout: float | None, source: int | None, want_kind: int | None) -> Any:
        item = None
        try:
            with self._guard:
                self._before_take(timeout)
                self._stage(want_kind, copy=True)
                item = self._deliver()
        except BaseException:
            # Taken, and an exception came before the return (one raised when the guard is
            # given back, say): the next call's.
            if item is not None:
                self._stash.insert(0, item)
            raise
        return item[1]

    def _get_many(self, max_count: int, timeout: float | None, source: int | None) -> list[Any]:
        check_max_count(max_count)
        items: list[tuple[int, Any, bool]] = []
        try:
            with self._guard:
                self._before_take(timeout)
                if len(self._buf) < max_count:
                    with self._io:
                        if not self._closed:
                            self._pump(0)  # what has arrived meanwhile counts as there
                while (self._stash or self._buf) and len(items) < max_count:
                    try:
                        self._stage(None, copy=True)
                    except SerializationError as exc:
                        if not items:
                            raise
                        self._deferred_error = exc
                        break
                    items.append(self._deliver())
            out = [value for _kind, value, _owned in items]
        except BaseException:
            self._stash[:0] = items  # taken, not returned: the next call's
            raise
        return out

    def _view(self, timeout: float | None, source: int | None) -> Hold:
        """The message for a ``view()`` block, in a native Hold (as a local reader's): the
        entry waits at the front of the stash until the block is entered, which takes it
        from there and counts it as delivered; a block never entered leaves it for the next
        call.  The data is the reader's own (a ZeroMQ frame): no ring slot is held."""
        hold = self._guard.hold()
        try:
            self._before_take(timeout)
            _kind, value, _owned = self._stage(None, copy=False)
            hold.set(value, stash=self._stash)
            return hold
        except BaseException:
            hold.release()
            raise

    # -- the rest of the endpoint -------------------------------------------------------------

    def _sender(self):
        raise RoleError(f"only the writer can send; this endpoint is remote reader {self._index}")

    @property
    def reader(self) -> int | None:
        return self._index

    @property
    def is_writer(self) -> bool:
        return False

    @property
    def remote(self) -> bool:
        """True: this reader receives over the network."""
        return True

    def __repr__(self) -> str:
        return (
            f"<BroadcastQueue remote reader {self._index} of {self._info.endpoint} "
            f"name={self.name!r} {'closed' if self._closed else 'open'}>"
        )

    def stats(self) -> QueueStats:
        return QueueStats("reader", self._index, self._consumed, self._consumed, self.waits,
                          self._policy.name)  # fmt: skip

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until the writer reports every reader index attached (its heartbeats carry
        the count).  QueueTimeout; QueueBroken if the writer is gone."""
        deadline = deadline_of(timeout)
        while True:
            with self._io:
                if self._closed:
                    raise QueueClosed(f"{self!r} is closed")
                if self._expected == 0:
                    return
                if isinstance(self._end, QueueBroken):
                    raise self._end
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise QueueTimeout("wait_until_ready timed out: the writer still waits for "
                                       f"{self._expected} reader(s)")  # fmt: skip
                most = self._heartbeat if deadline is None else min(self._heartbeat, deadline - now)
                if not self._buf:
                    self._pump(most)
                    continue
            # Messages arrived before the heartbeat that says everyone is attached: sleep
            # without holding _io, so that the heartbeat thread goes on taking frames (that
            # heartbeat among them) and acknowledging; else the writer would take this reader
            # for dead and the count would never be read.
            time.sleep(most)

    def close(self) -> None:
        """Detach (idempotent): tell the writer (BYE), so it stops waiting for this index and
        another reader may take it; close the socket.  Also done at exit and on collection."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self._guard.close()
        if self._beater is not threading.current_thread():
            self._beater.join(5)


def _kind_error(kind: int) -> MessageKindError:
    return MessageKindError(
        "the next message is an object sent with put(); read it with get() or view()"
        if kind == L.MSG_OBJECT
        else "the next message is not raw bytes"
    )


def _nothing() -> None:
    """What the guard calls once closed and idle: the socket is closed by close() itself."""


def _beat_loop(ref: weakref.ref[RemoteReader], stop: threading.Event) -> None:
    """The heartbeat thread: every half heartbeat, one round, while the reader exists."""
    reader = ref()
    period = 0.1 if reader is None else reader._heartbeat / 2
    del reader
    while not stop.wait(period):
        reader = ref()
        if reader is None:
            return
        try:
            reader._beat()
        except zmq.ZMQError:
            return
        finally:
            del reader


def _close_socket(io: threading.Lock, stop: threading.Event, sock: Any, monitor: Any,
                  context: Any, nonce: int) -> None:  # fmt: skip
    stop.set()
    with io:
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([W.header(W.BYE, nonce)], zmq.NOBLOCK)
        sock.close(linger=500)
        monitor.close(linger=0)
    context.term()
