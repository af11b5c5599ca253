"""The pickle-5 serializer with out-of-band buffers (shmcast._serialize)."""

from __future__ import annotations

import mmap
import pickle
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shmcast import PickleSerializer, SerializationError, Serializer

HEAD = struct.Struct("<IIQ")


def frame(parts: Sequence[Any]) -> bytes:
    """The message a list of parts makes (what the queue writes into the ring)."""
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def aligned_copy(data: bytes) -> tuple[mmap.mmap, memoryview]:
    """``data`` in a page-aligned writable buffer, as the ring would hold it."""
    mapping = mmap.mmap(-1, max(len(data), 1))
    mapping[: len(data)] = data
    return mapping, memoryview(mapping)[: len(data)]


def parse(message: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    """Independent parse of a frame: (n_buffers, stream offset, [(buffer offset, length)])."""
    n, _reserved, stream_len = HEAD.unpack_from(message, 0)
    if n == 0:
        return 0, HEAD.size, []
    lengths = struct.unpack_from(f"<{n}Q", message, HEAD.size)
    pos = -(-(HEAD.size + 8 * n) // 64) * 64
    stream_at = pos
    pos += stream_len
    buffers = []
    for length in lengths:
        pos = -(-pos // 64) * 64
        buffers.append((pos, length))
        pos += length
    assert pos == len(message)
    return n, stream_at, buffers


SERIALIZER = PickleSerializer()


def round_trip(obj: Any, copy: bool) -> Any:
    return SERIALIZER.loads(memoryview(frame(SERIALIZER.dumps(obj))), copy=copy)


# -- in-band objects --------------------------------------------------------------------------


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize(
    "obj",
    [
        None,
        0,
        -(2**70),
        3.5,
        "text ü",
        b"",
        b"\x00" * 1000,
        bytearray(b"ab"),
        [1, (2, {3: 4})],
        {"nested": {"deep": [None, True]}},
        frozenset({1, 2}),
    ],
    ids=repr,
)
def test_in_band_round_trip(obj: Any, copy: bool) -> None:
    parts = SERIALIZER.dumps(obj)
    message = frame(parts)
    n, stream_at, _ = parse(message)
    assert n == 0 and stream_at == HEAD.size
    assert SERIALIZER.loads(memoryview(message), copy=copy) == obj


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text()
        | st.binary(max_size=300),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_objects_round_trip(obj: Any) -> None:
    assert round_trip(obj, copy=True) == obj


# -- out-of-band buffers ----------------------------------------------------------------------


def test_numpy_arrays_travel_out_of_band_at_64_byte_offsets() -> None:
    arrays = (np.arange(10, dtype=np.int64), np.ones((3, 5), dtype=np.float32), np.zeros(0))
    message = frame(SERIALIZER.dumps(arrays))
    n, stream_at, buffers = parse(message)
    assert n == 3
    assert stream_at % 64 == 0
    assert [length for _, length in buffers] == [a.nbytes for a in arrays]
    for (offset, length), array in zip(buffers, arrays, strict=True):
        assert offset % 64 == 0
        assert message[offset : offset + length] == array.tobytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        dtype=st.sampled_from(["<i1", "<u2", "<i4", "<i8", "<f4", "<f8", "<c16", ">i4", "?"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    ),
    st.sampled_from(["C", "F"]),
)
def test_numpy_round_trip(array: np.ndarray, order: str) -> None:
    array = np.asarray(array, order=order)
    for copy in (True, False):
        result = round_trip(array, copy)
        assert result.dtype == array.dtype
        assert result.shape == array.shape
        np.testing.assert_array_equal(result, array)
        if array.ndim > 1 and array.size > 1 and order == "F" and min(array.shape) > 1:
            assert result.flags.f_contiguous and not result.flags.c_contiguous


def test_copy_false_aliases_the_message_and_copy_true_does_not() -> None:
    arrays = (np.arange(1000, dtype=np.float64), np.arange(12, dtype=np.int16).reshape(3, 4))
    mapping, data = aligned_copy(frame(SERIALIZER.dumps(arrays)))
    ring = np.frombuffer(mapping, dtype=np.uint8)
    try:
        aliased = SERIALIZER.loads(data, copy=False)
        copied = SERIALIZER.loads(data, copy=True)
        for a, c, original in zip(aliased, copied, arrays, strict=True):
            np.testing.assert_array_equal(a, original)
            np.testing.assert_array_equal(c, original)
            assert np.shares_memory(a, ring)
            assert not np.shares_memory(c, ring)
            # The aliased arrays start 64-byte aligned in the (page-aligned) message.
            offset = a.__array_interface__["data"][0] - ring.__array_interface__["data"][0]
            assert offset % 64 == 0
        ring[:] = 0  # the ring is overwritten: copies keep their values
        for c, original in zip(copied, arrays, strict=True):
            np.testing.assert_array_equal(c, original)
        del aliased, a
    finally:
        del ring
        data.release()
        mapping.close()


def test_pickle_buffers_come_back_as_buffers() -> None:
    payload = bytearray(b"0123456789" * 10)
    obj = {"raw": pickle.PickleBuffer(payload)}
    message = frame(SERIALIZER.dumps(obj))
    assert parse(message)[0] == 1
    copied = SERIALIZER.loads(memoryview(message), copy=True)["raw"]
    assert isinstance(copied, bytearray) and copied == payload
    viewed = SERIALIZER.loads(memoryview(message), copy=False)["raw"]
    assert bytes(viewed) == bytes(payload)


def test_non_contiguous_arrays_travel_in_band() -> None:
    array = np.arange(100).reshape(10, 10)[::2, ::3]
    assert not array.flags.c_contiguous and not array.flags.f_contiguous
    message = frame(SERIALIZER.dumps(array))
    assert parse(message)[0] == 0
    np.testing.assert_array_equal(SERIALIZER.loads(memoryview(message), copy=False), array)


def test_non_contiguous_pickle_buffer_cannot_be_encoded() -> None:
    strided = pickle.PickleBuffer(memoryview(bytearray(64))[::2])
    with pytest.raises((pickle.PicklingError, BufferError)):
        SERIALIZER.dumps(strided)


# -- corrupted frames -------------------------------------------------------------------------


def _oob_message() -> bytes:
    return frame(SERIALIZER.dumps((np.arange(16, dtype=np.int64), np.arange(8, dtype=np.int8))))


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (b"", "too short"),
        (b"\x00" * 15, "too short"),
        (HEAD.pack(0, 0, 100) + b"\x80\x05N.", "stream runs past"),
        (HEAD.pack(5, 0, 4), "buffer table runs past"),
        (_oob_message()[:-1], "a buffer runs past"),
        (HEAD.pack(1, 0, 10_000) + struct.pack("<Q", 0) + bytes(40), "runs past the message"),
    ],
    ids=["empty", "short", "stream-n0", "table", "buffer", "stream-n1"],
)
def test_corrupted_frames_raise_serialization_error(message: bytes, words: str) -> None:
    for copy in (True, False):
        with pytest.raises(SerializationError, match=words):
            SERIALIZER.loads(memoryview(message), copy=copy)


def test_garbage_pickle_stream_raises() -> None:
    message = HEAD.pack(0, 0, 4) + b"\xff\xfe\xfd\xfc"
    with pytest.raises(pickle.UnpicklingError):
        SERIALIZER.loads(memoryview(message), copy=True)


# -- the class --------------------------------------------------------------------------------


def test_protocol_must_be_five_or_more() -> None:
    with pytest.raises(ValueError, match="protocol 5"):
        PickleSerializer(protocol=4)
    assert PickleSerializer(protocol=pickle.HIGHEST_PROTOCOL).protocol == pickle.HIGHEST_PROTOCOL
    assert repr(PickleSerializer()) == "PickleSerializer(protocol=5)"


def test_serializer_protocol_is_checkable() -> None:
    class Custom:
        def dumps(self, obj: Any) -> Sequence[bytes]:
            return [repr(obj).encode()]

        def loads(self, data: memoryview, *, copy: bool) -> Any:
            return bytes(data).decode()

    assert isinstance(PickleSerializer(), Serializer)
    assert isinstance(Custom(), Serializer)
    assert not isinstance(object(), Serializer)


class Reversed:
    """A DeferredPart: the bytes of ``data`` in reverse order, written straight into place."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.writes = 0

    def __len__(self) -> int:
        return len(self.data)

    def write_into(self, dest: memoryview) -> None:
        assert len(dest) == len(self.data)
        dest[:] = self.data[::-1]
        self.writes += 1


class DeferredSerializer:
    """Sends raw bytes as one deferred part after a 4-byte length."""

    def dumps(self, obj: Any) -> Sequence[Any]:
        return [struct.pack("<I", len(obj)), Reversed(obj)]

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        (n,) = struct.unpack_from("<I", data, 0)
        return bytes(data[4 : 4 + n])[::-1]


@pytest.mark.parametrize("size", [0, 100, 5000, 40_000])
def test_deferred_parts_write_themselves_into_the_ring(size: int) -> None:
    from shmcast import BroadcastQueue

    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    # 8 slots of 4 KiB: 40 000 bytes exceed the ring and are streamed (materialized first).
    with BroadcastQueue(1, n_slots=8, slot_size=4096, serializer=DeferredSerializer()) as w:
        r = BroadcastQueue.attach(w.handle, reader=0, serializer=DeferredSerializer())
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(r.get(timeout=10) for _ in range(3)))
        reader.start()  # a streamed message needs a reader draining the ring meanwhile
        try:
            for _ in range(3):
                w.put(payload, timeout=10)
        finally:
            reader.join(20)
            r.close()
        assert got == [payload] * 3


def test_frame_parts_accepts_deferred_parts() -> None:
    from shmcast._serialize import frame_parts

    part = Reversed(b"abcdef")
    parts = frame_parts(b"stream", [memoryview(b"0123"), part])
    n, _, stream_len = HEAD.unpack_from(parts[0], 0)
    assert (n, stream_len) == (2, 6)
    assert struct.unpack_from("<2Q", parts[0], HEAD.size) == (4, 6)
    assert parts[-1] is part


def test_a_subclass_overriding_dumps_has_its_parts_checked() -> None:
    from shmcast import BroadcastQueue

    class Careless(PickleSerializer):
        def dumps(self, obj: Any) -> Sequence[Any]:
            return ["not a buffer"]

    assert PickleSerializer.trusted_parts and "trusted_parts" not in vars(Careless)
    with (
        BroadcastQueue(1, n_slots=4, slot_size=4096, serializer=Careless()) as w,
        pytest.raises(SerializationError, match="part 0"),
    ):
        w.put(1)
