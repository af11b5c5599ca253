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
from collections.abc import Sequence
from typing import Any

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


class _Dump:
    """The state of one ``dumps`` call: the reducer for tensors and what it lent."""

    __slots__ = ("deferred", "protocol", "torch")

    def __init__(self, torch: Any, protocol: int) -> None:
        self.torch = torch
        self.protocol = protocol
        self.deferred: dict[int, tuple[pickle.PickleBuffer, _StridedTensor]] = {}

    def reduce(self, t: Any) -> Any:
        torch = self.torch
        try:
            if _lendable(torch, t):
                shape = tuple(t.shape)
                name = str(t.dtype).removeprefix("torch.")
                return rebuild_tensor, (self._buffer(t), shape, name)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            pass  # an exotic tensor this path does not know: torch's own pickling below
        return t.__reduce_ex__(self.protocol)

    def _buffer(self, t: Any) -> pickle.PickleBuffer:
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


class TensorSerializer(PickleSerializer):
    """Pickle protocol 5 with out-of-band buffers, CPU torch tensors among them.

    Decodes as :class:`~shmcast.PickleSerializer` does.  Thread-safe: each call keeps its
    state to itself.
    """

    def __repr__(self) -> str:
        return f"TensorSerializer(protocol={self.protocol})"

    def dumps(self, obj: Any) -> Sequence[Buffer]:
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "Tensor"):
            return super().dumps(obj)
        dump = _Dump(torch, self.protocol)
        buffers: list[pickle.PickleBuffer] = []
        with io.BytesIO() as bio:
            pickler = pickle.Pickler(bio, protocol=self.protocol, buffer_callback=buffers.append)
            # Keep the reducers registered with copyreg; add the one for plain tensors
            # (a subclass is not looked up here, so it keeps its own pickling).
            table = dict(copyreg.dispatch_table)
            table[torch.Tensor] = dump.reduce
            pickler.dispatch_table = table
            pickler.dump(obj)
            stream = bio.getvalue()
        if not buffers:
            return frame_parts(stream, [])
        raws: list[Any] = []
        for b in buffers:
            entry = dump.deferred.get(id(b))
            if entry is not None and entry[0] is b:
                raws.append(entry[1])
                continue
            try:
                raws.append(b.raw())
            except BufferError:  # a non-contiguous buffer of some other type: all in-band
                return frame_parts(pickle.dumps(obj, protocol=self.protocol), [])
        return frame_parts(stream, raws)
