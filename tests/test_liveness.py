"""Is a peer still the process we knew? (shmcast._liveness)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _procs import process_group, report_identity, wait_for_state

from shmcast._liveness import identity, is_alive, process_start_time


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
