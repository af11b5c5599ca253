"""A pickle-5 serializer that sends CPU torch tensors out of band, straight into the ring.

torch pickles a tensor by copying its bytes into the pickle stream.  :class:`TensorSerializer`
reduces a plain CPU tensor instead to ``(rebuild_tensor, (buffer, shape, dtype name))``, where
the buffer travels next to the stream, like a numpy array's with :class:`~shmcast.PickleSerializer`:

- a contiguous tensor lends its own memory (a ``PickleBuffer`` over it), which the queue copies
  once, from the tensor into shared memory;
- a strided (non-contiguous) tensor becomes a deferred part that copies its elements, in order,
  straight into its place in the ring (one strided copy, no temporary contiguous tensor);
- every dtype torch has, bfloat16 and the float8 variants included, travels as raw bytes; 0-d
  and empty tensors too.

The receiver rebuilds the tensor on the private copy the queue made of the buffer (``get``,
``dequeue``), so it owns it: a later message never changes it, and it is writable.  Tensors
that cannot be lent this way (on another device, requiring grad, with the conjugate or negative
bit, quantized, sparse, named, or of a subclass such as ``Parameter``) keep torch's own
pickling.

torch stays optional: the serializer imports nothing of torch.  If torch has not been imported
in the sending process, no object can hold a tensor, and it pickles exactly as
:class:`~shmcast.PickleSerializer`.  The receiver imports torch when a message holds a tensor.
The frame is :class:`~shmcast.PickleSerializer`'s, so either serializer decodes the other's
messages.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
import pickle
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from .._serialize import Buffer, PickleSerializer, frame_parts


def rebuild_tensor(buf: Any, shape: tuple[int, ...], dtype_name: str) -> Any:
    """Rebuild a tensor sent by :class:`TensorSerializer` (called by pickle when it loads).

    ``buf`` is what the unpickler was given for the buffer: the queue's private copy (a
    ``bytearray``), a view of the ring inside a zero-copy ``view()`` block, or, for a stream
    pickled in-band, ``bytes``/``bytearray``.  A read-only buffer is copied so that the tensor
    is writable like any other.
    """
    import torch

    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype_name!r} in a tensor message")
    view = memoryview(buf)
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        buf = bytearray(view)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class _StridedTensor:
    """A deferred part: a non-contiguous tensor's elements, written in order into the ring."""

    __slots__ = ("_nbytes", "_tensor")

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor
        self._nbytes = tensor.numel() * tensor.element_size()

    def __len__(self) -> int:
        return self._nbytes

    def write_into(self, dest: memoryview) -> None:
        import torch

        if self._nbytes:
            t = self._tensor
            torch.frombuffer(dest, dtype=torch.uint8).view(t.dtype).view(t.shape).copy_(t)


def _lendable(torch: Any, t: Any) -> bool:
    """True for a tensor whose bytes can travel as an out-of-band buffer."""
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.requires_grad
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
        and not any(getattr(t, "names", None) or ())  # named tensors (older torch)
    )


class _DispatchTable(dict):
    """The reducer for plain tensors, then whatever ``copyreg`` has (looked up at each use,
    so that reducers registered there later count too)."""

    def __missing__(self, cls: type) -> Any:
        return copyreg.dispatch_table[cls]


#: A pickle stream up to this size is copied out of the pickler's buffer, which is then kept
#: for the thread's next ``dumps``; a larger one is handed out without a copy, and the next
#: ``dumps`` starts with a fresh pickler.
SMALL_STREAM = 64 * 1024


class _Session:
    """A pickler with its buffer, and the state of the dump under way: the strided tensors'
    placeholders (the buffer callback's list swaps each for its deferred part).

    The pickler's dispatch table reduces plain tensors with this session's :meth:`reduce`, so
    the state lives here rather than in a thread-local: a session serves one dump at a time
    (each thread keeps its idle one; a dumps nested in a reducer's dump makes its own).
    :meth:`discard` breaks the cycle session - pickler - table - session, so that a dropped
    session (and a large buffer it handed out) is freed at once, not by the cycle collector.
    """

    __slots__ = ("bio", "buffers", "deferred", "pickler", "protocol")

    def __init__(self, protocol: int, tensor_type: type) -> None:
        self.protocol = protocol
        self.bio = io.BytesIO()
        self.buffers: list[Any] = []
        self.deferred: dict[int, tuple[pickle.PickleBuffer, _StridedTensor]] = {}
        self.pickler: pickle.Pickler | None = pickle.Pickler(
            self.bio, protocol, buffer_callback=self.buffers.append
        )
        self.pickler.dispatch_table = _DispatchTable({tensor_type: self.reduce})

    def reduce(self, t: Any) -> Any:
        """The pickler's reducer for plain torch tensors (see the module docstring)."""
        torch = sys.modules["torch"]
        try:
            if _lendable(torch, t):
                name = str(t.dtype).removeprefix("torch.")
                return rebuild_tensor, (self._lend(t), tuple(t.shape), name)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            pass  # an exotic tensor this path does not know: torch's own pickling below
        return t.__reduce_ex__(self.protocol)

    def _lend(self, t: Any) -> pickle.PickleBuffer:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return pickle.PickleBuffer(bytearray())
        if t.is_contiguous():
            # The tensor's own memory, as a flat byte buffer (any dtype, numpy or not).
            memory = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
            memory.tensor = t  # the buffer keeps the tensor (and so its memory) alive
            return pickle.PickleBuffer(memory)
        # A placeholder the buffer callback recognizes; the part writes the elements itself.
        # (Writable, so that pickle does not mark the buffer read-only.)
        placeholder = pickle.PickleBuffer(bytearray())
        self.deferred[id(placeholder)] = (placeholder, _StridedTensor(t))
        return placeholder

    def dump(self, obj: Any) -> tuple[Any, list[Any], bool]:
        """``(stream, parts, reusable)``: the pickle stream of ``obj``, its out-of-band
        buffers with each strided tensor's placeholder replaced by its deferred part (None
        instead of the list if some buffer is not contiguous: the caller pickles in-band), and
        whether the session may serve the next dump."""
        assert self.pickler is not None
        self.pickler.dump(obj)
        parts: list[Any] | None = []
        deferred = self.deferred
        for b in self.buffers:
            entry = deferred.get(id(b)) if deferred else None
            if entry is not None and entry[0] is b:
                parts.append(entry[1])
                continue
            try:
                parts.append(b.raw())
            except BufferError:  # a non-contiguous buffer of some other type: all in-band
                parts = None
                break
        if self.bio.tell() > SMALL_STREAM:
            return self.bio.getbuffer(), parts, False  # no copy; the view keeps the buffer
        stream = self.bio.getvalue()
        self.bio.seek(0)
        self.bio.truncate()
        self.pickler.clear_memo()  # the next stream must not refer to this one's objects
        self.buffers.clear()
        if deferred:
            self.deferred = {}
        return stream, parts, True

    def discard(self) -> None:
        self.pickler = None


class _Sessions(threading.local):
    """Each thread's idle session, by protocol and tensor type: making one costs more than
    pickling a small object."""

    def __init__(self) -> None:
        self.idle: dict[tuple[int, type], _Session] = {}


_sessions = _Sessions()


class TensorSerializer(PickleSerializer):
    """Pickle protocol 5 with out-of-band buffers, CPU torch tensors among them.

    Decodes as :class:`~shmcast.PickleSerializer` does.  Thread-safe: each call keeps its
    state to itself.
    """

    trusted_parts: ClassVar[bool] = True  # byte strings, views and deferred parts only

    def __repr__(self) -> str:
        return f"TensorSerializer(protocol={self.protocol})"

    def dumps(self, obj: Any) -> Sequence[Buffer]:
        torch = sys.modules.get("torch")
        tensor_type = getattr(torch, "Tensor", None)
        if tensor_type is None:
            return super().dumps(obj)
        key = (self.protocol, tensor_type)
        idle = _sessions.idle
        session = idle.pop(key, None)  # taken: a dumps nested in this one makes its own
        if session is None:
            session = _Session(self.protocol, tensor_type)
        reusable = False
        try:
            stream, parts, reusable = session.dump(obj)
        finally:  # after an error the session's state is unknown: dropped
            if reusable:
                idle[key] = session
            else:
                session.discard()
        if parts is None:
            return frame_parts(pickle.dumps(obj, protocol=self.protocol), [])
        return frame_parts(stream, parts)
