"""Shared buffers (shmcast._region): large arrays received without a second copy."""

from __future__ import annotations

import gc
import os
import signal
import struct
import threading
import time

import pytest
from _procs import process_group, reader_hold_shared_and_stall, reader_shared_arrays

from shmcast import BroadcastQueue, SegmentError, SharedBuffers, _native
from shmcast._region import REGION_FRAME

np = pytest.importorskip("numpy")

SLAB = 1 << 20
ELEMS = 100_000  # 400 KB of int32: goes to a slab
OP_TIMEOUT = 10.0


def make(n: int) -> np.ndarray:
    return np.arange(ELEMS, dtype=np.int32) + n


def spec(slabs: int = 2) -> SharedBuffers:
    return SharedBuffers(slabs=slabs, slab_size=SLAB, min_size=64 << 10)


@pytest.fixture
def queue():
    with BroadcastQueue(2, n_slots=32, slot_size=64 << 10, shared=spec()) as q:
        yield q


@pytest.fixture
def readers(queue):
    r0 = BroadcastQueue.attach(queue.handle, reader=0)
    r1 = BroadcastQueue.attach(queue.handle, reader=1)
    yield r0, r1
    r0.close()
    r1.close()


def marks(queue: BroadcastQueue, slab: int) -> list[int]:
    region = queue._region
    return [region._a.load32(region._g.mark(slab, i)) for i in range(region._g.n_readers)]


def test_get_shared_gives_read_only_views_of_the_region(queue, readers) -> None:
    r0, r1 = readers
    queue.put({"a": make(0), "small": np.arange(4)})
    shared, owned = r0.get_shared(timeout=OP_TIMEOUT), r1.get(timeout=OP_TIMEOUT)
    assert (shared["a"] == make(0)).all() and (owned["a"] == make(0)).all()
    assert not shared["a"].flags.writeable, "a view of the region is read-only"
    with pytest.raises(ValueError):
        shared["a"][0] = 1
    assert owned["a"].flags.writeable, "get returns what the caller owns"
    assert shared["small"].flags.writeable, "a small buffer travels in the ring: a copy"
    region = np.frombuffer(r0._serializer.reader._seg.buf, dtype=np.uint8)  # its mapping
    assert np.shares_memory(shared["a"], region) and not np.shares_memory(owned["a"], region)
    private = np.array(shared["a"])
    assert private.flags.writeable and not np.shares_memory(private, region)
    del region, shared


def test_the_slab_is_handed_back_when_the_last_view_goes(queue, readers) -> None:
    r0, r1 = readers
    queue.put({"a": make(0)})
    array = r0.get_shared(timeout=OP_TIMEOUT)["a"]
    view = array[10:20]
    r1.get(timeout=OP_TIMEOUT)
    k = queue._region._order[0]
    assert marks(queue, k)[1] == 0, "reader 1 copied it out: handed back at once"
    assert marks(queue, k)[0] == os.getpid(), "held by reader 0: its pid"
    del array
    gc.collect()
    assert marks(queue, k)[0] == os.getpid(), "a slice of the array still holds it"
    del view
    gc.collect()
    assert marks(queue, k) == [0, 0]


def test_a_held_view_does_not_block_the_ring(queue, readers) -> None:
    r0, r1 = readers
    queue.put({"a": make(0)})
    kept = r0.get_shared(timeout=OP_TIMEOUT)["a"]
    r1.get(timeout=OP_TIMEOUT)
    for n in range(1, 100):  # ten times the ring's capacity; one slab is held, one is free
        queue.put({"a": make(n)}, timeout=OP_TIMEOUT)
        for r in readers:
            got = r.get_shared(timeout=OP_TIMEOUT)["a"]
            assert (got == make(n)).all()
            del got
    assert (kept == make(0)).all(), "the held buffer never changed"
    assert queue._region.fallbacks == 0, "the other slab served every later message"


def test_a_full_region_sends_in_the_ring(queue, readers) -> None:
    r0, r1 = readers
    queue.put({"a": make(0)})
    queue.put({"a": make(1)})
    held = [r0.get_shared(timeout=OP_TIMEOUT) for _ in range(2)]
    queue.put({"a": make(2)}, timeout=OP_TIMEOUT)  # no slab free: in the ring, no wait
    assert queue._region.fallbacks == 1
    got = r0.get_shared(timeout=OP_TIMEOUT)["a"]
    assert (got == make(2)).all() and got.flags.writeable  # a private copy
    for n in range(3):
        assert (r1.get(timeout=OP_TIMEOUT)["a"] == make(n)).all()
    assert [(h["a"] == make(n)).all() for n, h in enumerate(held)] == [True, True]


def test_a_slab_pending_for_a_slow_reader_is_waited_for(queue, readers) -> None:
    queue.put({"a": make(0)})
    queue.put({"a": make(1)})  # both slabs pending: nobody has read yet

    def read_later() -> None:
        time.sleep(0.2)
        for r in readers:
            r.get(timeout=OP_TIMEOUT)  # resolves the first message's marks, then wakes (P4)

    reading = threading.Thread(target=read_later)
    reading.start()
    try:
        queue.put({"a": make(2)}, timeout=OP_TIMEOUT)
    finally:
        reading.join()
    assert (queue._region.waits, queue._region.fallbacks) == (1, 0), "waited, no fallback"
    for n in (1, 2):
        for r in readers:
            assert (r.get(timeout=OP_TIMEOUT)["a"] == make(n)).all()


def test_the_wait_for_a_pending_slab_ends_at_the_deadline(queue, readers) -> None:
    queue.put({"a": make(0)})
    queue.put({"a": make(1)})
    start = time.monotonic()
    queue.put({"a": make(2)}, timeout=0.2)  # nobody reads: at the deadline, into the ring
    assert 0.2 <= time.monotonic() - start < 5
    assert (queue._region.waits, queue._region.fallbacks) == (1, 1)
    for n in range(3):
        for r in readers:
            assert (r.get(timeout=OP_TIMEOUT)["a"] == make(n)).all()


def test_buffers_out_of_range_travel_in_the_ring(queue, readers) -> None:
    r0, _ = readers
    queue.put({"big": np.zeros(SLAB + 8, dtype=np.uint8), "small": np.ones(8)})
    got = r0.get_shared(timeout=OP_TIMEOUT)
    assert got["big"].flags.writeable and got["small"].flags.writeable
    assert queue._region.used == 0


def test_a_reader_that_joins_late_does_not_hold_slabs(queue) -> None:
    r0 = BroadcastQueue.attach(queue.handle, reader=0)
    r1 = BroadcastQueue.attach(queue.handle, reader=1)
    queue.put({"a": make(0)})
    r0.get(timeout=OP_TIMEOUT)
    r1.close()  # leaves with its mark pending
    for n in range(1, 6):  # the writer clears the detached reader's marks and goes on
        queue.put({"a": make(n)}, timeout=OP_TIMEOUT)
        assert (r0.get(timeout=OP_TIMEOUT)["a"] == make(n)).all()
    assert queue._region.fallbacks == 0
    late = BroadcastQueue.attach(queue.handle, reader=1)
    queue.put({"a": make(9)})
    assert (late.get_shared(timeout=OP_TIMEOUT)["a"] == make(9)).all()
    r0.close()
    late.close()


def test_put_that_fails_frees_its_slabs(queue, readers) -> None:
    from shmcast import QueueTimeout

    _r0, _r1 = readers
    big = np.zeros(32 * (64 << 10) - 4096, dtype=np.uint8)  # fills the ring (in it: too big)
    queue.put({"a": make(0), "fill": big})
    with pytest.raises(QueueTimeout):
        queue.put({"a": make(1), "fill": big}, timeout=0.05)
    assert [marks(queue, k) for k in range(2)].count([0, 0]) == 1, "the failed put's slab"
    for r in readers:
        assert (r.get(timeout=OP_TIMEOUT)["a"] == make(0)).all()


def test_shared_buffers_options_are_checked() -> None:
    with pytest.raises(TypeError):
        BroadcastQueue(1, shared=(4, 1 << 20))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BroadcastQueue(1, shared=SharedBuffers(slabs=0))
    with pytest.raises(TypeError):
        BroadcastQueue(1, shared=SharedBuffers(slab_size=1.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checksums"):
        BroadcastQueue(1, shared=spec(), checksum=True)
    from shmcast import PickleSerializer

    with pytest.raises(ValueError, match="serializer"):
        BroadcastQueue(1, shared=spec(), serializer=PickleSerializer())


def test_get_shared_without_a_region_is_get() -> None:
    with (
        BroadcastQueue(1, n_slots=4, slot_size=1 << 20) as q,
        BroadcastQueue.attach(q.handle, reader=0) as r,
    ):
        q.put({"a": make(0)})
        got = r.get_shared(timeout=OP_TIMEOUT)["a"]
        assert got.flags.writeable and (got == make(0)).all()


# -- corrupted region: SegmentError, never a crash -------------------------------------------


def _sent(queue, readers):
    queue.put({"a": make(0)})
    return queue._region, queue._region._order[0]


@pytest.mark.parametrize("share", [True, False])
def test_a_corrupted_tag_is_an_error(queue, readers, share: bool) -> None:
    region, k = _sent(queue, readers)
    row = region._g.row(k)
    region._seg.buf[row : row + 8] = struct.pack("<Q", 12345)
    get = readers[0].get_shared if share else readers[0].get
    with pytest.raises(SegmentError, match="slab"):
        get(timeout=OP_TIMEOUT)


@pytest.mark.parametrize("length", [SLAB + 1, 2**63])
def test_a_corrupted_length_is_an_error(queue, readers, length: int) -> None:
    region, k = _sent(queue, readers)
    row = region._g.row(k)
    region._seg.buf[row + 8 : row + 16] = struct.pack("<Q", length)
    with pytest.raises(SegmentError):
        readers[0].get_shared(timeout=OP_TIMEOUT)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("mark", [0, 7])
def test_a_mark_that_is_not_pending_is_an_error(queue, readers, share: bool, mark: int) -> None:
    region, k = _sent(queue, readers)
    region._a.store32(region._g.mark(k, 0), mark)
    get = readers[0].get_shared if share else readers[0].get
    with pytest.raises(SegmentError, match="pending"):
        get(timeout=OP_TIMEOUT)


def test_a_reference_to_a_slab_out_of_range_is_an_error(queue, readers) -> None:
    # A message whose frame names a slab the region does not have.
    head = struct.pack("<IIQ", 1, REGION_FRAME, 0) + struct.pack("<2Q", 16, 99)
    frame = head + bytes(-len(head) % 64) + struct.pack("<QQ", 1, 16)
    queue.put_bytes(frame)
    r0 = readers[0]
    ring = r0._reader
    _kind, data, slots = ring.next_message(None, None)
    with pytest.raises(SegmentError, match="slab 98"):
        r0._serializer.reader.loads(data, True, True)
    del data
    ring.finish_message(slots)


def test_a_corrupted_region_header_is_refused_at_attach(queue) -> None:
    queue._region._seg.buf[0:8] = b"NOTMINE\0"
    with pytest.raises(SegmentError, match="not a shmcast shared region"):
        BroadcastQueue.attach(queue.handle, reader=0)


def test_a_lease_checks_its_bounds() -> None:
    import mmap

    m = mmap.mmap(-1, 4096)
    for args in ((0, 8192, 0), (-1, 8, 0), (0, 8, 4096), (0, 8, 2)):
        with pytest.raises(ValueError):
            _native.Lease(m, *args, 1)
    with pytest.raises(ValueError):
        _native.Lease(m, 0, 8, 0, 0)
    lease = _native.Lease(m, 8, 16, 0, 5)
    view = memoryview(lease)
    assert view.readonly and view.nbytes == 16
    with pytest.raises(TypeError):
        view[0] = 1
    del view, lease
    m.close()


# -- several processes ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_readers_in_other_processes_keep_views_while_the_ring_goes_on() -> None:
    count, hold = 30, 1
    with (
        BroadcastQueue(2, n_slots=8, slot_size=64 << 10, shared=spec(slabs=3)) as q,
        process_group("fork") as group,
    ):
        channels = [group.context.Pipe(duplex=True) for _ in range(2)]
        children = [
            group.start(reader_shared_arrays, q.handle, i, count, hold, channels[i][1])
            for i in range(2)
        ]
        q.wait_until_ready(timeout=OP_TIMEOUT)
        for n in range(count):  # four times the ring's slots, with the first slab held
            q.put({"a": make(n)}, timeout=OP_TIMEOUT)
        for parent_end, _ in channels:
            assert parent_end.poll(OP_TIMEOUT) and parent_end.recv() == "held"
        for parent_end, _ in channels:
            parent_end.send("go")
        results = [group.result(c) for c in children]
        used, fallbacks = q._region.used, q._region.fallbacks
    assert used + fallbacks == count and used >= 3
    for got in results:
        assert [g[0] for g in got] == list(range(count))
        assert all(s == float(make(n).sum()) for n, (_, s, _) in enumerate(got))
        assert not got[0][2], "the held one is a view of the region"
        # Messages sent while every slab was pending came through the ring: private copies.
        assert sum(w for *_, w in got) == fallbacks


@pytest.mark.timeout(60)
def test_slabs_of_a_reader_killed_while_holding_views_are_reclaimed() -> None:
    with (
        BroadcastQueue(1, n_slots=32, slot_size=64 << 10, shared=spec(slabs=2)) as q,
        process_group("fork") as group,
    ):
        parent_end, child_end = group.back_channel()
        holder = group.start(reader_hold_shared_and_stall, q.handle, 0, 2, child_end)
        q.wait_until_ready(timeout=OP_TIMEOUT)
        q.put({"a": make(0)})
        q.put({"a": make(1)})
        assert parent_end.poll(OP_TIMEOUT) and parent_end.recv() == 2
        q.put({"a": make(2)}, timeout=OP_TIMEOUT)
        assert q._region.fallbacks == 1, "both slabs held: the third went through the ring"
        group.kill(holder)
        assert group.join(holder) == -signal.SIGKILL
        # The reader's line is attached by a dead process now: the pids in its marks are
        # cleared, its pending mark too, and both slabs serve the next messages.
        q.put({"a": make(3)}, timeout=OP_TIMEOUT)
        q.put({"a": make(4)}, timeout=OP_TIMEOUT)
        assert q._region.fallbacks == 1 and q._region.used == 4


def test_the_tools_name_a_region_for_what_it_is(queue) -> None:
    from shmcast import _snapshot

    region = queue._region._seg
    with pytest.raises(_snapshot.Unusable, match="shared region"):
        _snapshot.read_header(bytes(region.buf[:256]), region.size, region.name)
