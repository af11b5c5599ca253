"""Exhaustive model checking of the ring protocol (model/ring.pml) with spin.

The correct model must verify with 0 errors (safety: assertions and invalid
end states; liveness: the ``delivered`` ltl property, acceptance cycles), and
every deliberately broken variant must be caught with the expected kind of
error. model/check.sh runs the same checks from a shell.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "model" / "ring.pml"
DEPTH = 100_000  # pan -m, far above the deepest path of the model (~800 steps)
MEMLIM_MB = 4096
TIMEOUT = 300  # seconds, for every subprocess


@dataclass
class PanResult:
    output: str
    errors: int
    states_stored: str
    transitions: str

    @property
    def first_error(self) -> str:
        m = re.search(r"^pan:1: (.*)$", self.output, re.MULTILINE)
        return m.group(1) if m else ""


def _require_tools() -> None:
    if shutil.which("spin") is None:
        pytest.fail(
            "the spin model checker is not installed: apt-get install spin "
            "(the protocol model check must run, it is not optional)"
        )
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to compile spin's verifier: apt-get install gcc")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def run_spin(tmp_path: Path, mode: str, define: str | None = None) -> PanResult:
    """Generate, compile and run the verifier; mode is 'safety' or 'liveness'."""
    _require_tools()
    assert MODEL.is_file(), f"model not found: {MODEL}"
    shutil.copy(MODEL, tmp_path / "ring.pml")  # spin and pan write next to the model

    spin_cmd = ["spin"] + ([f"-D{define}"] if define else []) + ["-a", "ring.pml"]
    proc = _run(spin_cmd, tmp_path)
    assert proc.returncode == 0, f"spin -a failed:\n{proc.stdout}\n{proc.stderr}"

    cflags = ["-DSAFETY", "-DNOCLAIM"] if mode == "safety" else []
    gcc_cmd = ["gcc", "-O2", "-DCOLLAPSE", f"-DMEMLIM={MEMLIM_MB}", *cflags, "-o", "pan", "pan.c"]
    proc = _run(gcc_cmd, tmp_path)
    assert proc.returncode == 0, f"gcc failed:\n{proc.stdout}\n{proc.stderr}"

    # liveness: acceptance cycles, no fairness assumption needed (see ring.pml)
    pan_cmd = ["./pan", f"-m{DEPTH}"] + (["-a"] if mode == "liveness" else [])
    proc = _run(pan_cmd, tmp_path)
    out = proc.stdout + proc.stderr

    m = re.search(r"errors: (\d+)", out)
    assert m, f"no result from pan:\n{out}"
    assert "max search depth too small" not in out, f"raise -m:\n{out}"
    assert "out of memory" not in out and "MEMLIM bound" not in out, f"out of memory:\n{out}"
    stored = re.search(r"^\s*([\d.e+]+) states, stored", out, re.MULTILINE)
    trans = re.search(r"^\s*([\d.e+]+) transitions", out, re.MULTILINE)
    result = PanResult(
        output=out,
        errors=int(m.group(1)),
        states_stored=stored.group(1) if stored else "?",
        transitions=trans.group(1) if trans else "?",
    )
    print(
        f"{define or 'correct'}/{mode}: states stored {result.states_stored}, "
        f"transitions {result.transitions}, errors {result.errors}"
    )
    return result


@pytest.mark.timeout(600)
def test_correct_model_safety(tmp_path: Path) -> None:
    """Assertions (no overwrite, no early read, in-order values) and no invalid end state."""
    res = run_spin(tmp_path, "safety")
    assert "assertion violations\t+" in res.output, res.output
    assert "invalid end states\t+" in res.output, res.output
    assert res.errors == 0, f"{res.first_error}\n{res.output}"


@pytest.mark.timeout(600)
def test_correct_model_liveness(tmp_path: Path) -> None:
    """Every message is eventually read by every reader (no timeout, no fairness)."""
    res = run_spin(tmp_path, "liveness")
    assert "never claim         \t+ (delivered)" in res.output, res.output
    assert "acceptance   cycles \t+" in res.output, res.output
    assert res.errors == 0, f"{res.first_error}\n{res.output}"


BROKEN = [
    # (variant, mode, the error pan must report)
    ("BROKEN_LATE_ANNOUNCE", "safety", "invalid end state"),
    ("BROKEN_LATE_ANNOUNCE", "liveness", "acceptance cycle"),
    ("BROKEN_ANNOUNCE_FIRST", "safety", "invalid end state"),
    ("BROKEN_ANNOUNCE_FIRST", "liveness", "acceptance cycle"),
    ("BROKEN_COUNT_EARLY", "safety", "invalid end state"),
    ("BROKEN_COUNT_EARLY", "liveness", "acceptance cycle"),
    ("BROKEN_NO_WAKE", "safety", "invalid end state"),
    ("BROKEN_NO_WAKE", "liveness", "acceptance cycle"),
    ("BROKEN_LATE_DRAIN", "safety", "invalid end state"),
    ("BROKEN_LATE_DRAIN", "liveness", "acceptance cycle"),
    ("BROKEN_LATE_MARK", "safety", "invalid end state"),
    ("BROKEN_LATE_MARK", "liveness", "acceptance cycle"),
    ("BROKEN_WRITER_LATE_FLAG", "safety", "invalid end state"),
    ("BROKEN_WRITER_LATE_FLAG", "liveness", "acceptance cycle"),
    ("BROKEN_EARLY_PUBLISH", "safety", "assertion violated"),
    ("BROKEN_EARLY_RELEASE", "safety", "assertion violated"),
    ("BROKEN_GATE", "safety", "assertion violated"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("variant", "mode", "expected"), BROKEN)
def test_broken_variant_is_caught(tmp_path: Path, variant: str, mode: str, expected: str) -> None:
    res = run_spin(tmp_path, mode, variant)
    assert res.errors >= 1, f"{variant} was not detected by the {mode} check:\n{res.output}"
    assert res.first_error.startswith(expected), (
        f"{variant}/{mode}: expected {expected!r}, got {res.first_error!r}"
    )
    assert list(tmp_path.glob("*.trail")), "pan wrote no error trail"
