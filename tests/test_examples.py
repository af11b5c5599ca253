"""The examples and the documentation's code run as written.

- every script in examples/ runs end to end in a subprocess and prints what it promises;
- every Python code block of README.md, docs/guide.md and docs/vllm.md marked runnable, that
  is preceded by a line ``<!-- runnable -->`` (optionally
  ``<!-- runnable needs="numpy" expect="text" -->``), is written to a file and run the same
  way; ``expect`` must appear in its output.

Scripts run in their own session with a timeout; on a timeout the whole process group (their
reader processes too) is killed and the test fails.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _procs import run_command

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS_WITH_RUNNABLE_CODE = [
    ROOT / "README.md",
    ROOT / "docs" / "guide.md",
    ROOT / "docs" / "vllm.md",
    ROOT / "docs" / "remote.md",
]
TIMEOUT = 90  # seconds per script (below pytest's own 120 s, so that this kills first)

#: What each example must print (every line listed must appear in its output).
EXAMPLE_OUTPUT: dict[str, list[str]] = {
    "broadcast.py": [
        "reader 0: 1000 messages, in order: True",
        "reader 1: 1000 messages, in order: True",
        "reader 2: 1000 messages, in order: True",
        "writer: sent 1000 messages to 3 readers",
    ],
    "zero_copy.py": [
        "reader 0: 20 frames, all as written: True",
        "reader 1: 20 frames, all as written: True",
        "writer: sent 20 frames of 2048 KiB without copying them",
    ],
    "custom_wait.py": [
        "reader 0 (futex): 2000 messages",
        "reader 1 (futex): 2000 messages",
        "futex: sent 2000 messages",
        "reader 0 (yield-then-sleep): 2000 messages",
        "reader 1 (yield-then-sleep): 2000 messages",
        "yield-then-sleep: sent 2000 messages",
    ],
    "asyncio_frontend.py": [
        "no reply before the first request (the wait was cancelled, nothing lost)",
        "front end: 100 requests answered by 2 workers, in order: True",
        "heartbeat kept ticking while the front end waited: True",
    ],
}


def run_python(script: Path, cwd: Path, env: dict[str, str] | None = None):
    """Run ``python SCRIPT``; kill its process group and fail the test if it overruns."""
    return run_command([sys.executable, str(script)], TIMEOUT, cwd=cwd, env=env)


def without_numpy(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import numpy`` fails, in the script and its children."""
    blocker = tmp_path / "no-numpy" / "numpy"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('numpy is blocked for this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(blocker.parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


# -- examples/ ------------------------------------------------------------------------------


def example_scripts() -> list[Path]:
    return sorted(EXAMPLES.glob("*.py"))


def test_every_example_has_expected_output():
    names = {p.name for p in example_scripts()}
    assert names, "examples/ has no scripts"
    assert names == set(EXAMPLE_OUTPUT), "add the new example's expected output to this file"


@pytest.mark.parametrize("script", example_scripts(), ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path):
    proc = run_python(script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in EXAMPLE_OUTPUT[script.name]:
        assert line in proc.stdout, f"{line!r} missing from:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_zero_copy_example_runs_without_numpy(tmp_path: Path):
    proc = run_python(EXAMPLES / "zero_copy.py", cwd=tmp_path, env=without_numpy(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in EXAMPLE_OUTPUT["zero_copy.py"]:
        assert line in proc.stdout, proc.stdout + proc.stderr


# -- runnable code blocks of the documentation ----------------------------------------------

MARKER = re.compile(r"^<!--\s*runnable\b(?P<attrs>.*?)-->\s*$")


@dataclass
class CodeBlock:
    doc: Path
    line: int  # of the opening fence, 1-based
    code: str
    expect: str
    needs: list[str]

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def runnable_blocks(doc: Path) -> list[CodeBlock]:
    """The code blocks of ``doc`` preceded by a runnable marker.  A marker not followed by a
    Python code block is an error (so that a marked example cannot silently stop running)."""
    lines = doc.read_text().splitlines()
    blocks = []
    for i, text in enumerate(lines):
        m = MARKER.match(text)
        if not m:
            continue
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group("attrs")))
        fence = i + 1
        if fence >= len(lines) or lines[fence].strip() != "```python":
            raise AssertionError(f"{doc}:{i + 1}: runnable marker not followed by ```python")
        end = next((j for j in range(fence + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{doc}:{fence + 1}: unterminated code block")
        blocks.append(
            CodeBlock(
                doc=doc,
                line=fence + 1,
                code="\n".join(lines[fence + 1 : end]) + "\n",
                expect=attrs.get("expect", ""),
                needs=[n for n in attrs.get("needs", "").split(",") if n],
            )
        )
    return blocks


ALL_BLOCKS = [b for doc in DOCS_WITH_RUNNABLE_CODE for b in runnable_blocks(doc)]


@pytest.mark.parametrize("doc", DOCS_WITH_RUNNABLE_CODE, ids=lambda p: p.name)
def test_doc_has_runnable_code(doc: Path):
    assert runnable_blocks(doc), f"{doc.name} has no runnable code block"


def test_readme_usage_example_is_runnable():
    readme = [b for b in ALL_BLOCKS if b.doc.name == "README.md"]
    assert any("BroadcastQueue.attach" in b.code and "mp.get_context" in b.code for b in readme)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_doc_code_block_runs(block: CodeBlock, tmp_path: Path):
    for module in block.needs:
        pytest.importorskip(module)
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    proc = run_python(script, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block.id} failed:\n{output}"
    assert block.expect in proc.stdout, f"{block.id}: {block.expect!r} not printed:\n{output}"
    assert "Traceback" not in proc.stderr, output
