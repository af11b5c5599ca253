"""Serializers: how an object becomes the bytes of a message, and back.

A serializer returns a message as a sequence of *parts* (bytes-like objects); the queue copies
each part straight into the ring, so a large buffer is copied once, from the object into shared
memory, and never concatenated.  A part may also be a :class:`DeferredPart`, which writes
itself into the destination (for data that is not one contiguous buffer).  On the reading side
the serializer gets one contiguous ``memoryview``.

:class:`PickleSerializer` (the default) uses pickle protocol 5 with out-of-band buffers: a numpy
array (or any object that exports a ``PickleBuffer``) travels as raw bytes next to the pickle
stream, aligned to 64 bytes, and is rebuilt on the reading side without a second copy.

Frame of a :class:`PickleSerializer` message::

    u32 n_buffers | u32 reserved | u64 pickle_len | n_buffers x u64 buffer_len
    pickle stream   (at offset 16 when n_buffers == 0, else at the next multiple of 64)
    buffer 0 ...    (each at the next multiple of 64)
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._errors import SerializationError

Buffer = Any  # anything that supports the buffer protocol (bytes, bytearray, memoryview, ...)


@runtime_checkable
class Serializer(Protocol):
    """The interface a pluggable serializer implements."""

    def dumps(self, obj: Any) -> Sequence[Buffer]:
        """Encode ``obj`` as parts whose concatenation is the message.  May raise anything; the
        queue reports it as SerializationError and sends nothing."""

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        """Decode one message.  With ``copy=True`` the result must not refer to ``data`` once
        this returns (``data`` lies in the ring and will be overwritten); with ``copy=False``
        it may (the caller keeps ``data`` valid while the result is in use)."""


_HEAD = struct.Struct("<IIQ")
_ALIGN = 64
_ZEROS = memoryview(bytes(_ALIGN))


def _pad(n: int) -> int:
    return -n % _ALIGN


class DeferredPart(Protocol):
    """A part that writes itself into the ring instead of exposing a buffer.

    For data that is not one contiguous buffer (a strided array, say): the queue hands it the
    destination in shared memory, so it is copied once, straight into place.  ``len()`` is the
    number of bytes it writes; :meth:`write_into` must fill exactly that many.
    """

    def __len__(self) -> int: ...

    def write_into(self, dest: memoryview) -> None:
        """Fill ``dest`` (``len(self)`` writable bytes, possibly in the ring) with the data."""


def frame_parts(stream: Buffer, raws: Sequence[Any]) -> list[Any]:
    """The parts of a pickle frame (see the module docstring) for a pickle ``stream`` and its
    out-of-band buffers ``raws``: flat byte views, or :class:`DeferredPart` objects."""
    if not raws:
        return [_HEAD.pack(0, 0, len(stream)), stream]
    lengths = [r.nbytes if isinstance(r, memoryview) else len(r) for r in raws]
    head = _HEAD.pack(len(raws), 0, len(stream)) + struct.pack(f"<{len(raws)}Q", *lengths)
    # head | pad | stream | pad | buf0 | pad | buf1 ...
    parts: list[Any] = [head, _ZEROS[: _pad(len(head))], stream]
    pos = len(head) + _pad(len(head)) + len(stream)
    for raw, length in zip(raws, lengths, strict=True):
        gap = _pad(pos)
        parts.append(_ZEROS[:gap])
        parts.append(raw)
        pos += gap + length
    return parts


class PickleSerializer:
    """Pickle protocol 5 with out-of-band buffers written straight into the ring."""

    #: Its parts are well-formed by construction: the queue does not check them.  (Looked up in
    #: the class's own body only: a subclass that overrides dumps() is checked.)
    trusted_parts: ClassVar[bool] = True

    def __init__(self, protocol: int = 5) -> None:
        if not 5 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError("PickleSerializer needs pickle protocol 5 or higher")
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self.protocol})"

    def dumps(self, obj: Any) -> Sequence[Buffer]:
        buffers: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(obj, protocol=self.protocol, buffer_callback=buffers.append)
        if not buffers:
            return (_HEAD.pack(0, 0, len(stream)), stream)
        try:
            raws = [b.raw() for b in buffers]
        except BufferError:  # a non-contiguous buffer: send everything in-band
            return frame_parts(pickle.dumps(obj, protocol=self.protocol), [])
        return frame_parts(stream, raws)

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        size = len(data)
        if size < _HEAD.size:
            raise SerializationError(f"message of {size} bytes is too short for a pickle frame")
        n, _, stream_len = _HEAD.unpack_from(data, 0)
        if n == 0:
            if _HEAD.size + stream_len > size:
                raise SerializationError("corrupted pickle frame: stream runs past the message")
            return pickle.loads(data[_HEAD.size : _HEAD.size + stream_len])
        end = _HEAD.size + 8 * n
        if end > size:
            raise SerializationError("corrupted pickle frame: buffer table runs past the message")
        lengths = struct.unpack_from(f"<{n}Q", data, _HEAD.size)
        pos = end + _pad(end)
        stream = data[pos : pos + stream_len]
        pos += stream_len
        buffers = []
        for length in lengths:
            pos += _pad(pos)
            if pos + length > size:
                raise SerializationError("corrupted pickle frame: a buffer runs past the message")
            view = data[pos : pos + length]
            buffers.append(bytearray(view) if copy else view)
            pos += length
        if len(stream) != stream_len:
            raise SerializationError("corrupted pickle frame: stream runs past the message")
        return pickle.loads(stream, buffers=buffers)
