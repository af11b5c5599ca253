"""Two private attributes of vLLM's ``MessageQueue`` that code and tests reach for, each mapped
onto what the drop-in really has: ``_spin_condition`` (how an end of the queue waits) and
``buffer`` (the state of the ring's slots).

- :class:`SpinCondition` is the wait policy of a drop-in endpoint: shmcast's
  :class:`~shmcast.FutexWait` with vLLM's busy/idle rule on top, whose two knobs,
  ``busy_loop_s`` and ``last_read``, every wait reads.
- :class:`RingFlags` is a read-only look at the ring's slots in the form of vLLM's chunk flags,
  computed from the sequences in the segment (``get_metadata(i)``).

What differs from vLLM is said in each class and in docs/vllm.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from .._errors import SegmentError
from .._snapshot import inspect_open_segment
from .._wait import FutexWait, Waiter

#: vLLM's default: a reader counts as busy for one second after its last read.
DEFAULT_BUSY_LOOP_S = 1.0


def _seconds(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if math.isnan(value) or value < minimum:
        raise ValueError(f"{name} must be a number of seconds >= {minimum:g}, got {value!r}")
    return float(value)


@dataclass(kw_only=True)
class SpinCondition(FutexWait):
    """How an end of a drop-in queue waits (``MessageQueue._spin_condition``): a reader for the
    next message, the writer for room.

    A :class:`~shmcast.FutexWait` (spin while the next message is near and a core is free,
    else sleep on the ring's futex, which the peer wakes), with vLLM's rule of when an end is
    *busy*:

    - ``last_read``: when this end last moved a message (``time.monotonic()``): a reader's
      last read, the writer's last write.  Every message sets it.
    - ``busy_loop_s``: for how many seconds after ``last_read`` the end counts as busy (default
      1, as vLLM's).

    A wait of a busy end spins first, for FutexWait's budget (up to twice as long as its
    previous wait lasted, at most ``spin_us``), then sleeps.  A wait of an idle end (its last
    message more than ``busy_loop_s`` ago) sleeps on the futex at once.  So ``last_read = 0``
    makes the next wait start asleep, ``busy_loop_s = 0`` makes every wait sleep at once, and a
    large ``busy_loop_s`` keeps every wait starting with its spin.

    While every core is taken by work (the :class:`~shmcast.FutexWait` crowding check), a
    wait sleeps until its peer wakes it (``quantum_us=None``), where a plain FutexWait sleeps
    in 200 us pieces and looks at the load after each.  vLLM's shape is why: in its executor
    loop every worker waits for the next step (``dequeue(indefinite=True)``) while the engine
    gathers the other workers' replies, so with more workers than cores the wait lasts a whole
    step and a wake-up of the sleeper's own only takes a core from a worker that has work,
    for nothing (measured with 12 workers on 2 cores: 1.5 sleeps per wait instead of one,
    about a fifth of the loop's CPU time; docs/vllm.md, "How it compares").

    Where vLLM differs: its busy reader keeps spinning (``sched_yield()`` between looks at the
    ring) for the whole ``busy_loop_s``, and its ``wait()`` is one such look (an idle one polls
    its notification socket), called again and again by one read.  Here ``wait(waiter,
    deadline)`` is the whole wait of one call that found nothing, and a busy end spins only
    as long as its budget: past that, the futex wakes a sleeper within microseconds, so a
    longer spin would burn a core for nothing.

    Who may call: the queue's calls (one at a time); the knobs may be set from any thread (a
    wait reads them once, when it starts).  Bad values get TypeError or ValueError.
    """

    tracks_activity: ClassVar[bool] = True
    quantum_us: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._busy_loop_s = DEFAULT_BUSY_LOOP_S
        self._last_read = time.monotonic()

    @property
    def busy_loop_s(self) -> float:
        return self._busy_loop_s

    @busy_loop_s.setter
    def busy_loop_s(self, value: float) -> None:
        self._busy_loop_s = _seconds("busy_loop_s", value, 0.0)

    @property
    def last_read(self) -> float:
        return self._last_read

    @last_read.setter
    def last_read(self, value: float) -> None:
        self._last_read = _seconds("last_read", value, -math.inf)

    def busy(self, now: float) -> bool:
        """True if this end moved a message at most ``busy_loop_s`` seconds before ``now``."""
        return now - self._last_read <= self._busy_loop_s

    def activity(self) -> None:
        """Called by the queue after each message put or taken."""
        self._last_read = time.monotonic()

    def _wait(self, waiter: Waiter, deadline: float | None, now: float) -> bool:
        # FutexWait.wait calls this once it found the condition false, and sets the next
        # wait's spin budget from how long this one lasted, whatever budget it had.
        if not self.busy(now):
            self._budget = 0.0  # idle: no spin, straight to the futex
        return super()._wait(waiter, deadline, now)


class RingFlags:
    """``MessageQueue.buffer``: the ring's slots, read-only, in the form of vLLM's chunk flags.

    ``get_metadata(i)`` is a context manager that yields ``1 + n_reader`` bytes about slot
    ``i`` of the ring (``0 <= i < n_slots``): byte 0 is 1 once the writer has published the
    slot at least once (a message's bytes or padding), byte ``1 + r`` is 1 if reader ``r`` has
    released the slot's latest publication: its consumed sequence is past it, so the writer may
    reuse the slot as far as that reader is concerned.  A message held by ``acquire_read`` is
    not released until its block ends.  A reader that left keeps the position it had.

    The bytes are a snapshot computed from the sequences in the segment, read through this
    end's own descriptor (:func:`shmcast._snapshot.inspect_open_segment`, which reads
    the readers' sequences before the writer's, so that a reader's flag never claims a slot the
    writer had not published);
    writing into them changes nothing.  Where vLLM differs: its ``get_metadata(i)`` yields the
    flag bytes of chunk ``i`` of ``max_chunks`` themselves, in shared memory, which its writer
    and readers write; the drop-in's ring has ``n_slots`` slots of its own size, and no flag
    bytes: a slot's state follows from the sequences.

    SegmentError once this end was shut down, or if the segment's sequences are impossible;
    IndexError for a slot outside the ring.  Any thread may call it.
    """

    def __init__(self, queue: Any) -> None:
        self._queue = queue
        self.n_reader: int = queue.n_readers
        self.n_slots: int = queue.n_slots
        self.slot_size: int = queue.slot_size
        #: vLLM's name: the bytes get_metadata yields.
        self.metadata_size = 1 + self.n_reader

    def flags(self, index: int) -> bytes:
        """The flag bytes of slot ``index``, as :meth:`get_metadata` yields them."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"a slot index must be an int, not {type(index).__name__}")
        if not 0 <= index < self.n_slots:
            raise IndexError(f"slot {index} is outside the ring (slots 0 to {self.n_slots - 1})")
        seg = self._queue._seg
        if seg.fd < 0:
            raise SegmentError(f"{self._queue.name}: this end of the queue was shut down")
        ring = inspect_open_segment(seg.fd, self._queue.name).rings[0]
        written = ring.writer.seq
        flags = bytearray(self.metadata_size)
        if written <= index:
            return bytes(flags)  # never published: nobody has read it either
        flags[0] = 1
        n = self.n_slots
        latest = index + (written - 1 - index) // n * n  # the slot's last publication
        for reader in ring.readers:
            if reader.seq > written:
                raise SegmentError(
                    f"corrupted queue: reader {reader.index} has consumed sequence "
                    f"{reader.seq}, past the writer's {written}"
                )
            flags[1 + reader.index] = reader.seq > latest
        return bytes(flags)

    @contextmanager
    def get_metadata(self, index: int) -> Iterator[bytes]:
        """Yield :meth:`flags` ``(index)`` (vLLM's form: a context manager)."""
        yield self.flags(index)

    def __repr__(self) -> str:
        return f"<shmcast ring flags of {self._queue.name}: {self.n_slots} slots>"
