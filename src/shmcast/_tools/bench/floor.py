"""The bare C futex wake-up (``benchmarks/wake_floor.c``), measured within a run.

The wake-up workload's target compares shmcast with the machine's own floor: how long a
process asleep on a futex in shared memory takes to run again after another one stores and
wakes it, in C, with no Python and no message.  The harness builds the probe from the source
tree (it is not part of the installed package) with the C compiler found on ``PATH``, and runs
it with the wake-up case's idle time and repetitions, once per round, right before that
round's first wake-up case.  Without the source file or a compiler it reports why.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from .stats import latency_summary

SOURCE = Path(__file__).resolve().parents[4] / "benchmarks" / "wake_floor.c"
_PREFIX = "store to sleeper running:"


def build(workdir: Path) -> tuple[Path | None, str]:
    """Compile the probe into ``workdir``: (executable, "") or (None, why not)."""
    if not SOURCE.is_file():
        return None, "benchmarks/wake_floor.c not found (not running from a source checkout)"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) on PATH"
    exe = workdir / "wake_floor"
    try:
        subprocess.run([cc, "-O2", "-o", str(exe), str(SOURCE)], check=True,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building wake_floor failed: {exc}"
    return exe, ""


def parse(output: str) -> list[float]:
    """The store-to-running times (microseconds) in the probe's output.  ValueError when the
    output has no such line."""
    for line in output.splitlines():
        if line.startswith(_PREFIX):
            return [float(v) for v in line[len(_PREFIX) :].split()]
    raise ValueError("no wake-up times in the output of wake_floor")


def measure(exe: Path, idle_s: float, repetitions: int) -> dict[str, Any]:
    """Run the probe: ``{"samples_us": [...], "p50_us": ..., "p99_us": ..., ...}``, or
    ``{"error": why}``.  Bounded: it takes ``idle_s * repetitions`` and has a limit of twice
    that plus 30 s."""
    try:
        done = subprocess.run(
            [str(exe), f"{idle_s:g}", str(repetitions)], check=True, capture_output=True,
            text=True, timeout=2 * idle_s * repetitions + 30,
        )  # fmt: skip
        samples = parse(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"error": str(exc)}
    summary = latency_summary([int(v * 1000) for v in samples])
    return {"idle_s": idle_s, "samples_us": samples, **summary}
