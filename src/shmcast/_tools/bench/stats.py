"""Small statistics for the benchmark: percentiles, CDF points and sequence verification.

Everything here is pure Python (no numpy), so that the harness runs in any environment the
package runs in, and every function is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, by linear interpolation.

    Raises ValueError on an empty sequence.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) * (1.0 - frac) + float(sorted_values[hi]) * frac


def latency_summary(values_ns: Sequence[int]) -> dict[str, float | int]:
    """p50, p99, p99.9, max, mean (microseconds) and the count of a set of latencies in ns.

    An empty set gives ``{"count": 0}``.
    """
    if not values_ns:
        return {"count": 0}
    ordered = sorted(values_ns)
    return {
        "count": len(ordered),
        "p50_us": percentile(ordered, 50) / 1e3,
        "p99_us": percentile(ordered, 99) / 1e3,
        "p99_9_us": percentile(ordered, 99.9) / 1e3,
        "max_us": ordered[-1] / 1e3,
        "mean_us": sum(ordered) / len(ordered) / 1e3,
    }


def cdf_points(values_ns: Sequence[int], points: int = 200) -> list[list[float]]:
    """A compact empirical CDF: ``[[latency_us, fraction], ...]``, denser in the tail.

    The fractions are spread evenly up to 0.9, then on a log scale toward 1 (the tail is what
    tells implementations apart); the last point is the maximum.
    """
    if not values_ns:
        return []
    ordered = sorted(values_ns)
    n = len(ordered)
    body = [0.9 * i / (points // 2) for i in range(points // 2)]
    tail_count = points - len(body)
    # 1 - 0.1 * 10**(-k) for k from 0 to 4 (0.9 .. 0.99999)
    tail = [1.0 - 0.1 * 10 ** (-4.0 * i / (tail_count - 1)) for i in range(tail_count)]
    out: list[list[float]] = []
    last = -1
    for frac in [*body, *tail]:
        idx = min(n - 1, int(frac * n))
        if idx == last:
            continue
        last = idx
        out.append([ordered[idx] / 1e3, (idx + 1) / n])
    if last != n - 1:
        out.append([ordered[-1] / 1e3, 1.0])
    return out


@dataclass
class SequenceCheck:
    """Verifies that one reader got messages ``0 .. expected-1`` exactly once, in order.

    Call :meth:`observe` for every message in the order received, then :meth:`finish`.

    - ``lost``: numbers never received (gaps not filled later, and a missing tail);
    - ``out_of_order``: messages that arrived after a higher number (a gap filled late);
    - ``duplicated``: numbers received more than once;
    - ``corrupt``: messages whose number was out of range or whose content did not match it
      (the latter reported by the caller through :meth:`corrupted`).
    """

    expected: int
    received: int = 0
    next_seq: int = 0
    lost: int = 0
    out_of_order: int = 0
    duplicated: int = 0
    corrupt: int = 0
    first_problem: str = ""
    _gaps: list[list[int]] = field(default_factory=list, repr=False)  # [start, end) not seen

    def observe(self, seq: int) -> bool:
        """Record message ``seq``.  True when it is the next one expected."""
        self.received += 1
        if seq == self.next_seq and seq < self.expected:
            self.next_seq += 1
            return True
        if not 0 <= seq < self.expected:
            self.corrupted(f"sequence number {seq} out of range 0..{self.expected - 1}")
            return False
        if seq > self.next_seq:
            self._note(f"gap: expected {self.next_seq}, got {seq}")
            self._gaps.append([self.next_seq, seq])
            self.next_seq = seq + 1
            return False
        for i, (start, end) in enumerate(self._gaps):
            if start <= seq < end:  # a late arrival: fill its place in the gap
                self._gaps[i : i + 1] = [r for r in ([start, seq], [seq + 1, end]) if r[0] < r[1]]
                self._note(f"out of order: got {seq} after {self.next_seq - 1}")
                self.out_of_order += 1
                return False
        self._note(f"duplicate: got {seq} again")
        self.duplicated += 1
        return False

    @property
    def complete(self) -> bool:
        """True once the last number was seen and no gap is left to fill."""
        return self.next_seq >= self.expected and not self._gaps

    @property
    def awaiting_late(self) -> bool:
        """True when the last number was seen but gaps remain (late arrivals may fill them)."""
        return self.next_seq >= self.expected and bool(self._gaps)

    def corrupted(self, what: str) -> None:
        """Record a message whose content was wrong."""
        self.corrupt += 1
        self._note(what)

    def finish(self) -> None:
        """Count what never arrived as lost (idempotent)."""
        if self.next_seq < self.expected:
            self._note(f"missing tail: {self.expected - self.next_seq} from {self.next_seq}")
            self._gaps.append([self.next_seq, self.expected])
            self.next_seq = self.expected
        self.lost = sum(end - start for start, end in self._gaps)

    def _note(self, what: str) -> None:
        if not self.first_problem:
            self.first_problem = what

    @property
    def ok(self) -> bool:
        """True when every message arrived once, in order, intact."""
        return (
            self.received == self.expected
            and self.lost == 0
            and self.out_of_order == 0
            and self.duplicated == 0
            and self.corrupt == 0
        )

    def as_dict(self) -> dict[str, int | str | bool]:
        """The counters, the first problem seen and ``ok`` (call :meth:`finish` first)."""
        return {
            "expected": self.expected,
            "received": self.received,
            "lost": self.lost,
            "out_of_order": self.out_of_order,
            "duplicated": self.duplicated,
            "corrupt": self.corrupt,
            "first_problem": self.first_problem,
            "ok": self.ok,
        }
