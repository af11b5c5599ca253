"""Shared-memory segments (shmcast._segment): create, reach, map, unlink, close; bad names."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shmcast import SegmentError, SharedMemoryFull, _native
from shmcast._segment import PREFIX, SHM_DIR, Segment, check_name, new_name


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


@pytest.fixture
def segment() -> Iterator[Segment]:
    seg = Segment.create(8192)
    yield seg
    seg.unlink()
    seg.close()


def test_new_names_are_prefixed_unique_and_valid() -> None:
    names = {new_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.startswith(PREFIX) and check_name(n) == n for n in names)


def test_create_makes_a_private_segment_of_the_size_asked(segment: Segment) -> None:
    assert segment.name.startswith(PREFIX)
    assert segment.size == 8192
    st = os.stat(_path(segment.name))  # named until unlink()
    assert st.st_size == 8192
    assert st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 >= 8192  # reserved: the memory is there, not only the size
    assert len(segment.buf) == 8192 and not segment.buf.readonly
    assert bytes(segment.buf[:16]) == bytes(16)  # fresh memory is zero
    assert segment.atomics.nbytes == 8192


def test_unlink_removes_the_name_and_keeps_the_memory(segment: Segment) -> None:
    segment.unlink()
    assert not os.path.exists(_path(segment.name))
    segment.unlink()  # idempotent
    segment.buf[0:3] = b"abc"
    assert bytes(segment.buf[0:3]) == b"abc"
    # Still reachable through the descriptor the creator holds.
    link = os.readlink(f"/proc/self/fd/{segment.fd}")
    assert link == f"{SHM_DIR}/{segment.name} (deleted)"


def test_attach_maps_the_same_memory_through_the_creators_descriptor(segment: Segment) -> None:
    segment.unlink()
    other = Segment.attach(segment.name, os.getpid(), segment.fd)
    try:
        assert other.size == segment.size and other.fd != segment.fd
        segment.buf[100:105] = b"hello"
        assert bytes(other.buf[100:105]) == b"hello"
        other.atomics.store64(8, 77)
        assert segment.atomics.load64(8) == 77
    finally:
        other.close()


def test_attach_refuses_what_is_not_that_segment(segment: Segment, tmp_path) -> None:
    pid = os.getpid()
    with pytest.raises(SegmentError, match="is gone"):
        Segment.attach(new_name(), pid, segment.fd)  # the descriptor holds another name
    other_file = tmp_path / "f"
    other_file.write_bytes(b"x" * 100)
    fd = os.open(other_file, os.O_RDONLY)
    try:
        with pytest.raises(SegmentError, match="is gone"):
            Segment.attach(segment.name, pid, fd)  # another file at that number
    finally:
        os.close(fd)
    closed_fd = os.dup(segment.fd)
    os.close(closed_fd)
    with pytest.raises(SegmentError, match="is gone"):
        Segment.attach(segment.name, pid, closed_fd)
    fd = segment.fd
    bad = [(0, fd), (-5, fd), (1 << 40, fd), (pid, -1), (pid, 1 << 40), (True, fd), ("1", fd)]
    for pid_, fd_ in bad:
        with pytest.raises(SegmentError, match="invalid handle"):
            Segment.attach(segment.name, pid_, fd_)


BAD_NAMES = [".", "..", "", "a/b", "x" * 300, "nul\x00byte", "bad\udcffsurrogate", "ümlaut"]


@pytest.mark.parametrize("bad", [*BAD_NAMES, 123, None, b"shmcast-0123456789abcdef"])
def test_bad_names_are_refused(bad: object) -> None:
    with pytest.raises(SegmentError, match="invalid"):
        check_name(bad, own=False)
    with pytest.raises(SegmentError, match="invalid"):
        Segment.open(bad)  # type: ignore[arg-type]
    with pytest.raises(SegmentError, match="invalid"):
        Segment.attach(bad, os.getpid(), 0)  # type: ignore[arg-type]


def test_a_directory_or_a_symlink_in_dev_shm_is_refused(tmp_path) -> None:
    name = PREFIX + "test-dir-" + secrets.token_hex(4)
    os.mkdir(_path(name))
    try:
        with pytest.raises(SegmentError, match=name):
            Segment.open(name)
    finally:
        os.rmdir(_path(name))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 4096)
    os.symlink(target, _path(name))
    try:
        with pytest.raises(SegmentError, match=name):
            Segment.open(name)  # never followed
    finally:
        os.unlink(_path(name))


def test_close_releases_the_mapping_and_the_descriptor(segment: Segment) -> None:
    fd = segment.fd
    segment.close()
    assert segment.atomics.released and segment.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
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


def test_shared_memory_full_is_an_oserror_and_a_shmcast_error() -> None:
    exc = SharedMemoryFull(28, "no room")
    assert isinstance(exc, OSError) and exc.errno == 28 and exc.strerror == "no room"


FULL_SHM_CHILD = """
import json, os
from shmcast import BroadcastQueue, GatherQueue, SharedMemoryFull
out = {}
try:
    BroadcastQueue(1, n_slots=64, slot_size=256 << 10)
except SharedMemoryFull as exc:
    out["error"], out["errno"] = str(exc), exc.errno
out["left"] = os.listdir("/dev/shm")
with BroadcastQueue(1, n_slots=64, slot_size=8192) as w, BroadcastQueue.attach(w.handle, 0) as r:
    w.put(b"x" * 300_000, timeout=5)  # streamed through every slot: all of it is really there
    out["got"] = len(r.get(timeout=5))
    try:
        GatherQueue(2, n_slots=64, slot_size=8192)
    except SharedMemoryFull as exc:
        out["second"] = str(exc)
out["left_after"] = os.listdir("/dev/shm")
print(json.dumps(out))
"""


def test_a_full_dev_shm_is_an_error_at_creation_and_leaves_nothing() -> None:
    """In a mount namespace of its own with a 1 MiB /dev/shm: a queue that does not fit raises
    SharedMemoryFull saying what it needs and what is free, nothing is left behind, and a queue
    that fits works through every byte of its ring (no SIGBUS)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to make a private mount namespace")
    probe = subprocess.run([unshare, "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.strip()}")
    script = 'mount -t tmpfs -o size=1m,mode=1777 shmcast-test /dev/shm && exec "$0" -c "$1"'
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
         FULL_SHM_CHILD],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["errno"] == errno.ENOSPC
    needed, free = (int(n.replace(",", "")) for n in re.findall(r"[\d,]{5,}", out["error"]))
    assert needed > 16 << 20 and 0 < free <= 1 << 20, out["error"]
    assert "needs" in out["error"] and "free" in out["error"]
    assert out["left"] == [] and out["left_after"] == []
    assert out["got"] == 300_000
    assert "not enough shared memory" in out["second"]
