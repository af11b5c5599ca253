"""Several readers awaited in one event loop: the one-way latency of ``get_async`` there.

One process holds ``--readers`` reader endpoints of one queue and awaits all of them at once
in one event loop (``asyncio.gather``), as an API server awaiting several queues would; the
parent process writes a timestamp every ``--interval-us`` microseconds.  Each reader reports
the time from the stamp to its ``get_async`` returning; the figures are taken over all of
them after the first ``--warmup`` messages.

``--loop-pass-every US`` sets how long the cooperative spin may look without a pass of the
loop (``shmcast._aio.LOOP_PASS_EVERY``, 10 us by default; several spinners in one loop share
it), to compare the rule with another: ``0`` is a pass at every look.

Usage (from the repository root)::

    .venv/bin/python benchmarks/aio_one_loop.py [--readers 8] [--messages 1500]
                                                [--loop-pass-every US]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import time
from typing import Any

from shmcast import BroadcastQueue, _aio
from shmcast._tools.bench.stats import latency_summary


def _readers(handle: Any, n: int, warmup: int, pass_every: float | None, out: Any) -> None:
    if pass_every is not None:
        _aio.LOOP_PASS_EVERY = pass_every
    queues = [BroadcastQueue.attach(handle, i) for i in range(n)]
    latencies: list[int] = []

    async def read(queue: BroadcastQueue) -> None:
        seen = 0
        while (stamp := await queue.get_async(timeout=30)) is not None:
            now = time.monotonic_ns()
            seen += 1
            if seen > warmup:
                latencies.append(now - stamp)

    async def main() -> None:
        await asyncio.gather(*(read(q) for q in queues))

    try:
        asyncio.run(main())
        out.put(latencies)
    finally:
        for q in queues:
            q.close()


def measure(queue: BroadcastQueue, messages: int, interval_us: float, warmup: int,
            pass_every: float | None) -> tuple[float, float, int]:  # fmt: skip
    """(p50 us, p99 us, samples) of one run through ``queue`` (closed at the end)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with queue:
        child = ctx.Process(target=_readers,
                            args=(queue.handle, queue.n_readers, warmup, pass_every,
                                  out))  # fmt: skip
        child.start()
        try:
            queue.wait_until_ready(60)  # every reader attached
            interval = int(interval_us * 1000)
            due = time.monotonic_ns()
            for _ in range(messages):
                while (left := due - time.monotonic_ns()) > 0:
                    time.sleep(max(0.0, left / 1e9 - 50e-6))  # the last 50 us spin
                queue.put(time.monotonic_ns(), timeout=30)
                due += interval
            queue.put(None, timeout=30)
            got = out.get(timeout=60)
            child.join(timeout=30)
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
    summary = latency_summary(got)  # the bench's percentiles
    return summary["p50_us"], summary["p99_us"], summary["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--interval-us", type=float, default=1000.0)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--loop-pass-every", type=float, default=None, metavar="US")
    args = parser.parse_args()
    every = args.loop_pass_every
    if not (math.isfinite(args.interval_us) and args.interval_us > 0):
        parser.error(f"--interval-us must be a positive number, not {args.interval_us}")
    if every is not None and not (math.isfinite(every) and every >= 0):
        parser.error(f"--loop-pass-every must be a number >= 0, not {every}")
    if not 0 <= args.warmup < args.messages:
        parser.error("needs 0 <= --warmup < --messages")
    try:
        queue = BroadcastQueue(args.readers)
    except ValueError as exc:  # the number of readers
        parser.error(str(exc))
    pass_every = None if every is None else every * 1e-6
    p50, p99, n = measure(queue, args.messages, args.interval_us, args.warmup, pass_every)
    rule = "default" if pass_every is None else f"{args.loop_pass_every:g} us"
    print(f"{args.readers} readers in one loop, a message every {args.interval_us:g} us, "
          f"loop pass every {rule}: p50 {p50:.1f} us  p99 {p99:.1f} us  ({n} samples)")  # fmt: skip


if __name__ == "__main__":
    main()
