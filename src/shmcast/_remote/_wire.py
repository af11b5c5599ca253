"""The frames of the remote path: what travels over ZeroMQ between a writer and a remote reader.

Every ZeroMQ message starts with one fixed 40-byte *header* frame (little-endian)::

    +0   4s   magic     b"SHMR"
    +4   u8   version   WIRE_VERSION
    +5   u8   kind      HELLO, WELCOME, REJECT, DATA, ACK, HEARTBEAT, CLOSE, BYE
    +6   u16  flags     0 (reserved; must be 0)
    +8   u64  nonce     the queue's nonce (the segment's, from the handle)
    +16  u64  seq       a message sequence number (meaning per kind, below)
    +24  u64  a         per kind
    +32  u64  b         per kind

========== ========= ===================================== ==================================
kind       direction seq                                   a, b; further frames
========== ========= ===================================== ==================================
HELLO      R -> W    0                                     a: reader index, b: reader pid
WELCOME    W -> R    first sequence number the reader gets a: window (messages), b: window
                                                           (bytes); frame 1: WELCOME_BODY
REJECT     W -> R    0                                     frame 1: the reason, UTF-8
DATA       W -> R    sequence number of the first message  a: messages (>= 1), b: payload bytes;
                                                           the header frame goes on with the
                                                           table (``a`` ENTRY records) and
                                                           inline payload; frames 1..: more
                                                           payload
ACK        R -> W    messages consumed (next one needed)   0, 0 (also the reader's heartbeat)
HEARTBEAT  W -> R    next sequence number to be sent       0, 0
CLOSE      W -> R    end: no message numbered >= seq comes 0, 0
BYE        R -> W    0                                     0, 0 (the reader detaches)
========== ========= ===================================== ==================================

A DATA message carries ``a`` consecutive messages numbered ``seq .. seq + a - 1``.  Its first
frame is longer than the header: right after the header comes the table, which gives each
message's length and kind (``ENTRY``: u64 length, u32 kind, u32 reserved = 0), then the
*inline* payload (the small messages, gathered; possibly empty).  The inline payload and the
further frames hold whole messages, in order: each is the concatenation of one or more
messages, and no message spans two of them.  (One frame for a batch of small messages; a
large message travels in a frame of its own, copied once.)

Everything is checked before use: magic, version, kind, flags, nonce, counts, the table's
size, that the lengths partition the payload exactly, and the limits the receiver set
(:func:`parse_data`).  A frame that fails any check
raises :class:`WireError` and nothing of it is delivered.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ShmcastError

MAGIC = b"SHMR"
WIRE_VERSION = 1

HELLO = 1
WELCOME = 2
REJECT = 3
DATA = 4
ACK = 5
HEARTBEAT = 6
CLOSE = 7
BYE = 8
KIND_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", REJECT: "REJECT", DATA: "DATA", ACK: "ACK",
    HEARTBEAT: "HEARTBEAT", CLOSE: "CLOSE", BYE: "BYE",
}  # fmt: skip
#: The kinds each side may receive.
FROM_READER = frozenset((HELLO, ACK, BYE))
FROM_WRITER = frozenset((WELCOME, REJECT, DATA, HEARTBEAT, CLOSE))

HEADER = struct.Struct("<4sBBHQQQQ")
ENTRY = struct.Struct("<QII")
#: WELCOME's frame 1: heartbeat interval (ms), silence that means death (ms), the writer's
#: n_readers, n_slots, slot_size (for the reader's properties).
WELCOME_BODY = struct.Struct("<IIIIQ")
MAX_REASON = 1024  # bytes of a REJECT reason
U64 = (1 << 64) - 1


class WireError(ShmcastError):
    """A frame that is not a valid frame of this queue (malformed, truncated, oversized, of
    another queue or another version).  Raised by the parsers; the receiver turns it into the
    error its caller sees (a remote reader: QueueBroken), and it never delivers any part of
    such a frame."""


@dataclass(frozen=True)
class Header:
    kind: int
    nonce: int
    seq: int
    a: int
    b: int


def header(kind: int, nonce: int, seq: int = 0, a: int = 0, b: int = 0) -> bytes:
    """One header frame."""
    return HEADER.pack(MAGIC, WIRE_VERSION, kind, 0, nonce, seq, a, b)


def parse_header(frame: Any, nonce: int, allowed: frozenset[int]) -> Header:
    """Check a header frame: size, magic, version, kind (one of ``allowed``), flags, nonce.
    WireError says which check failed."""
    data = memoryview(frame).cast("B") if not isinstance(frame, bytes) else frame
    if len(data) != HEADER.size and not (len(data) > HEADER.size and data[5] == DATA):
        raise WireError(f"header frame of {len(data)} bytes, expected {HEADER.size}")
    magic, version, kind, flags, their_nonce, seq, a, b = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a shmcast frame (magic {bytes(magic)!r})")
    if version != WIRE_VERSION:
        raise WireError(
            f"frame of wire version {version}; this shmcast speaks version {WIRE_VERSION}"
        )
    if kind not in allowed:
        name = KIND_NAMES.get(kind, f"unknown kind {kind}")
        raise WireError(f"unexpected frame kind {name}")
    if flags:
        raise WireError(f"frame with reserved flags set ({flags:#x})")
    if their_nonce != nonce:
        raise WireError(f"frame of another queue (nonce {their_nonce:#x}, expected {nonce:#x})")
    return Header(kind, their_nonce, seq, a, b)


def data_frames(nonce: int, seq: int, messages: Sequence[tuple[int, Any]],
                inline: Any = b"", payloads: Sequence[Any] = ()) -> list[Any]:  # fmt: skip
    """The frames of one DATA message: ``messages`` is ``(kind, length)`` per message, in
    order; ``inline`` the payload of the first frame and ``payloads`` the further frames
    (each the concatenation of whole messages)."""
    total = sum(length for _kind, length in messages)
    first = bytearray(header(DATA, nonce, seq, len(messages), total))
    for kind, length in messages:
        first += ENTRY.pack(length, kind, 0)
    first += inline
    return [first, *payloads]


def parse_data(head: Header, frames: Sequence[Any], max_count: int,
               max_bytes: int) -> list[tuple[int, memoryview]]:  # fmt: skip
    """The messages of a DATA message (``frames``: all of them, the header frame first), as
    ``(kind, view)`` pairs, after checking the table against the header and the payload, and
    the counts against ``max_count`` messages and ``max_bytes`` payload bytes."""
    count, total = head.a, head.b
    if not 1 <= count <= max_count:
        raise WireError(f"DATA with {count} messages (at most {max_count} allowed)")
    if total > max_bytes:
        raise WireError(f"DATA of {total} payload bytes (at most {max_bytes} allowed)")
    first = memoryview(frames[0]).cast("B")
    end = HEADER.size + ENTRY.size * count
    if len(first) < end:
        raise WireError(f"DATA header frame of {len(first)} bytes too short for {count} entries")
    table = first[HEADER.size : end]
    payloads = [first[end:], *(memoryview(f).cast("B") for f in frames[1:])]
    if sum(len(p) for p in payloads) != total:
        raise WireError("DATA payload frames do not add up to the length in the header")
    out: list[tuple[int, memoryview]] = []
    frame_i, pos = 0, 0
    for length, kind, reserved in ENTRY.iter_unpack(table):
        if reserved:
            raise WireError("DATA table entry with reserved bits set")
        while frame_i < len(payloads) and pos == len(payloads[frame_i]) and length > 0:
            frame_i, pos = frame_i + 1, 0
        if length == 0:
            out.append((kind, memoryview(b"")))
            continue
        if frame_i >= len(payloads) or pos + length > len(payloads[frame_i]):
            raise WireError("DATA message runs past the end of its payload frame")
        out.append((kind, payloads[frame_i][pos : pos + length]))
        pos += length
    # Every message lies inside one frame and the lengths add up to the frames' total (both
    # checked above), so every payload byte belongs to exactly one message.
    return out


def welcome_frames(nonce: int, first: int, window_msgs: int, window_bytes: int,
                   body: tuple[int, int, int, int, int]) -> list[bytes]:  # fmt: skip
    return [header(WELCOME, nonce, first, window_msgs, window_bytes), WELCOME_BODY.pack(*body)]


def parse_welcome(head: Header, frames: Sequence[Any]) -> tuple[int, int, int, int, int]:
    """WELCOME_BODY of a WELCOME message, checked: sizes, and that the numbers are sane."""
    if len(frames) != 1 or len(memoryview(frames[0])) != WELCOME_BODY.size:
        raise WireError("WELCOME without its body frame")
    body = WELCOME_BODY.unpack(bytes(frames[0]))
    heartbeat_ms, dead_ms, n_readers, n_slots, slot_size = body
    if not (1 <= heartbeat_ms <= 60_000 and heartbeat_ms < dead_ms <= 3_600_000):
        raise WireError(f"WELCOME with heartbeat {heartbeat_ms} ms, death after {dead_ms} ms")
    if not (head.a >= 1 and head.b >= 1 and n_readers >= 1 and n_slots >= 1 and slot_size >= 1):
        raise WireError("WELCOME with a zero window or geometry")
    return body


def reject_frames(nonce: int, reason: str) -> list[bytes]:
    return [header(REJECT, nonce), reason.encode()[:MAX_REASON]]


def parse_reject(frames: Sequence[Any]) -> str:
    if len(frames) != 1 or len(memoryview(frames[0])) > MAX_REASON:
        return "(the writer's reason was malformed)"
    return bytes(frames[0]).decode("utf-8", "replace")
