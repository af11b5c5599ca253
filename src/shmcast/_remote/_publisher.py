"""The writer's side of the remote path: a thread in the writer's process that reads the ring
as the remote readers' stand-in and sends what it reads over ZeroMQ.

Why a reader of the ring: every local guarantee then holds for remote readers without a line of
new protocol.  For each connected remote reader the publisher holds that reader's line in the
segment (claimed with the writer's own pid, exactly as a local reader claims it) and a
:class:`~shmcast._ring.RingReader` on it.  It copies a message out of the ring into ZeroMQ's own
buffers (``copy=True``: the caller's buffer was already copied into the ring by ``put``, and the
ring slot is released only after ZeroMQ holds its own copy, so nothing races with either), then
releases the slots.  It reads no further while the reader's *window* is full: the messages sent
and not yet acknowledged (ACK) reach ``window_messages`` or ``window_bytes``.  The reader's line
then stops advancing, the ring fills, and the writer blocks: backpressure, as for a slow local
reader.  Memory is bounded by the ring plus the window (or one message larger than the window).

Liveness (docs/remote.md): each side sends a frame at least every ``heartbeat``.  A remote
reader that is silent for ``dead_after``, or whose connection ZeroMQ has dropped (a send to its
routing id fails with EHOSTUNREACH under ROUTER_MANDATORY: its process died), is declared dead by
storing 0 in the pid word of its line (docs/protocol.md, "Remote readers").  The writer's own
liveness check then finds that line held by no live process and raises QueueBroken naming the
reader, or drops it with ``on_dead_reader="drop"``.  The publisher never drops a reader itself.

Sockets: one ROUTER, bound to the one address given, with ROUTER_MANDATORY (never a silent
drop of a frame to a peer that left), unlimited high-water marks (the window, not a high-water
mark, bounds memory: a high-water mark would drop or block), MAXMSGSIZE small (a reader sends only
small frames; a larger one cuts its connection before it is buffered), and optional CURVE with
a ZAP handler (:class:`zmq.auth.thread.ThreadAuthenticator`).

Threads: the thread is the only user of its socket; the writer's thread only starts it and asks
it to finish (:meth:`Publisher.finish`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from .. import _layout as L
from .._errors import AttachError, QueueClosed, QueueTimeout, SegmentError
from .._participants import announce
from .._queue import attach_reader_ring
from .._ring import RingReader
from .._segment import Segment
from .._wait import FutexWait
from . import _wire as W
from ._options import RemoteOptions, load_key_pair, load_public_keys

log = logging.getLogger("shmcast")

#: Messages at least this large travel in a ZeroMQ frame of their own, copied once, straight
#: from the ring; smaller ones are gathered into one frame per batch.
LARGE = 64 << 10
#: Longest sleep of the thread between two looks at everything (the ring among them).
IDLE_SLICE = 0.05
#: A put sends in the writer's own thread only if nothing was sent for this long (a quiet
#: stream: it saves the thread's wake-up); in a busy one the thread gathers batches.
KICK_GAP = 0.0002
#: Frames from readers are small; a larger one makes ZeroMQ drop the connection.
MAX_READER_FRAME = 4096


@dataclass(eq=False)
class Session:
    """One connected remote reader: its line in the ring, its window, its liveness."""

    ident: bytes
    index: int
    ring: RingReader
    next_seq: int = 0  # the sequence number of the next message to send
    acked: int = 0  # messages the reader has consumed (its last ACK)
    inflight: deque[int] = field(default_factory=deque)  # sizes of sent, unacked messages
    inflight_bytes: int = 0
    pending: tuple[int, Any, int] | None = None  # a message taken from the ring, not yet sent
    last_heard: float = 0.0
    last_beat: float = 0.0
    closed: bool = False  # the writer closed and every message was taken from the ring
    closed_sent: bool = False
    dead: bool = False


class Publisher:
    """Serves the remote reader slots of one broadcast queue (writer's process only).

    Created by the queue's constructor after the writer's ring; binds at once (so that the
    handle can carry the actual port), starts its thread, and runs until :meth:`finish`.
    """

    def __init__(self, seg: Segment, header: L.Header, options: RemoteOptions,
                 indices: tuple[int, ...], ipv6: bool) -> None:  # fmt: skip
        self._seg = seg
        self._a = seg.atomics
        self._header = header
        self._geometry = geometry = header.geometry
        self._ring = geometry.ring()
        self._nonce = header.nonce
        self._opts = options
        self._indices = frozenset(indices)
        self._sessions: dict[bytes, Session] = {}
        self._by_index: dict[int, Session] = {}
        self._closing = False  # the writer closed: send what is left, then CLOSE
        self._abort = False  # stop now
        self.rejected_frames = 0  #: frames dropped because they failed a check
        # The policy of the publisher's ring readers (it sleeps itself; they never log).
        self._ring_wait = FutexWait(warn_after=None)
        #: Held by whoever uses the socket and the sessions: the thread, except while it
        #: sleeps, and a put of the writer's thread that finds it free (kick).
        self._lock = threading.Lock()
        self.public_key: bytes | None = None
        self._context = zmq.Context()
        self._auth = None
        self._missed = False  # a kick found the thread busy and rang the doorbell
        self._last_send = 0.0
        self._bell_r, self._bell_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._socket = self._open_socket(ipv6)
            self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            self._poller = zmq.Poller()
            self._poller.register(self._socket, zmq.POLLIN)
            self._poller.register(self._bell_r, zmq.POLLIN)
        except BaseException:
            self._shutdown_zmq()
            raise
        self._thread = threading.Thread(target=self._run, name="shmcast-publisher", daemon=True)
        self._thread.start()

    # -- set-up and tear-down -----------------------------------------------------------------

    def _open_socket(self, ipv6: bool) -> Any:
        sock = self._context.socket(zmq.ROUTER)
        try:
            self._configure(sock, ipv6)
        except BaseException:
            # Not ours to close later (self._socket is not set): an open socket would make
            # the context's term() in _shutdown_zmq wait for it forever.
            sock.close(linger=0)
            raise
        return sock

    def _configure(self, sock: Any, ipv6: bool) -> None:
        """Set the socket's options and bind it (zmq.ZMQError if the address cannot be bound,
        such as one this host does not have)."""
        opts = self._opts
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_READER_FRAME)
        sock.setsockopt(zmq.LINGER, int(opts.linger * 1000))
        if ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if opts.server_key is not None:
            from zmq.auth.thread import ThreadAuthenticator

            public, secret = load_key_pair(opts.server_key, "server_key")
            allowed = load_public_keys(opts.client_keys)  # type: ignore[arg-type]
            self._auth = ThreadAuthenticator(self._context, log=log.getChild("auth"))
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=_KeySet(allowed))
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            self.public_key = public
        sock.bind(opts.bind)

    def _shutdown_zmq(self) -> None:
        with contextlib.suppress(Exception):
            sock = getattr(self, "_socket", None)
            if sock is not None:
                sock.close(linger=0 if self._abort else int(self._opts.linger * 1000))
        if self._auth is not None:
            with contextlib.suppress(Exception):
                self._auth.stop()
        with contextlib.suppress(Exception):
            self._context.term()
        for fd in (self._bell_r, self._bell_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def finish(self) -> None:
        """The writer closed (call after the ring's close): send every remote reader what is
        left and a CLOSE, for at most ``linger`` seconds, then stop.  Idempotent; blocks until
        the thread has stopped, so that the segment may be unmapped afterwards."""
        self._closing = True
        self._ring_bell()
        self._thread.join(self._opts.linger)
        if self._thread.is_alive():
            log.warning(
                "remote readers did not receive everything within linger=%g s; "
                "closing the writer's socket anyway", self._opts.linger,
            )  # fmt: skip
            self._abort = True
            self._thread.join()

    def stats(self) -> dict[str, Any]:
        """A snapshot for ``stats()``: per connected index, messages sent and acknowledged."""
        return {
            s.index: {"sent": s.next_seq, "acked": s.acked, "in_flight_bytes": s.inflight_bytes}
            for s in list(self._by_index.values())
        }

    # -- the thread ---------------------------------------------------------------------------

    def kick(self) -> None:
        """Called by the writer's thread after it published slots (put, put_many, reserve):
        if the thread is idle (the socket is free), send what is ready now, in this thread,
        saving a wake-up; else ring the doorbell, so that the thread looks again before it
        sleeps.  Never blocks.

        Why nothing is missed: the thread looks at the ring in every round it holds the lock,
        and sleeps only after a round that moved nothing.  A kick that finds the lock held
        rings the doorbell (once until the thread has heard it), and the thread's sleep
        returns at once while the doorbell rings; the flag is cleared before the pipe is
        read, so a ring after the read is heard by the next sleep.  A publish that no kick
        follows is still found within ``IDLE_SLICE``."""
        quiet = time.monotonic() - self._last_send >= KICK_GAP
        if quiet and self._lock.acquire(blocking=False):
            try:
                if not self._closing and not self._abort:
                    self._pump()
            finally:
                self._lock.release()
        elif not self._missed:
            self._missed = True
            self._ring_bell()

    def _run(self) -> None:
        try:
            while not self._abort:
                with self._lock:
                    self._receive_all()
                    progressed = self._pump()
                    now = time.monotonic()
                    self._liveness(now)
                    if self._closing and self._drained():
                        break
                if not progressed:
                    self._idle()
        except SegmentError as exc:  # the segment was written into: nothing more is trusted
            log.error("the shmcast publisher stopped: %s; remote readers are cut off", exc)
            for s in list(self._sessions.values()):
                self._declare_dead(s, f"the queue's shared memory is corrupted: {exc}")
        except Exception:  # a bug: say so loudly, and let the readers see the writer go silent
            log.exception("the shmcast publisher thread failed; remote readers are cut off")
            for s in list(self._sessions.values()):
                self._declare_dead(s, "the writer's publisher thread failed")
        finally:
            self._shutdown_zmq()

    def _drained(self) -> bool:
        return all(s.closed_sent or s.dead for s in self._sessions.values())

    def _idle(self) -> None:
        """Sleep until there may be something to do: a frame on the socket, the doorbell (a
        put the thread must handle, or the writer closing), or at most ``IDLE_SLICE``."""
        for fd, _event in self._poller.poll(IDLE_SLICE * 1000):
            if fd == self._bell_r:
                self._missed = False  # before the read: a ring after it wakes us again
                with contextlib.suppress(BlockingIOError):
                    os.read(self._bell_r, 4096)

    def _ring_bell(self) -> None:
        """Wake the thread from :meth:`_idle` (any thread; a full pipe is already ringing)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._bell_w, b"!")

    # -- incoming -------------------------------------------------------------------------------

    def _receive_all(self) -> None:
        sock = self._socket
        for _ in range(10_000):  # bounded; the rest waits for the next round
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _reject_frame(self, why: str, ident: bytes) -> None:
        self.rejected_frames += 1
        if self.rejected_frames <= 10 or self.rejected_frames % 1000 == 0:
            log.warning("remote path: dropped a frame from peer %s: %s", ident.hex(), why)

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        if len(frames) < 2:
            self._reject_frame("no header frame", ident)
            return
        try:
            head = W.parse_header(frames[1], self._nonce, W.FROM_READER)
            if len(frames) != 2:
                raise W.WireError(f"{W.KIND_NAMES[head.kind]} with {len(frames) - 2} extra frames")
        except W.WireError as exc:
            self._reject_frame(str(exc), ident)
            session = self._sessions.get(ident)
            if session is not None:
                self._end(session, f"it sent an invalid frame ({exc})")
            return
        session = self._sessions.get(ident)
        if head.kind == W.HELLO:
            if session is not None:
                self._reject_frame("a second HELLO on one connection", ident)
                return
            self._hello(ident, head)
            return
        if session is None:
            self._reject_frame(f"{W.KIND_NAMES[head.kind]} before HELLO", ident)
            return
        session.last_heard = time.monotonic()
        if head.kind == W.ACK:
            self._ack(session, head.seq)
        elif head.kind == W.BYE:
            self._forget(session)
            if not session.dead:
                session.ring.detach()  # the index may be taken again (P5)

    def _hello(self, ident: bytes, head: W.Header) -> None:
        index = head.a
        if self._closing:
            self._send_reject(ident, "the queue is closing")
            return
        if index not in self._indices:
            self._send_reject(ident, f"reader index {index} is not served over the network "
                              f"(remote indices: {sorted(self._indices)})")  # fmt: skip
            return
        old = self._by_index.get(index)
        if old is not None and not old.dead:
            self._beat(old, time.monotonic())  # a reader that restarted: is the old one gone?
        if old is not None and not old.dead:
            self._send_reject(ident, f"reader index {index} is attached by another remote reader")
            return
        if old is not None:
            self._forget(old)
        try:
            ring = attach_reader_ring(self._seg, self._header, index, self._ring_wait,
                                      f"{self._seg.name} (remote reader {index})")  # fmt: skip
        except AttachError as exc:
            self._send_reject(ident, str(exc))
            return
        now = time.monotonic()
        session = Session(ident, index, ring, last_heard=now, last_beat=now)
        self._sessions[ident] = session
        self._by_index[index] = session
        g, o = self._geometry, self._opts
        body = (int(o.heartbeat * 1000), int(o.dead_after * 1000), g.n_peers, g.n_slots,
                g.slot_size)  # fmt: skip
        self._send(session, W.welcome_frames(self._nonce, 0, o.window_messages, o.window_bytes,
                                             body))  # fmt: skip
        log.info("remote reader %d connected (pid %d on its host)", index, head.b)

    def _ack(self, session: Session, consumed: int) -> None:
        if not session.acked <= consumed <= session.next_seq:
            self._end(session, f"it acknowledged message {consumed}, but {session.acked} to "
                      f"{session.next_seq} were possible")  # fmt: skip
            return
        for _ in range(consumed - session.acked):
            session.inflight_bytes -= session.inflight.popleft()
        session.acked = consumed

    # -- outgoing -------------------------------------------------------------------------------

    def _send(self, session: Session, frames: list[Any], copy: bool = True) -> bool:
        """Send to one reader; False (and the reader is declared dead) if ZeroMQ says its
        connection is gone."""
        try:
            self._socket.send_multipart([session.ident, *frames], copy=copy)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._declare_dead(session, "its connection was lost")
                return False
            raise
        session.last_beat = self._last_send = time.monotonic()
        return True

    def _send_reject(self, ident: bytes, reason: str) -> None:
        log.warning("remote path: refused a reader: %s", reason)
        with contextlib.suppress(zmq.ZMQError):
            self._socket.send_multipart([ident, *W.reject_frames(self._nonce, reason)])

    def _beat(self, session: Session, now: float) -> None:
        expected = sum(
            1
            for i in range(self._geometry.n_peers)
            if self._a.load32(self._geometry.peer_line(i) + L.STATE) == L.EXPECTED
        )
        self._send(session, [W.header(W.HEARTBEAT, self._nonce, session.next_seq, expected)])

    def _can_send(self, s: Session) -> bool:
        return not s.dead and not s.closed_sent and len(s.inflight) < self._opts.window_messages

    def _pump(self) -> bool:
        """Send every reader what its window allows; True if anything moved."""
        moved = False
        for session in list(self._sessions.values()):
            if self._can_send(session):
                moved |= self._pump_one(session)
        return moved

    def _take(self, session: Session) -> tuple[int, Any, int] | None:
        """The next message at the reader's position, without waiting: ``(kind, data, slots)``
        as RingReader.next_message gives it (``slots`` 0: private data, already released).
        None if nothing is there yet; after the writer closed and everything was taken, None
        and ``closed`` set (the caller sends CLOSE after what it has gathered)."""
        if session.pending is not None:
            item, session.pending = session.pending, None
            return item
        ring = session.ring
        # The fast path only between messages: while a streamed one is in progress (or
        # complete and not yet counted) the slots at our position are not a message's first.
        fast = None if ring.streaming else ring.cursor.next()
        if fast is not None:
            kind, off, total, k = fast
            data = self._seg.buf[off : off + total]
            if ring.cursor.checksum:
                # next() checked the payload in the ring, where any process can still write:
                # what is sent is a copy, checked again (docs/protocol.md, "Trust").
                data = bytes(data)
                ring.check_copy(data)
            return kind, data, k
        # Cheap looks first (P6: the writer's state before its sequence), then the general
        # path for padding, streamed messages and the end.
        closed = self._a.load32(self._ring.writer + L.STATE) & (L.DETACHED | L.DROPPED)
        if not closed and not ring.poll():
            return None
        try:
            return ring.next_message(time.monotonic(), 0.0)
        except QueueTimeout:
            return None
        except QueueClosed:
            session.closed = True
            return None

    def _pump_one(self, s: Session) -> bool:
        """One DATA message for ``s``: as many messages as its window and ``batch_bytes``
        allow, small ones gathered into the first frame, a large one in a frame of its own
        (last).  Slots of gathered messages are released at once (their bytes are copied); a
        large message's once ZeroMQ has copied it into a message of its own (``copy=True``).
        (Zero-copy from the ring, holding the slots until pyzmq's tracker reports the send
        done, measured slower here: the tracker is set by pyzmq's collector thread, which
        waits for the interpreter lock the writer's threads hold.)"""
        o = self._opts
        entries: list[tuple[int, int]] = []
        small = bytearray()
        large: tuple[Any, int] | None = None  # (data, slots) of a final large message
        room_msgs = o.window_messages - len(s.inflight)
        room_bytes = o.window_bytes - s.inflight_bytes
        used = 0
        while len(entries) < room_msgs and large is None:
            item = self._take(s)
            if item is None:
                break
            kind, data, slots = item
            size = len(data)
            alone = not s.inflight and not entries
            if not alone and (
                used + size > room_bytes or (size < LARGE and len(small) + size > o.batch_bytes)
            ):
                s.pending = item  # its slots stay held: next time
                break
            entries.append((kind, size))
            used += size
            if size >= LARGE:
                large = (data, slots)
            else:
                small += data
                # Counted as delivered (a streamed message too, slots 0: else it is kept for
                # the next take); its slots are released with the next flush.
                s.ring.finish_message(slots, defer=True)
        if not entries:
            s.ring.flush()
            return self._close_if_done(s)
        payloads: list[Any] = [] if large is None else [large[0]]
        frames = W.data_frames(self._nonce, s.next_seq, entries, small, payloads)
        # copy=False for what is ours alone (the gathered bytes, a streamed message's private
        # copy, the checked copy taken with checksums: nothing writes to them again); ring
        # slots (a view of the segment) are copied before they go back.
        in_ring = large is not None and large[1] != 0 and isinstance(large[0], memoryview)
        ok = self._send(s, frames, copy=in_ring)
        if large is not None:
            s.ring.finish_message(large[1])  # after the copy: the writer may reuse the slots
        s.ring.flush()
        if ok:
            s.next_seq += len(entries)
            s.inflight.extend(size for _kind, size in entries)
            s.inflight_bytes += used
        self._close_if_done(s)
        return True

    def _close_if_done(self, s: Session) -> bool:
        """After the last message (the ring said closed), send CLOSE; True if it was sent."""
        if not s.closed or s.closed_sent or s.dead:
            return False
        if self._send(s, [W.header(W.CLOSE, self._nonce, s.next_seq)]):
            s.closed_sent = True
        return True

    # -- liveness -------------------------------------------------------------------------------

    def _liveness(self, now: float) -> None:
        o = self._opts
        for s in list(self._sessions.values()):
            if s.dead:
                if self._a.load32(self._geometry.peer_line(s.index) + L.STATE) != L.ATTACHED:
                    self._forget(s)  # the writer dropped it (or someone took the index)
                continue
            if now - s.last_heard > o.dead_after:
                self._declare_dead(s, f"it was silent for {now - s.last_heard:.1f} s")
            elif now - s.last_beat >= o.heartbeat and not s.closed_sent:
                self._beat(s, now)

    def _declare_dead(self, s: Session, why: str) -> None:
        """The reader is gone: its line now names no live process (pid 0), which the writer's
        liveness check reads as a dead reader (docs/protocol.md, "Remote readers")."""
        if s.dead:
            return
        s.dead = True
        s.pending = None
        line = self._geometry.peer_line(s.index)
        log.warning("remote reader %d is dead: %s", s.index, why)
        self._a.store64(line + L.START, 0)
        self._a.store64(line + L.PID, 0)
        announce(self._a, self._ring.space_futex)  # a blocked writer looks now (P5)

    def _end(self, s: Session, why: str) -> None:
        """End a session whose peer broke the protocol: tell it, then treat it as dead."""
        self._send_reject(s.ident, f"remote reader {s.index}: {why}")
        self._declare_dead(s, why)

    def _forget(self, s: Session) -> None:
        self._sessions.pop(s.ident, None)
        if self._by_index.get(s.index) is s:
            del self._by_index[s.index]


class _KeySet:
    """A ZAP credentials provider: accept exactly these CURVE public keys (Z85, as pyzmq's
    authenticator passes them)."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


__all__ = ["Publisher"]
