"""Process orchestration on the harness's side: leaders, time limits, kills and clean-up.

For each implementation the harness starts a leader process (``leader.py``) in a new session
and hands it cases one at a time.  A case that has not reported its result within its time
limit is a *hang*: the harness kills the leader's whole process group (the leader, its
forkserver, every reader; by process-group id), waits until none of them is left, removes the
shared-memory segments and socket files the case had recorded, reports the hang, and starts a
fresh leader for the next case.

Leader start-up (imports, forkserver preload) has its own limit and is not part of any case.
Resources each case recorded (``adapters.record_resource``) and still present after it ended
normally are reported as *leaked*, then removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import _native
from ..._liveness import all_stat_fields
from . import adapters
from .workloads import CaseSpec

STARTUP_LIMIT_S = 180.0  # importing torch and vLLM twice (leader and forkserver) takes ~15 s


def _process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    # fields[0] is the state (field 3), fields[2] the process group (field 5)
    return [
        pid
        for pid, fields in all_stat_fields()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid
    ]


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def background_load(sample_s: float = 0.2) -> dict[str, float]:
    """How busy the machine is while the harness itself is idle (between cases): the busy
    share of all CPUs over ``sample_s`` seconds, and the 1-minute load average.  Other work
    on the machine skews every figure; this is recorded with each case so it can be seen."""
    busy0, total0 = _cpu_jiffies()
    time.sleep(sample_s)
    busy1, total1 = _cpu_jiffies()
    share = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return {"busy_percent": round(100 * share, 1), "loadavg_1m": round(os.getloadavg()[0], 2)}


def core_to_core(rounds: int = 20_000, batches: int = 10) -> dict[str, Any]:
    """Where the host has put this machine's CPUs, as seen from one cache line: the median
    round trip (ns) of a line passed between threads pinned to the first two CPUs this process
    may use (``_native.core_to_core_ns``).  On a virtual machine the host may move the virtual
    CPUs between core complexes while the harness runs (seen on a 2-vCPU machine: 60-90 ns on
    one complex, 340 ns across two, and 1 MiB throughput 10x apart), so it is recorded before
    and after each case.  ``{}`` when there are fewer than two CPUs or no probe."""
    cpus = sorted(os.sched_getaffinity(0))
    probe = getattr(_native, "core_to_core_ns", None)
    if len(cpus) < 2 or probe is None:
        return {}
    try:
        means = probe(cpus[0], cpus[1], rounds, batches, 2.0)
    except (OSError, TimeoutError) as exc:
        return {"cpus": cpus[:2], "error": str(exc)}
    return {"cpus": cpus[:2], "round_trip_ns": round(statistics.median(means), 1)}


@dataclass
class CaseOutcome:
    """What the harness learned about one case, beyond the leader's own summary."""

    result: dict[str, Any]
    elapsed_s: float
    leaked: list[str] = field(default_factory=list)
    background: dict[str, float] = field(default_factory=dict)
    #: core-to-core round trip (ns) measured just before and just after the case
    core_to_core_ns: list[float | None] = field(default_factory=list)


class Leader:
    """One leader process: start, run cases with a time limit each, kill.

    Not thread-safe; owned by the harness's main thread.
    """

    def __init__(
        self,
        impl: str,
        options: dict[str, Any],
        workdir: Path,
        start_method: str,
        on_event: Callable[[dict[str, Any]], None],
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = dict(extra_env or {})
        self.impl = impl
        self.options = options
        self.workdir = workdir
        self.start_method = start_method
        self.on_event = on_event
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"leader-{impl.replace(':', '_').replace('/', '_')}.log"
        self.resource_log = workdir / f"resources-{os.getpid()}-{id(self)}.txt"
        self.tmpdir = Path(tempfile.mkdtemp(prefix="ipc-", dir=workdir))
        self._events = b""
        self._event_fd = -1
        self._cmd_fd = -1
        self.phase = "starting"

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, limit: float = STARTUP_LIMIT_S) -> dict[str, Any]:
        """Start the leader; return its ``ready`` or ``unavailable`` event.  On a start-up that
        exceeds ``limit`` the leader is killed and an ``unavailable`` event is returned."""
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env[adapters.RESOURCE_LOG_ENV] = str(self.resource_log)
        env[adapters.TMPDIR_ENV] = str(self.tmpdir)
        env["VLLM_RPC_BASE_PATH"] = str(self.tmpdir)  # where vLLM puts its ipc:// sockets
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        config = {"impl": self.impl, "options": self.options, "start_method": self.start_method}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shmcast._tools.bench.leader", str(cmd_r), str(evt_w),
                 json.dumps(config)],
                pass_fds=(cmd_r, evt_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # fmt: skip
        os.close(cmd_r)
        os.close(evt_w)
        self._cmd_fd, self._event_fd = cmd_w, evt_r
        deadline = time.monotonic() + limit
        while True:
            event = self._next_event(deadline)
            if event is None:
                reason = (
                    self._death_reason(wait=time.monotonic() < deadline)
                    or f"start-up took more than {limit:.0f} s"
                )
                self.kill()
                return {"event": "unavailable", "reason": reason}
            if event.get("event") in ("ready", "unavailable"):
                return event

    def run(self, spec: CaseSpec) -> CaseOutcome:
        """Run one case; a case past ``spec.time_limit`` is killed and reported as a hang."""
        assert self.proc is not None
        background = background_load()
        c2c_before = core_to_core().get("round_trip_ns")
        recorded_before = self._recorded()
        start = time.monotonic()
        deadline = start + spec.time_limit
        self.phase = "sending the case"
        command = json.dumps({"cmd": "case", "case": spec.as_dict()}) + "\n"
        with contextlib.suppress(BrokenPipeError):  # a dead leader shows below
            os.write(self._cmd_fd, command.encode())
        while True:
            event = self._next_event(deadline)
            if event is None:
                elapsed = time.monotonic() - start
                died = self._death_reason(wait=time.monotonic() < deadline)
                phase = self.phase
                killed = self.kill()
                if died:
                    result = {"status": "error", "detail": f"leader {died} (phase: {phase})"}
                else:
                    result = {
                        "status": "hang",
                        "detail": f"no result within {spec.time_limit:g} s (phase: {phase}); "
                        f"process group {killed['process_group']} killed",
                    }
                result.update(verification={}, metrics={}, kill=killed)
                c2c = [c2c_before, core_to_core().get("round_trip_ns")]
                return CaseOutcome(result, elapsed, background=background, core_to_core_ns=c2c)
            if event.get("event") == "phase":
                self.phase = event["phase"]
                self.on_event(event)
            elif event.get("event") == "result":
                elapsed = time.monotonic() - start
                leaked = self._remove_resources(self._recorded()[len(recorded_before) :])
                c2c = [c2c_before, core_to_core().get("round_trip_ns")]
                return CaseOutcome(event["result"], elapsed, leaked, background, c2c)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the leader to exit; kill it (and its group) if it does not within ``timeout``."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._cmd_fd, b'{"cmd": "exit"}\n')
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()

    def kill(self) -> dict[str, Any]:
        """Kill the leader's process group, reap the leader, wait for the group to be gone,
        close the pipes and remove the recorded resources.  Returns what it did."""
        report: dict[str, Any] = {
            "process_group": None,
            "leftover_processes": [],
            "removed_resources": [],
        }
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the leader leads its own group
            report["process_group"] = pgid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            deadline = time.monotonic() + 10
            while (members := _process_group_members(pgid)) and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                time.sleep(0.05)
            report["leftover_processes"] = members
            self.proc = None
        for fd in (self._cmd_fd, self._event_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._cmd_fd = self._event_fd = -1
        report["removed_resources"] = self._remove_resources(self._recorded())
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.resource_log.unlink()
        return report

    # -- helpers --------------------------------------------------------------------------------

    def _next_event(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON event from the leader, or None at the deadline or when it is gone."""
        while b"\n" not in self._events:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._event_fd < 0:
                return None
            readable, _, _ = select.select([self._event_fd], [], [], min(remaining, 0.5))
            if not readable:
                continue
            chunk = os.read(self._event_fd, 65536)
            if not chunk:
                return None  # the leader closed its end: it exited
            self._events += chunk
        line, _, self._events = self._events.partition(b"\n")
        return json.loads(line)

    def _death_reason(self, wait: bool = False) -> str:
        """Why the leader is gone ("" while it runs).  ``wait``: it closed its event pipe, so
        give it a moment to finish exiting."""
        if self.proc is not None and wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            return f"exited with code {code}; its output ended with:\n{self.log_tail()}"
        return ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the leader (and its readers) printed: the log itself lives in a
        temporary directory removed at the end of the run."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _recorded(self) -> list[str]:
        try:
            return self.resource_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    @staticmethod
    def _remove_resources(paths: list[str]) -> list[str]:
        """Remove those of ``paths`` that still exist; return them."""
        removed = []
        for path in dict.fromkeys(paths):
            if os.path.lexists(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                removed.append(path)
        return removed
