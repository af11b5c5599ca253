"""Who removes a queue's segment, and when: the creator, on close(), when the queue is
collected, and at interpreter exit; never a reader, never a forked child.  And no warnings
about leaked shared memory from anyone."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _procs import process_group, reader_close_in_ways

from shmcast import BroadcastQueue
from shmcast._segment import SHM_DIR

TESTS = Path(__file__).resolve().parent
SUBPROCESS_TIMEOUT = 60
NOISE = ("leaked", "resource_tracker", "Warning", "Exception ignored", "Traceback")


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with warnings shown (``-X dev``)."""
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def assert_quiet(stderr: str) -> None:
    for word in NOISE:
        assert word not in stderr, f"unexpected {word!r} on stderr:\n{stderr}"


# -- the creator ------------------------------------------------------------------------------


def test_close_unlinks() -> None:
    writer = BroadcastQueue(1, n_slots=4, slot_size=64)
    reader = BroadcastQueue.attach(writer.handle, 0)
    assert exists(writer.name)
    writer.close()
    assert not exists(writer.name)
    reader.close()


def test_garbage_collection_unlinks() -> None:
    writer = BroadcastQueue(1, n_slots=4, slot_size=64)
    name = writer.name
    del writer
    gc.collect()
    assert not exists(name)


def test_garbage_collection_of_a_queue_in_a_cycle_unlinks() -> None:
    writer = BroadcastQueue(1, n_slots=4, slot_size=64)
    name = writer.name
    writer.myself = writer  # a reference cycle: only the cycle collector frees it
    del writer
    gc.collect()
    assert not exists(name)


EXIT_SCRIPT = """
    import sys
    import shmcast

    how = sys.argv[1]
    writer = shmcast.BroadcastQueue(2, n_slots=4, slot_size=64)
    reader = shmcast.BroadcastQueue.attach(writer.handle, 0)
    writer.put("pending")
    if how == "cycle":
        writer.myself = writer
    print(writer.name, flush=True)
    if how == "exit-code":
        sys.exit(3)
    if how == "exception":
        raise RuntimeError("boom")
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("how", "returncode"), [("plain", 0), ("cycle", 0), ("exit-code", 3), ("exception", 1)]
)
def test_interpreter_exit_unlinks(how: str, returncode: int) -> None:
    done = run_python(EXIT_SCRIPT, how)
    name = done.stdout.strip()
    assert name.startswith("shmcast-"), done
    assert done.returncode == returncode, done.stderr
    assert not exists(name)
    if how == "exception":
        assert "RuntimeError: boom" in done.stderr
        assert "leaked" not in done.stderr and "Warning" not in done.stderr
    else:
        assert_quiet(done.stderr)


# -- readers ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "gc", "keep"])
def test_readers_never_unlink(how: str) -> None:
    with BroadcastQueue(1, n_slots=4, slot_size=64) as writer:
        with process_group("fork", timeout=30) as group:
            child = group.start(reader_close_in_ways, writer.handle, 0, how)
            assert group.result(child) is True  # still there, seen from the reader
            group.join(child)
        assert exists(writer.name)


READER_EXIT_SCRIPT = """
    import sys
    import shmcast

    name, nonce = sys.argv[1], int(sys.argv[2])
    reader = shmcast.BroadcastQueue.attach(shmcast.Handle(name, nonce), 0)
    print(reader.get(timeout=30), flush=True)
"""


@pytest.mark.timeout(90)
def test_reader_interpreter_exit_detaches_without_unlinking() -> None:
    with BroadcastQueue(1, n_slots=4, slot_size=64) as writer:
        writer.put("hello")
        done = run_python(READER_EXIT_SCRIPT, writer.name, str(writer.handle.nonce))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hello"
        assert_quiet(done.stderr)
        assert exists(writer.name)
        # It detached on exit: the writer no longer waits for it.
        for i in range(10):
            writer.put(i, timeout=0)


FORK_SCRIPT = """
    import gc, json, os, sys
    import shmcast

    how = sys.argv[1]
    writer = shmcast.BroadcastQueue(1, n_slots=4, slot_size=64)
    reader = shmcast.BroadcastQueue.attach(writer.handle, 0)
    path = "/dev/shm/" + writer.name
    pid = os.fork()
    if pid == 0:
        # The child: leave in one of several ways, always through a normal interpreter exit
        # (atexit handlers and finalizers run).
        if how == "close":
            writer.close()
            reader.close()
        elif how == "gc":
            del writer, reader
            gc.collect()
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    report = {"child_status": status, "exists_after_child": os.path.exists(path)}
    writer.put("after the child", timeout=5)
    report["delivered"] = reader.get(timeout=5)
    writer.close()
    reader.close()
    report["exists_after_close"] = os.path.exists(path)
    print(json.dumps(report), flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "close", "gc"])
def test_forked_child_does_not_unlink_the_parents_segment(how: str) -> None:
    done = run_python(FORK_SCRIPT, how)
    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)
    report = json.loads(done.stdout)
    assert report == {
        "child_status": 0,
        "exists_after_child": True,
        "delivered": "after the child",
        "exists_after_close": False,
    }


SPAWN_SCRIPT = """
    import multiprocessing as mp
    import shmcast

    def read(handle, index, count):
        with shmcast.BroadcastQueue.attach(handle, index) as q:
            return [q.get(timeout=30) for _ in range(count)]

    def main():
        ctx = mp.get_context("spawn")
        with shmcast.BroadcastQueue(2, n_slots=4, slot_size=64) as writer:
            with ctx.Pool(2) as pool:
                results = [pool.apply_async(read, (writer.handle, i, 20)) for i in range(2)]
                writer.wait_until_ready(timeout=30)
                for n in range(20):
                    writer.put(n, timeout=30)
                assert [r.get(timeout=60) for r in results] == [list(range(20))] * 2
            print(writer.name, flush=True)

    if __name__ == "__main__":
        main()
"""


@pytest.mark.timeout(120)
def test_no_shared_memory_warnings_with_spawned_readers(tmp_path: Path) -> None:
    script = tmp_path / "spawned_readers.py"
    script.write_text(textwrap.dedent(SPAWN_SCRIPT))
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(script)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)
    assert not exists(done.stdout.strip())


# -- the leak check of conftest itself --------------------------------------------------------

LEAKY_TESTS = """
    import multiprocessing
    import subprocess
    import time

    from shmcast import BroadcastQueue
    from shmcast._segment import Segment

    KEPT = []


    def test_leaks_a_segment():
        KEPT.append(BroadcastQueue(1, n_slots=4, slot_size=64))
        with open("leaked-name", "w") as f:
            f.write(KEPT[-1].name)


    def test_leaks_a_subprocess():
        proc = subprocess.Popen(["sleep", "60"])
        with open("leaked-pid", "w") as f:
            f.write(str(proc.pid))


    def test_leaks_a_multiprocessing_child():
        multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,)).start()


    def test_leaks_a_raw_segment():
        KEPT.append(Segment.create(4096))
        with open("leaked-raw", "w") as f:
            f.write(KEPT[-1].name)


    def test_clean():
        with BroadcastQueue(1, n_slots=4, slot_size=64):
            pass
"""


@pytest.mark.timeout(120)
def test_the_leak_check_catches_leaks(tmp_path: Path) -> None:
    for helper in ("conftest.py", "_procs.py"):
        shutil.copy(TESTS / helper, tmp_path / helper)
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(LEAKY_TESTS))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rE", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT * 2,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 1, out
    assert "5 passed, 4 errors" in out, out
    name = (tmp_path / "leaked-name").read_text()
    pid = int((tmp_path / "leaked-pid").read_text())
    assert f"shared-memory segments left in /dev/shm: {name} (creator pid" in out
    assert f"pid {pid} " in out and "child processes left running (killed now)" in out
    assert "multiprocessing child" in out
    raw = (tmp_path / "leaked-raw").read_text()
    assert f"{raw} (no shmcast header; still in use by this test)" in out
    assert "test_clean" not in out.split("short test summary info")[-1]
    assert not exists(name)
    assert not os.path.exists(f"/proc/{pid}")
