"""Is a peer still the process we knew? (shmcast._liveness)"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys

import pytest
from _procs import process_group, report_identity, wait_for_state

from shmcast import _liveness
from shmcast._liveness import exit_fd, identity, is_alive, process_start_time


def _stat_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, parsed independently of shmcast."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data.rsplit(")", 1)[1].split()[19])


def test_own_process_is_alive() -> None:
    pid, start = identity()
    assert pid == os.getpid()
    assert start == process_start_time(pid) == _stat_start_time(pid) > 0
    assert is_alive(pid, start)
    assert is_alive(pid, 0)  # unknown start time: existence only


def test_parent_process_is_alive() -> None:
    ppid = os.getppid()
    assert is_alive(ppid, process_start_time(ppid))


def test_wrong_start_time_means_another_process() -> None:
    pid, start = identity()
    assert not is_alive(pid, start + 1)
    assert not is_alive(pid, start - 1)


def test_non_positive_pids_are_dead() -> None:
    assert not is_alive(0, 0)
    assert not is_alive(-1, 0)


def test_pid_that_cannot_exist_is_dead() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    assert process_start_time(beyond) == 0
    assert not is_alive(beyond, 0)
    assert not is_alive(beyond, 12345)


@pytest.mark.timeout(60)
def test_dead_child_is_dead() -> None:
    with process_group("fork", timeout=30) as group:
        child = group.start(report_identity)
        child_pid, (ident_pid, ident_start), proc_start = group.result(child)
        group.join(child)
    assert child_pid == ident_pid == child.pid
    assert ident_start == proc_start > 0
    assert not is_alive(child_pid, ident_start)


@pytest.mark.timeout(60)
def test_identity_is_recomputed_in_a_forked_child() -> None:
    parent = identity()  # cached in this process before the fork
    with process_group("fork", timeout=30) as group:
        child = group.start(report_identity)
        child_pid, child_identity, proc_start = group.result(child)
    assert child_identity == (child_pid, proc_start)
    assert child_identity[0] != parent[0]


def test_zombie_is_dead() -> None:
    pid = os.fork()
    if pid == 0:  # the child exits at once, without running anything of the parent's
        os._exit(0)
    try:
        start = process_start_time(pid)
        assert wait_for_state(pid, "Z", 10) == "Z", "the child did not become a zombie"
        assert not is_alive(pid, start)
        assert not is_alive(pid, 0)
    finally:
        os.waitpid(pid, 0)


@pytest.mark.timeout(60)
def test_command_names_with_spaces_and_parentheses() -> None:
    script = (
        "import sys\n"
        "with open('/proc/self/comm', 'w') as f:\n"
        "    f.write('a) b (c) d')\n"
        "print('renamed', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        start_before = _stat_start_time(child.pid)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "renamed"
        with open(f"/proc/{child.pid}/comm") as f:
            assert f.read().strip() == "a) b (c) d"
        assert process_start_time(child.pid) == start_before
        assert is_alive(child.pid, start_before)
    finally:
        child.communicate(timeout=30)
    assert not is_alive(child.pid, start_before)


# -- the pidfd cache ----------------------------------------------------------------------------


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


@pytest.mark.timeout(60)
def test_a_watched_process_is_dead_as_soon_as_it_ends() -> None:
    child = _sleeper()
    try:
        start = _stat_start_time(child.pid)
        assert is_alive(child.pid, start)  # looked up once, then watched
        fd = exit_fd(child.pid, start)
        assert fd is not None and not _readable(fd, 0)
        child.kill()
        try:
            assert _readable(fd, 10)  # the descriptor tells, before anyone reaps the child
            assert not is_alive(child.pid, start)  # a zombie now: dead
        finally:
            os.close(fd)  # the caller's own copy
        assert (child.pid, start) not in _liveness._WATCHES._fds  # a dead one's goes at once
    finally:
        child.kill()
        child.wait(10)
    assert exit_fd(child.pid, start) is None


def test_no_exit_descriptor_without_a_start_time_or_a_process() -> None:
    pid, start = identity()
    assert exit_fd(pid, 0) is None  # unknown start: existence only, never cached
    assert exit_fd(pid, start + 1) is None  # another process's identity
    assert exit_fd(0, 5) is None and exit_fd(2**63, 5) is None


@pytest.mark.timeout(60)
def test_the_cache_keeps_at_most_its_bound(monkeypatch) -> None:
    watches = _liveness._Watches()
    monkeypatch.setattr(_liveness, "_WATCHES", watches)
    monkeypatch.setattr(_liveness, "WATCHED_MAX", 2)
    children = [_sleeper() for _ in range(3)]
    try:
        known = [(c.pid, _stat_start_time(c.pid)) for c in children]
        for _ in range(2):
            assert all(is_alive(pid, start) for pid, start in known)
            assert len(watches._fds) == 2
        children[0].kill()
        children[0].wait(10)
        assert not is_alive(*known[0])  # evicted earlier: looked up again, and dead
        assert all(is_alive(pid, start) for pid, start in known[1:])
    finally:
        for c in children:
            c.kill()
            c.wait(10)
    assert not any(is_alive(pid, start) for pid, start in known)
    assert not watches._fds


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EMFILE])
def test_without_pidfds_proc_answers(monkeypatch, err: int) -> None:
    watches = _liveness._Watches()
    monkeypatch.setattr(_liveness, "_WATCHES", watches)

    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "pidfd_open", refuse)
    pid, start = identity()
    assert is_alive(pid, start) and is_alive(os.getppid(), process_start_time(os.getppid()))
    assert not is_alive(pid, start + 1)
    assert exit_fd(pid, start) is None
    assert not watches._fds
    # A kernel or sandbox without them stops asking; a one-off refusal does not.
    assert watches._unavailable == (err in (errno.ENOSYS, errno.EPERM))


@pytest.mark.timeout(60)
def test_a_forked_child_starts_with_an_empty_cache_and_still_answers() -> None:
    sleeper = _sleeper()
    try:
        watched = sleeper.pid, _stat_start_time(sleeper.pid)
        assert is_alive(*watched)  # cached before the fork
        with process_group("fork", timeout=30) as group:
            child = group.start(_alive_in_child, watched)
            assert group.result(child) == (0, True, True)
        sleeper.kill()
        sleeper.wait(10)
        assert not is_alive(*watched)  # the parent's copy still answers
    finally:
        sleeper.kill()
        sleeper.wait(10)


def _alive_in_child(who: tuple[int, int]) -> tuple[int, bool, bool]:
    inherited = len(_liveness._WATCHES._fds)
    return inherited, is_alive(*who), is_alive(*identity())
