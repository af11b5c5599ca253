"""Shared-memory segments (shmcast._segment): create, open, map, unlink, close."""

from __future__ import annotations

import gc
import os
import secrets
import threading
import time
from collections.abc import Iterator

import pytest

from shmcast import SegmentError, _native
from shmcast._segment import PREFIX, SHM_DIR, Segment, new_name


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


@pytest.fixture
def segment() -> Iterator[Segment]:
    seg = Segment.create(8192)
    yield seg
    seg.unlink()
    seg.close()


def test_new_names_are_prefixed_and_unique() -> None:
    names = {new_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.startswith(PREFIX) and "/" not in n for n in names)


def test_create_makes_a_private_segment_of_the_size_asked(segment: Segment) -> None:
    assert segment.name.startswith(PREFIX)
    assert segment.owner is True
    assert segment.size == 8192
    st = os.stat(_path(segment.name))
    assert st.st_size == 8192
    assert st.st_mode & 0o777 == 0o600
    assert len(segment.buf) == 8192 and not segment.buf.readonly
    assert bytes(segment.buf[:16]) == bytes(16)  # fresh memory is zero
    assert segment.atomics.nbytes == 8192


def test_open_maps_the_same_memory(segment: Segment) -> None:
    other = Segment.open(segment.name)
    try:
        assert other.owner is False and other.size == segment.size
        segment.buf[100:105] = b"hello"
        assert bytes(other.buf[100:105]) == b"hello"
        other.atomics.store64(8, 77)
        assert segment.atomics.load64(8) == 77
    finally:
        other.close()


def test_only_the_creator_unlinks(segment: Segment) -> None:
    other = Segment.open(segment.name)
    other.unlink()  # not the owner: a no-op
    other.close()
    del other
    gc.collect()
    assert os.path.exists(_path(segment.name))
    segment.unlink()
    assert not os.path.exists(_path(segment.name))
    segment.unlink()  # idempotent


def test_mapping_outlives_the_name(segment: Segment) -> None:
    other = Segment.open(segment.name)
    try:
        segment.unlink()
        segment.buf[0:3] = b"abc"
        assert bytes(other.buf[0:3]) == b"abc"
    finally:
        other.close()


def test_creator_unlinks_when_collected() -> None:
    seg = Segment.create(4096)
    name = seg.name
    seg.close()
    assert os.path.exists(_path(name))  # close unmaps; the name stays until unlink
    del seg
    gc.collect()
    assert not os.path.exists(_path(name))


def test_close_releases_the_mapping(segment: Segment) -> None:
    segment.close()
    assert segment.atomics.released
    with pytest.raises(ValueError):
        segment.buf[0]
    segment.close()  # idempotent


def test_close_leaves_exported_views_valid(segment: Segment) -> None:
    segment.buf[0:4] = b"keep"
    kept = segment.buf[0:4]
    segment.close()  # must not raise although a view is still exported
    assert bytes(kept) == b"keep"
    kept.release()


def test_close_while_a_thread_waits_does_not_raise(segment: Segment) -> None:
    a = segment.atomics
    thread = threading.Thread(target=lambda: a.wait32(0, 0, 30.0))
    thread.start()
    try:
        time.sleep(0.1)
        segment.close()  # the waiter holds the buffer: close gives up quietly
    finally:
        deadline = time.monotonic() + 10
        while a.wake32(0, 1) == 0 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        thread.join(35)
    assert not thread.is_alive()


def test_open_errors() -> None:
    missing = PREFIX + "does-not-exist-" + secrets.token_hex(4)
    with pytest.raises(SegmentError, match="no shared-memory segment named"):
        Segment.open(missing)
    for bad in ("", "a/b", 123, None):
        with pytest.raises(SegmentError, match="invalid segment name"):
            Segment.open(bad)


def test_open_empty_segment_is_rejected() -> None:
    name = PREFIX + "test-empty-" + secrets.token_hex(4)
    fd = _native.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        with pytest.raises(SegmentError, match="empty"):
            Segment.open(name)
    finally:
        _native.shm_unlink("/" + name)


def test_create_fails_cleanly_on_an_impossible_size() -> None:
    """The name is removed again when the segment cannot be sized (the leak check of
    conftest verifies that nothing is left in /dev/shm)."""
    with pytest.raises(OSError):
        Segment.create(-1)
