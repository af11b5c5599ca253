"""What the machine itself can do: single-threaded memcpy bandwidth, measured in the same run
as the reference for the large-message throughput cases.

Two figures per message size, in MB/s, each the best of ``repeats`` passes:

- ``in_cache``: one source copied into one destination again and again.  Both stay in the
  caches when they fit: the cost of copying data that was just produced.
- ``from_memory``: consecutive message-sized pieces of a ``SOURCE_BYTES`` buffer copied into
  one destination.  The source does not fit in any cache and comes from main memory, as the
  throughput writer's prebuilt messages do (1000 distinct 1 MiB messages, for instance).

A broadcast copies each message twice (into the ring, and out of it on another CPU), so a
reader's MB/s is compared with these one-copy figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: throughput cases of at least this size are compared with memcpy (smaller copies measure
#: the call, not the memory)
MIN_SIZE = 1 << 20
#: the source of the ``from_memory`` figure: larger than any cache of a usual machine
SOURCE_BYTES = 256 << 20
#: bytes copied in one pass (at least one message)
PASS_BYTES = 256 << 20


def _best_mb_per_s(copy_pass: Callable[[], None], nbytes: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy_pass()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e6


def memcpy_bandwidth(size: int, repeats: int = 3) -> dict[str, float]:
    """``{"in_cache": MB/s, "from_memory": MB/s}`` for copies of ``size`` bytes.

    Allocates about ``SOURCE_BYTES + 2 * size`` bytes for a moment; takes a fraction of a
    second.  ValueError if ``size`` < 1."""
    if size < 1:
        raise ValueError(f"memcpy_bandwidth: size must be at least 1, not {size}")
    dst = memoryview(bytearray(size))
    one = memoryview(bytearray(b"\x5a") * size)  # written, so its pages are real
    copies = max(1, PASS_BYTES // size)

    def in_cache() -> None:
        for _ in range(copies):
            dst[:] = one

    pieces = max(1, SOURCE_BYTES // size)
    source = memoryview(bytearray(b"\xa5") * (pieces * size))
    views = [source[i * size : (i + 1) * size] for i in range(pieces)]
    rounds = max(1, copies // pieces)

    def from_memory() -> None:
        for _ in range(rounds):
            for piece in views:
                dst[:] = piece

    result = {
        "in_cache": round(_best_mb_per_s(in_cache, copies * size, repeats), 1),
        "from_memory": round(_best_mb_per_s(from_memory, rounds * pieces * size, repeats), 1),
    }
    for view in views:
        view.release()
    return result
