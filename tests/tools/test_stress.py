"""``shmcast stress``: the engine-and-workers scenario of the frozen-server report, at small size.

Every run starts 12 worker processes (more than the cores of a small machine, on purpose),
so every test that runs one has a timeout, and checks afterwards that the workers are gone and
the two queues' segments removed.  The full-size soak is in docs/stress.md, not here.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmcast import _layout as L
from shmcast._tools.cli import UsageError
from shmcast._tools.stress import (
    StressConfig,
    StressResult,
    _config_from_args,
    _Scheduler,
    add_arguments,
    reply_digest,
    run_stress,
    step_digest,
)

SHM = Path("/dev/shm")
WORKERS = 12
# 3 batches of 6 requests of 2..6 steps, a batch every 2 steps, at most 12 running.
SMALL = dict(
    workers=WORKERS, batches=3, batch_size=6, max_running=12, min_steps=2, max_steps=6,
    arrival_every=2, watchdog=20.0,
)  # fmt: skip
SMALL_ARGS = [
    "--workers", str(WORKERS), "--batches", "3", "--batch-size", "6", "--max-running", "12",
    "--min-steps", "2", "--max-steps", "6", "--arrival-every", "2", "--watchdog", "20",
]  # fmt: skip

# The command's entry point, as the `shmcast stress` subcommand calls it.
WRAPPER = (
    # As a terminal gives a foreground command: Ctrl-C raises KeyboardInterrupt, even when the
    # tests themselves run with SIGINT ignored (as a background job of a shell does).
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "import sys, argparse\n"
    "from shmcast._tools import stress as s\n"
    "p = argparse.ArgumentParser()\n"
    "s.add_arguments(p)\n"
    "sys.exit(s.run(p.parse_args(sys.argv[1:])))\n"
)
CLI_TIMEOUT = 60.0


def assert_cleaned_up(result: StressResult) -> None:
    """The run's workers are no longer our children and its segments are gone."""
    assert len(result.worker_pids) == WORKERS
    live = {p.pid for p in multiprocessing.active_children()}
    assert not live & set(result.worker_pids), "a worker process outlived the run"
    assert len(result.segments) == 2
    for name in result.segments:
        assert not (SHM / name).exists(), f"segment {name} left in /dev/shm"


def details(result: StressResult) -> str:
    return f"{result.summary()}\n{result.report}"


# -- the scenario under every wait policy ---------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", ["futex", "spin", "backoff", "idle"])
def test_scenario_completes_and_verifies_under_every_wait_policy(wait: str) -> None:
    result = run_stress(**SMALL, wait=wait, seed=7)
    assert result.verdict == "ok", details(result)
    assert result.wait == wait
    assert not result.hung
    assert result.items_completed == result.items_total == 18
    assert result.batches_completed == result.batches_total == 3
    assert result.steps >= 6  # a request needs at least 2 steps; batches arrive 2 steps apart
    assert 0 < result.max_running_seen <= 12
    assert result.steps_per_s > 0
    assert_cleaned_up(result)


@pytest.mark.timeout(60)
def test_same_seed_gives_the_same_schedule() -> None:
    first = run_stress(**SMALL, seed=3)
    second = run_stress(**SMALL, seed=3)
    assert first.ok and second.ok, details(first) + details(second)
    assert (first.steps, first.max_running_seen) == (second.steps, second.max_running_seen)


# -- faults: the run must end promptly, name the culprit, and clean up ----------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", ["futex", "spin"])
def test_killed_worker_ends_the_run_promptly_naming_it(wait: str) -> None:
    started = time.monotonic()
    result = run_stress(**{**SMALL, "watchdog": 120.0}, wait=wait, kill_worker_at_step=3,
                        fault_worker=5)  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.verdict == "worker-died", details(result)
    assert result.stalled_workers == (5,)
    assert result.stalled_party == "worker 5"
    assert "worker 5" in result.message and "SIGKILL" in result.message
    assert result.steps == 3  # steps 0..2 completed; step 3 never did
    assert not result.hung
    # Found by the queue's liveness check, not by the 120 s watchdog.
    assert elapsed < 60
    assert "killed by SIGKILL  <--" in result.report
    assert_cleaned_up(result)


@pytest.mark.timeout(60)
def test_frozen_worker_is_reported_by_the_watchdog() -> None:
    result = run_stress(**{**SMALL, "watchdog": 3.0}, freeze_worker_at_step=2, fault_worker=-1)
    assert result.verdict == "stall", details(result)
    assert result.hung
    assert result.stalled_workers == (WORKERS - 1,)
    assert result.message.startswith("STALL: no step completed")
    assert f"stalled: worker {WORKERS - 1}" in result.message
    report = result.report
    assert f"missing: {WORKERS - 1}" in report
    assert "state T (stopped)" in report  # the process is alive, and stopped
    # The queue words: the frozen worker has not read step 2 nor replied to it.
    assert f"reader  {WORKERS - 1}: read_seq 2 (1 unread)" in report
    assert f"writer  {WORKERS - 1}: write_seq 2 (engine read 2)" in report
    assert report.count("<-- stalled") == 2
    assert_cleaned_up(result)


@pytest.mark.timeout(60)
def test_wrong_reply_fails_the_run_naming_the_worker() -> None:
    result = run_stress(**SMALL, corrupt_reply_at_step=1, fault_worker=2)
    assert result.verdict == "wrong-reply", details(result)
    assert result.stalled_workers == (2,)
    assert "worker 2 sent a wrong reply to step 1" in result.message
    assert result.steps == 1
    assert_cleaned_up(result)


# -- pure parts: digests and the scheduler ---------------------------------------------------------


def test_digests_depend_on_every_input() -> None:
    requests = [(1, 0, b"ab"), (2, 3, b"cd")]
    base = step_digest(5, requests)
    assert base == step_digest(5, list(requests))
    assert base != step_digest(6, requests)
    assert base != step_digest(5, [(1, 0, b"ab"), (2, 4, b"cd")])
    assert base != step_digest(5, [(1, 0, b"ab"), (2, 3, b"ce")])
    assert base != step_digest(5, requests[::-1])
    assert len({reply_digest(base, w) for w in range(64)}) == 64


def test_scheduler_caps_running_and_completes_every_request() -> None:
    config = StressConfig(batches=30, batch_size=12, max_running=62, arrival_every=1)
    sched = _Scheduler(config, random.Random(1))
    step = 0
    while not sched.finished():
        sched.admit(step)
        assert 0 < len(sched.running) <= 62
        sched.complete_step()
        step += 1
        assert step < 10_000
    assert sched.items_done == 360 and sched.batches_done == 30
    assert sched.max_running_seen == 62  # arrivals outpace completions: the cap binds


def test_closed_loop_keeps_one_batch_in_flight() -> None:
    config = StressConfig(batches=10, batch_size=12, arrival_every=0)
    sched = _Scheduler(config, random.Random(2))
    step = 0
    while not sched.finished():
        sched.admit(step)
        assert len({r.batch for r in sched.running}) == 1 and not sched.waiting
        sched.complete_step()
        step += 1
    assert sched.items_done == 120


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="min_steps"):
        run_stress(min_steps=9, max_steps=8)
    with pytest.raises(ValueError, match="unknown wait policy"):
        run_stress(wait="nap")
    with pytest.raises(TypeError):
        run_stress(no_such_option=1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UsageError, match="idle"):
        _config_from_args(parser.parse_args(["--idle-busy-period", "1"]))
    with pytest.raises(UsageError, match="fault_worker"):
        _config_from_args(parser.parse_args(["--workers", "4", "--fault-worker", "4"]))


# -- the command ---------------------------------------------------------------------------------


def members_of_session(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (orphans keep it when reparented)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[3]) == sid:
            found.append(int(entry))
    return found


def segments_created_by(pid: int) -> list[str]:
    names = []
    for path in SHM.glob("shmcast-*"):
        try:
            head = path.read_bytes()[: L.HEADER.size]
        except OSError:
            continue
        if len(head) == L.HEADER.size and L.HEADER.unpack_from(head, 0)[8] == pid:
            names.append(path.name)
    return names


def run_cli(args: list[str], interrupt_after: float | None = None, how: str = "ctrl-c"):
    """Run the command in its own session; return (status, stdout, stderr).  With
    ``interrupt_after``, interrupt it after that many seconds: ``how`` is "ctrl-c" (SIGINT to
    the process group, as a terminal does) or "sigterm" (to the command only).  Kills the
    whole session if it outlives CLI_TIMEOUT, and checks nothing of it is left behind."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        if interrupt_after is not None:
            time.sleep(interrupt_after)
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    deadline = time.monotonic() + 10
    while members_of_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert members_of_session(proc.pid) == [], "processes of the command outlived it"
    assert segments_created_by(proc.pid) == [], "the command left segments in /dev/shm"
    return proc.returncode, out, err


@pytest.mark.timeout(90)
def test_command_runs_repetitions_and_reports_each() -> None:
    status, out, err = run_cli([*SMALL_ARGS, "--repeat", "2", "--progress-interval", "0.01"])
    assert status == 0, out + err
    assert "shmcast stress: 12 workers, 3 batches x 6 requests" in out
    assert out.count(" ok ") == 2 and "rep   1 [futex]" in out and "rep   2 [futex]" in out
    assert "summary: 2/2 repetitions ok, hangs 0, other failures 0" in out
    assert "items 36/36" in out
    assert "rep 1/2 [futex] batches" in err  # progress lines (stderr is not a terminal here)


@pytest.mark.timeout(90)
def test_command_exits_nonzero_naming_a_killed_worker() -> None:
    status, out, err = run_cli([*SMALL_ARGS, "--kill-worker-at-step", "2", "--fault-worker", "3"])
    assert status == 1, out + err
    assert "worker-died" in out and "worker 3 (pid" in out and "killed by SIGKILL" in out
    assert "summary: 0/1 repetitions ok, hangs 0, other failures 1" in out


@pytest.mark.timeout(90)
def test_command_reports_a_stall_and_exits_nonzero() -> None:
    args = [*SMALL_ARGS[:-2], "--watchdog", "3", "--freeze-worker-at-step", "1"]
    status, out, err = run_cli(args)
    assert status == 1, out + err
    assert "STALL" in out and "stalled: worker 11" in out
    assert "summary: 0/1 repetitions ok, hangs 1" in out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_stops_workers_and_removes_queues(how: str) -> None:
    # A run far longer than the wait below: 2000 batches.
    args = ["--batches", "2000", "--progress-interval", "0.1"]
    status, out, err = run_cli(args, interrupt_after=2.0, how=how)
    assert status == 130, out + err
    assert "interrupted during repetition 1" in out
    assert "Traceback" not in err  # the workers ignore SIGINT: the engine shuts them down
