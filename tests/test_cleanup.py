"""No segment outlives its processes.

A queue's segment loses its name in /dev/shm as soon as the queue exists; from then on the
kernel keeps it exactly as long as some process maps it or holds it open.  These tests end the
creator (and its readers) in every way a process can end, and check that nothing is left: no
name in /dev/shm, and no process that maps the segment or holds it (``segment_users``, read
from /proc), which is when the kernel frees it.  What remains possible (a creator killed
inside the constructor, between creating the name and removing it) is made on purpose and
``cleanup`` must remove exactly that.  And no warnings about leaked shared memory from anyone.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _procs import (
    START_METHODS,
    killed_while_creating,
    process_group,
    reader_close_in_ways,
    segment_users,
)

from shmcast import BroadcastQueue, GatherQueue
from shmcast._segment import SHM_DIR
from shmcast._tools import inspection as I

TESTS = Path(__file__).resolve().parent
SUBPROCESS_TIMEOUT = 60
NOISE = ("leaked", "resource_tracker", "Warning", "Exception ignored", "Traceback")


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def gone(name: str, timeout: float = 10.0) -> bool:
    """True once no name is left in /dev/shm and no process maps or holds the segment (the
    processes of the test may take a moment to finish exiting)."""
    deadline = time.monotonic() + timeout
    while exists(name) or segment_users(name):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with warnings shown (``-X dev``)."""
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def start_python(script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` in a fresh interpreter, talking on stdin/stdout (lines)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_quiet(stderr: str) -> None:
    for word in NOISE:
        assert word not in stderr, f"unexpected {word!r} on stderr:\n{stderr}"


# -- in this process --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["broadcast", "gather"])
def test_a_new_queue_has_no_name_and_goes_with_its_last_user(kind: str) -> None:
    make, attach = (
        (lambda: BroadcastQueue(1, n_slots=4, slot_size=64), BroadcastQueue.attach)
        if kind == "broadcast"
        else (lambda: GatherQueue(1, n_slots=4, slot_size=64), GatherQueue.attach)
    )
    creator = make()
    name = creator.name
    assert not exists(name)
    assert segment_users(name) == {os.getpid()}
    peer = attach(creator.handle, 0)
    creator.close()
    assert segment_users(name) == {os.getpid()}  # the peer still maps it
    peer.close()
    assert gone(name)


@pytest.mark.parametrize("how", ["gc", "cycle"])
def test_a_collected_queue_is_gone(how: str) -> None:
    import gc

    writer = BroadcastQueue(1, n_slots=4, slot_size=64)
    name = writer.name
    if how == "cycle":
        writer.myself = writer  # only the cycle collector frees it
    del writer
    gc.collect()
    assert gone(name)


# -- however the creator ends ---------------------------------------------------------------------

CREATOR_SCRIPT = """
    import gc, json, os, resource, signal, sys
    import shmcast

    how, kind = sys.argv[1], sys.argv[2]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file
    if kind == "broadcast":
        queue = shmcast.BroadcastQueue(1, n_slots=8, slot_size=256)
    else:
        queue = shmcast.GatherQueue(1, n_slots=8, slot_size=256)
    h = queue.handle
    print(json.dumps([h.name, h.nonce, h.pid, h.fd]), flush=True)
    if sys.stdin.readline().strip() == "wait":
        queue.wait_until_ready(timeout=30)
        if kind == "broadcast":
            queue.put("hello", timeout=30)
        sys.stdin.readline()
    queue.myself = queue  # in a reference cycle too, as in a worker's global
    if how == "close":
        queue.close()
    elif how == "exit":
        sys.exit(0)
    elif how == "exception":
        raise RuntimeError("boom")
    elif how == "os._exit":
        os._exit(0)
    elif how == "abort":
        os.abort()
    else:
        os.kill(os.getpid(), getattr(signal, how))
        signal.pause()
"""

PEER_SCRIPT = """
    import json, sys
    import shmcast

    kind, (name, nonce, pid, fd) = sys.argv[1], json.loads(sys.argv[2])
    handle = shmcast.Handle(name, nonce, pid, fd)
    if kind == "broadcast":
        queue = shmcast.BroadcastQueue.attach(handle, 0)
        print("attached", queue.get(timeout=30), flush=True)
        try:
            queue.get(timeout=30)
        except (shmcast.QueueBroken, shmcast.QueueClosed) as exc:
            print("ended", type(exc).__name__, flush=True)
        sys.stdin.readline()  # hold the segment until told
    else:
        queue = shmcast.GatherQueue.attach(handle, 0)
        print("attached hello", flush=True)
        try:
            while True:
                queue.put("reply", timeout=30)
        except (shmcast.QueueBroken, shmcast.QueueClosed) as exc:
            print("ended", type(exc).__name__, flush=True)
        sys.stdin.readline()
"""

ENDINGS = ["close", "exit", "exception", "os._exit", "abort", "SIGTERM", "SIGHUP", "SIGQUIT",
           "SIGINT", "SIGKILL", "SIGSEGV", "SIGBUS"]  # fmt: skip


def _read_line(proc: subprocess.Popen[str]) -> str:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line, f"the child said nothing: {proc.stderr.read()}"  # type: ignore[union-attr]
    return line.strip()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["broadcast", "gather"])
@pytest.mark.parametrize("how", ENDINGS)
def test_nothing_is_left_however_a_lone_creator_ends(how: str, kind: str) -> None:
    creator = start_python(CREATOR_SCRIPT, how, kind)
    try:
        name = json.loads(_read_line(creator))[0]
        assert not exists(name)
        creator.stdin.write("go\n")  # type: ignore[union-attr]
        creator.stdin.flush()  # type: ignore[union-attr]
        creator.wait(SUBPROCESS_TIMEOUT)
    finally:
        creator.kill()
        creator.wait()
    assert gone(name), f"{name}: users {segment_users(name)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["broadcast", "gather"])
@pytest.mark.parametrize("how", ENDINGS)
def test_nothing_is_left_once_the_creator_and_its_peer_have_ended(how: str, kind: str) -> None:
    creator = start_python(CREATOR_SCRIPT, how, kind)
    peer = None
    try:
        fields = _read_line(creator)
        name = json.loads(fields)[0]
        creator.stdin.write("wait\n")  # type: ignore[union-attr]
        creator.stdin.flush()  # type: ignore[union-attr]
        peer = start_python(PEER_SCRIPT, kind, fields)
        assert _read_line(peer) == "attached hello"
        creator.stdin.write("go\n")  # type: ignore[union-attr]
        creator.stdin.flush()  # type: ignore[union-attr]
        creator.wait(SUBPROCESS_TIMEOUT)
        assert _read_line(peer).startswith("ended Queue")  # the survivor notices the end ...
        assert segment_users(name) == {peer.pid}  # ... and alone keeps the segment
        peer.stdin.write("bye\n")  # type: ignore[union-attr]
        peer.stdin.flush()  # type: ignore[union-attr]
        peer.wait(SUBPROCESS_TIMEOUT)
    finally:
        for proc in (creator, peer):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert gone(name), f"{name}: users {segment_users(name)}"


def creator_worker(conn, how: str) -> None:
    """A multiprocessing worker that creates a queue, keeps it in a global and a cycle, sends
    its name, then is terminated or returns (multiprocessing then leaves by os._exit)."""
    queue = BroadcastQueue(1, n_slots=8, slot_size=256)
    queue.myself = queue
    globals()["KEPT"] = queue
    conn.send(queue.name)
    if how == "terminate":
        time.sleep(60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("how", ["terminate", "return"])
def test_nothing_is_left_by_a_multiprocessing_worker(method: str, how: str) -> None:
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=creator_worker, args=(child, how))
    worker.start()
    try:
        assert parent.poll(SUBPROCESS_TIMEOUT)
        name = parent.recv()
        if how == "terminate":
            worker.terminate()
        worker.join(SUBPROCESS_TIMEOUT)
        assert worker.exitcode == (-signal.SIGTERM if how == "terminate" else 0)
    finally:
        worker.kill()
        worker.join()
    assert gone(name), f"{name}: users {segment_users(name)}"


# -- the one window left, and what cleanup does about it --------------------------------------


@pytest.mark.timeout(60)
def test_a_creator_killed_inside_the_constructor_leaves_a_name_that_cleanup_removes() -> None:
    name, _creator = killed_while_creating()
    try:
        assert exists(name) and not segment_users(name)
        with BroadcastQueue(1, n_slots=4, slot_size=64) as live:  # a live queue beside it
            report = I.plan_and_cleanup(dry_run=True)
            assert name in [s.name for s in report.orphans]
            assert live.name not in [s.name for s in report.orphans + report.live]
            assert exists(name)  # a dry run removes nothing
            assert I.cleanup(dry_run=False, names=[name]) == [name]
            assert live.put("still works", timeout=5) is None
        assert not exists(name)
    finally:
        if exists(name):
            os.unlink(os.path.join(SHM_DIR, name))


# -- readers and forked children never touch the creator's segment ---------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "gc", "keep"])
def test_readers_leaving_do_not_affect_the_segment(how: str) -> None:
    with BroadcastQueue(1, n_slots=4, slot_size=64) as writer:
        with process_group("fork", timeout=30) as group:
            child = group.start(reader_close_in_ways, writer.handle, 0, how)
            assert group.result(child) is True  # still reachable, seen from the reader
            group.join(child)
        assert segment_users(writer.name) == {os.getpid()}
        for i in range(10):  # it detached: the writer no longer waits for it
            writer.put(i, timeout=0)


FORK_SCRIPT = """
    import gc, json, os, sys
    import shmcast

    how = sys.argv[1]
    writer = shmcast.BroadcastQueue(1, n_slots=4, slot_size=64)
    reader = shmcast.BroadcastQueue.attach(writer.handle, 0)
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
    report = {"child_status": status}
    writer.put("after the child", timeout=5)
    report["delivered"] = reader.get(timeout=5)
    writer.close()
    reader.close()
    print(json.dumps(report), flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "close", "gc"])
def test_a_forked_child_leaving_does_not_affect_the_parents_queue(how: str) -> None:
    done = run_python(FORK_SCRIPT, how)
    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)
    assert json.loads(done.stdout) == {"child_status": 0, "delivered": "after the child"}


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
    assert gone(done.stdout.strip())


# -- the leak check of conftest itself --------------------------------------------------------

LEAKY_TESTS = """
    import multiprocessing
    import subprocess
    import time

    from shmcast import BroadcastQueue
    from shmcast._segment import Segment

    KEPT = []


    def test_leaks_an_open_queue():
        KEPT.append(BroadcastQueue(1, n_slots=4, slot_size=64))
        with open("leaked-open", "w") as f:
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
    opened = (tmp_path / "leaked-open").read_text()
    pid = int((tmp_path / "leaked-pid").read_text())
    assert f"segments left open by this process: {opened}" in out
    assert f"pid {pid} " in out and "child processes left running (killed now)" in out
    assert "multiprocessing child" in out
    raw = (tmp_path / "leaked-raw").read_text()
    assert f"{raw} (no shmcast header; still in use by this test)" in out
    assert "test_clean" not in out.split("short test summary info")[-1]
    assert gone(opened)  # the open queue went with the process
    assert not os.path.exists(f"/proc/{pid}")
    os.unlink(os.path.join(SHM_DIR, raw))  # a raw segment keeps its name: not shmcast's
