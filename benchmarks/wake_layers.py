"""Where a wake-up after an idle period goes, layer by layer, in one run.

The wake-up target of ``shmcast bench`` compares a shmcast reader woken after ``idle``
seconds with the bare C futex wake-up (``wake_floor.c``).  This script measures, side by side
and with the same idle time, the layers in between:

- ``c``: the C probe (``wake_floor.c``, built here with ``cc``): store, FUTEX_WAKE, the sleeper
  runs again.  No interpreter.
- ``python``: the same handshake from Python, through shmcast's native atomics (``wait32`` /
  ``wake32``): the interpreter's way into and out of the futex, nothing of the queue.
- ``queue``: a ``BroadcastQueue`` reader blocked in ``get()``, woken by ``put()`` of a small
  int (the time from just before the ``put`` to the ``get`` returning).

The gap between ``python`` and ``queue`` is the queue's own code on both sides, run cold after
the idle period: ``benchmarks/call_costs.py --after-sleep S`` times those calls alone.

Usage (Linux, from a source checkout, with shmcast installed)::

    python benchmarks/wake_layers.py [idle_seconds=2] [repetitions=8]

Prints the median and the largest sample of each layer, in microseconds.
"""

from __future__ import annotations

import mmap
import os
import pickle
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shmcast import BroadcastQueue, _native

HERE = Path(__file__).resolve().parent


def _c_layer(idle: float, reps: int) -> list[float]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "wake_floor"
        subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "wake_floor.c")], check=True,
                       timeout=120)  # fmt: skip
        out = subprocess.run([str(exe), f"{idle:g}", str(reps)], check=True, text=True,
                             capture_output=True, timeout=2 * idle * reps + 30).stdout  # fmt: skip
    for line in out.splitlines():
        if line.startswith("store to sleeper running:"):
            return [float(v) for v in line.split(":", 1)[1].split()]
    raise RuntimeError("no samples in wake_floor's output")


def _python_layer(idle: float, reps: int) -> list[float]:
    """A forked sleeper on a futex word of an anonymous shared mapping; word 0 counts the
    wakes, bytes 8-16 hold the waker's clock just before its store."""
    m = mmap.mmap(-1, 4096)
    a = _native.Atomics(m)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sleeper
        os.close(r)
        got = []
        for i in range(reps):
            while a.load32(0) == i:
                a.wait32(0, i, idle + 10)
            got.append((time.monotonic_ns() - struct.unpack_from("<q", m, 8)[0]) / 1e3)
        os.write(w, pickle.dumps(got))
        os._exit(0)
    os.close(w)
    try:
        for _ in range(reps):
            time.sleep(idle)
            struct.pack_into("<q", m, 8, time.monotonic_ns())
            a.add32(0, 1)
            a.wake32(0, 1)
        with os.fdopen(r, "rb") as f:
            return pickle.loads(f.read())
    finally:
        os.waitpid(pid, 0)
        del a
        m.close()


def _queue_layer(idle: float, reps: int) -> list[float]:
    with BroadcastQueue(1) as writer:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the reader
            os.close(r)
            with BroadcastQueue.attach(writer.handle, 0) as reader:
                reader.get(timeout=30)
                got = []
                for _ in range(reps):
                    sent = reader.get(timeout=idle + 30)
                    got.append((time.monotonic_ns() - sent) / 1e3)
            os.write(w, pickle.dumps(got))
            os._exit(0)
        os.close(w)
        try:
            writer.wait_until_ready(timeout=30)
            writer.put(0, timeout=30)
            for _ in range(reps):
                time.sleep(idle)
                writer.put(time.monotonic_ns(), timeout=30)
            with os.fdopen(r, "rb") as f:
                return pickle.loads(f.read())
        finally:
            os.waitpid(pid, 0)


def main(argv: list[str]) -> int:
    idle = float(argv[1]) if len(argv) > 1 else 2.0
    reps = int(argv[2]) if len(argv) > 2 else 8
    print(f"wake-up after {idle:g} s idle, {reps} repetitions (microseconds: median / max)")
    layers = {"c": _c_layer, "python": _python_layer, "queue": _queue_layer}
    for name, layer in layers.items():
        samples = layer(idle, reps)
        print(f"  {name:<8} {statistics.median(samples):8.1f} / {max(samples):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
