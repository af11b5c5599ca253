"""Per-call cost of put/get in one process, without any waiting.

One writer and one reader endpoint of the same queue live in this process: 32 messages are put,
then 32 taken, again and again, and each side is timed on its own.  This is the CPU cost of the
calls themselves (no wake-ups, no other core involved), the figure the native fast path lowers.

With ``--after-sleep S`` each call is timed once right after the process slept S seconds, as a
paced writer's ``put`` and a woken reader's ``get`` run (the median of ``--repetitions``): the
same code run cold, after the processor's caches have been used by other work or powered down.

``--size N`` sets the raw messages' size (64 B by default), ``--checksum`` makes the queue carry
CRC-32Cs (what each call then pays for them: a pass over the bytes on each side, a second one
at the end of a ``view()`` block, a private buffer for ``reserve()``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/call_costs.py [--messages N] [--size N] [--checksum]
                                              [--after-sleep S [--repetitions N]]
"""

from __future__ import annotations

import argparse
import statistics
import time

from shmcast import BroadcastQueue

BATCH = 32


def measure(put, get, messages: int) -> tuple[float, float]:
    """Mean microseconds per put and per get."""
    put_s = get_s = 0.0
    rounds = messages // BATCH
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(BATCH):
            put()
        put_s += time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(BATCH):
            get()
        get_s += time.perf_counter() - t
    n = rounds * BATCH
    return put_s / n * 1e6, get_s / n * 1e6


def measure_cold(put, get, pause: float, repetitions: int) -> tuple[float, float]:
    """Median microseconds of one put, and of one get, each right after a ``pause`` s sleep."""
    put_us, get_us = [], []
    for _ in range(repetitions):
        time.sleep(pause)
        t = time.perf_counter()
        put()
        put_us.append((time.perf_counter() - t) * 1e6)
        time.sleep(pause)
        t = time.perf_counter()
        get()
        get_us.append((time.perf_counter() - t) * 1e6)
    return statistics.median(put_us), statistics.median(get_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--after-sleep", type=float, metavar="S", help="time calls run cold")
    parser.add_argument("--repetitions", type=int, default=10, help="with --after-sleep")
    parser.add_argument("--size", type=int, default=64, help="bytes of the raw messages")
    parser.add_argument("--checksum", action="store_true", help="a queue with checksums")
    args = parser.parse_args()
    small = {f"field{i}": i * 1.5 for i in range(10)}
    raw = b"x" * args.size
    slot = max(4096, -(-args.size // 64) * 64)  # a batch of messages fits the ring, one per slot
    queue = BroadcastQueue(1, n_slots=2 * BATCH, slot_size=slot, checksum=args.checksum)

    def reserve() -> None:
        with writer.reserve(len(raw)) as region:
            region[:] = raw

    def view() -> None:
        with reader.view():
            pass

    with queue as writer, BroadcastQueue.attach(writer.handle, 0) as reader:
        cases = [
            (f"put_bytes / get_bytes, {args.size} B", lambda: writer.put_bytes(raw),
             reader.get_bytes),
            (f"reserve / view, {args.size} B", reserve, view),
            ("put / get, 10-field dict", lambda: writer.put(small), reader.get),
        ]  # fmt: skip
        for name, put, get in cases:
            measure(put, get, 10 * BATCH)  # warm up
            if args.after_sleep is None:
                put_us, get_us = measure(put, get, args.messages)
            else:
                put_us, get_us = measure_cold(put, get, args.after_sleep, args.repetitions)
            print(f"{name:36s} put {put_us:7.2f} us   get {get_us:7.2f} us")


if __name__ == "__main__":
    main()
