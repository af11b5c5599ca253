"""Run vLLM's own queue tests against shmcast's MessageQueue (``make test-vllm``).

1. Download vLLM's source distribution from the package index (``pip download``; its tests are
   not in the wheel) into a scratch directory, and extract only the two test files of its
   queue: ``tests/distributed/test_shm_broadcast.py`` and ``test_mq_connect_ip.py``.
2. Put this directory's ``conftest.py`` beside them, and run them with pytest, with the shmcast
   plugin loaded in every process (``sitecustomize.py`` on ``PYTHONPATH``), so that every
   ``MessageQueue`` they build is shmcast's.
3. Compare each test's outcome with ``expected_failures.txt``: exit 1 if a test fails that is
   not listed there, or if a listed one passes; print the per-test table either way.

``--against vllm`` runs the same files against vLLM's own class (the plugin turned off with
``SHMCAST_VLLM=0``), to compare; nothing is expected to fail then.

Runs with the interpreter of the venv that has vLLM, torch and shmcast (``.venv-vllm``).
Nothing is written into the repository: the scratch directory is removed at the end
(``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM_VERSION = "0.33.0"
TEST_FILES = ("tests/distributed/test_shm_broadcast.py", "tests/distributed/test_mq_connect_ip.py")
#: Seconds any one test may take; the whole run takes about a minute on two cores.
TEST_TIMEOUT = 300
RUN_TIMEOUT = 1500


def download_sdist(dest: Path, version: str) -> Path:
    """vLLM's source distribution, fetched with pip.  Preparing its metadata needs torch and
    a few build tools in this venv (the Makefile installs them); ``VLLM_TARGET_DEVICE=empty``
    keeps its build from looking for CUDA, and the version override keeps pip from finding a
    "+empty" version instead of the one asked for."""
    env = dict(os.environ, VLLM_TARGET_DEVICE="empty", VLLM_VERSION_OVERRIDE=version)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
           "--no-build-isolation", "--no-deps", "--dest", str(dest),
           f"vllm=={version}"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL, timeout=900)
    found = sorted(dest.glob(f"vllm-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no vllm-{version}.tar.gz in {dest}")
    return found[0]


def extract_tests(sdist: Path, dest: Path) -> list[str]:
    """Extract only TEST_FILES (checked member by member; nothing else leaves the archive)."""
    wanted = {f"vllm-{VLLM_VERSION}/{name}": name for name in TEST_FILES}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = wanted.pop(member.name, None)
            if name is None:
                continue
            if not member.isfile():
                raise SystemExit(f"{member.name} in {sdist.name} is not a regular file")
            source = archive.extractfile(member)
            assert source is not None
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
    if wanted:
        raise SystemExit(f"{sdist.name} lacks {', '.join(sorted(wanted.values()))}")
    return list(TEST_FILES)


def read_expected(path: Path) -> dict[str, tuple[str, str]]:
    """``{node id: (category, reason)}`` from expected_failures.txt."""
    expected = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(" | ")]
        if len(fields) != 3 or fields[1] != "internal":
            raise SystemExit(f"{path.name}:{number}: expected 'node id | category | reason'")
        expected[fields[0]] = (fields[1], fields[2])
    return expected


def outcomes(junit: Path) -> dict[str, str]:
    """``{node id: passed | failed | error | skipped}`` from pytest's JUnit XML."""
    result = {}
    for case in ET.parse(junit).iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{path}::{case.get('name')}"
        if case.find("skipped") is not None:
            result[node] = "skipped"
        elif case.find("error") is not None:
            result[node] = "error"
        elif case.find("failure") is not None:
            result[node] = "failed"
        else:
            result[node] = result.get(node, "passed")
    return result


def run_pytest(work: Path, files: list[str], against: str, junit: Path) -> int:
    (work / "pytest.ini").write_text(f"[pytest]\ntimeout = {TEST_TIMEOUT}\naddopts = -ra\n")
    shutil.copy(HERE / "conftest.py", work / "conftest.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["SHMCAST_VLLM_EVERY_PROCESS"] = "1"
    env["VLLM_PLUGINS"] = "shmcast"  # vLLM's allow-list: only shmcast's plugin
    env["SHMCAST_VLLM"] = "1" if against == "shmcast" else "0"
    env["SHMCAST_VLLM_EXPECT"] = against
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
           f"--junitxml={junit}", *files]  # fmt: skip
    print(f"== running vLLM {VLLM_VERSION}'s queue tests against {against}'s MessageQueue")
    done = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
    return done.returncode


def report(results: dict[str, str], expected: dict[str, tuple[str, str]], against: str) -> int:
    """Print the per-test table; return the number of surprises."""
    surprises = 0
    print(f"\n== per-test results against {against}'s MessageQueue")
    for node, outcome in results.items():
        category, reason = expected.get(node, ("", ""))
        if against != "shmcast":
            category = reason = ""
        note = ""
        if outcome in ("failed", "error") and not category:
            note = "  <-- UNEXPECTED FAILURE"
            surprises += 1
        elif outcome == "passed" and category:
            note = "  <-- listed as an expected failure, but passed: update expected_failures.txt"
            surprises += 1
        label = f"{outcome} ({category}: {reason})" if category and outcome != "passed" else outcome
        print(f"{node}: {label}{note}")
    if against == "shmcast":
        for node in expected.keys() - results.keys():
            print(f"{node}: not run  <-- listed in expected_failures.txt but not collected")
            surprises += 1
    counts = {k: list(results.values()).count(k) for k in ("passed", "failed", "error", "skipped")}
    failed = [node for node, outcome in results.items() if outcome in ("failed", "error")]
    internal = sum(1 for node in failed if expected.get(node, ("",))[0] == "internal")
    failures = counts["failed"] + counts["error"]
    print(
        f"\nvLLM {VLLM_VERSION}'s queue tests against {against}'s MessageQueue: "
        f"{counts['passed']} passed, {counts['skipped']} skipped, {failures} not passed"
    )
    if against == "shmcast":
        print(
            f"of those not passed: {internal} read vLLM internals (listed in "
            f"expected_failures.txt), {surprises} unexpected"
        )
    return surprises


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", choices=("shmcast", "vllm"), default="shmcast")
    parser.add_argument("--sdist", type=Path, help="use this vllm sdist instead of downloading")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    expected = read_expected(HERE / "expected_failures.txt")
    work = Path(tempfile.mkdtemp(prefix="shmcast-vllm-tests-"))
    try:
        sdist = args.sdist or download_sdist(work / "download", VLLM_VERSION)
        files = extract_tests(sdist, work)
        junit = work / "junit.xml"
        run_pytest(work, files, args.against, junit)
        if not junit.exists():
            print("pytest wrote no results", file=sys.stderr)
            return 1
        surprises = report(outcomes(junit), expected if args.against == "shmcast" else {},
                           args.against)  # fmt: skip
        return 1 if surprises else 0
    finally:
        if args.keep:
            print(f"scratch directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
