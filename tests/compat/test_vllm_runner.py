"""tests_vllm/run.py, the runner of vLLM's own queue tests: how it reads the list of expected
failures and judges a run (without running vLLM's tests: make test-vllm does that)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "tests_vllm" / "run.py"


@pytest.fixture(scope="module")
def run() -> Any:
    spec = importlib.util.spec_from_file_location("tests_vllm_run", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_list_of_expected_failures_parses_and_gives_a_reason_for_each(run: Any) -> None:
    expected = run.read_expected(RUNNER.parent / "expected_failures.txt")
    assert expected, "the list is empty"
    for node, (category, reason) in expected.items():
        assert node.startswith("tests/distributed/test_") and "::" in node
        assert category == "internal" and len(reason) > 20, node


def test_a_malformed_line_is_refused(run: Any, tmp_path: Path) -> None:
    bad = tmp_path / "list.txt"
    bad.write_text("tests/x.py::t | remote | needs readers on other hosts\n")
    with pytest.raises(SystemExit, match=r"list\.txt:1"):
        run.read_expected(bad)


def test_a_run_is_judged_against_the_list(run: Any, capsys: pytest.CaptureFixture[str]) -> None:
    expected = {"t.py::internal": ("internal", "reads _spin_condition"),
                "t.py::fixed": ("internal", "reads buffer.get_metadata")}  # fmt: skip
    ok = {"t.py::a": "passed", "t.py::internal": "failed", "t.py::fixed": "failed"}
    assert run.report(ok, expected, "shmcast") == 0
    new_failure = {**ok, "t.py::a": "failed"}
    assert run.report(new_failure, expected, "shmcast") == 1
    now_passes = {**ok, "t.py::fixed": "passed"}
    assert run.report(now_passes, expected, "shmcast") == 1
    assert run.report({"t.py::a": "passed", "t.py::internal": "failed"}, expected, "shmcast") == 1
    out = capsys.readouterr().out
    assert "UNEXPECTED FAILURE" in out and "update expected_failures.txt" in out
    assert "not collected" in out


def test_junit_outcomes_are_read_per_test(run: Any, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.distributed.test_x" name="test_a"/>'
        '<testcase classname="tests.distributed.test_x" name="test_b[p]"><failure/></testcase>'
        '<testcase classname="tests.distributed.test_x" name="test_c"><skipped/></testcase>'
        '<testcase classname="tests.distributed.test_x" name="test_d"><error/></testcase>'
        "</testsuite></testsuites>"
    )
    assert run.outcomes(junit) == {
        "tests/distributed/test_x.py::test_a": "passed",
        "tests/distributed/test_x.py::test_b[p]": "failed",
        "tests/distributed/test_x.py::test_c": "skipped",
        "tests/distributed/test_x.py::test_d": "error",
    }
