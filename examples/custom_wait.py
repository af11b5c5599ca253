"""Choosing and writing a wait policy.

Run it:  python examples/custom_wait.py

A wait policy decides *how* a blocked put or get waits, never *what* for: the queue hands the
policy a waiter with three methods,

- ``ready()``: is the condition true now?  (cheap; fine to call in a loop)
- ``sleep(timeout)``: sleep on the futex without losing a wake-up, at most ``timeout`` s;
  True if it found the condition already true;
- ``tick()``: look at the peer's liveness (raises QueueBroken if it died); call it at least
  once per ``slice`` seconds.

and the policy's ``wait(waiter, deadline)`` returns True once ready, False at the deadline.
This example configures a built-in policy and defines a new one, then runs both.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import ClassVar

from shmcast import BroadcastQueue, FutexWait, QueueClosed, WaitPolicy


@dataclass(kw_only=True)
class YieldThenSleep(WaitPolicy):
    """Give the CPU away ``yields`` times (cheap, low latency if the peer is quick), then sleep
    on the futex one slice at a time."""

    yields: int = 200
    name: ClassVar[str] = "yield-then-sleep"

    def wait(self, waiter, deadline: float | None) -> bool:
        for _ in range(self.yields):
            if waiter.ready():
                return True
            os.sched_yield()
        next_tick = time.monotonic() + self.slice
        while True:
            if waiter.ready():
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now >= next_tick:
                waiter.tick()  # a dead peer raises here
                next_tick = now + self.slice
            timeout = self.slice if deadline is None else min(self.slice, deadline - now)
            if waiter.sleep(timeout):
                return True


def reader(handle, index: int, policy: WaitPolicy) -> None:
    count = 0
    with BroadcastQueue.attach(handle, reader=index, wait=policy) as queue:
        while True:
            try:
                queue.get(timeout=30)
            except QueueClosed:
                break
            count += 1
    print(f"  reader {index} ({policy.name}): {count} messages")


def run(policy: WaitPolicy, messages: int = 2000) -> None:
    ctx = mp.get_context("spawn")
    start = time.monotonic()
    with BroadcastQueue(n_readers=2, n_slots=8, slot_size=4096, wait=policy) as queue:
        readers = [
            ctx.Process(target=reader, args=(queue.handle, i, policy), daemon=True)
            for i in range(2)
        ]
        for p in readers:
            p.start()
        queue.wait_until_ready(timeout=60)
        for n in range(messages):
            queue.put(n, timeout=30)
            if n % 500 == 0:
                time.sleep(0.01)  # a pause: the readers run out of work and wait
        stats = queue.stats()
    for p in readers:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"{p.name} failed with exit code {p.exitcode}")
    print(
        f"{policy.name}: sent {stats.messages} messages in {time.monotonic() - start:.2f} s, "
        f"the writer waited for space {stats.waits} times"
    )


if __name__ == "__main__":
    # A built-in policy, tuned: spin for 50 us before sleeping, look at peers every 50 ms.
    run(FutexWait(spin_us=50, slice=0.05))
    # A policy of our own.
    run(YieldThenSleep(yields=100))
