"""Which cases a run has, with which parameters, and how long each may take.

The defaults are the full benchmark; ``quick`` shrinks every count (for tests and a first
look).  Every number can be overridden from the command line; the plan that ran is recorded in
the results.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .workloads import WORKLOADS, CaseSpec, KiB, MiB

#: payload kind and size of each variant
LATENCY_VARIANTS = {"dict": ("dict", 0), "1KiB": ("bytes", KiB)}
THROUGHPUT_VARIANTS = {
    "64B": ("bytes", 64),
    "4KiB": ("bytes", 4 * KiB),
    "1MiB": ("bytes", MiB),
    "16MiB": ("bytes", 16 * MiB),
    "numpy-16MiB": ("numpy", 16 * MiB),
}
#: messages per throughput case: (full, quick)
THROUGHPUT_MESSAGES = {
    "64B": (100_000, 2000),
    "4KiB": (50_000, 1000),
    "1MiB": (1000, 30),
    "16MiB": (30, 4),
    "numpy-16MiB": (30, 4),
}
#: the executor loop's requests: a decode step's small dict, or one carrying 1 MiB
EXECUTOR_VARIANTS = {"small": ("dict", 0), "1MiB": ("bytes", MiB)}
#: steps per executor case: (full, quick)
EXECUTOR_STEPS = {"small": (2000, 100), "1MiB": (500, 30)}
DEFAULT_EXECUTOR_WORKERS = (4, 12)
#: the saturated workload: target interval (us), messages in flight per reader at most
SATURATED_INTERVAL_US = 20.0
SATURATED_WINDOW = 10
VARIANTS = {
    "latency": tuple(LATENCY_VARIANTS),
    "saturated": tuple(LATENCY_VARIANTS),
    "throughput": tuple(THROUGHPUT_VARIANTS),
    "wakeup": ("dict",),
    "idle_cpu": ("dict",),
    "engine": ("dict",),
    "executor": tuple(EXECUTOR_VARIANTS),
}
DEFAULT_READERS = {
    "latency": (1, 4, 8),
    "saturated": (1, 4, 8),
    "throughput": (1, 4),
    "wakeup": (1,),
    "idle_cpu": (1, 4),
}


@dataclass
class PlanOptions:
    """The knobs of a run (None: the default for the mode)."""

    quick: bool = False
    readers: tuple[int, ...] | None = None  # overrides the reader counts of all but the engine
    messages: int | None = None  # latency messages per case
    interval_us: float | None = None  # latency send interval
    saturated_messages: int | None = None  # messages per saturated case
    saturated_interval_us: float | None = None  # saturated target send interval
    saturated_window: int | None = None  # saturated: messages in flight per reader at most
    repetitions: int | None = None  # wake-up repetitions
    idle_seconds: float | None = None  # wake-up idle time
    idle_cpu_seconds: float | None = None  # idle-CPU measurement window
    engine_workers: int | None = None
    engine_steps: int | None = None
    executor_workers: tuple[int, ...] | None = None
    executor_steps: int | None = None
    stall_seconds: float | None = None  # a reader gives up after this long without a message
    time_limit: float | None = None  # hard limit per case (None: estimated per case)

    def pick(self, value, full, quick):
        if value is not None:
            return value
        return quick if self.quick else full


def parse_selectors(selectors: list[str] | None) -> dict[str, set[str]]:
    """``["latency", "throughput:64B", ...]`` -> {workload: variants}.  ValueError on an
    unknown workload or variant."""
    if not selectors:
        return {w: set(VARIANTS[w]) for w in WORKLOADS}
    chosen: dict[str, set[str]] = {}
    for item in selectors:
        workload, _, variant = item.partition(":")
        if workload not in VARIANTS:
            raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(VARIANTS)}")
        if variant and variant not in VARIANTS[workload]:
            raise ValueError(
                f"unknown {workload} variant {variant!r}; choose from "
                f"{', '.join(VARIANTS[workload])}"
            )
        chosen.setdefault(workload, set()).update([variant] if variant else VARIANTS[workload])
    return chosen


def _limit(estimate_s: float, opts: PlanOptions) -> float:
    """The hard time limit of a case from a (pessimistic) estimate of its duration."""
    if opts.time_limit is not None:
        return opts.time_limit
    return round(60.0 + 5.0 * estimate_s)


def plan_cases(selectors: list[str] | None, opts: PlanOptions) -> list[CaseSpec]:
    """The cases of a run, in a stable order (workload, variant, readers)."""
    chosen = parse_selectors(selectors)
    stall = opts.pick(opts.stall_seconds, 10.0, 3.0)
    cases: list[CaseSpec] = []

    def readers_for(workload: str) -> tuple[int, ...]:
        return opts.readers or DEFAULT_READERS[workload]

    def latency_cases(workload: str, messages: int, warmup: int, interval: float,
                      per_reader_s: float, extra: dict) -> None:  # fmt: skip
        """The latency-like cases of ``workload`` (paced or saturated): every chosen
        variant at every reader count."""
        for variant in VARIANTS[workload]:
            if variant not in chosen[workload]:
                continue
            payload, size = LATENCY_VARIANTS[variant]
            for n in readers_for(workload):
                estimate = messages * (interval * 1e-6 + n * per_reader_s) + 2
                cases.append(
                    CaseSpec(workload, variant, n, payload, size, messages, warmup, interval,
                             stall_s=stall, time_limit=_limit(estimate, opts), extra=dict(extra))
                )  # fmt: skip

    if "latency" in chosen:
        messages = opts.pick(opts.messages, 2000, 200)
        interval = opts.pick(opts.interval_us, 1000.0, 500.0)
        latency_cases("latency", messages, min(100, messages // 10), interval, 50e-6, {})
    if "saturated" in chosen:
        messages = opts.pick(opts.saturated_messages, 4000, 400)
        interval = opts.pick(opts.saturated_interval_us, SATURATED_INTERVAL_US,
                             SATURATED_INTERVAL_US)  # fmt: skip
        window = opts.pick(opts.saturated_window, SATURATED_WINDOW, SATURATED_WINDOW)
        if window < 1:
            raise ValueError(f"the saturated window must be at least 1, not {window}")
        latency_cases("saturated", messages, messages // 10, interval, 100e-6,
                      {"window": window})  # fmt: skip
    if "throughput" in chosen:
        for variant in VARIANTS["throughput"]:
            if variant not in chosen["throughput"]:
                continue
            payload, size = THROUGHPUT_VARIANTS[variant]
            if payload == "numpy" and importlib.util.find_spec("numpy") is None:
                continue  # reported by the caller as skipped
            full, quick = THROUGHPUT_MESSAGES[variant]
            messages = quick if opts.quick else full
            for n in readers_for("throughput"):
                estimate = messages * (100e-6 * n + size * n / 200e6) + 2
                cases.append(
                    CaseSpec("throughput", variant, n, payload, size, messages,
                             stall_s=stall, time_limit=_limit(estimate, opts))
                )  # fmt: skip
    if "wakeup" in chosen:
        reps = opts.pick(opts.repetitions, 5, 2)
        idle = opts.pick(opts.idle_seconds, 2.0, 0.2)
        for n in readers_for("wakeup"):
            estimate = reps * idle + 2
            cases.append(
                CaseSpec("wakeup", "dict", n, "dict", 0, reps + 1, idle_s=idle, stall_s=stall,
                         time_limit=_limit(estimate, opts))
            )  # fmt: skip
    if "idle_cpu" in chosen:
        window = opts.pick(opts.idle_cpu_seconds, 5.0, 0.5)
        burst = 2000 if not opts.quick else 200
        for n in readers_for("idle_cpu"):
            estimate = window + burst * n * 100e-6 + 2
            cases.append(
                CaseSpec("idle_cpu", "dict", n, "dict", 0, burst + 1, idle_s=window,
                         stall_s=stall, time_limit=_limit(estimate, opts))
            )  # fmt: skip
    if "engine" in chosen:
        workers = opts.engine_workers or 12
        steps = opts.pick(opts.engine_steps, 2000, 100)
        warmup = min(50, steps // 10)
        estimate = steps * workers * 1e-3 + 2
        cases.append(
            CaseSpec("engine", "dict", workers, "dict", 0, steps, warmup, stall_s=stall,
                     time_limit=_limit(estimate, opts))
        )  # fmt: skip
    if "executor" in chosen:
        for variant in VARIANTS["executor"]:
            if variant not in chosen["executor"]:
                continue
            payload, size = EXECUTOR_VARIANTS[variant]
            steps = opts.pick(opts.executor_steps, *EXECUTOR_STEPS[variant])
            warmup = min(50, steps // 10)
            for n in opts.executor_workers or DEFAULT_EXECUTOR_WORKERS:
                estimate = steps * n * (1e-3 + size / 200e6) + 2
                cases.append(
                    CaseSpec("executor", variant, n, payload, size, steps, warmup,
                             stall_s=stall, time_limit=_limit(estimate, opts))
                )  # fmt: skip
    return cases
