"""``shmcast bench``: the comparative benchmark of shmcast against other one-to-many channels.

One writer and N reader processes run the same workloads through a small adapter per
implementation (``adapters.py``): latency, throughput, wake-up latency, idle CPU and an engine
scenario (``workloads.py``).  Every reader verifies that it got every message in order; an
implementation that loses or reorders is flagged, not ranked.  Each case runs under a hard time
limit; a hang is reported and its processes killed (``runner.py``).  Results go to the
terminal, to JSON and to PNG plots (``report.py``).

The CLI registers :func:`add_arguments` and :func:`run` as the ``bench`` subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_list(value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {value!r}"
        ) from None
    if not numbers or any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError(f"reader counts must be >= 1: {value!r}")
    return numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    from .adapters import ADAPTERS
    from .plan import VARIANTS

    workloads = ", ".join(f"{w} ({'/'.join(v)})" for w, v in VARIANTS.items())
    parser.description = (
        "Compare shmcast with other one-to-many channels: one writer, N reader processes, "
        "every message verified, a hard time limit per case."
    )
    parser.add_argument(
        "--impl", action="append", metavar="NAME",
        help=f"implementations to run (repeat or comma-separate; default: all): "
        f"{', '.join(ADAPTERS)}, or module:Class for an adapter of your own",
    )  # fmt: skip
    parser.add_argument(
        "--workload", action="append", metavar="W[:VARIANT]",
        help=f"workloads to run (repeat or comma-separate; default: all): {workloads}",
    )  # fmt: skip
    parser.add_argument(
        "--readers", type=_int_list, metavar="N,N",
        help="reader counts for every workload but the engine and the executor loop "
        "(default: latency and saturated 1,4,8; throughput 1,4; wakeup 1; idle_cpu 1,4)",
    )  # fmt: skip
    numbers = [
        ("--messages", int, "N", "messages per latency case (default 2000; quick 200)"),
        ("--interval-us", float, "US", "latency send interval (default 1000; quick 500)"),
        (
            "--saturated-messages",
            int,
            "N",
            "messages per saturated-latency case (default 4000; quick 400)",
        ),
        (
            "--saturated-interval-us",
            float,
            "US",
            "saturated latency: target send interval (default 20)",
        ),
        (
            "--saturated-window",
            int,
            "N",
            "saturated latency: messages in flight per reader at most, for every "
            "implementation (the harness's credits; default 10)",
        ),
        ("--repetitions", int, "N", "wake-up repetitions (default 5; quick 2)"),
        ("--idle-seconds", float, "S", "idle time before each wake-up (default 2; quick 0.2)"),
        ("--idle-cpu-seconds", float, "S", "idle-CPU window (default 5; quick 0.5)"),
        ("--engine-workers", int, "N", "workers of the engine scenario (default 12)"),
        ("--engine-steps", int, "N", "steps of the engine scenario (default 2000; quick 100)"),
        (
            "--executor-steps",
            int,
            "N",
            "steps of each executor-loop case (default 2000 small, 500 with 1 MiB; quick 100, 30)",
        ),
        (
            "--stall-seconds",
            float,
            "S",
            "a reader with no message for this long stops and reports what it is missing "
            "(default 10; quick 3)",
        ),
        ("--time-limit", float, "S", "hard limit per case (default: estimated, >= 60 s)"),
    ]
    for flag, kind, metavar, text in numbers:
        parser.add_argument(flag, type=kind, metavar=metavar, help=text)
    parser.add_argument(
        "--executor-workers", type=_int_list, metavar="N,N",
        help="worker counts of the executor loop (default 4,12)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="small counts everywhere (tests, a first look)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        metavar="DIR",
        help="where the JSON and PNG files go (default: benchmarks/results)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument(
        "--start-method",
        choices=("forkserver", "spawn", "fork"),
        default="forkserver",
        help="how reader processes start (default forkserver: imports each implementation once)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="run the whole plan N times, one round after the other (default 1); the tables "
        "and ratios give each metric's median over the rounds, the JSON every round",
    )
    parser.add_argument(
        "--order",
        choices=("case", "impl"),
        default="case",
        help="case (default): run each case for every implementation in turn, so that other "
        "load on the machine falls on all alike; impl: all cases of one implementation, then "
        "the next",
    )
    parser.add_argument(
        "--shmcast-replies",
        choices=("broadcast", "gather"),
        default="gather",
        help="shmcast's reply path in the engine scenario: one GatherQueue (default) or one "
        "BroadcastQueue per worker",
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="the remote cases: readers over TCP, on loopback and across two network "
        "namespaces (shmcast-remote, zmq-tcp, vllm-mq-remote and their -netns variants; "
        "latency dict/1KiB, throughput 64B/1MiB; 1 reader unless --readers)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the implementations and whether installed"
    )


def _progress(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


def _one_line(case: dict[str, Any]) -> str:
    m = case["metrics"]
    if case["status"] != "ok":
        detail = (case.get("detail") or "").strip().splitlines()
        return f"{case['status'].upper()}: {(detail[-1] if detail else '')[:120]}"
    w = case["workload"]
    if w in ("latency", "saturated", "wakeup"):
        return f"ok  p50 {m['p50_us']:.1f} us  p99 {m['p99_us']:.1f} us  max {m['max_us']:.0f} us"
    if w == "throughput":
        rate, bandwidth = m["msgs_per_s_per_reader"], m["mb_per_s_per_reader"]
        return f"ok  {rate:,.0f} msg/s  {bandwidth:,.1f} MB/s per reader"
    if w == "idle_cpu":
        cpu, window = m.get("reader_cpu_s_mean", float("nan")), m.get("window_s", 0.0)
        return f"ok  reader CPU {cpu:.3f} s in {window:.1f} s"
    if w in ("engine", "executor"):
        return f"ok  {m['steps_per_s']:,.0f} steps/s"
    return "ok"


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": Path(sys.executable).name,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it, else its name (no
    absolute paths of this machine in the results).  Symbolic links are not followed."""
    full = os.path.abspath(path)
    if full.startswith(os.getcwd() + os.sep):
        return os.path.relpath(full)
    return Path(path).name


def _command_line() -> str:
    """How this run was started, as a reproducible command line."""
    argv = list(sys.argv)
    if argv and argv[0] not in ("-c", "-m", ""):
        argv[0] = _shown_path(argv[0])
        if not argv[0].endswith("shmcast"):  # a script: show the interpreter that ran it
            argv.insert(0, _shown_path(sys.executable))
    return shlex.join(argv)


def _source_state() -> dict[str, Any]:
    """The commit the shmcast under test was built from, and its uncommitted changes (when
    it runs from a git checkout); the benchmark measures whatever code is there."""
    root = Path(__file__).resolve().parents[4]
    state: dict[str, Any] = {"version": _package_version()}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src/shmcast"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return state
    state["commit"] = commit
    state["uncommitted"] = [
        line[3:] for line in changed if not line[3:].startswith("src/shmcast/_tools/bench")
    ]
    return state


def _package_version() -> str:
    from shmcast import __version__

    return __version__


def _memcpy_references(cases: list[Any]) -> dict[str, dict[str, float]]:
    """This machine's single-threaded memcpy MB/s for each throughput size of at least
    ``memcpy.MIN_SIZE`` in the plan (``memcpy.memcpy_bandwidth``), keyed by the size."""
    from .memcpy import MIN_SIZE, memcpy_bandwidth

    sizes = sorted({c.size for c in cases if c.workload == "throughput" and c.size >= MIN_SIZE})
    if sizes:
        _progress(f"memcpy reference: {', '.join(f'{s >> 20} MiB' for s in sizes)}")
    return {str(size): memcpy_bandwidth(size) for size in sizes}


class _WakeFloor:
    """The bare C futex wake-up (``floor.py``), measured once per round right before that
    round's first wake-up case, with its idle time and repetitions; built when the plan has a
    wake-up case."""

    def __init__(self, cases: list[Any], workdir: Path) -> None:
        from . import floor

        self.rounds: dict[int, dict[str, Any]] = {}
        self.exe: Path | None = None
        self.reason = "the plan has no wake-up case"
        if any(c.workload == "wakeup" for c in cases):
            self.exe, self.reason = floor.build(workdir)
            if self.exe is None:
                _progress(f"wake-up floor: unavailable: {self.reason}")

    def before_wakeup(self, round_index: int, spec: Any) -> None:
        from . import floor

        if self.exe is None or round_index in self.rounds:
            return
        _progress(f"wake-up floor (C futex), round {round_index + 1}", end=" ")
        got = floor.measure(self.exe, spec.idle_s, spec.messages - 1)
        self.rounds[round_index] = got
        _progress(f"p50 {got['p50_us']:.1f} us" if "p50_us" in got else got.get("error", ""))

    def result(self) -> dict[str, Any]:
        if self.exe is None:
            return {"status": "unavailable", "reason": self.reason}
        return {
            "status": "ok",
            "rounds": [{"round": r, **self.rounds[r]} for r in sorted(self.rounds)],
        }


def _network_envs(runnable: dict[str, Any], implementations: dict[str, dict[str, Any]],
                  stack: contextlib.ExitStack) -> dict[str, dict[str, str]]:  # fmt: skip
    """The environment of each remote implementation's leader: the writer's address, and for
    the ``-netns`` ones the two namespaces, made once for the run (removed when ``stack``
    closes).  An implementation that needs namespaces the machine cannot make is recorded
    as unavailable and dropped from ``runnable``."""
    from .remote_adapters import BIND_HOST_ENV, READER_NETNS_ENV, WRITER_NETNS_ENV

    envs: dict[str, dict[str, str]] = {}
    pair = None
    for name, (_spec, cls) in list(runnable.items()):
        net = getattr(cls, "net", "local")
        if net == "loopback":
            envs[name] = {BIND_HOST_ENV: "127.0.0.1"}
        elif net == "netns":
            if pair is None:
                from ..._remote._netns import NetnsUnavailable, netns_pair

                try:
                    pair = stack.enter_context(netns_pair())
                except NetnsUnavailable as exc:
                    pair = str(exc)
            if isinstance(pair, str):
                implementations[name] = {"status": "unavailable", "reason": pair}
                _progress(f"{name}: unavailable: network namespaces: {pair}")
                del runnable[name]
                continue
            envs[name] = {BIND_HOST_ENV: pair.writer_v4, WRITER_NETNS_ENV: pair.writer_ns,
                          READER_NETNS_ENV: pair.reader_ns}  # fmt: skip
    return envs


def _start_leader(
    name: str,
    spec_cls: tuple[str, Any],
    args: argparse.Namespace,
    workdir: Path,
    implementations: dict[str, dict[str, Any]],
    env: dict[str, str] | None = None,
) -> Any:
    """Start the leader of implementation ``name`` (with ``env`` added to its environment);
    record it in ``implementations``.  Returns the leader, or None when the implementation
    cannot run (recorded as such)."""
    from .adapters import ShmcastAdapter
    from .runner import Leader

    spec_name, cls = spec_cls
    options = {"replies": args.shmcast_replies} if issubclass(cls, ShmcastAdapter) else {}
    leader = Leader(spec_name, options, workdir, args.start_method, lambda event: None, env)
    t0 = time.monotonic()
    event = leader.start()
    if event["event"] != "ready":
        leader.kill()
        reason = event.get("reason", "")
        missing = "ImportError" in reason or "ModuleNotFoundError" in reason
        status = "not installed" if missing else "unavailable"
        implementations[name] = {"status": status, "reason": reason}
        _progress(f"{name}: {status}: {reason}")
        return None
    implementations.setdefault(
        name,
        {
            "status": "ok",
            "versions": event.get("versions", {}),
            "config": event.get("config", {}),
            "startup_s": round(time.monotonic() - t0, 2),
        },
    )
    return leader


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the report; write JSON (and PNGs).

    Returns 0 when the run completed (implementations that failed verification or hung are
    results, not failures of the run), 2 on a usage error.
    """
    from . import adapters, report, targets
    from .plan import PlanOptions, plan_cases
    from .remote_adapters import REMOTE_ADAPTERS, REMOTE_WORKLOADS
    from .runner import Leader

    remote_names = [cls.name for cls in REMOTE_ADAPTERS]
    default = (
        remote_names if args.remote else [n for n in adapters.ADAPTERS if n not in remote_names]
    )
    impl_names = [n for item in (args.impl or default) for n in _csv(item)]
    if args.remote and not args.workload:
        args.workload = list(REMOTE_WORKLOADS)
    if args.remote and not args.readers:
        args.readers = (1,)
    if args.list:
        for name in adapters.ADAPTERS:
            missing = adapters.missing_modules(adapters.ADAPTERS[name].requires)
            hint = adapters.ADAPTERS[name].install_hint
            state = (
                "installed"
                if not missing
                else f"not installed (no {', '.join(missing)})" + (f": {hint}" if hint else "")
            )
            print(f"{name:<16} {state}")
        return 0
    try:
        classes = {name: adapters.resolve(name) for name in impl_names}
        options = PlanOptions(
            quick=args.quick,
            readers=args.readers,
            messages=args.messages,
            interval_us=args.interval_us,
            saturated_messages=args.saturated_messages,
            saturated_interval_us=args.saturated_interval_us,
            saturated_window=args.saturated_window,
            repetitions=args.repetitions,
            idle_seconds=args.idle_seconds,
            idle_cpu_seconds=args.idle_cpu_seconds,
            engine_workers=args.engine_workers,
            engine_steps=args.engine_steps,
            executor_workers=args.executor_workers,
            executor_steps=args.executor_steps,
            stall_seconds=args.stall_seconds,
            time_limit=args.time_limit,
        )
        selectors = [s for item in (args.workload or []) for s in _csv(item)]
        cases = plan_cases(selectors or None, options)
        if args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, not {args.rounds}")
    except (ValueError, ImportError, AttributeError) as exc:
        print(f"shmcast bench: {exc}", file=sys.stderr)
        return 2

    started = time.time()
    stem = "bench-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    workdir = Path(tempfile.mkdtemp(prefix="shmcast-bench-"))
    implementations: dict[str, dict[str, Any]] = {}
    runnable: dict[str, tuple[str, type[adapters.Adapter]]] = {}
    for spec_name, cls in classes.items():
        missing = adapters.missing_modules(cls.requires)
        if missing:
            reason = f"cannot import {', '.join(missing)}"
            if cls.install_hint:
                reason += f"; {cls.install_hint}"
            implementations[cls.name] = {"status": "not installed", "reason": reason}
            _progress(f"{cls.name}: not installed ({reason})")
        else:
            runnable[cls.name] = (spec_name, cls)

    def runs(spec: Any, name: str) -> bool:
        supported = runnable[name][1].workloads
        return supported is None or spec.workload in supported

    if args.order == "case":  # each case for every implementation in turn
        one_round = [(spec, name) for spec in cases for name in runnable if runs(spec, name)]
    else:
        one_round = [(spec, name) for name in runnable for spec in cases if runs(spec, name)]
    order = [(r, spec, name) for r in range(args.rounds) for spec, name in one_round]
    _progress(
        f"shmcast bench: {len(runnable)} implementation(s) x {len(cases)} case(s), "
        f"results to {args.out}"
    )
    memcpy = _memcpy_references(cases)
    floor = _WakeFloor(cases, workdir)
    results: list[dict[str, Any]] = []
    leaders: dict[str, Leader] = {}
    interrupted = False
    networks = contextlib.ExitStack()
    envs = _network_envs(runnable, implementations, networks)
    try:
        for done, (round_index, spec, name) in enumerate(order, 1):
            if implementations.get(name, {}).get("status", "ok") != "ok":
                continue
            leader = leaders.get(name)
            if leader is None:
                leader = _start_leader(name, runnable[name], args, workdir, implementations,
                                       envs.get(name))  # fmt: skip
                if leader is None:
                    continue
                leaders[name] = leader
            if spec.workload == "wakeup":
                floor.before_wakeup(round_index, spec)
            _progress(f"[{done:>3}/{len(order)}] {name:<16} {spec.key:<26}", end=" ")
            outcome = leader.run(spec)
            case = {
                "impl": name,
                "net": getattr(runnable[name][1], "net", "local"),
                "round": round_index,
                **{k: v for k, v in spec.as_dict().items() if k != "extra"},
                **outcome.result,
                "elapsed_s": round(outcome.elapsed_s, 3),
                "leaked": outcome.leaked,
                "background": outcome.background,
                "core_to_core_ns": outcome.core_to_core_ns,
            }
            results.append(case)
            _progress(f"{_one_line(case)}  ({outcome.elapsed_s:.1f} s)")
            if "kill" in outcome.result:
                del leaders[name]  # killed: the next case gets a fresh leader
    except KeyboardInterrupt:
        interrupted = True
        _progress("\ninterrupted: writing the results so far")
    finally:
        for leader in leaders.values():
            if interrupted:
                leader.kill()
            else:
                leader.stop()
        networks.close()
        shutil.rmtree(workdir, ignore_errors=True)

    doc: dict[str, Any] = {
        "schema": report.SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": _command_line(),
        "machine": _machine(),
        "shmcast_source": _source_state(),
        "settings": {
            "quick": args.quick,
            "start_method": args.start_method,
            "order": args.order,
            "rounds": args.rounds,
            "shmcast_replies": args.shmcast_replies,
            "options": {k: v for k, v in vars(options).items()},
            "cases": [spec.as_dict() for spec in cases],
        },
        "implementations": implementations,
        "memcpy_mb_per_s": memcpy,
        "wake_floor": floor.result(),
        "cases": results,
    }
    doc["ratios"] = report.compute_ratios(results)
    doc["ratios_by_round"] = [
        report.compute_ratios([c for c in results if c["round"] == r]) for r in range(args.rounds)
    ]
    doc["targets"] = targets.compute_targets(doc)
    print(report.format_tables(doc))
    path = report.write_json(doc, args.out, stem)
    print(f"results: {path}")
    if not args.no_plots:
        plots, note = report.write_plots(doc, args.out, stem)
        for plot in plots:
            print(f"plot: {plot}")
        if note:
            print(note)
    return 0
