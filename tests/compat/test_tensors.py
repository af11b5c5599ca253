"""CPU torch tensors through the drop-in (shmcast.compat._tensors): out of band, straight into
the ring, owned by the receiver; the rest keeps torch's own pickling.

Needs torch: skipped where it is not installed (the default test venv); ``make test-vllm``
runs it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import pickle
import struct
from typing import Any

import pytest
from _procs import mq_class, process_group

from shmcast import BroadcastQueue, PickleSerializer
from shmcast.compat._tensors import TensorSerializer
from shmcast.compat.vllm import MessageQueue

torch = pytest.importorskip("torch", reason="torch is not installed here (make test-vllm has it)")

DTYPES = [
    name
    for name in (
        "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "int8", "int16", "int32",
        "int64", "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
]  # fmt: skip


def random_tensor(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    """Random bits of ``dtype`` (any bit pattern: NaNs included, so compare bytes)."""
    g = torch.Generator().manual_seed(seed)
    count = 1
    for n in shape:
        count *= n
    size = torch.empty((), dtype=dtype).element_size()
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (count * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (NaN-proof, for every dtype)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def round_trip(obj: Any, copy: bool = True) -> Any:
    """dumps then loads, through a buffer laid out as the ring would hold the message."""
    parts = TensorSerializer().dumps(obj)
    data = bytearray(sum(len(p) for p in parts))
    pos = 0
    for part in parts:
        n = len(part)
        if hasattr(part, "write_into"):
            part.write_into(memoryview(data)[pos : pos + n])
        else:
            data[pos : pos + n] = memoryview(part).cast("B")
        pos += n
    return TensorSerializer().loads(memoryview(data), copy=copy)


def head(parts: Any) -> tuple[int, int]:
    """(out-of-band buffers, pickle stream bytes) of a message's parts."""
    n, _, stream = struct.unpack_from("<IIQ", bytes(memoryview(parts[0]).cast("B")), 0)
    return n, stream


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_out_of_band(dtype: str) -> None:
    tensor = random_tensor(getattr(torch, dtype), (33, 7))
    parts = TensorSerializer().dumps({"t": tensor})
    n_buffers, stream = head(parts)
    assert n_buffers == 1 and stream < 500  # the bytes are not in the pickle stream
    got = round_trip({"t": tensor})["t"]
    assert type(got) is torch.Tensor and same(got, tensor)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.tensor(3.25), id="0-d"),
        pytest.param(lambda: torch.empty(0, 8), id="empty"),
        pytest.param(lambda: torch.empty(3, 0, dtype=torch.bfloat16), id="empty-bf16"),
        pytest.param(lambda: torch.arange(600.0).reshape(20, 30).t(), id="transposed"),
        pytest.param(lambda: torch.arange(1000, dtype=torch.int16)[::3], id="strided"),
        pytest.param(lambda: torch.arange(4.0).expand(5, 4), id="expanded"),
        pytest.param(lambda: random_tensor(torch.bfloat16, (4, 5, 6)).permute(2, 0, 1), id="perm"),
        pytest.param(lambda: torch.arange(24.0).reshape(2, 3, 4)[:, 1], id="sliced"),
    ],
)
def test_shapes_and_strides_round_trip(make: Any) -> None:
    tensor = make()
    got = round_trip([tensor, "after"])
    assert got[1] == "after"
    assert same(got[0], tensor.contiguous())
    assert got[0].is_contiguous()


def test_a_contiguous_tensor_lends_its_memory_to_the_ring() -> None:
    tensor = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
    parts = TensorSerializer().dumps(tensor)
    lent = [p for p in parts if isinstance(p, memoryview) and p.nbytes == tensor.nbytes]
    assert len(lent) == 1
    assert ctypes.addressof(lent[0].obj) == tensor.data_ptr()  # no copy before the ring
    assert sum(len(p) for p in parts) < tensor.nbytes + 1024


def test_a_strided_tensor_is_written_straight_into_place() -> None:
    tensor = torch.arange(200 * 300, dtype=torch.float64).reshape(200, 300).t()
    parts = TensorSerializer().dumps(tensor)
    deferred = [p for p in parts if hasattr(p, "write_into")]
    assert len(deferred) == 1 and len(deferred[0]) == tensor.numel() * 8
    assert sum(len(p) for p in parts) < tensor.numel() * 8 + 1024  # no contiguous copy made
    dest = bytearray(len(deferred[0]))
    deferred[0].write_into(memoryview(dest))
    assert bytes(dest) == tensor.contiguous().numpy().tobytes()


@pytest.mark.parametrize(
    "make, kind",
    [
        pytest.param(lambda: torch.randn(8, 8, requires_grad=True), "grad", id="requires_grad"),
        pytest.param(lambda: torch.randn(4, dtype=torch.complex64).conj(), "conj", id="conj"),
        pytest.param(lambda: torch.randn(4, dtype=torch.complex64).conj().imag, "neg", id="neg"),
        pytest.param(lambda: torch.quantize_per_tensor(torch.randn(6), 0.1, 0, torch.qint8),
                     "quantized", id="quantized",
                     marks=pytest.mark.filterwarnings("ignore::UserWarning")),
    ],
)  # fmt: skip
def test_tensors_that_cannot_be_lent_keep_torch_pickling(make: Any, kind: str) -> None:
    tensor = make()
    parts = TensorSerializer().dumps(tensor)
    assert head(parts)[0] == 0  # nothing out of band: torch's own reduction, in the stream
    got = round_trip(tensor)
    assert type(got) is type(tensor)
    assert got.requires_grad == tensor.requires_grad
    if kind == "quantized":
        assert torch.equal(got.int_repr(), tensor.int_repr())
    else:
        assert torch.equal(got.resolve_conj().resolve_neg(), tensor.resolve_conj().resolve_neg())


def test_a_parameter_keeps_its_type_and_its_data_travels_out_of_band() -> None:
    param = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    parts = TensorSerializer().dumps(param)
    assert head(parts)[0] == 1  # Parameter's own reduction, around its plain data tensor
    got = round_trip(param)
    assert type(got) is torch.nn.Parameter and not got.requires_grad
    assert torch.equal(got, param)


def test_a_cuda_tensor_keeps_torch_pickling() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    tensor = torch.randn(4, device="cuda")
    assert head(TensorSerializer().dumps(tensor))[0] == 0
    assert torch.equal(round_trip(tensor).cpu(), tensor.cpu())


def test_received_tensors_are_owned_and_writable() -> None:
    # A ring of two 64 KiB slots: every message reuses the memory of the ones before.
    writer = MessageQueue(1, 1, max_chunk_bytes=64 * 1024, max_chunks=1)
    reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
    try:
        sent = torch.full((1000,), 17, dtype=torch.bfloat16)
        writer.enqueue({"t": sent, "strided": torch.arange(100.0).reshape(10, 10).t()})
        got = reader.dequeue(timeout=5)
        for value in range(10):
            writer.enqueue(torch.full((1000,), value, dtype=torch.bfloat16))
            expected = torch.full((1000,), value, dtype=torch.bfloat16)
            assert torch.equal(reader.dequeue(timeout=5), expected)
        assert torch.equal(got["t"], sent)
        assert torch.equal(got["strided"], torch.arange(100.0).reshape(10, 10).t())
        got["t"] += 1  # writable, and the sender's tensor is its own
        assert torch.equal(sent, torch.full((1000,), 17, dtype=torch.bfloat16))
    finally:
        writer.shutdown()
        reader.shutdown()


def test_the_frame_is_pickle_serializers() -> None:
    """Either serializer decodes the other's messages (readers may use the default one)."""
    tensor = torch.arange(10)
    with BroadcastQueue(1, n_slots=4, slot_size=4096, serializer=TensorSerializer()) as w:
        r = BroadcastQueue.attach(w.handle, reader=0, serializer=PickleSerializer())
        try:
            w.put({"t": tensor})
            assert torch.equal(r.get(timeout=5)["t"], tensor)
        finally:
            r.close()


def test_a_message_larger_than_the_ring_streams() -> None:
    tensor = random_tensor(torch.float8_e4m3fn, (512, 1024))  # 512 KiB through 8 KiB
    strided = random_tensor(torch.float32, (300, 300), seed=1).t()
    writer = MessageQueue(1, 1, max_chunk_bytes=4096, max_chunks=2)
    try:
        with process_group() as group:
            group.start(_receive_and_describe, writer.export_handle(), 2)
            writer.wait_until_ready(timeout=30)
            writer.enqueue(tensor, timeout=30)
            writer.enqueue({"s": strided}, timeout=30)
            (described,) = group.results()
        assert described[0] == ("float8_e4m3fn", (512, 1024), _digest(tensor))
        assert described[1] == ("float32", (300, 300), _digest(strided))
    finally:
        writer.shutdown()


def test_a_queue_asked_for_vllms_tensor_arena_sends_large_tensors_all_the_same() -> None:
    # vLLM's arena is a second segment for tensors of 8 MiB and more.  The drop-in's tensors
    # go straight into the ring whatever their size: the option is accepted and changes
    # nothing, and a reader ignores an arena named in its handle (here one that does not exist).
    huge = random_tensor(torch.float32, (2048, 2048))  # 16 MiB
    mid = random_tensor(torch.float32, (1024, 512), seed=1)  # 2 MiB
    writer = MessageQueue(1, 1, max_chunk_bytes=8 * 1024 * 1024, enable_shm_tensor_arena=True)
    handle = writer.export_handle()
    assert writer.tensor_arena is None and handle.tensor_arena_handle is None
    handle = dataclasses.replace(handle, tensor_arena_handle=(1, 1 << 20, 4, "no-such-arena"))
    try:
        with process_group() as group:
            group.start(_receive_and_describe, handle, 2)
            writer.wait_until_ready(timeout=30)
            writer.enqueue(huge, timeout=30)
            writer.enqueue({"s": mid}, timeout=30)
            (described,) = group.results()
        assert described == [
            ("float32", (2048, 2048), _digest(huge)),
            ("float32", (1024, 512), _digest(mid)),
        ]
    finally:
        writer.shutdown()


def _digest(t: Any) -> str:
    import hashlib

    return hashlib.blake2b(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _receive_and_describe(handle: Any, count: int) -> list[tuple[str, tuple[int, ...], str]]:
    queue = mq_class("shmcast").create_from_handle(handle, 0)
    queue.wait_until_ready()
    out = []
    for _ in range(count):
        got = queue.dequeue(timeout=30)
        t = got["s"] if isinstance(got, dict) else got
        out.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), _digest(t)))
    queue.shutdown()
    return out


def test_nothing_changes_for_objects_without_tensors() -> None:
    obj = {"a": [1, 2, 3], "b": b"x" * 100}
    assert TensorSerializer().dumps(obj)[1] == PickleSerializer().dumps(obj)[1]
    assert pickle.loads(pickle.dumps(TensorSerializer())) is not None
